"""llama.cpp as a peer in the accuracy report (`--peers Q8_0 Q4_0 Q4_K_M`, `make bench-peers`).

Optional: needs `llama-cpp-python` (built from source here: `pip install llama-cpp-python`; never needed
by the tests or CI). The peer quantizes the same weights the reference runs: the bundle's reference
checkpoint must be a .gguf (the default model's is), which llama.cpp re-quantizes to each type
(`llama_model_quantize` with allow_requantize: it dequantizes to fp32 first, so a Q4_1 source gives the
same weights the fp32 reference computes with). Each peer then runs the same token ids in the same
windows, each from an empty context, teacher-forced, all positions' logits kept, and is scored against the
same reference logits as the bundles. The quantized files go under the report's folder
(out/accuracy/peers/), made once and reused.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..contract import Bundle
from ..errors import GeneratorError
from .metrics import kl_divergence, token_metrics
from .run import Result, reference_run

PEER_ROOT = Path("out") / "accuracy" / "peers"


def llama_cpp():
    """The llama_cpp module, or a clear error saying how to get it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise GeneratorError("--peers needs llama-cpp-python, an optional extra this project does not install "
                             "(it builds llama.cpp from source, ~20 min on 2 cores): "
                             "`.venv/bin/pip install llama-cpp-python`, then run again.") from exc
    return llama_cpp


def check_types(types: list[str]) -> list[str]:
    lib = llama_cpp()
    bad = [t for t in types if not hasattr(lib, f"LLAMA_FTYPE_MOSTLY_{t.upper()}")]
    if bad:
        raise GeneratorError(f"--peers {' '.join(bad)}: not a llama.cpp quantization type; e.g. Q8_0 Q4_0 Q4_K_M.")
    return [t.upper() for t in types]


def quantized_gguf(source: Path, qtype: str, root: Path, threads: int) -> Path:
    """`source` re-quantized to `qtype` by llama.cpp, under root (made once; a temp name until complete)."""
    lib = llama_cpp()
    out = root / f"{source.stem}.{qtype}.gguf"
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True
    params.nthread = threads
    rc = lib.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise GeneratorError(f"llama.cpp could not quantize {source} to {qtype} (llama_model_quantize returned {rc}).")
    tmp.rename(out)
    return out


def peer_logits(path: Path, ids: list[int], spans: list[tuple[int, int]], threads: int) -> np.ndarray:
    """llama.cpp's logits at every position of every window [T, V], each window from an empty context."""
    lib = llama_cpp()
    window = max(e - s for s, e in spans)
    llm = lib.Llama(model_path=str(path), n_ctx=window, n_batch=window, logits_all=True, n_threads=threads,
                    verbose=False)
    out = []
    for s, e in spans:
        llm.reset()
        llm.eval(ids[s:e])
        out.append(np.array(llm.scores[: e - s], dtype=np.float32))
    return np.concatenate(out)


def evaluate_peers(bundle_dir: str | Path, types: list[str], *, text: str, max_tokens: int | None, threads: int,
                   refs: dict, root: Path = PEER_ROOT, log=print) -> list[Result]:
    """One Result per llama.cpp type, on the windows and reference of the first bundle (`refs` shared with
    the bundles' evaluation, so the reference runs once)."""
    types = check_types(types)
    bundle = Bundle(Path(bundle_dir))
    ids, spans, targets, key, (ref, _) = reference_run(bundle, text, max_tokens, None, False, refs)
    source = Path(key[0])
    if source.suffix != ".gguf" or not source.is_file():
        raise GeneratorError(f"--peers: llama.cpp quantizes the reference checkpoint itself, which must be a .gguf "
                             f"file; {bundle.dir}'s reference is {source}.")
    results = []
    for qtype in types:
        path = quantized_gguf(source, qtype, root, threads)
        started = time.perf_counter()
        logits = peer_logits(path, ids, spans, threads)
        seconds = time.perf_counter() - started
        if logits.shape != ref.shape:
            raise GeneratorError(f"llama.cpp {qtype} gave logits {logits.shape} for the reference's {ref.shape}.")
        metrics, kld = token_metrics(ref, logits, targets), kl_divergence(ref, logits)
        results.append(Result(f"llama.cpp {qtype}", str(path), qtype, "llama.cpp", metrics, kld,
                              {"peer": True, "quant_method": "llama.cpp", "bytes": path.stat().st_size,
                               "bundle_seconds": round(seconds, 2)}))
        log(f"llama.cpp {qtype}: {metrics['n_tokens']} tokens")
    return results


# -- speed, for `make bench-peers` (generator/bench/) -----------------------------------------------

def llama_speed(path: Path, ids: list[int], tokens: int, runs: int, threads: int) -> dict:
    """llama.cpp on the prompt ids: TTFT (prompt evaluated, first token picked) and greedy decode tok/s over
    `tokens` tokens (EOS ignored), the median of `runs` after a warm-up; the greedy answer too."""
    import statistics

    lib = llama_cpp()
    llm = lib.Llama(model_path=str(path), n_ctx=len(ids) + tokens + 8, n_batch=512, n_threads=threads,
                    n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()

    def pick() -> int:  # the last evaluated token's logits (only it is an output without logits_all)
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())

    def run(prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        answer = [pick()]
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([answer[-1]])
            answer.append(pick())
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (n - 1) / max(t2 - t1, 1e-9), answer

    run(ids[:8], 4)
    timed = [run(ids, tokens) for _ in range(runs)]
    return {"ttft_ms": statistics.median(t for t, _, _ in timed),
            "decode_tok_s": statistics.median(d for _, d, _ in timed), "answer": timed[-1][2]}


def genai_build(hf_dir: Path, precision: str, root: Path, env: dict, log=print) -> Path:
    """onnxruntime-genai's model builder on a Hugging Face checkpoint folder (int8 / int4, CPU), into
    root/genai-<precision> (made once; a temp name until complete). `env`: where onnxruntime_genai is."""
    import shutil
    import subprocess
    import sys

    out = root / f"genai-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    tmp = root / f".genai-{precision}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(tmp / "cache_dir")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0 or not (tmp / "genai_config.json").is_file():
        tail = " / ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
        raise GeneratorError(f"onnxruntime-genai's builder failed on {hf_dir} ({precision}): {tail}")
    shutil.rmtree(tmp / "cache_dir", ignore_errors=True)
    tmp.rename(out)
    log(f"onnxruntime-genai {precision}: built {out}")
    return out


def genai_model(path: Path, threads: int):
    import json

    import onnxruntime_genai as og

    cfg = og.Config(str(path))
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                      "inter_op_num_threads": 1}}}}))
    return og, og.Model(cfg)


def genai_speed(path: Path, ids: list[int], tokens: int, runs: int, threads: int) -> dict:
    """onnxruntime-genai on the prompt ids, greedy, `tokens` tokens (min_length = max_length: EOS ignored)."""
    import statistics

    og, model = genai_model(path, threads)

    def run(prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        answer = [int(gen.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while not gen.is_done() and len(answer) < n:
            gen.generate_next_token()
            answer.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (len(answer) - 1) / max(t2 - t1, 1e-9), answer

    run(ids[:8], 4)
    timed = [run(ids, tokens) for _ in range(runs)]
    return {"ttft_ms": statistics.median(t for t, _, _ in timed),
            "decode_tok_s": statistics.median(d for _, d, _ in timed), "answer": timed[-1][2]}


def genai_logits(path: Path, ids: list[int], spans, threads: int) -> np.ndarray:
    """onnxruntime-genai's logits at every position of every window [T, V] (token by token, each window
    from an empty context)."""
    og, model = genai_model(path, threads)
    out = []
    for s, e in spans:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=e - s + 1, do_sample=False)
        gen = og.Generator(model, params)
        for t in ids[s:e]:
            gen.append_tokens([t])
            out.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
    return np.stack(out)
