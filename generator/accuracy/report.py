"""The accuracy report as people read it: report/accuracy.json, report/accuracy.png and a table.

Several bundles (weight types, methods, numerics) go in one report, side by side; every bundle's
report/ folder gets the whole comparison. The JSON holds each bundle's figures (KLD mean, p50/p90/p99,
max, top-1 agreement, perplexity of ours and of the reference) and how it was measured; the PNG, per
bundle, the distribution of the per-position KL divergence (log scale) and the top-1 agreement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from ..export.bundle import dest, write_text
from .run import Result


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def weights_text(r: Result) -> str:
    """The weight type, with the per-weight overrides (a mix, --override, -w auto) counted by type; a
    calibration method is named next to the type it calibrated (a GPTQ checkpoint holds one bit width)."""
    over = r.info.get("overrides") or {}
    method, calibrated = r.info.get("quant_method"), r.info.get("quant_type")

    def named(t: str) -> str:
        return f"{t} {method}" if method and method != "rtn" and t == calibrated else t

    base = named(r.weight_type)
    if not over:
        return base
    counts: dict[str, int] = {}
    for t in over.values():
        counts[t] = counts.get(t, 0) + 1
    return f"{base} + " + ", ".join(f"{named(t)} x{n}" for t, n in sorted(counts.items()))


def summary_line(r: Result) -> str:
    """One bundle's figures in one line (the -c 2 report and bench notes use it)."""
    m = r.metrics
    return (f"KLD mean {fmt(m['kld_mean'], '.4f')}, p99 {fmt(m['kld_p99'], '.3f')}, top-1 {m['top1_agreement']:.3f}, "
            f"ppl {fmt(m['ppl'], '.2f')} (ref {fmt(m['ppl_ref'], '.2f')}) over {m['n_tokens']} tokens")


def print_table(console: Console, results: list[Result], title: str = "accuracy vs the fp32 reference "
                "(teacher-forced; KLD: KL(ref || ours), lower is better)"):
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("bundle", "weights", "numerics", "KLD mean", "KLD p99", "top-1", "ppl", "ref ppl", "tokens", "s"):
        table.add_column(col, justify="left" if col in ("bundle", "weights", "numerics") else "right", no_wrap=True)
    for r in results:
        m = r.metrics
        table.add_row(r.label, weights_text(r), r.numerics, fmt(m["kld_mean"], ".4f"), fmt(m["kld_p99"], ".3f"),
                      f"{m['top1_agreement']:.3f}", fmt(m["ppl"], ".2f"), fmt(m["ppl_ref"], ".2f"), str(m["n_tokens"]),
                      f"{r.info.get('bundle_seconds', 0):.1f}")
    console.print(table)
    for r in results:
        if r.info.get("note"):
            console.print(f"{r.label}: {r.info['note']}", highlight=False)


def plot(results: list[Result], path: Path, title: str):
    """Left: each bundle's per-position KLD distribution (box plot, log scale); right: top-1 agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-8  # exact agreement, shown at the bottom of the log scale
    labels = [f"{r.label}\n{weights_text(r)}, {r.numerics}" for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(results) + 4), 5),
                                      gridspec_kw={"width_ratios": [2, 1]})
    data = [np.maximum(r.kld, floor) if r.kld is not None else np.array([]) for r in results]
    left.boxplot(data, whis=(1, 99), showmeans=True, showfliers=False)
    first = next((i for i, r in enumerate(results, start=1) if r.kld is not None), None)
    for i, r in enumerate(results, start=1):
        if r.kld is not None:
            left.scatter([i], [max(r.metrics["kld_p99"], floor)], marker="_", s=300, color="red", zorder=5,
                         label="p99" if i == first else None)
    left.set_xticks(range(1, len(results) + 1), labels, fontsize=8)
    for i, r in enumerate(results, start=1):
        if r.kld is None:  # post_topk: no full logits (run.py)
            left.text(i, 0.5, "no KLD:\npost_topk > 0", ha="center", va="center", fontsize=8,
                      transform=left.get_xaxis_transform())
    if any(r.kld is not None for r in results):
        left.set_yscale("log")
    left.set_ylabel("KL(ref || ours) per position (nats)")
    left.set_title("KLD distribution (box: p25-p75, whiskers: p1-p99, triangle: mean)", fontsize=9)
    left.grid(alpha=0.3, axis="y")
    if any(r.kld is not None for r in results):
        left.legend(fontsize=8, loc="upper left")
    top1 = [r.metrics["top1_agreement"] for r in results]
    bars = right.bar(range(len(results)), top1, color="tab:blue")
    right.bar_label(bars, labels=[f"{v:.3f}" for v in top1], fontsize=8)
    right.set_xticks(range(len(results)), labels, fontsize=8, rotation=0)
    right.set_ylim(min(top1 + [0.9]) - 0.05, 1.02)
    right.set_ylabel("top-1 agreement with the reference")
    right.set_title("top-1 agreement", fontsize=9)
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report_json(evaluation: dict[str, Any], text_name: str) -> dict[str, Any]:
    return {"text": text_name, **evaluation["settings"], "bundles": [r.as_json() for r in evaluation["results"]]}


def write_reports(evaluation: dict[str, Any], text_name: str, model: str | None = None) -> list[Path]:
    """report/accuracy.json and report/accuracy.png (the whole comparison) in every bundle's folder; in fast
    numerics accuracy_fast.json / .png, so the board-numerics report stays."""
    results: list[Result] = evaluation["results"]
    stem = "accuracy" if evaluation["settings"]["numerics"] == "board" else f"accuracy_{evaluation['settings']['numerics']}"
    doc = json.dumps(report_json(evaluation, text_name), indent=1, ensure_ascii=False)
    title = (f"{model or results[0].label}: accuracy vs fp32 reference, {results[0].metrics['n_tokens']} tokens of "
             f"{text_name}, {evaluation['settings']['numerics']} numerics")
    written, png = [], None
    for r in results:
        if r.info.get("peer"):  # llama.cpp (peers.py): in the report, no bundle folder of its own
            continue
        folder = dest(Path(r.bundle), "report")
        folder.mkdir(exist_ok=True)
        write_text(dest(folder, f"{stem}.json"), doc)
        target = dest(folder, f"{stem}.png")
        if png is None:
            plot(results, target, title)
            png = target
        else:
            target.write_bytes(png.read_bytes())
        written += [folder / f"{stem}.json", target]
    return written
