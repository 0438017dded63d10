"""Verification, Pulsar2's check levels, against transformers as the independent reference.

Level 1 (layer check): every compiled layer, in every shape group, is fed the reference model's own
inputs for that layer (hidden states, cached K/V history, positions) and its outputs (K_cache_out,
V_cache_out, output) are compared with the reference's; the post graph is compared on the final
hidden state. Level 2: the check prompt (default `1+1=`) end to end through the local runner, with
the system prompt prefilled and reused as on the board, against transformers' greedy output.
Thresholds per weight type and hidden-state type live in data/tolerances.yaml; each graph is held to
those of the weight types it was built with (read from the graph), the end-to-end checks to the loosest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto
from rich.console import Console

from ..contract import STORAGE, Bundle, Sampling, board_mask, from_storage, to_storage, uses_dequantize
from ..errors import GeneratorError
from ..export.bundle import dest, write_text
from ..paths import DATA_DIR
from ..progress import Progress
from ..runtime.chat import load_tokenizer_module
from ..runtime.engine import Engine
from ..runtime.generation import Generator, Sampler, common_prefix
from ..runtime.ort import open_session, run_once
from .report import (FAILURES_SHOWN, describe, excess, failing_rows, limit_text, plot, print_layer_table, print_rows,
                     within)

TOLERANCES = DATA_DIR / "tolerances.yaml"
GENERATE_TOKENS = 16
NUMERICS = "board"  # every session the checks open computes what the board computes (fp32 activations)


@lru_cache(maxsize=1)
def tolerance_table() -> dict:
    return yaml.safe_load(TOLERANCES.read_text())


def limits_for(weight_types: Iterable[str], hidden_state_type: str) -> dict[str, dict[str, float]]:
    """The loosest of the entries of these weight types and of the hidden-state type, per check: a graph
    is held to the limits of the least precise weights it holds, and of its boundary type."""
    t = tolerance_table()
    entries = [t["weight_type"][w] for w in sorted(set(weight_types))] + [t["hidden_state_type"][hidden_state_type]]
    return {check: {key: (max if key.startswith("max") else min)(e[check][key] for e in entries)
                    for key in entries[-1][check]}
            for check in entries[-1]}


def thresholds(weight_type: str, hidden_state_type: str) -> dict[str, dict[str, float]]:
    """The looser of the weight-type and hidden-state-type entries, per check."""
    return limits_for([weight_type], hidden_state_type)


WEIGHT_TYPE_OF = {TensorProto.INT8: "s8", TensorProto.INT4: "s4", TensorProto.BFLOAT16: "bf16",
                  TensorProto.FLOAT16: "fp16", TensorProto.FLOAT: "fp32", TensorProto.FLOAT8E4M3FN: "fp8_e4m3",
                  TensorProto.FLOAT8E5M2: "fp8_e5m2"}


def graph_weight_types(path: Path) -> list[str]:
    """The weight types a graph was built with, read from the graph itself: the stored type of every
    MatMul weight (an initializer, directly or through its DequantizeLinear / Cast). Per-tensor
    `overrides` and post_weight_type show here as they were built."""
    graph = onnx.load(str(path), load_external_data=False).graph
    stored = {t.name: t.data_type for t in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}
    types = set()
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        w = node.input[1]
        if w in made_by and made_by[w].op_type in ("DequantizeLinear", "Cast"):
            w = made_by[w].input[0]
        if w in stored:
            types.add(WEIGHT_TYPE_OF[stored[w]])
    return sorted(types)


def parameter_count(spec) -> int:
    head = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    return spec.num_hidden_layers * spec.layer_params + head


# Bytes of memory per model parameter in each phase of a level-1/2 check, which run one after the other
# (run_checks): the fp32 transformers reference (4) plus its working memory, released before the runner's
# sessions and their working memory open. A vision-language model's whole-model reference also holds
# the vision tower (VISION_SHARE of the language model's parameters at most, for the families here).
REFERENCE_BYTES_PER_PARAMETER = 5
RUNNER_BYTES_PER_PARAMETER = 5
VISION_SHARE = 0.25


def check_memory(spec, vision: bool = False) -> int:
    """Bytes the checks need at their peak: the larger of the reference phase and the runner phase."""
    params = parameter_count(spec)
    reference = params * (1 + VISION_SHARE if vision else 1) * REFERENCE_BYTES_PER_PARAMETER
    return int(max(reference, params * RUNNER_BYTES_PER_PARAMETER)) + (1 << 30)


def reference_fits(spec, vision: bool = False) -> tuple[bool, str]:
    """Whether this machine has the memory to verify against an fp32 transformers reference."""
    import psutil

    params = parameter_count(spec)
    need = check_memory(spec, vision)
    avail = psutil.virtual_memory().available
    if need <= avail:
        return True, ""
    return False, (f"checking {spec.model_name} against transformers needs about {need / 2**30:.0f} GiB of memory "
                   f"({params / 1e9:.2f}B parameters: the fp32 reference, then the runner), and this machine has "
                   f"{avail / 2**30:.0f} GiB available. The bundle is built but NOT verified; verify it on a larger "
                   f"machine with `python -m generator verify <bundle> -c 2`.")


def release_memory():
    """Give freed memory back to the system (a released reference's weights) before the next phase."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps it, nothing is wrong
        pass


def compare(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cos = float(a @ b / denom) if denom else float(np.allclose(a, b))
    err = float(np.abs(a - b).max())
    scale = float(np.abs(b).max()) or 1.0
    return {"cosine": cos, "max_abs_err": err, "max_rel_err": err / scale}


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
                idx = np.zeros((spec.position_rows, g.tokens), np.uint32)  # text positions (mRoPE: rows equal)
                idx[:, :n] = np.arange(h, h + n)
                path = bundle.layer_file(i, g.index)
                types = graph_weight_types(path)
                limit = limits_for(types, hidden)["layer"]
                sess = open_session(path, threads=threads, quantized=any(map(uses_dequantize, types)), numerics=NUMERICS)
                got = run_once(sess, {
                    "K_cache": (to_storage(k_hist, hidden), ot), "V_cache": (to_storage(v_hist, hidden), ot),
                    "indices": (idx, TensorProto.UINT32), "input": (to_storage(x, hidden), ot),
                    "mask": (board_mask(hidden, g.tokens, rows_hist, h), ot)},
                    {"K_cache_out": ((1, g.tokens, kv), dt, ot), "V_cache_out": ((1, g.tokens, kv), dt, ot),
                     "output": ((1, g.tokens, H), dt, ot)})
                refs = {"K_cache_out": cap["keys"][i, h:h + n], "V_cache_out": cap["values"][i, h:h + n],
                        "output": cap["outputs"][i, h:h + n]}
                for name, ref in refs.items():
                    m = compare(from_storage(got[name], hidden)[0, :n], ref)
                    rows.append({"layer": i, "group": g.index, "kind": g.kind, "label": g.label, "history": h,
                                 "tokens": n, "tensor": name, **m, "weight_types": types, "limit": limit})
            step()
    return rows


def logits_check(bundle: Bundle, cap: dict[str, np.ndarray]) -> dict[str, Any]:
    opts, spec = bundle.opts, bundle.spec
    hidden = opts.hidden_state_type
    dt, ot = STORAGE[hidden]
    types = graph_weight_types(bundle.post_file)
    sess = open_session(bundle.post_file, threads=2, quantized=any(map(uses_dequantize, types)), numerics=NUMERICS)
    x = cap["outputs"][-1, -1:][None]  # [1, 1, H] last layer output at the last position
    k = opts.post_topk
    outs = {"output": ((1, 1, k or spec.vocab_size), dt, ot)}
    if k:
        outs["indices"] = ((1, 1, k), np.int32, TensorProto.INT32)
    got = run_once(sess, {"input": (to_storage(x, hidden), ot)}, outs)
    ref = cap["logits"][-1]
    ours = from_storage(got["output"], hidden)[0, 0]
    info = {"weight_types": types, "limit": limits_for(types, hidden)["logits"]}
    if k:
        top = np.argsort(-ref)[:k]
        return {**compare(ours, ref[top]), "topk_index_match": float(np.mean(got["indices"][0, 0] == top)), **info}
    return {**compare(ours, ref), "argmax_match": bool(int(np.argmax(ours)) == int(np.argmax(ref))), **info}


def generate_reference(bundle: Bundle, model, session, prompt: str, max_new_tokens: int = GENERATE_TOKENS) -> dict[str, Any]:
    """What the generate check compares with, from the reference alone (session: a fresh ChatSession):
    the system prompt's and the prompt's ids, the EOS ids and transformers' greedy answer."""
    from .reference import greedy

    eos = list(session.tokenizer.eos_ids) or bundle.spec.eos_token_ids
    system_ids = list(session.reset(bundle.system_prompt))
    ids = list(session.encode(prompt)[0])
    return {"system_ids": system_ids, "ids": ids, "eos": eos, "reference": greedy(model, ids, max_new_tokens, eos)}


def generate_check(bundle: Bundle, session, prompt: str, ref: dict[str, Any],
                   max_new_tokens: int = GENERATE_TOKENS) -> dict[str, Any]:
    """Greedy answer to `prompt` through the runner vs transformers' (`ref`: generate_reference's, made
    before the runner's sessions open, with the same session)."""
    tok = session.tokenizer
    eos, ids, system_ids, ref = ref["eos"], ref["ids"], ref["system_ids"], ref["reference"]
    engine = Engine(bundle, threads=2, numerics=NUMERICS)
    gen = Generator(engine, eos, Sampler(Sampling()))  # greedy, whatever post_config says
    if system_ids:
        engine.prefill(system_ids)  # prefilled once and reused, as on the board
    ours = gen.generate(ids, max_new_tokens)
    ttft = gen.stats.ttft_ms
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
    engine = Engine(bundle, threads=threads, history=history, numerics=NUMERICS)
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


def run_checks(bundle_dir: Path, ckpt, recipe, level: int, prompt: str | None, progress: Progress,
               console: Console, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run levels 1..level; write report/ into the bundle; return the summary (with `passed`). `config`:
    the checkpoint's config as the recipe reads it, when the caller has it (a build does).

    Each graph is held to the limits of the weight types it was built with (a wider post graph or
    per-tensor overrides get their own); the end-to-end checks to those of the least precise graph."""
    from ..accuracy.check import check_accuracy, check_reference
    from .reference import capture, extend_reference, load_reference

    bundle = Bundle(bundle_dir)
    opts = bundle.opts
    all_types = {t for i in range(bundle.spec.num_hidden_layers) for t in graph_weight_types(bundle.layer_file(i, 0))}
    all_types.update(graph_weight_types(bundle.post_file))
    limits = limits_for(all_types, opts.hidden_state_type)
    report_dir = dest(bundle.dir, "report")
    report_dir.mkdir(exist_ok=True)
    tok_mod = load_tokenizer_module(bundle)
    tok = tok_mod.ChatTokenizer(bundle.tokenizer_dir)
    prompt = prompt or recipe.chat.check_prompt
    summary: dict[str, Any] = {"level": level, "thresholds": limits, "passed": True, "failures": []}
    # The references run first, one at a time, and are released before the bundle's sessions open: only
    # what the checks compare is kept (peak memory: the larger of one fp32 reference and the runner).
    release_memory()  # what the build freed, before the reference's weights
    model = load_reference(ckpt, recipe, config)
    extend_reference(model, opts)  # the build's --extend_method, as transformers writes it
    cap = gen_ref = None
    if level >= 1:
        length = max(opts.last_kv_cache_len or [0]) + opts.prefill_len
        cap = capture(model, check_sequence(bundle, tok, prompt, length))
    if level >= 2:
        session = tok_mod.ChatSession(tok)
        gen_ref = generate_reference(bundle, model, session, prompt)
        acc_ref = check_reference(bundle, model)  # the accuracy section's reference logits (informational)
    del model
    release_memory()
    vision_ref = None
    if bundle.manifest.vision is not None and level >= 1:
        from .vision import vision_reference_outputs

        vision_ref = vision_reference_outputs(bundle, ckpt, recipe, level)
        release_memory()
    if level >= 1:
        rows = layer_check(bundle, cap, progress)
        bad = sorted(failing_rows(rows), key=excess, reverse=True)
        worst = max(rows, key=excess)
        post = logits_check(bundle, cap)
        post_ok = within(post["cosine"], post["max_rel_err"], post["limit"])
        write_text(dest(report_dir, "layer_check.json"), json.dumps({"rows": rows, "post": post}, indent=1))
        plot(rows, dest(report_dir, "layer_check.png"),
             f"{bundle.model}: layer check, {'/'.join(sorted({t for r in rows for t in r['weight_types']}))} layer "
             f"weights, {opts.hidden_state_type} hidden states, vs transformers")
        print_layer_table(console, rows)
        console.print(f"post: cosine {post['cosine']:.6f}, rel err {post['max_rel_err']:.2e} (limits "
                      f"{limit_text(post['limit'], post['weight_types'])})", highlight=False)
        summary["layer"] = {"worst_cosine": worst["cosine"], "worst_layer": worst["layer"], "worst_group": worst["group"],
                            "worst_label": worst["label"], "worst_tensor": worst["tensor"],
                            "worst_rel_err": worst["max_rel_err"], "worst": describe(worst),
                            "max_rel_err": max(r["max_rel_err"] for r in rows), "failing": len(bad), "post": post}
        if bad:
            print_rows(console, bad[:FAILURES_SHOWN], f"failing layer outputs, worst first ({len(bad)} of {len(rows)})")
            summary["failures"].append(f"layer check: {len(bad)} of {len(rows)} outputs outside their limits; worst "
                                       f"is {describe(bad[0])}")
        if not post_ok:
            summary["failures"].append(f"post graph: cosine {post['cosine']:.6f}, rel err {post['max_rel_err']:.2e} "
                                       f"(limits {limit_text(post['limit'], post['weight_types'])})")
    if level >= 2:
        res = generate_check(bundle, session, prompt, gen_ref)
        lg = limits["generate"]
        need = min(int(lg["min_prefix"]), len(res["reference"]))
        res["passed"] = res["matching_prefix"] >= need and res["teacher_forced_agreement"] >= lg["min_agreement"]
        write_text(dest(report_dir, "generate_check.json"), json.dumps(res, indent=1, ensure_ascii=False))
        console.print(f"[bold]{prompt}[/bold] -> ours: {res['ours_text']!r}")
        console.print(f"{' ' * len(prompt)}    transformers: {res['reference_text']!r}")
        console.print(f"matching prefix {res['matching_prefix']}/{len(res['reference'])} tokens, teacher-forced "
                      f"agreement {res['teacher_forced_agreement']:.2f}")
        summary["generate"] = {k: res[k] for k in ("prompt", "ours_text", "reference_text", "matching_prefix",
                                                   "teacher_forced_agreement", "passed")}
        if not res["passed"]:
            summary["failures"].append(f"generate check: {res['matching_prefix']} matching tokens (need {need}), "
                                       f"agreement {res['teacher_forced_agreement']:.2f} (need {lg['min_agreement']})")
        summary["accuracy"] = check_accuracy(bundle, acc_ref, console)
        del acc_ref
    if bundle.manifest.vision is not None and level >= 1:  # the vision part (verify/vision.py)
        from .vision import vision_checks

        summary["vision"], failed = vision_checks(bundle, recipe, level, limits, report_dir, console, vision_ref)
        summary["failures"] += failed
    summary["passed"] = not summary["failures"]
    write_text(dest(report_dir, "summary.json"), json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def require_passed(summary: dict[str, Any]):
    if not summary["passed"]:
        raise GeneratorError("Verification failed: " + "; ".join(summary["failures"]) + ".")
