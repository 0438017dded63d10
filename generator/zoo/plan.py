"""What each zoo job needs before it is scheduled: its resolved build (from the driver, no weights read),
the memory its build task declares to Ray, and whether its bundle is already up to date.

Up to date (skipped) means: the bundle's manifest.json is the one this zoo recorded after building it
(sha256 of the file, in <output_root>/.zoo/<bundle>.json), and what the manifest records still holds
now: its tool versions (`tools`), its recipe's sha256 (flattened, parents merged) and its options
equal today's, and the inputs' sha256 and the build arguments equal what the zoo recorded at that
build. Hashing a multi-GB checkpoint on every run would cost more than a small build, so input file
hashes are cached in <output_root>/.zoo/hashes.json by (path, size, mtime_ns), as git's index does:
a file whose size and mtime are unchanged is not read again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import GeneratorError
from .schema import Job

GIB = 2**30


class State:
    """<output_root>/.zoo/: the input hash cache, one stamp per built bundle, the build logs."""

    def __init__(self, out_root: Path):
        self.dir = out_root / ".zoo"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hash_file = self.dir / "hashes.json"
        try:
            self.hashes: dict[str, list] = json.loads(self.hash_file.read_text()) if self.hash_file.is_file() else {}
        except ValueError:
            self.hashes = {}  # a damaged cache only costs re-hashing

    def sha256(self, path: Path) -> str:
        from ..inputs.source import sha256_file

        st = path.stat()
        key = str(path.resolve())
        hit = self.hashes.get(key)
        if isinstance(hit, list) and len(hit) == 3 and hit[:2] == [st.st_size, st.st_mtime_ns]:
            return hit[2]
        digest = sha256_file(path)
        self.hashes[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def save(self):
        self.hash_file.write_text(json.dumps(self.hashes, indent=0, sort_keys=True))

    def stamp_path(self, job: Job) -> Path:
        return self.dir / f"{job.label}.json"

    def log_path(self, job: Job) -> Path:
        return self.dir / f"{job.label}.log"

    def stamp(self, job: Job) -> dict[str, Any] | None:
        try:
            return json.loads(self.stamp_path(job).read_text())
        except (OSError, ValueError):
            return None

    def record(self, job: Job, key: dict[str, Any]):
        """After a successful build: the key it was built for and the manifest it wrote."""
        manifest = Path(job.out_dir) / "manifest.json"
        self.stamp_path(job).write_text(json.dumps(
            {"key": key, "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}, indent=1))


def resolve_job(job: Job):
    """pipeline.resolve for the job (checkpoint opened lazily, flags checked against the chip): a
    GeneratorError here is the build's own error, reported without starting a task."""
    from ..pipeline import resolve
    from ..resolve.options import parse_overrides

    flags = job.flags.model_dump(exclude_none=True)
    flags.pop("quant_method", None), flags.pop("kld_budget", None)  # build-only: resolve never sees them
    overrides = parse_overrides(flags.pop("override", None))
    return resolve(model=job.variant, input_path=job.input, chip=job.chip, synthetic=job.synthetic,
                   output_path=job.out_dir, weight_type="s8" if job.weight_type == "auto" else job.weight_type,
                   flag_overrides=overrides, **flags)


def inputs_key(job: Job, r, state: State) -> dict[str, str]:
    """sha256 of every file of the input (a folder's top-level files, or the .gguf), cached."""
    if r.ckpt.kind == "synthetic":
        return {"synthetic": job.variant or "", **r.ckpt.fingerprint()}
    src = Path(job.input or r.ckpt.source)
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    return {str(f): state.sha256(f) for f in files}


def job_key(job: Job, r, state: State) -> dict[str, Any]:
    return {"argv": job.argv(), "inputs": inputs_key(job, r, state)}


def stale_reason(job: Job, r, key: dict[str, Any], state: State) -> str | None:
    """None if the bundle is up to date (skip it), else why it is (re)built."""
    from ..export.bundle import recipe_sha256, tool_versions

    manifest = Path(job.out_dir) / "manifest.json"
    if not manifest.is_file():
        return "not built yet"
    stamp = state.stamp(job)
    raw = manifest.read_bytes()
    if stamp is None or stamp.get("manifest_sha256") != hashlib.sha256(raw).hexdigest():
        return "its manifest is not the one this zoo recorded"
    try:
        m = json.loads(raw)
    except ValueError:
        return "unreadable manifest"
    if stamp.get("key") != key:
        return "inputs or build arguments changed"
    if m.get("tools") != tool_versions():
        return "tool versions changed"
    if (m.get("recipe") or {}).get("sha256") != recipe_sha256(r.recipe):
        return "recipe changed"
    want = json.loads(json.dumps(r.opts.model_dump()))
    decided = {"weight_type", "overrides"} if job.weight_type == "auto" else set()  # -w auto: chosen by the build
    if any(want.get(k) != v for k, v in (m.get("options") or {}).items() if k not in decided):
        return "options changed"
    checks = m.get("checks")
    if job.check_level > 0 and not m.get("checks_skipped") and (not checks or not checks.get("passed")
                                                                 or checks.get("level", 0) < job.check_level):
        return f"checks at level {job.check_level} missing or failed"
    return None


def build_memory(r, check_level: int) -> int:
    """Bytes the build task declares to Ray (its `memory` resource), so Ray never packs builds past a
    node's memory: a base for the interpreter and libraries, fp32 copies of the largest tensors a
    streamed build holds at once (the embedding / lm_head and a few layers), and for checks the fp32
    transformers reference of the whole model (checks load it)."""
    spec = r.spec
    head = spec.vocab_size * spec.hidden_size * 4
    layer = spec.layer_params * 4
    need = 1.5 * GIB + 3 * head + 4 * layer
    if check_level > 0:
        need += 1.5 * 4 * (spec.num_hidden_layers * spec.layer_params + 2 * spec.vocab_size * spec.hidden_size)
    return int(need)


def plan(jobs: list[Job], state: State, log) -> tuple[list[tuple[Job, Any, dict, int]], dict[str, dict]]:
    """(jobs to build: job, resolved, key, memory), and the results known already: skipped (up to date)
    and failed before building (the build's own error from resolving it)."""
    todo, done = [], {}
    for job in jobs:
        try:
            r = resolve_job(job)
            key = job_key(job, r, state)
        except GeneratorError as exc:
            done[job.label] = {"status": "failed", "error": str(exc), "seconds": 0.0}
            log(f"[red]{job.label}: failed before building[/]: {exc}")
            continue
        why = stale_reason(job, r, key, state)
        if why is None:
            done[job.label] = {"status": "skipped", "error": None, "seconds": 0.0}
            log(f"{job.label}: up to date, skipped")
            continue
        memory = build_memory(r, job.check_level)
        log(f"{job.label}: to build ({why}; declares {memory / GIB:.1f} GiB of memory to Ray)")
        todo.append((job, r, key, memory))
    state.save()
    return todo, done
