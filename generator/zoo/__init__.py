"""The model zoo (`python -m generator zoo ZOO.yaml`, `make zoo ZOO=zoo.yaml`): a matrix of variants x chips
x weight types built as Ray tasks, resumable, then one index of every bundle.

schema.py reads and checks the zoo file and expands the matrix (unknown variants or chips fail before
any engine starts); plan.py resolves each job in the driver (its flags checked against the chip, its
build memory estimated) and skips bundles that are up to date; engine.py runs the rest as Ray tasks,
each build a `python -m generator build` subprocess; index.py writes index.md / index.html / index.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import GeneratorError


def add_zoo_args(p: argparse.ArgumentParser):
    p.add_argument("zoo", help="zoo file (YAML: models x chips x weight types; see README 'Model zoo') (required)")
    p.add_argument("--num_cpus", type=int, help="CPUs of the local Ray instance (default: this machine's; ignored "
                   "with RAY_ADDRESS, where the cluster's are used)")


def run_zoo(path: str | Path, console: Console | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Build the zoo file's matrix; returns {"results": label -> result, "index": [paths], "jobs": [...]}."""
    from . import engine
    from .index import write_index
    from .plan import State, plan
    from .schema import expand, read_zoo

    console = console or Console(stderr=True)
    log = lambda s: console.print(s, highlight=False, soft_wrap=True)  # noqa: E731
    zoo = read_zoo(path)
    jobs = expand(zoo, path, Path.cwd())
    out_root = Path(jobs[0].out_dir).parent
    state = State(out_root)
    todo, results = plan(jobs, state, log)
    where = "nothing (every bundle up to date or failed before building)"
    if todo:
        where = engine.start(num_cpus)
        log(f"zoo: building {len(todo)} on {where}")
        results.update(engine.run_all(todo, state, log))
    index = write_index(out_root, jobs, results, where)
    return {"results": results, "index": index, "jobs": jobs}


def zoo(args) -> int:
    if args.num_cpus is not None and args.num_cpus < 1:
        raise GeneratorError(f"--num_cpus must be at least 1, got {args.num_cpus}.")
    out = run_zoo(args.zoo, num_cpus=args.num_cpus)
    results = out["results"]
    failed = [k for k, r in results.items() if r["status"] == "failed"]
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("built", "skipped", "failed")}
    Console().print(f"[bold]zoo[/]: {counts['built']} built, {counts['skipped']} up to date, {counts['failed']} failed; "
                    f"index {out['index'][0]} and {out['index'][1].name}", highlight=False, soft_wrap=True)
    return 1 if failed else 0
