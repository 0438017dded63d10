"""The zoo's builds as Ray tasks: a local Ray instance by default, the cluster at $RAY_ADDRESS when set.

Each task declares its memory (plan.build_memory) and one CPU, so Ray runs as many builds at once as
the nodes' memory and cores allow. A task runs `python -m generator build ...` in a subprocess: a build
that crashes or is killed for memory fails that task only. On a cluster, every node needs this project
at the same path (the task runs its interpreter and code from there) and the output root on a shared
filesystem.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ..errors import GeneratorError
from ..paths import PROJECT_ROOT

OBJECT_STORE_BYTES = 80 * 2**20  # results are small dicts; Ray's default takes 30% of RAM


def _env_vars() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}


def _reachable(address: str, timeout: float = 5.0) -> str | None:
    """None if a TCP connection to host:port of `address` opens, else why not (Ray itself would retry
    for a minute before failing)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None  # "auto", "local" or a form Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def start(num_cpus: int | None = None) -> str:
    """Ray for the zoo: the session already running in this process, else the cluster at $RAY_ADDRESS,
    else a local instance (small object store, no dashboard, this machine's cores). Returns a description."""
    try:
        import ray
    except ImportError:
        raise GeneratorError("The zoo runs its builds on Ray, which is not installed: "
                             "`.venv/bin/pip install -r requirements.txt`.") from None
    if ray.is_initialized():
        return "the Ray session of this process"
    address = os.environ.get("RAY_ADDRESS", "").strip()
    runtime_env = {"env_vars": _env_vars()}
    if address:
        why = _reachable(address)
        if why is None:
            try:
                ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
                return f"the Ray cluster at RAY_ADDRESS={address}"
            except Exception as exc:  # noqa: BLE001 (Ray raises ConnectionError, RuntimeError, ...)
                why = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise GeneratorError(f"RAY_ADDRESS={address}: cannot connect to a Ray cluster there ({why}). Unset "
                             f"RAY_ADDRESS to build on a local Ray instance, or start the cluster's head "
                             f"(`ray start --head`) and give its address; a cluster with token authentication "
                             f"(Ray's default) also needs RAY_AUTH_MODE=token and its token (~/.ray/auth_token "
                             f"or RAY_AUTH_TOKEN).")
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES,
             include_dashboard=False, runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
    return f"a local Ray instance ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def largest_node_memory() -> int:
    import ray

    return int(max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0))


def build_task(argv: list[str], cwd: str, log_path: str) -> dict[str, Any]:
    """One build in a subprocess, its output in `log_path`; the result with the error line on failure."""
    import subprocess
    import sys
    import time

    env = dict(os.environ, **_env_vars())
    env.setdefault("COLUMNS", "200")
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        res = subprocess.run([sys.executable, "-m", "generator", "build", *argv], cwd=cwd, env=env, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    error = None
    if res.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
        error = (errors or lines or [f"exit status {res.returncode}"])[-1]
        if res.returncode < 0:
            error = f"killed by signal {-res.returncode} (out of memory?); last line: {error}"
    return {"status": "built" if res.returncode == 0 else "failed", "error": error, "seconds": round(seconds, 2),
            "host": socket.gethostname()}


def run_all(todo: list[tuple[Any, Any, dict, int]], state, log) -> dict[str, dict]:
    """Every job as a Ray task, results as they finish; a failed one does not stop the others."""
    import ray

    remote = ray.remote(build_task)
    cap = largest_node_memory()
    pending = {}
    for job, _r, key, memory in todo:
        if cap and memory > cap:
            log(f"[yellow]{job.label}: needs about {memory / 2**30:.1f} GiB, more than the largest node's "
                f"{cap / 2**30:.1f} GiB; declared as {cap / 2**30:.1f} GiB (it may run out of memory)[/]")
            memory = cap
        ref = remote.options(num_cpus=1, memory=memory, max_retries=0).remote(
            job.argv(), str(PROJECT_ROOT), str(state.log_path(job)))
        pending[ref] = (job, key)
    results = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job, key = pending.pop(ready[0])
        try:
            res = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 (the worker died: Ray's error, one line)
            res = {"status": "failed", "error": f"Ray task failed: {' '.join(str(exc).split())[:300]}", "seconds": 0.0}
        if res["status"] == "built":
            state.record(job, key)
            log(f"[green]{job.label}: built in {res['seconds']:.1f} s[/]")
        else:
            log(f"[red]{job.label}: FAILED[/]: {res['error']} (log: {state.log_path(job)})")
        results[job.label] = res
    return results
