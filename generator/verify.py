"""Verification, Pulsar2's check levels, against transformers as the independent reference.

Level 1 (layer check): every compiled layer, in every shape group, is fed the reference model's own
inputs for that layer (hidden states, cached K/V history, positions) and its outputs (K_cache_out,
V_cache_out, output) are compared with the reference's; the post graph is compared on the final
hidden state. Level 2: the check prompt (default `1+1=`) end to end through the local runner, with
the system prompt prefilled and reused as on the board, against transformers' greedy output.
Thresholds per weight type and hidden-state type live in data/tolerances.yaml.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml
from onnx import TensorProto
from rich.console import Console
from rich.table import Table

from .errors import GeneratorError
from .progress import Progress
from .recipe import Sampling
from .runner import (MASK_VALUE, STORAGE, Bundle, Engine, Generator, Sampler, common_prefix, eos_ids_of,
                     from_storage, load_tokenizer_module, session_options, to_storage)

TOLERANCES = Path(__file__).resolve().parent / "data" / "tolerances.yaml"
GENERATE_TOKENS = 16


@lru_cache(maxsize=1)
def tolerance_table() -> dict:
    return yaml.safe_load(TOLERANCES.read_text())


def thresholds(weight_type: str, hidden_state_type: str) -> dict[str, dict[str, float]]:
    """The looser of the weight-type and hidden-state-type entries, per check."""
    t = tolerance_table()
    a, b = t["weight_type"][weight_type], t["hidden_state_type"][hidden_state_type]
    out = {}
    for check in ("layer", "logits", "end_to_end", "generate"):
        out[check] = {}
        for key in a[check]:
            loose = max if key.startswith("max") else min
            out[check][key] = loose(a[check][key], b[check][key])
    return out


def within(cosine: float, rel_err: float, limit: dict) -> bool:
    """A comparison passes one thresholds entry (min_cosine, max_rel_err); NaN never passes."""
    return cosine >= limit["min_cosine"] and rel_err <= limit["max_rel_err"]


def failing_rows(rows: list[dict[str, Any]], limit: dict) -> list[dict[str, Any]]:
    """The layer-check rows outside `limit`."""
    return [r for r in rows if not within(r["cosine"], r["max_rel_err"], limit)]


def parameter_count(spec) -> int:
    head = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    return spec.num_hidden_layers * spec.layer_params + head


# Bytes of memory per model parameter a level-1/2 check needs: the fp32 transformers reference (4)
# plus the runner's sessions and their working memory (measured ~5-8 on 0.5B-1.5B models).
CHECK_BYTES_PER_PARAMETER = 10


def reference_fits(spec) -> tuple[bool, str]:
    """Whether this machine has the memory to verify against an fp32 transformers reference."""
    import psutil

    params = parameter_count(spec)
    need = params * CHECK_BYTES_PER_PARAMETER + (1 << 30)
    avail = psutil.virtual_memory().available
    if need <= avail:
        return True, ""
    return False, (f"checking {spec.model_name} against transformers needs about {need / 2**30:.0f} GiB of memory "
                   f"({params / 1e9:.2f}B parameters: the fp32 reference plus the runner), and this machine has "
                   f"{avail / 2**30:.0f} GiB available. The bundle is built but NOT verified; verify it on a larger "
                   f"machine with `python -m generator verify <bundle> -c 2`.")


def compare(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cos = float(a @ b / denom) if denom else float(np.allclose(a, b))
    err = float(np.abs(a - b).max())
    scale = float(np.abs(b).max()) or 1.0
    return {"cosine": cos, "max_abs_err": err, "max_rel_err": err / scale}


def run_graph(sess: ort.InferenceSession, feeds: dict[str, tuple[np.ndarray, int]],
              outputs: dict[str, tuple[tuple[int, ...], np.dtype, int]]) -> dict[str, np.ndarray]:
    """Run with IO binding (bf16 arrays are passed as uint16 bits with their ONNX type)."""
    io = sess.io_binding()
    keep = []
    for name, (arr, onnx_type) in feeds.items():
        arr = np.ascontiguousarray(arr)
        keep.append(arr)
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, onnx_type))
    result = {}
    for name, (shape, dtype, onnx_type) in outputs.items():
        buf = np.zeros(shape, dtype)
        result[name] = buf
        io.bind_output(name, "cpu", 0, onnx_type, list(shape), buf.ctypes.data)
    sess.run_with_iobinding(io)
    return result


def check_sequence(bundle: Bundle, tok, prompt: str, length: int) -> list[int]:
    """The chat-templated prompt (tok: the bundle's ChatTokenizer), padded with random ids to length."""
    ids = list(tok.encode_messages([{"role": "user", "content": prompt}], add_generation_prompt=True))
    rng = np.random.default_rng(1234)
    while len(ids) < length:
        ids.append(int(rng.integers(0, bundle.spec.vocab_size)))
    return ids[:length]


def layer_check(bundle: Bundle, cap: dict[str, np.ndarray], progress: Progress, threads: int = 2) -> list[dict[str, Any]]:
    spec, opts = bundle.spec, bundle.opts
    hidden = opts.hidden_state_type
    dt, ot = STORAGE[hidden]
    P, C, kv, H = opts.prefill_len, opts.kv_cache_len, spec.kv_dim, spec.hidden_size
    T = cap["inputs"].shape[1]
    quantized = opts.weight_type in ("s8", "s4")
    mask_value = MASK_VALUE[hidden]
    rows = []
    with progress.task("layer check", spec.num_hidden_layers) as step:
        for i in range(spec.num_hidden_layers):
            for g in bundle.groups:
                if g.index == 0:
                    h, n, rows_hist = T - 1, 1, C
                else:
                    n = P - 1
                    h = 0 if g.dummy_history else g.history - 1
                    rows_hist = g.history_rows
                k_hist = np.zeros((1, rows_hist, kv), np.float32)
                v_hist = np.zeros((1, rows_hist, kv), np.float32)
                k_hist[0, :h] = cap["keys"][i, :h]
                v_hist[0, :h] = cap["values"][i, :h]
                x = np.zeros((1, g.tokens, H), np.float32)
                x[0, :n] = cap["inputs"][i, h:h + n]
                idx = np.zeros((1, g.tokens), np.uint32)
                idx[0, :n] = np.arange(h, h + n)
                mask = np.full((1, g.tokens, rows_hist + g.tokens), mask_value, np.float32)
                mask[0, :, :h] = 0
                mask[0, :, rows_hist:][np.tril(np.ones((g.tokens, g.tokens), bool))] = 0
                sess = ort.InferenceSession(str(bundle.layer_file(i, g.index)), session_options(threads, quantized),
                                            providers=["CPUExecutionProvider"])
                got = run_graph(sess, {
                    "K_cache": (to_storage(k_hist, hidden), ot), "V_cache": (to_storage(v_hist, hidden), ot),
                    "indices": (idx, TensorProto.UINT32), "input": (to_storage(x, hidden), ot),
                    "mask": (to_storage(mask, hidden), ot)},
                    {"K_cache_out": ((1, g.tokens, kv), dt, ot), "V_cache_out": ((1, g.tokens, kv), dt, ot),
                     "output": ((1, g.tokens, H), dt, ot)})
                refs = {"K_cache_out": cap["keys"][i, h:h + n], "V_cache_out": cap["values"][i, h:h + n],
                        "output": cap["outputs"][i, h:h + n]}
                for name, ref in refs.items():
                    m = compare(from_storage(got[name], hidden)[0, :n], ref)
                    rows.append({"layer": i, "group": g.index, "kind": g.kind, "history": h, "tokens": n,
                                 "tensor": name, **m})
            step()
    return rows


def logits_check(bundle: Bundle, cap: dict[str, np.ndarray]) -> dict[str, Any]:
    opts, spec = bundle.opts, bundle.spec
    hidden = opts.hidden_state_type
    dt, ot = STORAGE[hidden]
    quantized = opts.post_weight_type in ("s8", "s4")
    sess = ort.InferenceSession(str(bundle.post_file), session_options(2, quantized), providers=["CPUExecutionProvider"])
    x = cap["outputs"][-1, -1:][None]  # [1, 1, H] last layer output at the last position
    k = opts.post_topk
    outs = {"output": ((1, 1, k or spec.vocab_size), dt, ot)}
    if k:
        outs["indices"] = ((1, 1, k), np.int32, TensorProto.INT32)
    got = run_graph(sess, {"input": (to_storage(x, hidden), ot)}, outs)
    ref = cap["logits"][-1]
    ours = from_storage(got["output"], hidden)[0, 0]
    if k:
        top = np.argsort(-ref)[:k]
        result = compare(ours, ref[top])
        result["topk_index_match"] = float(np.mean(got["indices"][0, 0] == top))
        return result
    result = compare(ours, ref)
    result["argmax_match"] = bool(int(np.argmax(ours)) == int(np.argmax(ref)))
    return result


def generate_check(bundle: Bundle, model, session, prompt: str, max_new_tokens: int = GENERATE_TOKENS) -> dict[str, Any]:
    """Greedy answer to `prompt` through the runner vs transformers (session: a fresh ChatSession)."""
    from .reference import greedy

    tok = session.tokenizer
    eos = eos_ids_of(session) or bundle.spec.eos_token_ids
    engine = Engine(bundle, threads=2)
    gen = Generator(engine, eos, Sampler(Sampling()))  # greedy, whatever post_config says
    system_ids = list(session.reset(bundle.system_prompt))
    if system_ids:
        engine.prefill(system_ids)  # prefilled once and reused, as on the board
    ids = list(session.encode(prompt)[0])
    ours = gen.generate(ids, max_new_tokens)
    ttft = gen.stats.ttft_ms
    ref = greedy(model, ids, max_new_tokens, eos)
    prefix = common_prefix(ours, ref)
    logits: list = []
    gen.generate(ids, forced=ref, logits_out=logits)
    argmax = [int(l[1][np.argmax(l[0])]) if isinstance(l, tuple) else int(np.argmax(l)) for l in logits]
    agreement = float(np.mean([a == b for a, b in zip(argmax, ref)])) if ref else 1.0
    strip = lambda t: [x for x in t if x not in set(eos)]  # noqa: E731
    return {"prompt": prompt, "prompt_tokens": len(ids), "ours": ours, "reference": ref,
            "ours_text": tok.decode(strip(ours)), "reference_text": tok.decode(strip(ref)),
            "matching_prefix": prefix, "teacher_forced_agreement": agreement, "ttft_ms": round(ttft, 2)}


def conversation_check(bundle: Bundle, model, *, system: int = 11, turns=((40, 6), (20, 5)), seed: int = 1,
                       history: str = "used", threads: int = 1) -> dict[str, Any]:
    """The local runner end to end over a conversation, against transformers.

    A system prompt of `system` random tokens is prefilled once; each turn adds (new, forced)
    random tokens: `new` are prefilled on top of what is cached (several chunks when longer than
    prefill_len), then `forced` tokens are teacher-forced through decode. Every step's logits are
    compared with one transformers forward over the whole sequence (with the contract's bf16
    embedding table, see reference.bf16_embedding_input). Returns the worst cosine and relative
    error, and per turn how many tokens were prefilled."""
    import torch

    from .reference import bf16_embedding_input

    vocab = bundle.spec.vocab_size
    seeds = iter(range(seed, seed + 1 + 2 * len(turns)))  # one seed per draw, in order
    draw = lambda n: np.random.default_rng(next(seeds)).integers(0, vocab, n).tolist()  # noqa: E731
    engine = Engine(bundle, threads=threads, history=history)
    gen = Generator(engine, [], Sampler(Sampling()))
    ids = draw(system)
    engine.prefill(ids)
    worst_cos, worst_rel, prefilled = 1.0, 0.0, []
    for new, n_forced in turns:
        ids = ids + draw(new)
        forced = draw(n_forced)
        logits: list = []
        gen.generate(ids, forced=forced, logits_out=logits)
        prefilled.append(gen.stats.prefilled)
        with torch.no_grad(), bf16_embedding_input(model):
            ref = model(torch.tensor([ids + forced])).logits[0].float().numpy()
        for step, ours in enumerate(logits):
            m = compare(ours, ref[len(ids) - 1 + step])
            worst_cos, worst_rel = min(worst_cos, m["cosine"]), max(worst_rel, m["max_rel_err"])
        ids = ids + forced
    return {"worst_cosine": worst_cos, "worst_rel_err": worst_rel, "prefilled": prefilled}


def plot(rows: list[dict], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tensors = ["output", "K_cache_out", "V_cache_out"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, tensor in zip(axes, tensors):
        for g in sorted({r["group"] for r in rows}):
            pts = sorted((r["layer"], r["cosine"]) for r in rows if r["tensor"] == tensor and r["group"] == g)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"group {g}")
        ax.set_title(tensor)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine vs transformers")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_checks(bundle_dir: Path, ckpt, recipe, level: int, prompt: str | None, progress: Progress,
               console: Console) -> dict[str, Any]:
    """Run levels 1..level; write report/ into the bundle; return the summary (with `passed`)."""
    from .reference import capture, load_reference

    bundle = Bundle(bundle_dir)
    opts = bundle.opts
    limits = thresholds(opts.weight_type, opts.hidden_state_type)
    report_dir = bundle.dir / "report"
    report_dir.mkdir(exist_ok=True)
    tok_mod = load_tokenizer_module(bundle)
    tok = tok_mod.ChatTokenizer(bundle.tokenizer_dir)
    prompt = prompt or recipe.chat.check_prompt
    summary: dict[str, Any] = {"level": level, "thresholds": limits, "passed": True, "failures": []}
    model = load_reference(ckpt, recipe)
    if level >= 1:
        length = max(opts.last_kv_cache_len or [0]) + opts.prefill_len
        ids = check_sequence(bundle, tok, prompt, length)
        cap = capture(model, ids)
        rows = layer_check(bundle, cap, progress)
        lim = limits["layer"]
        bad = failing_rows(rows, lim)
        worst = min(rows, key=lambda r: r["cosine"])
        post = logits_check(bundle, cap)
        lp = limits["logits"]
        post_ok = within(post["cosine"], post["max_rel_err"], lp)
        (report_dir / "layer_check.json").write_text(json.dumps({"thresholds": lim, "rows": rows, "post": post}, indent=1))
        plot(rows, report_dir / "layer_check.png", f"{bundle.model} {opts.weight_type}/{opts.hidden_state_type} layer check")
        print_layer_table(console, rows, lim, bundle.spec.num_hidden_layers)
        console.print(f"post: cosine {post['cosine']:.6f}, max rel err {post['max_rel_err']:.2e}")
        summary["layer"] = {"worst_cosine": worst["cosine"], "worst_layer": worst["layer"], "worst_group": worst["group"],
                            "worst_tensor": worst["tensor"], "max_rel_err": max(r["max_rel_err"] for r in rows),
                            "failing": len(bad), "post": post}
        if bad:
            b = min(bad, key=lambda r: r["cosine"])
            summary["failures"].append(f"layer check: {len(bad)} of {len(rows)} outputs below thresholds "
                                       f"(min cosine {lim['min_cosine']}, max rel err {lim['max_rel_err']}); worst is "
                                       f"layer {b['layer']} group {b['group']} {b['tensor']}: cosine {b['cosine']:.6f}, "
                                       f"rel err {b['max_rel_err']:.2e}")
        if not post_ok:
            summary["failures"].append(f"post graph: cosine {post['cosine']:.6f}, rel err {post['max_rel_err']:.2e} "
                                       f"(limits {lp['min_cosine']}, {lp['max_rel_err']})")
    if level >= 2:
        res = generate_check(bundle, model, tok_mod.ChatSession(tok), prompt)
        lg = limits["generate"]
        need = min(int(lg["min_prefix"]), len(res["reference"]))
        res["passed"] = res["matching_prefix"] >= need and res["teacher_forced_agreement"] >= lg["min_agreement"]
        (report_dir / "generate_check.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
        console.print(f"[bold]{prompt}[/bold] -> ours: {res['ours_text']!r}")
        console.print(f"{' ' * len(prompt)}    transformers: {res['reference_text']!r}")
        console.print(f"matching prefix {res['matching_prefix']}/{len(res['reference'])} tokens, teacher-forced "
                      f"agreement {res['teacher_forced_agreement']:.2f}")
        summary["generate"] = {k: res[k] for k in ("prompt", "ours_text", "reference_text", "matching_prefix",
                                                   "teacher_forced_agreement", "passed")}
        if not res["passed"]:
            summary["failures"].append(f"generate check: {res['matching_prefix']} matching tokens (need {need}), "
                                       f"agreement {res['teacher_forced_agreement']:.2f} (need {lg['min_agreement']})")
    summary["passed"] = not summary["failures"]
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def print_layer_table(console: Console, rows: list[dict], lim: dict, n_layers: int):
    table = Table(title="layer check vs transformers (worst over groups and outputs)")
    for col in ("layer", "worst cosine", "max rel err", "where"):
        table.add_column(col, justify="right" if col != "where" else "left")
    for i in range(n_layers):
        mine = [r for r in rows if r["layer"] == i]
        w = min(mine, key=lambda r: r["cosine"])
        rel = max(r["max_rel_err"] for r in mine)
        ok = w["cosine"] >= lim["min_cosine"] and rel <= lim["max_rel_err"]
        style = "" if ok else "bold red"
        table.add_row(str(i), f"{w['cosine']:.6f}", f"{rel:.2e}", f"group {w['group']} {w['tensor']}", style=style)
    console.print(table)


def require_passed(summary: dict[str, Any]):
    if not summary["passed"]:
        raise GeneratorError("Verification failed: " + "; ".join(summary["failures"]) + ".")
