"""The conformance table: every family x check x build, with the largest error the tests measured.

tests/test_families.py (and tests/test_vision_*.py, rows `<family>/vision`) record their measurements here while they run (several pytest workers may
record at once: updates are serialised with a file lock) into docs/conformance.json, and renders
docs/conformance.md from it. Errors are stored rounded *up* to one significant digit on the
1-2-5 ladder (an upper bound), so reruns on the same software write the same file and the docs
only change when a result really moves. The committed table is the baseline: `growth` says when a
measured error outgrows it by more than data/conformance.yaml allows. `python -m generator list
--verified` prints the table.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from ..paths import DATA_DIR, DOCS_DIR

DOCS = DOCS_DIR
GROWTH = DATA_DIR / "conformance.yaml"
CHECKS = {  # check -> what it compares
    "layers": "every layer's K_cache_out / V_cache_out / output in every shape group (decode + all prefill "
              "groups), fed the reference's own inputs",
    "switches": "positions exactly at every boundary, each layer fed the reference's inputs: the last KV row, "
                "each prefill group filled to its cap, the sliding window's edge, the longrope switch",
    "logits": "the post graph (final norm + head + softcap) on the reference's last hidden state",
    "end_to_end": "the local runner over a cached system prompt and two turns in several prefill chunks, "
                  "every step's logits (teacher-forced)",
}
VISION_CHECKS = {  # the vision part of a vision-language family, recorded as "<family>/vision" by tests/test_vision_*.py
    "vision": "the vision graph(s) on a picture made by code vs the reference's vision tower + projector or "
              "resampler: the worst cosine over the image tokens, the max relative error over all of them",
    "image_end_to_end": "a picture + prompt through the local runner's Chat (image rows over the image-context "
                        "embeddings, cached system prompt) vs the reference: the first step's logits teacher-forced; "
                        "the greedy tokens must match too (generate's min_prefix)",
}
BUILDS = ("fp32", "s8")
ORDER = [*CHECKS, *VISION_CHECKS]


def docs_dir() -> Path:
    return Path(os.environ.get("AXGEN_CONFORMANCE_DIR") or DOCS)


def bound(x: float) -> str:
    """Round up to one significant digit on the 1-2-5 ladder: 3.1e-06 -> '5e-06'."""
    if x <= 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    e = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if x <= m * 10.0 ** e * (1 + 1e-9):
            return f"{m if m < 10 else 1}e{e + (m == 10):+03d}"
    return f"1e{e + 1:+03d}"


@contextmanager
def _locked():
    lock = Path(tempfile.gettempdir()) / "axgen-conformance.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(directory: Path | None = None) -> dict[str, Any]:
    path = (directory or docs_dir()) / "conformance.json"
    if not path.is_file():
        return {"families": {}}
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def committed() -> dict[str, Any]:
    """docs/conformance.json as committed (git HEAD): the baseline. Outside a git checkout, the file
    as this process first finds it (each family/check/build is written once per test session)."""
    try:
        shown = subprocess.run(["git", "show", "HEAD:docs/conformance.json"], cwd=DOCS.parent, capture_output=True,
                               text=True, timeout=60, check=True)
        return json.loads(shown.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return load(DOCS)


def growth(family: str, build: str, check: str, max_rel_err: float, limit: float) -> str | None:
    """Why `max_rel_err` outgrows the committed value of the same cell, or None."""
    old = committed()["families"].get(family, {}).get("checks", {}).get(check, {}).get(build)
    if not old:
        return None
    rule = yaml.safe_load(GROWTH.read_text(encoding="utf-8"))
    base = max(float(old["max_rel_err"]), rule["noise_fraction"] * limit)
    if max_rel_err <= rule["max_growth"] * base:
        return None
    return (f"{family} {check} {build}: max rel err {max_rel_err:.2e} is more than {rule['max_growth']}x the committed "
            f"{old['max_rel_err']} (docs/conformance.json; baseline at least {rule['noise_fraction']} x the limit "
            f"{limit:g}, {GROWTH.name})")


def record(family: str, build: str, check: str, *, max_rel_err: float, min_cosine: float, passed: bool,
           reference: str, quirks: list[str], thresholds: dict[str, float]):
    """Store one measurement and re-render the markdown (safe with concurrent test workers); returns
    `growth`'s complaint about it, or None."""
    complaint = growth(family, build, check, max_rel_err, thresholds["max_rel_err"])  # before this run writes
    directory = docs_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with _locked():
        data = load(directory)
        fam = data["families"].setdefault(family, {})
        fam["reference"] = reference
        fam["quirks"] = list(quirks)
        fam.setdefault("checks", {}).setdefault(check, {})[build] = {
            "max_rel_err": bound(max_rel_err), "one_minus_cosine": bound(max(0.0, 1.0 - min_cosine)),
            "limits": {"max_rel_err": thresholds["max_rel_err"], "min_cosine": thresholds["min_cosine"]},
            "passed": bool(passed)}
        data["families"] = dict(sorted(data["families"].items()))
        for f in data["families"].values():
            f["checks"] = {c: dict(sorted(v.items())) for c, v in sorted(f["checks"].items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99)}
        text = json.dumps(data, indent=1, ensure_ascii=False, sort_keys=False) + "\n"
        _write(directory / "conformance.json", text)
        _write(directory / "conformance.md", render(data))
    return complaint


def _write(path: Path, text: str):
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(family, check, fp32 max rel err, s8 max rel err, status) per family and check."""
    out = []
    for family, fam in data["families"].items():
        for check, builds in fam.get("checks", {}).items():
            cells = [f"{builds[b]['max_rel_err']} (limit {builds[b]['limits']['max_rel_err']:g})" if b in builds else "-"
                     for b in BUILDS]
            ok = all(v["passed"] for v in builds.values())
            out.append((family, check, *cells, "pass" if ok else "FAIL"))
    return out


def render(data: dict[str, Any]) -> str:
    lines = [
        "# Conformance: every family against a reference implementation",
        "",
        "Generated by `tests/test_families.py` and `tests/test_vision_*.py` (`make test`); do not edit",
        "by hand. Each family is a tiny random-weight model with every quirk of the family active (see",
        "`tests/test_families.py`; the vision rows: `tests/test_vision_*.py`), built",
        "as a bundle and compared with its reference: transformers' own implementation, or for",
        "remote-code families a transformers architecture that computes the same function with the",
        "checkpoint's tensors re-laid out (the equivalence is written in the test). Errors are the",
        "largest relative error (max |ours - ref| / max |ref|), rounded up on the 1-2-5 ladder (so a",
        "shown bound may exceed the limit the exact value met); cosine limits are checked too.",
        "Builds: fp32 (fp32 weights and hidden states), s8 (int8 weights, bf16 hidden states, the",
        "board default). Thresholds: `generator/data/tolerances.yaml`. The committed table is also the",
        "baseline: an error that outgrows its committed value by more than `generator/data/conformance.yaml`",
        "allows fails the test, even within the thresholds.",
        "",
        "Checks:",
        "",
    ]
    lines += [f"- **{c}**: {what}" for c, what in CHECKS.items()]
    lines += ["", "Vision rows (`<family>/vision`, written by `tests/test_vision_*.py`): a tiny random",
              "vision-language model per family, its vision part built at the test's image size; s8 there",
              "means int8 weights with fp32 hidden states.", ""]
    lines += [f"- **{c}**: {what}" for c, what in VISION_CHECKS.items()]
    lines += ["", "| family | check | fp32 max rel err | s8 max rel err | status |", "|---|---|---|---|---|"]
    lines += [f"| {f} | {c} | {a} | {b} | {s} |" for f, c, a, b, s in rows(data)]
    lines += ["", "## References and quirks exercised", "", "| family | reference | quirks active in the test model |",
              "|---|---|---|"]
    for family, fam in data["families"].items():
        lines.append(f"| {family} | {fam.get('reference', '')} | {'; '.join(fam.get('quirks', []))} |")
    return "\n".join(lines) + "\n"


def print_conformance(console) -> None:
    from rich.table import Table

    data = load()
    if not data["families"]:
        console.print("No conformance results yet: run `make test` (tests/test_families.py writes docs/conformance.md).")
        return
    table = Table(title="conformance vs reference implementations: max relative error (rounded up)",
                  caption="details, references and limits: docs/conformance.md")
    for col in ("family", "check", *BUILDS, "status"):
        table.add_column(col)
    for family, fam in data["families"].items():
        for check, builds in fam.get("checks", {}).items():
            ok = all(v["passed"] for v in builds.values())
            table.add_row(family, check, *[builds[b]["max_rel_err"] if b in builds else "-" for b in BUILDS],
                          "pass" if ok else "FAIL", style="" if ok else "bold red")
    console.print(table)
    for family, fam in data["families"].items():
        console.print(f"  {family}: {fam.get('reference', '')}", highlight=False)
