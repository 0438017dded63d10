"""The layer check's rows as people read them: the pass rule per row, the order of "worst", the
failure line, the tables and the plot (report/layer_check.png). generator/verify/checks.py produces
the rows; every figure shown here is written the way `describe` writes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table


def within(cosine: float, rel_err: float, limit: dict) -> bool:
    """A comparison passes one thresholds entry (min_cosine, max_rel_err); NaN never passes."""
    return cosine >= limit["min_cosine"] and rel_err <= limit["max_rel_err"]


def failing_rows(rows: list[dict[str, Any]], limit: dict | None = None) -> list[dict[str, Any]]:
    """The layer-check rows outside `limit` (default: each row's own, that of the graph it came from)."""
    return [r for r in rows if not within(r["cosine"], r["max_rel_err"], limit or r["limit"])]


def excess(row: dict[str, Any]) -> float:
    """How much of its limit a comparison uses, the larger of the cosine and the error share; above 1
    fails, NaN counts as infinite. The one order for "worst" in tables, plots and the failure line."""
    lim = row["limit"]
    shares = ((1.0 - row["cosine"]) / max(1.0 - lim["min_cosine"], 1e-12), row["max_rel_err"] / lim["max_rel_err"])
    return float("inf") if np.isnan(shares).any() else max(shares)


def describe(row: dict[str, Any]) -> str:
    """A layer-check row as the failure line and the tables write it."""
    return (f"layer {row['layer']} {row['label']} {row['tensor']}: cosine {row['cosine']:.6f}, "
            f"rel err {row['max_rel_err']:.2e} (limits {limit_text(row['limit'], row['weight_types'])})")


def limit_text(lim: dict, weight_types: list[str]) -> str:
    """A limit with the weight types it comes from: `s8 >=0.995 <=0.1` (cosine, relative error)."""
    return f"{'/'.join(weight_types)} >={lim['min_cosine']} <={lim['max_rel_err']}"


def plot(rows: list[dict], path: Path, title: str):
    """One column per output tensor; top: 1 - cosine, bottom: max relative error, both per layer and shape
    group (log scale), with each layer's limit as a dashed line and the points beyond it marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tensors = ["output", "K_cache_out", "V_cache_out"]
    panels = [("1 - cosine vs transformers", lambda r: 1.0 - r["cosine"], lambda lim: 1.0 - lim["min_cosine"]),
              ("max relative error", lambda r: r["max_rel_err"], lambda lim: lim["max_rel_err"])]
    groups = {r["group"]: r["label"] for r in rows}
    layers = sorted({r["layer"] for r in rows})
    limits = {r["layer"]: r["limit"] for r in rows}
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True, sharey="row", squeeze=False)
    floor = 1e-12  # exact agreement, shown at the bottom of the log scale
    for col, tensor in enumerate(tensors):
        for row_i, (ylabel, value, bound) in enumerate(panels):
            ax = axes[row_i][col]
            for g, label in sorted(groups.items()):
                pts = sorted((r["layer"], max(value(r), floor)) for r in rows if r["tensor"] == tensor and r["group"] == g)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
            ax.step(layers, [bound(limits[i]) for i in layers], where="mid", color="red", linestyle="--", label="limit")
            bad = [r for r in rows if r["tensor"] == tensor and not value(r) <= bound(r["limit"])]  # NaN fails
            if bad:
                ax.scatter([r["layer"] for r in bad], [max(value(r), floor) for r in bad], marker="x", s=60,
                           color="red", zorder=5, label="fails")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if row_i == 0:
                ax.set_title(tensor)
            else:
                ax.set_xlabel("layer")
            if col == 0:
                ax.set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.ravel():  # every legend entry once, failures included wherever they are
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


FAILURES_SHOWN = 8  # rows of the failing-outputs table; the full list is in report/layer_check.json


def print_rows(console: Console, rows: list[dict], title: str):
    """Layer-check rows as a table whose figures are written as `describe` writes them."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("layer", "group", "tensor", "cosine", "rel err", "limits"):
        table.add_column(col, justify="right" if col in ("layer", "cosine", "rel err") else "left", no_wrap=True)
    for r in rows:
        table.add_row(str(r["layer"]), r["label"], r["tensor"], f"{r['cosine']:.6f}", f"{r['max_rel_err']:.2e}",
                      limit_text(r["limit"], r["weight_types"]), style="" if excess(r) <= 1 else "bold red")
    console.print(table)


def print_layer_table(console: Console, rows: list[dict]):
    """Each layer's worst output (the most of its limit used), the row a failure line names."""
    worst = [max((r for r in rows if r["layer"] == i), key=excess) for i in sorted({r["layer"] for r in rows})]
    print_rows(console, worst, "layer check vs transformers: each layer's worst output")


def vision_plot(res: dict[str, Any], path: Path, title: str):
    """The vision check (report/vision_check.png): top, 1 - cosine per image token; bottom, each token's
    max |ours - ref| over the reference's max |ref| (the check's max relative error is their maximum);
    log scale, the limit as a dashed line and the tokens beyond it marked, as `plot` draws layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lim, floor = res["limit"], 1e-12
    panels = [("1 - cosine vs reference", [1.0 - c for c in res["token_cosines"]], 1.0 - lim["min_cosine"]),
              ("max relative error", res["token_rel_errs"], lim["max_rel_err"])]
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for ax, (ylabel, values, bound) in zip(axes, panels):
        tokens = range(len(values))
        ax.plot(tokens, [max(v, floor) for v in values], marker=".", label="image token")
        ax.axhline(bound, color="red", linestyle="--", label="limit")
        bad = [(t, v) for t, v in zip(tokens, values) if not v <= bound]  # NaN fails
        if bad:
            ax.scatter([t for t, _ in bad], [max(v, floor) for _, v in bad], marker="x", s=60, color="red", zorder=5,
                       label="fails")
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("image token")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def accuracy_text(acc: dict[str, Any]) -> str:
    """The -c 2 accuracy section (accuracy/check.py) in one line, for the build's closing lines."""
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return (f"KLD mean {f(acc['kld_mean'], '.4f')}, p99 {f(acc['kld_p99'], '.3f')}, top-1 {acc['top1_agreement']:.3f}, "
            f"ppl {f(acc['ppl'], '.2f')} (fp32 {f(acc['ppl_ref'], '.2f')}) over {acc['n_tokens']} tokens")
