"""`make bench`: the bundle runner against transformers, same machine, same prompt, one run.

Builds the embedded default model at s8 and s4 (timed), then measures for each bundle and for
transformers eager fp32 (the reference everything is verified against): time to first token for
the chat-templated prompt, and decode speed over a fixed number of greedy tokens (EOS ignored, so
every contender decodes the same count). Prints ratios against transformers and writes bench.json.

Speed is never shown without its accuracy cost: each bundle is timed in each --numerics mode (board:
fp32 activations, what the board computes; fast: int8 activations, labelled "int8 act"), and in the
same run the accuracy report measures that mode's KL divergence and top-1 agreement vs the fp32
reference on the first `bench_tokens` (data/accuracy.yaml) tokens of the evaluation text.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .cli.types import int_at_least

PROMPT = "Write a short story about a robot who learns to paint."
DEFAULT_TOKENS = 128


def add_bench_args(p):
    p.add_argument("--model", default="smollm2-135m-instruct", help="model variant to build and time "
                   "(default: %(default)s)")
    p.add_argument("--tokens", type=int_at_least(1), default=DEFAULT_TOKENS, help="greedy tokens decoded per run "
                   "(default: %(default)s)")
    p.add_argument("--runs", type=int_at_least(1), default=3, help="runs per contender, the median is reported "
                   "(default: %(default)s)")
    p.add_argument("--threads", type=int_at_least(1), default=2, help="intra-op threads for every contender (default: %(default)s)")
    p.add_argument("--weight_types", nargs="+", default=["s8", "s4"], help="bundles to build and time "
                   "(default: s8 s4)")
    p.add_argument("--out", default=None, help="where bundles and bench.json go (default: out/bench)")
    p.add_argument("--numerics", nargs="+", choices=["board", "fast"], default=["board", "fast"],
                   help="runner numerics to time, each with its own accuracy: board (fp32 activations) and fast "
                        "(int8 activations) (default: both)")


def measure_bundle(path: Path, ids: list[int], tokens: int, runs: int, threads: int, numerics: str = "board") -> dict:
    from .contract import Bundle, Sampling
    from .runtime.engine import Engine
    from .runtime.generation import Generator, Sampler

    t0 = time.perf_counter()
    engine = Engine(Bundle(path), threads=threads, shared_pool=True, numerics=numerics)
    load_s = time.perf_counter() - t0
    gen = Generator(engine, [], Sampler(Sampling()))
    gen.generate(ids[:8], 4)  # warm-up: sessions, pages, thread pool
    ttft, decode = [], []
    for _ in range(runs):
        engine.reset()
        gen.generate(ids, tokens)
        ttft.append(gen.stats.ttft_ms)
        decode.append(gen.stats.decode_tok_s)
    return {"ttft_ms": statistics.median(ttft), "decode_tok_s": statistics.median(decode), "load_s": load_s}


def measure_transformers(hf_dir: Path, ids: list[int], tokens: int, runs: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ttft, decode = [], []
    with torch.inference_mode():
        for r in range(runs + 1):  # first run warms up
            cache = DynamicCache()
            t0 = time.perf_counter()
            out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            for _ in range(tokens - 1):
                out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
                tok = int(out.logits[0, -1].argmax())
            t2 = time.perf_counter()
            if r:
                ttft.append((t1 - t0) * 1000)
                decode.append((tokens - 1) / (t2 - t1))
    return {"ttft_ms": statistics.median(ttft), "decode_tok_s": statistics.median(decode)}


def bench(args) -> int:
    from .pipeline import OUT_DIR, build
    from .contract import Bundle
    from .runtime.chat import load_tokenizer_module

    console = Console()
    if not console.is_terminal:  # a pipe or a log: the whole table, not 80 columns of it
        console.width = 160
    root = Path(args.out) if args.out else OUT_DIR / "bench"
    results: dict = {"model": args.model, "prompt": PROMPT, "tokens": args.tokens, "threads": args.threads, "bundles": {}}
    quiet = Console(file=io.StringIO())
    bundles = {}
    for wt in args.weight_types:
        console.print(f"building {args.model} at {wt} ...")
        m = build(model=args.model, output_path=str(root / f"{args.model}_{wt}"), weight_type=wt, console=quiet,
                  progress=False)
        bundles[wt] = Path(m["out_dir"])
        results["bundles"][wt] = {"build_s": m["build_seconds"],
                                  "method": (m["input"].get("quantization") or {}).get("method") or "rtn",
                                  "bundle_mib": sum(f["bytes"] for f in m["files"].values()) / 2**20}
    first = Bundle(next(iter(bundles.values())))
    tok = load_tokenizer_module(first)
    chat = tok.ChatTokenizer(first.tokenizer_dir)
    ids = chat.encode_messages([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    results["prompt_tokens"] = len(ids)
    from .inputs.checkpoint import open_input

    from .accuracy.run import evaluate, read_text, reference_path, settings

    hf_dir = open_input(reference_path(first)).dir  # a calibrated bundle's fp32 source, not its GPTQ checkpoint

    text, acc_tokens, refs = read_text(None), settings()["bench_tokens"], {}
    results["accuracy_tokens"] = acc_tokens
    for wt, path in bundles.items():
        base = results["bundles"].pop(wt)
        for mode in args.numerics:
            console.print(f"running the {wt} bundle, {mode} numerics ...")
            r = {**base, "weight_type": wt, "numerics": mode,
                 **measure_bundle(path, ids, args.tokens, args.runs, args.threads, mode)}
            acc = evaluate([path], text=text, max_tokens=acc_tokens, numerics=mode, threads=args.threads,
                           shared_pool=True, log=lambda s: None, ref_cache=refs)["results"][0].metrics
            r.update({k: acc[k] for k in ("kld_mean", "kld_p99", "top1_agreement", "ppl", "ppl_ref")})
            results["bundles"][f"{wt} {mode}"] = r
    del refs
    console.print("running transformers eager fp32 ...")
    results["transformers_fp32"] = measure_transformers(hf_dir, ids, args.tokens, args.runs, args.threads)
    ref = results["transformers_fp32"]

    table = Table(title_justify="left", title=f"{args.model}: {len(ids)}-token prompt, {args.tokens} greedy tokens, {args.threads} threads "
                        f"(median of {args.runs}); HF = transformers eager fp32")
    for col in ("contender", "TTFT ms", "decode tok/s", "decode vs HF", "TTFT vs HF", "KLD mean", "top-1", "build s",
                "MiB"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for r in results["bundles"].values():
        r["decode_ratio"] = r["decode_tok_s"] / ref["decode_tok_s"]
        r["ttft_ratio"] = ref["ttft_ms"] / r["ttft_ms"]
        mode = "board" if r["numerics"] == "board" else "fast (int8 act)"
        kld = "-" if r["kld_mean"] is None else f"{r['kld_mean']:.4f}"
        method = "" if r["method"] == "rtn" else f" {r['method']}"
        table.add_row(f"axgen {r['weight_type']}{method} {mode}", f"{r['ttft_ms']:.1f}", f"{r['decode_tok_s']:.1f}",
                      f"{r['decode_ratio']:.2f}x", f"{r['ttft_ratio']:.2f}x", kld, f"{r['top1_agreement']:.3f}",
                      f"{r['build_s']:.1f}", f"{r['bundle_mib']:.1f}")
    table.add_row("HF fp32 (reference)", f"{ref['ttft_ms']:.1f}", f"{ref['decode_tok_s']:.1f}", "1.00x", "1.00x", "0",
                  "1.000", "-", "-")
    console.print(table)
    console.print(f"KLD mean: KL(fp32 reference || bundle) per token, top-1: argmax agreement, over the first "
                  f"{acc_tokens} tokens of the evaluation text (teacher-forced; `make accuracy` for the full report).",
                  highlight=False)
    (root / "bench.json").write_text(json.dumps(results, indent=2))
    ratios = ", ".join(f"{name} {r['decode_ratio']:.2f}x" for name, r in results["bundles"].items())
    console.print(f"decode vs transformers eager fp32: {ratios} (board: what the board computes; fast: int8 "
                  f"activations). Results: {root / 'bench.json'}", highlight=False)
    return 0
