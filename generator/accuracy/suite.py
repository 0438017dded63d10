"""`make accuracy MODEL=...` (`python -m generator accuracy --model ...`): build the model once per
configuration of data/accuracy.yaml (s8, s4 RTN, s4 calibrated, fp8, an auto mix) into
out/accuracy/<model>_<label>, then one report over all of them.

Builds run as `python -m generator build` processes (-c 0: the report is the check here); adding a
configuration is a line of data. A build that fails is reported and left out of the report.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ..errors import GeneratorError
from ..names import safe_name
from .run import settings


def _env() -> dict:
    import os

    from ..paths import PROJECT_ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("COLUMNS", "200")
    return env


def configurations() -> list[dict]:
    confs = settings().get("configurations") or []
    for c in confs:
        if not isinstance(c, dict) or not isinstance(c.get("label"), str) or not isinstance(c.get("flags"), list):
            raise GeneratorError(f"data/accuracy.yaml: each configuration needs a label and a list of flags, got {c!r}")
    return confs


def build_all(model: str, chip: str, out_root: Path, reuse: bool, log) -> list[tuple[str, Path]]:
    """(label, bundle folder) of every configuration that could be built."""
    built = []
    for conf in configurations():
        label = conf["label"]
        out = out_root / f"{safe_name(model, '--model')}_{label}"
        if reuse and (out / "manifest.json").is_file():
            log(f"{label}: reusing {out}")
            built.append((label, out))
            continue
        cmd = [sys.executable, "-m", "generator", "build", model, "--chip", chip, "-c", "0", "--no-progress",
               "--output_path", str(out), *map(str, conf["flags"])]
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            log(f"[red]build of {label} failed[/] ({' '.join(cmd[3:])}): {' / '.join(tail)}")
            continue
        log(f"{label}: built {out} in {time.perf_counter() - t:.0f} s")
        built.append((label, out))
    if not built:
        raise GeneratorError(f"make accuracy: no configuration of {model} could be built (see the notes above).")
    return built
