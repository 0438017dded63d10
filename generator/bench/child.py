"""One contender of `make bench`, measured in its own process (`python -m generator.bench.child SPEC RESULT`),
so that its peak RSS (VmHWM, read right after the timed runs, before the accuracy pass) is its own.

SPEC is a JSON file written by the parent (generator/bench/__init__.py); RESULT the JSON written back.
Kinds:
  engine     a registered backend (runtime/backends.open_engine) x numerics on a bundle: TTFT and decode
             tok/s of the chat prompt (greedy, EOS ignored, median of runs), the greedy answer, peak RSS,
             the KV pool's bytes where the engine has one; then, teacher-forced through Generator.stream
             (forced=..., logits_out=...), the logits at every position of the accuracy windows, saved as
             .npy for the parent to score against the fp32 reference. `transformers`: the fp32 reference
             checkpoint in transformers' own KV-cache loop (run_transformers).
  batch      many users: the prompts one after another on a batch-1 engine (single-stream aggregate tok/s
             and answers), then all at once through the continuous Batcher (runtime/batching.py), then each
             alone through that Batcher (answers compared with both).
  llama.cpp  a llama.cpp GGUF (llama-cpp-python): the same prompt ids, timing and logits
             (llama.cpp-quantize: the GGUF made first, in a process of its own).
  genai      an onnxruntime-genai model folder: the same.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would include the parent's RSS at fork,
    which Linux carries over exec)."""
    return _status_mib("VmHWM:", lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def steady_rss_mib() -> float | None:
    """This process's resident memory now (VmRSS): after the timed runs, what the engine holds once loaded
    (the peak also counts load-time copies, e.g. weights before onnxruntime packs them)."""
    return _status_mib("VmRSS:", lambda: None)


def _status_mib(key: str, fallback):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return fallback()  # not Linux (ru_maxrss: KiB on Linux, bytes on macOS)


def greedy_sampler():
    from ..contract import Sampling
    from ..runtime.generation import Sampler

    return Sampler(Sampling(enable_top_k_sampling=False, enable_top_p_sampling=False))


def time_runs(run, runs: int) -> dict:
    """run() -> (ttft_ms, decode_tok_s, answer); the median of `runs` after one warm-up."""
    run(warm=True)
    ttft, decode, answer = [], [], []
    for _ in range(runs):
        t, d, answer = run()
        ttft.append(t)
        decode.append(d)
    return {"ttft_ms": statistics.median(ttft), "decode_tok_s": statistics.median(decode), "answer": answer}


# -- our backends ----------------------------------------------------------------------------------

def open_contender(spec: dict, **extra):
    from ..contract import Bundle
    from ..runtime.backends import open_engine

    engine, _ = open_engine(Bundle(Path(spec["bundle"])), spec["backend"], numerics=spec["numerics"],
                            threads=spec["threads"], shared_pool=True, **extra)
    return engine


def engine_speed(engine, ids: list[int], tokens: int, runs: int) -> dict:
    from ..runtime.generation import Generator

    gen = Generator(engine, [], greedy_sampler())

    def run(warm=False):
        engine.reset()
        out = gen.generate(ids[:8] if warm else ids, 4 if warm else tokens)
        return gen.stats.ttft_ms, gen.stats.decode_tok_s, out

    return time_runs(run, runs)


def transformers_speed(model, ids: list[int], tokens: int, runs: int) -> dict:
    """transformers' own KV-cache loop (the `transformers` backend's engine recomputes the whole sequence
    per step: a reference for answers, not transformers' speed)."""
    import torch
    from transformers import DynamicCache

    def run(warm=False):
        n = 4 if warm else tokens
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(torch.tensor([ids]), past_key_values=DynamicCache(), use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            t1, answer = time.perf_counter(), [tok]
            for _ in range(n - 1):
                out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
                tok = int(out.logits[0, -1].argmax())
                answer.append(tok)
            t2 = time.perf_counter()
        return (t1 - t0) * 1000, (n - 1) / max(t2 - t1, 1e-9), answer

    return time_runs(run, runs)


def engine_logits(engine, ids: list[int], spans: list[list[int]]) -> np.ndarray:
    """Teacher-forced logits at positions s..e-1 of every window (each from an empty cache) [T, V]; with a
    top-k post graph, the top-1 ids [T] only."""
    from ..runtime.generation import Generator

    gen, rows = Generator(engine, [], greedy_sampler()), []
    for s, e in spans:
        engine.reset()
        out: list = []
        gen.generate(ids[s:s + 1], forced=ids[s + 1:e + 1], logits_out=out)
        rows.extend(out)
    if rows and isinstance(rows[0], tuple):
        return np.array([int(idx[0]) for _, idx in rows], np.int64)
    return np.stack(rows).astype(np.float32)


def reference_model(spec: dict, threads: int):
    """transformers fp32 (eager attention) of the bundle's reference checkpoint, a GGUF imported as the
    accuracy report does (the `transformers` backend itself takes only a Hugging Face folder as its source)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..accuracy.run import reference_path
    from ..contract import Bundle
    from ..inputs.checkpoint import open_input

    torch.set_num_threads(threads)
    hf_dir = open_input(reference_path(Bundle(Path(spec["bundle"])))).dir
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def run_transformers(spec: dict) -> dict:
    """The fp32 reference in transformers' own KV-cache loop; its logits over the windows in one forward each."""
    from ..accuracy.run import model_logits

    t0 = time.perf_counter()
    model = reference_model(spec, spec["threads"])
    res = {"load_s": time.perf_counter() - t0, "numerics": "fp32"}
    res.update(transformers_speed(model, spec["ids"], spec["tokens"], spec["runs"]))
    res["rss_mib"] = peak_rss_mib()
    if spec.get("accuracy"):
        a = spec["accuracy"]
        np.save(spec["logits"], model_logits(model, a["ids"], [tuple(s) for s in a["spans"]]))
    return res


def run_engine(spec: dict) -> dict:
    if spec["backend"] == "transformers":
        return run_transformers(spec)
    t0 = time.perf_counter()
    engine = open_contender(spec)
    res = {"load_s": time.perf_counter() - t0, "numerics": engine.numerics}
    res.update(engine_speed(engine, spec["ids"], spec["tokens"], spec["runs"]))
    res["rss_mib"] = peak_rss_mib()
    res["rss_steady_mib"] = steady_rss_mib()
    pool = getattr(engine, "pool", None)
    if pool is not None:
        res["kv_pool_mib"] = (pool.k.nbytes + pool.v.nbytes) / 2**20
    else:
        kc, vc = getattr(engine, "k_cache", None), getattr(engine, "v_cache", None)
        if kc is not None:
            res["kv_pool_mib"] = (kc.nbytes + vc.nbytes) / 2**20
    if spec.get("accuracy"):
        np.save(spec["logits"], engine_logits(engine, spec["accuracy"]["ids"], spec["accuracy"]["spans"]))
    return res


def run_batch(spec: dict) -> dict:
    """8 (or len(prompts)) greedy sessions one by one on a batch-1 engine, then at once through the Batcher."""
    from ..runtime.batching import Batcher
    from ..runtime.generation import Generator

    prompts, tokens = spec["prompts"], spec["tokens"]
    engine = open_contender(spec)
    gen = Generator(engine, [], greedy_sampler())
    gen.generate(prompts[0][:8], 4)  # warm-up
    single, t0 = [], time.perf_counter()
    for ids in prompts:
        engine.reset()
        single.append(gen.generate(ids, tokens))
    single_s = time.perf_counter() - t0
    del gen, engine
    engine = open_contender(spec, batch_size=spec["batch_size"])
    batcher = Batcher(engine, batch_size=spec["batch_size"], eos_ids=[])
    try:
        warm = batcher.submit(prompts[0][:8], greedy_sampler(), 4)
        list(warm.tokens())
        answers: list[list[int]] = [[] for _ in prompts]
        errors: list[str] = []

        def consume(n, req):
            try:
                for tok in req.tokens():
                    answers[n].append(tok)
            except Exception as exc:  # RequestFailed: the row says so, the others still count
                errors.append(f"session {n}: {exc}")

        t0 = time.perf_counter()
        reqs = [batcher.submit(ids, greedy_sampler(), tokens) for ids in prompts]
        threads = [threading.Thread(target=consume, args=(n, r)) for n, r in enumerate(reqs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batch_s = time.perf_counter() - t0
        rss = peak_rss_mib()
        solo = []  # each prompt alone through the same Batcher (its prefix cache warm, as S's tests compare)
        for ids in prompts:
            try:
                solo.append(list(batcher.submit(ids, greedy_sampler(), tokens).tokens()))
            except Exception as exc:
                errors.append(f"alone: {exc}")
                solo.append([])
    finally:
        batcher.close()
    n_single, n_batch = sum(map(len, single)), sum(map(len, answers))
    return {"sessions": len(prompts), "tokens": tokens, "single_tok_s": n_single / single_s,
            "batch_tok_s": n_batch / batch_s, "speedup": (n_batch / batch_s) / (n_single / single_s),
            "identical": [a == s for a, s in zip(answers, single)],
            "identical_alone": [a == s for a, s in zip(answers, solo)],
            "first_difference": [first_difference(a, s) for a, s in zip(answers, single)],
            "first_difference_alone": [first_difference(a, s) for a, s in zip(answers, solo)],
            "errors": errors, "generated": [len(a) for a in answers], "rss_mib": rss}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first token index where two answers differ (None: equal)."""
    from ..runtime.generation import common_prefix

    return None if a == b else common_prefix(a, b)


# -- peers -----------------------------------------------------------------------------------------

def run_llama(spec: dict) -> dict:
    import llama_cpp  # noqa: F401  (missing: the parent's note)

    from ..accuracy.peers import llama_speed, peer_logits

    res = llama_speed(Path(spec["path"]), spec["ids"], spec["tokens"], spec["runs"], spec["threads"])
    res["rss_mib"] = peak_rss_mib()
    if spec.get("accuracy"):
        a = spec["accuracy"]
        np.save(spec["logits"], peer_logits(Path(spec["path"]), a["ids"], [tuple(s) for s in a["spans"]], spec["threads"]))
    return res


def run_llama_quantize(spec: dict) -> dict:
    import llama_cpp  # noqa: F401  (missing: the parent's note)

    from ..accuracy.peers import check_types, quantized_gguf

    qtype = check_types([spec["qtype"]])[0]
    return {"path": str(quantized_gguf(Path(spec["source"]), qtype, Path(spec["root"]), spec["threads"]))}


def run_genai(spec: dict) -> dict:
    import onnxruntime_genai  # noqa: F401  (missing: the parent's note)

    from ..accuracy.peers import genai_logits, genai_speed

    res = genai_speed(Path(spec["path"]), spec["ids"], spec["tokens"], spec["runs"], spec["threads"])
    res["rss_mib"] = peak_rss_mib()
    if spec.get("accuracy"):
        a = spec["accuracy"]
        np.save(spec["logits"], genai_logits(Path(spec["path"]), a["ids"], a["spans"], spec["threads"]))
    return res


KINDS = {"engine": run_engine, "batch": run_batch, "llama.cpp": run_llama, "llama.cpp-quantize": run_llama_quantize,
         "genai": run_genai}


def main(argv: list[str]) -> int:
    from ..errors import GeneratorError

    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    try:
        res = KINDS[spec["kind"]](spec)
    except ImportError as exc:
        res = {"missing": str(exc)}
    except GeneratorError as exc:
        res = {"error": str(exc)}
    result_path.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
