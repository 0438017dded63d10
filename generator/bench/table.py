"""`make bench`'s table and the issue's targets, from the measured rows (generator/bench/__init__.py).

Ratios: each contender against the default backend (onnxruntime, board numerics) on the same bundle;
a fast path's KLD against board numerics on the same bundle (target <= 1.2x); with peers, our fastest
same-bits contender within that KLD target against each peer: decode (target >= 1.3x llama.cpp) and TTFT (target
<= 0.5x llama.cpp), each beside both KLDs; many users: aggregate tok/s against single-stream (target >= 3x)
and identical answers; memory: the fused backend's RSS once loaded against bundle + KV pool (target <= 1.2x;
the load peak shown too).
"""

from __future__ import annotations

from rich.table import Table

DEFAULT = "onnxruntime"
TARGETS = {"decode_vs_llama": 1.3, "ttft_vs_llama": 0.5, "users_speedup": 3.0, "rss_vs_bundle_kv": 1.2,
           "fast_kld_vs_board": 1.2}


def measured(r: dict) -> bool:
    return r.get("decode_tok_s") is not None


def baseline(rows: list[dict], wt: str) -> dict | None:
    """The default backend in board numerics on weight type `wt`, else the first measured row of it."""
    same = [r for r in rows if r.get("weight_type") == wt and measured(r)]
    return next((r for r in same if r.get("backend") == DEFAULT and r.get("numerics") == "board"),
                same[0] if same else None)


def add_ratios(results: dict) -> None:
    rows = results["contenders"]
    first_wt = next(iter(results["bundles"]), None)
    for r in rows + results.get("peers", []):
        if not measured(r):
            continue
        base = baseline(rows, r["weight_type"] if r["weight_type"] in results["bundles"] else first_wt)
        if base:
            r["decode_vs_default"] = r["decode_tok_s"] / base["decode_tok_s"]
            r["ttft_vs_default"] = r["ttft_ms"] / base["ttft_ms"]
        board = next((b for b in rows if b.get("backend") == r.get("backend") and b.get("numerics") == "board"
                      and b["weight_type"] == r["weight_type"] and b.get("kld_mean")), None)
        if board is None:
            board = next((b for b in rows if b.get("backend") == DEFAULT and b.get("numerics") == "board"
                          and b["weight_type"] == r["weight_type"] and b.get("kld_mean")), None)
        if board and r.get("kld_mean") is not None and r.get("numerics") not in ("board", "fp32") and not r.get("peer"):
            r["kld_vs_board"] = r["kld_mean"] / board["kld_mean"]
        kv = r.get("kv_pool_mib")
        if r.get("rss_mib") and r.get("bundle_mib") and kv is not None:
            r["rss_vs_bundle_kv"] = r["rss_mib"] / (r["bundle_mib"] + kv)
            if r.get("rss_steady_mib"):  # once loaded (the peak also holds load-time copies of the weights)
                r["steady_rss_vs_bundle_kv"] = r["rss_steady_mib"] / (r["bundle_mib"] + kv)


def targets(results: dict) -> list[dict]:
    """The issue's targets that this run measured: [{name, value, target, met, detail}]."""
    out = []
    ours = [r for r in results["contenders"] if measured(r) and r.get("backend") != "transformers"]
    for p in results.get("peers", []):
        same = [r for r in ours if r["weight_type"] == p["weight_type"]]
        if not measured(p) or not same:
            continue
        # speed must not come from different numbers: the fastest of ours within the KLD target (board
        # numerics, or a fast path within 1.2x of board's KLD on the same bundle), else the fastest
        honest = [r for r in same if r.get("numerics") == "board" or (r.get("kld_vs_board") or 99) <= TARGETS["fast_kld_vs_board"]]
        best = max(honest or same, key=lambda r: r["decode_tok_s"])
        d, t = best["decode_tok_s"] / p["decode_tok_s"], best["ttft_ms"] / p["ttft_ms"]
        detail = (f"{best['label']} ({best['decode_tok_s']:.1f} tok/s, {best['ttft_ms']:.0f} ms, KLD {kld(best)}) vs "
                  f"{p['label']} ({p['decode_tok_s']:.1f} tok/s, {p['ttft_ms']:.0f} ms, KLD {kld(p)})")
        if p["kind"] != "llama.cpp":  # the targets are against llama.cpp; others get the ratios only
            out.append({"name": f"decode / TTFT vs {p['label']}", "value": d, "target": None, "met": None,
                        "detail": f"TTFT {t:.2f}x; {detail}"})
            continue
        out.append({"name": f"decode vs {p['label']}", "value": d, "target": f">= {TARGETS['decode_vs_llama']}x",
                    "met": d >= TARGETS["decode_vs_llama"], "detail": detail})
        out.append({"name": f"TTFT vs {p['label']}", "value": t, "target": f"<= {TARGETS['ttft_vs_llama']}x",
                    "met": t <= TARGETS["ttft_vs_llama"], "detail": detail})
    for u in results.get("users") or []:
        if u.get("speedup") is None:
            continue
        same, alone = sum(u["identical"]), sum(u.get("identical_alone", []))
        out.append({"name": f"{u['sessions']} users on {u['backend']} {u['numerics']} vs one by one", "value": u["speedup"],
                    "target": f">= {TARGETS['users_speedup']}x", "met": u["speedup"] >= TARGETS["users_speedup"]
                    and same == u["sessions"] and not u.get("errors"),
                    "detail": f"{u['backend']} {u['numerics']} {u['weight_type']}: {u['batch_tok_s']:.1f} tok/s "
                              f"aggregate vs {u['single_tok_s']:.1f} one by one; answers identical {same}/{u['sessions']} "
                              f"to the batch-1 engine's, {alone}/{u['sessions']} to each alone through the Batcher"
                              + (f" (first differing token: {u['first_difference']})" if same < u["sessions"] else "")
                              + (f"; errors: {'; '.join(u['errors'])}" if u.get("errors") else "")})
    for r in ours:
        if r["backend"] == "onnxruntime-fused" and r.get("rss_vs_bundle_kv") is not None:
            steady = r.get("steady_rss_vs_bundle_kv")
            value = steady if steady is not None else r["rss_vs_bundle_kv"]
            out.append({"name": f"{'steady' if steady is not None else 'peak'} RSS {r['label']}", "value": value,
                        "target": f"<= {TARGETS['rss_vs_bundle_kv']}x bundle + KV",
                        "met": value <= TARGETS["rss_vs_bundle_kv"],
                        "detail": (f"{r['rss_steady_mib']:.0f} MiB once loaded, " if steady is not None else "")
                        + f"{r['rss_mib']:.0f} MiB peak (loading) vs bundle {r['bundle_mib']:.0f} + KV pool "
                          f"{r['kv_pool_mib']:.0f} MiB"})
        if r.get("numerics") == "fast" and r.get("kld_vs_board") is not None:
            out.append({"name": f"KLD {r['label']} vs board", "value": r["kld_vs_board"],
                        "target": f"<= {TARGETS['fast_kld_vs_board']}x", "met": r["kld_vs_board"] <= TARGETS["fast_kld_vs_board"],
                        "detail": f"KLD {kld(r)}"})
    return out


def kld(r: dict) -> str:
    if r.get("kld_mean") is not None:
        return f"{r['kld_mean']:.4f}"
    return r.get("accuracy_note") or "-"


def fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def render(results: dict) -> tuple[Table, list[str]]:
    """The table and its footnotes (long notes: a [n] in the row, the text below the table)."""
    notes: list[str] = []

    def mark(text: str) -> str:
        if len(text) <= 24:
            return text
        notes.append(text)
        return f"[{len(notes)}]"

    table = Table(title_justify="left", title=f"{results['model']}: {results['prompt_tokens']}-token prompt, "
                  f"{results['tokens']} greedy tokens, {results['threads']} threads (median of {results['runs']}); "
                  f"ratios vs {DEFAULT} board on the same bundle; " + (
                      f"KLD vs fp32 over {results['accuracy_tokens']} tokens" if results["accuracy_tokens"] and not all(
                          b["synthetic"] for b in results["bundles"].values()) else "KLD not measured"))
    cols = ("contender", "TTFT ms", "decode tok/s", "decode vs default", "TTFT vs default", "KLD mean", "top-1",
            "KLD vs board", "peak RSS MiB", "RSS loaded / (bundle+KV)", "note")
    for col in cols:
        table.add_column(col, justify="left" if col in ("contender", "note") else "right")
    for r in results["contenders"] + results.get("peers", []):
        note = mark(r.get("note") or r.get("error") or r.get("missing") or "")
        if not measured(r):
            table.add_row(r["label"], *["-"] * 9, note or "not measured")
            continue
        top1 = r.get("top1_agreement")
        table.add_row(r["label"], f"{r['ttft_ms']:.1f}", f"{r['decode_tok_s']:.1f}",
                      fmt(r.get("decode_vs_default"), ".2f", "x"), fmt(r.get("ttft_vs_default"), ".2f", "x"),
                      kld(r), fmt(top1, ".3f"), fmt(r.get("kld_vs_board"), ".2f", "x"), fmt(r.get("rss_mib"), ".0f"),
                      fmt(r.get("steady_rss_vs_bundle_kv", r.get("rss_vs_bundle_kv")), ".2f", "x"), note)
    for u in results.get("users") or []:
        if u.get("speedup") is None:
            label = f"many users {u.get('backend', '')} {u.get('numerics', '')}".strip()
            table.add_row(label, *["-"] * 9, mark(u.get("note") or u.get("error") or u.get("missing") or "not measured"))
            continue
        same = sum(u["identical"])
        table.add_row(f"{u['sessions']} users: {u['backend']} {u['numerics']} {u['weight_type']}", "-",
                      f"{u['batch_tok_s']:.1f}", f"{u['speedup']:.2f}x vs 1 by 1", "-", "-", "-", "-",
                      fmt(u.get("rss_mib"), ".0f"), "-",
                      mark(f"aggregate of {u['sessions']} x {u['tokens']} tokens; single-stream {u['single_tok_s']:.1f} "
                           f"tok/s; answers identical {same}/{u['sessions']} (batch-1 engine), "
                           f"{sum(u.get('identical_alone', []))}/{u['sessions']} (alone through the Batcher)"))
    return table, notes


def finish(results: dict, console) -> None:
    """Ratios and targets into results; the table and the targets printed."""
    add_ratios(results)
    results["targets"] = targets(results)
    table, notes = render(results)
    console.print(table)
    for n, text in enumerate(notes, 1):
        console.print(f"[{n}] {text}", highlight=False, markup=False)
    load = results.get("load_average") or []
    if load:
        console.print(f"load average (1 min) at the start / end: {' / '.join(f'{x:.2f}' for x in load)} "
                      f"(other processes on these cores skew every figure)", highlight=False)
    for t in results["targets"]:
        if t["target"] is None:
            console.print(f"{t['name']}: decode {t['value']:.2f}x, {t['detail']}", highlight=False)
            continue
        mark = "met" if t["met"] else "NOT met"
        console.print(f"target {t['name']}: {t['value']:.2f}x ({t['target']}) {mark}: {t['detail']}", highlight=False)
