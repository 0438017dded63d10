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
