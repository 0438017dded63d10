"""`make bench`: every registered backend x numerics side by side on the same bundles, same prompt, one run.

Builds the model at each --weight_types (timed; --reuse keeps a built one, --bundles times given ones), then
measures each contender in its own process (generator/bench/child.py): time to first token for the
chat-templated prompt, greedy decode speed over --tokens tokens (EOS ignored, so every contender decodes
the same count), and its peak RSS. Contenders: each backend of runtime/backends.py (--backends) in each of
its numerics (--numerics; a backend without board/fast numerics runs its own, transformers: fp32).

Speed is never shown without its accuracy cost: in the same run each contender is teacher-forced over the
first `bench_tokens` (data/accuracy.yaml) tokens of the evaluation text and its KL divergence and top-1
agreement vs the fp32 reference reported (synthetic weights: "synthetic, n/a").

Then many users (--users, default 8): that many different prompts one by one, then at once through the
continuous Batcher on the fused backend (aggregate tok/s and whether every answer equals its single-stream
answer); and with --peers (`make bench-peers`) llama.cpp and onnxruntime-genai in the same table
(generator/bench/peers.py). Ratios and the issue's targets in generator/bench/table.py; all in bench.json.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from ..cli.types import int_at_least

PROMPT = "Write a short story about a robot who learns to paint."
USER_PROMPTS = [PROMPT, "Explain how a bicycle stays upright.", "List five uses for a paperclip.",
                "What is the capital of France, and why is it famous?", "Describe the water cycle to a child.",
                "Give me three tips for learning a new language.", "Why is the sky blue?",
                "Write a haiku about autumn leaves."]
DEFAULT_TOKENS = 128
DEFAULT_BACKEND = "onnxruntime"


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
    p.add_argument("--backends", nargs="+", default=None, help="backends to time (default: every registered one)")
    p.add_argument("--synthetic", action="store_true", help="build the model from synthetic weights (no download; "
                   "KLD is then n/a) (default: real weights)")
    p.add_argument("--reuse", action="store_true", help="time a bundle already built in --out instead of "
                   "rebuilding it (default: rebuild)")
    p.add_argument("--bundles", nargs="+", default=None, help="time these built bundles (no build; --model and "
                   "--weight_types are then ignored) (default: build --model)")
    p.add_argument("--users", type=int_at_least(0), default=8, help="concurrent sessions of the many-users row on "
                   "the fused backend, 0 to skip (default: %(default)s)")
    p.add_argument("--accuracy_tokens", type=int_at_least(0), default=None, help="tokens of the evaluation text "
                   "each contender's KLD is measured on, 0 to skip (default: bench_tokens of data/accuracy.yaml)")
    p.add_argument("--peers", nargs="*", default=[], help="peers in the same table (`make bench-peers`): llama.cpp "
                   "types (Q8_0 Q4_0 Q4_1 Q4_K_M) and onnxruntime-genai precisions (int8 int4); a missing peer "
                   "is a note, not a failure (default: none)")


def child_env(peers: bool = False) -> dict:
    from ..paths import PROJECT_ROOT

    from .peers import PEERS_SITE

    env = dict(os.environ)
    paths = [str(PROJECT_ROOT), str(PEERS_SITE) if peers else "", env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def run_child(spec: dict, work: Path, name: str, peers: bool = False) -> dict:
    """Run one contender in its own process; its result (or {"error": ...} / {"missing": ...})."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    res = subprocess.run([sys.executable, "-m", "generator.bench.child", str(spec_path), str(result_path)],
                         capture_output=True, text=True, env=child_env(peers))
    spec_path.unlink(missing_ok=True)
    if res.returncode != 0 or not result_path.is_file():
        tail = " / ".join((res.stderr or res.stdout).strip().splitlines()[-2:])
        return {"error": f"exit {res.returncode}: {tail}"}
    out = json.loads(result_path.read_text())
    result_path.unlink()
    return out


def score(res: dict, logits_path: Path, acc) -> None:
    """KLD mean / p99, top-1 and perplexity of a child's logits against the fp32 reference, into res."""
    import numpy as np

    from ..accuracy.metrics import kl_divergence, token_metrics

    if not logits_path.is_file():
        return
    got = np.load(logits_path)
    logits_path.unlink()
    ref, targets = acc["ref"], acc["targets"]
    if got.ndim == 1:  # a top-k post graph: only its top-1 ids
        res.update(kld_mean=None, top1_agreement=float((got == ref.argmax(-1)).mean()))
        return
    if got.shape != ref.shape:
        res["accuracy_note"] = f"logits {got.shape} vs the reference's {ref.shape}"
        return
    m = token_metrics(ref, got, targets)
    res.update(kld_mean=m["kld_mean"], kld_p99=m["kld_p99"], top1_agreement=m["top1_agreement"], ppl=m["ppl"],
               ppl_ref=m["ppl_ref"])
    res["kld_max"] = float(kl_divergence(ref, got).max())


def get_bundles(args, root: Path, console: Console, results: dict) -> dict[str, Path]:
    """weight type -> bundle folder: --bundles as given, else each --weight_types built (or reused)."""
    from ..contract import Bundle
    from ..errors import GeneratorError
    from ..pipeline import build

    bundles: dict[str, Path] = {}
    if args.bundles:
        for path in map(Path, args.bundles):
            if not (path / "manifest.json").is_file():
                raise GeneratorError(f"--bundles {path}: not a bundle folder (no manifest.json).")
            wt = Bundle(path).opts.weight_type
            bundles[wt if wt not in bundles else path.name] = path
    else:
        quiet = Console(file=io.StringIO())
        for wt in args.weight_types:
            out = root / f"{args.model}{'_synthetic' if args.synthetic else ''}_{wt}"
            if args.reuse and (out / "manifest.json").is_file():
                console.print(f"reusing {out}")
                bundles[wt] = out
                continue
            console.print(f"building {args.model} at {wt}{' (synthetic weights)' if args.synthetic else ''} ...")
            m = build(model=args.model, output_path=str(out), weight_type=wt, synthetic=args.synthetic,
                      console=quiet, progress=False)
            bundles[wt] = Path(m["out_dir"])
            results["build_s"][wt] = m["build_seconds"]
    for wt, path in bundles.items():
        b = Bundle(path)
        results["bundles"][wt] = {"path": str(path), "weight_type": b.opts.weight_type,
                                  "method": (getattr(b.manifest.input, "quantization", None) or {}).get("method") or "rtn",
                                  "bundle_mib": sum(f.bytes for f in b.manifest.files.values()) / 2**20,
                                  "synthetic": bool(b.manifest.synthetic), "build_s": results["build_s"].get(wt)}
    return bundles


def accuracy_plan(bundles: dict[str, Path], tokens: int, console: Console) -> dict[str, dict]:
    """weight type -> {ids, spans, targets, ref}: the evaluation windows and fp32 reference logits (one
    reference for bundles of the same checkpoint); empty for synthetic bundles."""
    from ..accuracy.run import read_text, reference_run
    from ..contract import Bundle

    text, refs, plan = read_text(None), {}, {}
    for wt, path in bundles.items():
        b = Bundle(path)
        if b.manifest.synthetic or not tokens:
            continue
        console.print(f"fp32 reference logits for {wt} ({tokens} tokens) ...")
        ids, spans, targets, _, (ref, _) = reference_run(b, text, tokens, None, False, refs)
        plan[wt] = {"ids": ids, "spans": [list(s) for s in spans], "targets": targets, "ref": ref}
    return plan


def contenders(args, bundles: dict[str, Path]) -> list[dict]:
    """(backend, numerics, bundle) to time: every backend's declared numerics that --numerics asks for (a
    backend with none of them: its own first); transformers (the source checkpoint) once."""
    from ..runtime import backends

    names = args.backends or backends.available()
    for n in names:
        backends.get(n)  # an unknown name: the registry's clear error
    order = sorted(names, key=lambda n: (n != backends.DEFAULT, n == "transformers", n))
    out = []
    for name in order:
        cls = backends.get(name)
        declared = list(cls.capabilities.get("numerics", ()))
        modes = [m for m in declared if m in args.numerics] or declared[:1]
        for wt, path in bundles.items():
            for mode in modes:
                out.append({"backend": name, "numerics": mode, "weight_type": wt, "bundle": str(path),
                            "label": f"{name} {mode} {wt}" if name != "transformers" else f"{name} {mode}"})
            if name == "transformers":
                break
    return out


def too_big_for_fp32(path: Path, backend: str, numerics: str) -> str | None:
    """Why a contender that holds the weights in fp32 cannot run here, or None: transformers fp32, and
    onnxruntime in board numerics (int weights become fp32 at load: a 7B s4 layer file of 124 MB takes ~930 MB
    resident). onnxruntime-fused refuses by itself, up front, when its weights would not fit."""
    import psutil

    from ..contract import Bundle

    if not (backend == "transformers" or (backend == DEFAULT_BACKEND and numerics == "board")):
        return None
    b = Bundle(path)
    bits = {"s4": 4, "s8": 8}.get(b.opts.weight_type, 16)
    fp32 = sum(f.bytes for f in b.manifest.files.values()) * 32 / bits
    avail = psutil.virtual_memory().available
    if fp32 > 0.6 * avail:
        return f"skipped: fp32 weights ~{fp32 / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
    return None


def bench(args) -> int:
    from ..contract import Bundle
    from ..pipeline import OUT_DIR
    from ..runtime.chat import load_tokenizer_module
    from . import peers as peer_rows
    from . import table

    console = Console()
    if not console.is_terminal:  # a pipe or a log: the whole table, not 80 columns of it
        console.width = 200
    root = Path(args.out) if args.out else OUT_DIR / "bench"
    work = root / ".bench"
    from ..runtime import backends

    for name in args.backends or []:
        backends.get(name)  # an unknown name: the registry's error, before any work
    results: dict = {"model": args.model, "prompt": PROMPT, "tokens": args.tokens, "threads": args.threads,
                     "runs": args.runs, "build_s": {}, "bundles": {}, "contenders": [], "peers": [], "notes": [],
                     "load_average": [os.getloadavg()[0]]}  # at the start and the end: other work skews the figures
    bundles = get_bundles(args, root, console, results)
    first = Bundle(next(iter(bundles.values())))
    chat = load_tokenizer_module(first).ChatTokenizer(first.tokenizer_dir)
    ids = chat.encode_messages([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    results["prompt_tokens"] = len(ids)
    for wt, path in bundles.items():
        C = Bundle(path).opts.kv_cache_len
        if len(ids) + args.tokens > C:
            from ..errors import GeneratorError

            raise GeneratorError(f"the {len(ids)}-token prompt + --tokens {args.tokens} exceed the kv_cache_len "
                                 f"{C} of {path}; pass fewer --tokens or a bundle with a longer KV cache.")
    if args.bundles:
        results["model"] = first.manifest.recipe.variant or first.manifest.recipe.name
    from ..accuracy.run import settings

    acc_tokens = settings()["bench_tokens"] if args.accuracy_tokens is None else args.accuracy_tokens
    results["accuracy_tokens"] = acc_tokens
    acc = accuracy_plan(bundles, acc_tokens, console)
    for n, c in enumerate(contenders(args, bundles)):
        row = dict(c, kind="engine", bundle_mib=results["bundles"][c["weight_type"]]["bundle_mib"])
        skip = too_big_for_fp32(Path(c["bundle"]), c["backend"], c["numerics"])
        if skip:
            results["contenders"].append(dict(row, note=skip))
            continue
        console.print(f"running {c['label']} ...")
        a = acc.get(c["weight_type"])
        logits = work / f"c{n}.npy"
        spec = dict(c, kind="engine", ids=ids, tokens=args.tokens, runs=args.runs, threads=args.threads,
                    logits=str(logits), accuracy={"ids": a["ids"], "spans": a["spans"]} if a else None)
        res = run_child(spec, work, f"c{n}")
        if a:
            score(res, logits, a)
        elif "error" not in res:
            res["accuracy_note"] = "synthetic, n/a" if results["bundles"][c["weight_type"]]["synthetic"] else "n/a"
        results["contenders"].append({**row, **res})
    if args.users:
        results["users"] = many_users(args, bundles, chat, work, console)
    else:
        results["users"] = []
    if args.peers:
        results["peers"] = peer_rows.run_peers(args, bundles, first, ids, acc, work, root / "peers", console)
    results["load_average"].append(os.getloadavg()[0])
    table.finish(results, console)
    (root / "bench.json").write_text(json.dumps(results, indent=2, default=float))
    console.print(f"Results: {root / 'bench.json'}", highlight=False)
    return 0


def many_users(args, bundles: dict[str, Path], chat, work: Path, console: Console) -> list[dict]:
    """--users sessions through the continuous Batcher on the fused backend, s8 bundle (the issue's target),
    in each of its numerics that --numerics asks for."""
    from ..runtime import backends

    name = "onnxruntime-fused"
    if name not in backends.available() or (args.backends and name not in args.backends):
        return [{"note": f"backend {name} {'not registered' if name not in backends.available() else 'not in --backends'}"}]
    modes = list(backends.get(name).capabilities.get("numerics", ()))
    wt = "s8" if "s8" in bundles else next(iter(bundles))
    prompts = [chat.encode_messages([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in (USER_PROMPTS * (args.users // len(USER_PROMPTS) + 1))[:args.users]]
    rows = []
    for mode in [m for m in modes if m in args.numerics] or modes[:1]:
        row = {"backend": name, "numerics": mode, "weight_type": wt}
        skip = too_big_for_fp32(bundles[wt], name, mode)
        if skip:
            rows.append(dict(row, note=skip))
            continue
        console.print(f"many users: {args.users} sessions on {name} {mode} {wt} ...")
        spec = {"kind": "batch", "backend": name, "numerics": mode, "bundle": str(bundles[wt]),
                "threads": args.threads, "prompts": prompts, "tokens": args.tokens, "batch_size": args.users}
        rows.append({**row, **run_child(spec, work, f"users_{mode}")})
    return rows
