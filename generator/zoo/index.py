"""The zoo index: <output_root>/index.md, index.html (templates/zoo_index.*.j2) and index.json, one row
per bundle: model, chip, weight type, what happened this run, size, build time, check results,
accuracy (report/accuracy.json, when `make accuracy` measured it) and the predicted board speed and
memory (report/predicted.json, else generator.predict on the bundle when that module exists, else "-")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..paths import TEMPLATES_DIR
from .schema import Job


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def accuracy_of(bundle: Path) -> str:
    doc = _json(bundle / "report" / "accuracy.json")
    rows = doc.get("bundles") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        return "-"
    mine = [r for r in rows if isinstance(r, dict) and Path(str(r.get("bundle", ""))).name == bundle.name]
    row = mine[0] if mine else (rows[0] if len(rows) == 1 else None)
    if not isinstance(row, dict) or "kld_mean" not in row:
        return "-"
    return f"KLD {row['kld_mean']:.4f}, top-1 {100 * row.get('top1_agreement', 0):.1f}%"


def predicted_of(bundle: Path) -> dict[str, Any] | None:
    p = _json(bundle / "report" / "predicted.json")
    if isinstance(p, dict) and "decode_tok_s" in p:
        return p
    import importlib

    try:  # generator/predict.py (the cost model), where this checkout has it
        predict_bundle = importlib.import_module("generator.predict").predict_bundle
    except (ImportError, AttributeError):
        return None
    try:
        return predict_bundle(bundle)
    except Exception:  # noqa: BLE001 (a prediction is extra information; the index is written regardless)
        return None


def checks_of(manifest: dict[str, Any]) -> str:
    if manifest.get("checks_skipped"):
        return "skipped"
    c = manifest.get("checks")
    if not c:
        return "-"
    return f"passed (level {c.get('level')})" if c.get("passed") else f"FAILED: {'; '.join(map(str, c.get('failures') or []))[:200]}"


def row(job: Job, result: dict[str, Any]) -> dict[str, Any]:
    bundle = Path(job.out_dir)
    out = {"bundle": job.label, "path": str(bundle), "model": job.variant or Path(job.input or "").name,
           "input": job.input or ("synthetic" if job.synthetic else "embedded"), "chip": job.chip,
           "weight_type": job.weight_type, "status": result["status"], "error": result.get("error"),
           "task_seconds": result.get("seconds"), "size_mib": None, "build_seconds": None, "checks": "-",
           "accuracy": "-", "predicted": None}
    manifest = _json(bundle / "manifest.json") if result["status"] != "failed" else None
    if isinstance(manifest, dict):
        out["model"] = manifest.get("model", out["model"])
        out["size_mib"] = round(sum(f.get("bytes", 0) for f in (manifest.get("files") or {}).values()) / 2**20, 1)
        out["build_seconds"] = manifest.get("build_seconds")
        out["checks"] = checks_of(manifest)
        out["accuracy"] = accuracy_of(bundle)
        out["predicted"] = predicted_of(bundle)
    return out


def write_index(out_root: Path, jobs: list[Job], results: dict[str, dict], where: str) -> list[Path]:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    rows = [row(j, results[j.label]) for j in jobs]
    env = Environment(loader=FileSystemLoader(str(TEMPLATES_DIR)), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["cell"] = lambda v: "-" if v is None else str(v).replace("|", "\\|").replace("\n", " ")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("built", "skipped", "failed")}
    ctx = {"rows": rows, "counts": counts, "where": where}
    paths = [out_root / "index.md", out_root / "index.html", out_root / "index.json"]
    paths[0].write_text(env.get_template("zoo_index.md.j2").render(**ctx), encoding="utf-8")
    paths[1].write_text(env.get_template("zoo_index.html.j2").render(**ctx), encoding="utf-8")
    paths[2].write_text(json.dumps({"counts": counts, "bundles": rows}, indent=1, ensure_ascii=False) + "\n",
                        encoding="utf-8")
    return paths
