"""Teacher-forced evaluation of bundles against their fp32 reference over a fixed text.

The text (default generator/data/text/evaluation.txt) is tokenized with the bundle's own tokenizer as
plain text and cut into windows of at most `window` tokens (data/accuracy.yaml). Each window starts
from an empty KV cache; its tokens are prefilled through the bundle's layer graphs (runtime Engine,
`hidden_out`: every position's final hidden state), and the post graph runs once over all of them
(the same graph with its token dimension symbolic). Each position's logits are compared with the
reference's logits at the same position; the token that follows it in the text is its target.

The reference is transformers' fp32 model of `--reference`, else the manifest's `input.reference`
(the fp32 checkpoint a calibrated bundle was derived from), else `input.source`, with fp32 embeddings:
the model as the checkpoint defines it, so the figures are the whole cost of the bundle as the board
runs it (bf16 embedding table and hidden-state type included). `bf16_embedding=True` (API only) rounds
the reference's layer-0 input to bf16 as the checks do, to measure the graphs alone.

post_topk > 0: the post graph gives only the top k logits, from which neither a KL divergence nor a
perplexity over the vocabulary can be formed. Then only top-1 agreement is reported (the first of
the top k is the argmax) and the other figures are None with a note: build with --post_topk 0 for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..contract import STORAGE, Bundle, from_storage
from ..errors import GeneratorError
from ..paths import DATA_DIR
from .metrics import kl_divergence, token_metrics

SETTINGS = DATA_DIR / "accuracy.yaml"
EVALUATION_TEXT = DATA_DIR / "text" / "evaluation.txt"


@lru_cache(maxsize=1)
def settings() -> dict[str, Any]:
    """data/accuracy.yaml: window and token counts, and make accuracy's configurations."""
    return yaml.safe_load(SETTINGS.read_text())


def read_text(path: str | Path | None, flag: str = "--text") -> str:
    """The evaluation text: a non-empty UTF-8 text file (default: the committed evaluation text)."""
    p = Path(path) if path else EVALUATION_TEXT
    if not p.is_file():
        raise GeneratorError(f"{flag} {p}: no such file; expected a UTF-8 text file.")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GeneratorError(f"{flag} {p}: not a UTF-8 text file ({exc.reason} at byte {exc.start}).") from None
    if "\x00" in text:
        raise GeneratorError(f"{flag} {p}: not a text file (it holds NUL bytes); expected UTF-8 text.")
    if not text.strip():
        raise GeneratorError(f"{flag} {p}: the file is empty; expected some English text to evaluate on.")
    return text


def check_max_tokens(n: int | None, flag: str = "--max_tokens") -> int | None:
    if n is not None and n < 1:
        raise GeneratorError(f"{flag} must be a positive number of tokens, got {n}.")
    return n


def text_ids(bundle: Bundle, text: str, max_tokens: int | None) -> list[int]:
    """The text's token ids (the bundle's tokenizer, plain text): max_tokens targets, so one id more."""
    from ..runtime.chat import load_tokenizer_module

    tok = load_tokenizer_module(bundle).ChatTokenizer(bundle.tokenizer_dir)
    ids = list(tok.encode_text(text))
    if len(ids) < 2:
        raise GeneratorError(f"the evaluation text is {len(ids)} token(s) long; at least 2 are needed "
                             f"(one position and the token that follows it).")
    return ids[:max_tokens + 1] if max_tokens else ids


def windows(n_ids: int, window: int) -> list[tuple[int, int]]:
    """(start, end) of each window: positions start..end-1 are run, ids start+1..end are their targets."""
    if window < 1:
        raise GeneratorError(f"accuracy window must be at least 1 token, got {window}.")
    last = n_ids - 1
    return [(s, min(s + window, last)) for s in range(0, last, window)]


def window_for(bundle: Bundle) -> int:
    """The configured window, no longer than the bundle's KV cache."""
    return max(1, min(int(settings()["window"]), bundle.opts.kv_cache_len))


# -- the bundle ----------------------------------------------------------------------------------

def bundle_logits(bundle: Bundle, ids: list[int], spans: list[tuple[int, int]], *, numerics: str = "board",
                  threads: int = 2, shared_pool: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The bundle's logits at every position of every window: fp32 [T, V], or with post_topk the top-k
    values [T, k] and their ids [T, k]."""
    from onnx import TensorProto

    from ..runtime.engine import Engine
    from ..runtime.ort import open_session, run_once

    engine = Engine(bundle, threads=threads, shared_pool=shared_pool, numerics=numerics)
    hidden = bundle.opts.hidden_state_type
    dt, ot = STORAGE[hidden]
    post = open_session(bundle.post_file, threads=threads, quantized=bundle.opts.quantized,
                        shared_pool=engine.shared_pool, relaxed=True, numerics=numerics)
    k = bundle.opts.post_topk
    width = k or bundle.spec.vocab_size
    total = sum(e - s for s, e in spans)
    values = np.zeros((total, width), np.float32)
    indices = np.zeros((total, k), np.int64) if k else None
    at = 0
    for s, e in spans:
        n = e - s
        engine.reset()
        h = np.zeros((n, bundle.spec.hidden_size), engine.dtype)
        engine.prefill(ids[s:e], hidden_out=h)
        outs = {"output": ((1, n, width), dt, ot)}
        if k:
            outs["indices"] = ((1, n, k), np.int32, TensorProto.INT32)
        got = run_once(post, {"input": (h[None], ot)}, outs)
        values[at:at + n] = from_storage(got["output"], hidden)[0]
        if k:
            indices[at:at + n] = got["indices"][0]
        at += n
    return values, indices


# -- the reference -------------------------------------------------------------------------------

def reference_path(bundle: Bundle, override: str | None = None) -> str:
    """--reference, else the fp32 checkpoint a calibrated bundle came from, else what it was built from."""
    inp = bundle.manifest.input
    if override:
        return override
    ref = getattr(inp, "reference", None)
    if ref and not Path(ref).exists():  # never fall back to the calibrated weights: that hides their error
        raise GeneratorError(f"{bundle.dir}: the fp32 checkpoint its weights were calibrated from (manifest "
                             f"input.reference {ref}) does not exist here; pass it with --reference PATH.")
    return ref or inp.source


def open_reference(bundle: Bundle, override: str | None = None):
    """(checkpoint, recipe) of the bundle's fp32 reference."""
    from ..inputs.checkpoint import open_input
    from ..recipe import registry

    recipe = registry().recipes[bundle.manifest.recipe.name]
    if not override and bundle.manifest.synthetic:
        from ..inputs.synthetic import synthetic_checkpoint

        return synthetic_checkpoint(recipe, bundle.manifest.recipe.variant), recipe
    return open_input(reference_path(bundle, override)), recipe


def reference_logits(ckpt, recipe, ids: list[int], spans: list[tuple[int, int]],
                     bf16_embedding: bool = False, opts=None) -> np.ndarray:
    """transformers fp32 logits at every position of every window [T, V] (each window from no context);
    `opts`: the bundle's options, whose --extend_method the reference gets too."""
    from ..verify.checks import release_memory
    from ..verify.reference import extend_reference, load_reference

    model = load_reference(ckpt, recipe)
    if opts is not None:
        extend_reference(model, opts)
    out = model_logits(model, ids, spans, bf16_embedding)
    del model
    release_memory()
    return out


def model_logits(model, ids: list[int], spans: list[tuple[int, int]], bf16_embedding: bool = False) -> np.ndarray:
    """A loaded transformers model's fp32 logits at every position of every window [T, V]."""
    import contextlib

    import torch

    from ..verify.reference import bf16_embedding_input

    out = []
    with torch.no_grad(), (bf16_embedding_input(model) if bf16_embedding else contextlib.nullcontext()):
        for s, e in spans:
            out.append(model(torch.tensor([ids[s:e]])).logits[0].float().numpy())
    return np.concatenate(out)


# -- one evaluation ------------------------------------------------------------------------------

def reference_run(bundle: Bundle, text: str, max_tokens: int | None, reference: str | None, bf16_embedding: bool,
                  refs: dict) -> tuple[list[int], list[tuple[int, int]], np.ndarray, tuple, tuple[np.ndarray, float]]:
    """(ids, windows, targets, reference key, (reference logits, seconds)) of `text` for `bundle`; the
    reference is computed once per key in `refs` (bundles of the same checkpoint and tokens share it)."""
    ids = text_ids(bundle, text, max_tokens)
    spans = windows(len(ids), window_for(bundle))
    targets = np.concatenate([ids[s + 1:e + 1] for s, e in spans])
    key = (reference_path(bundle, reference), bundle.manifest.synthetic and not reference, tuple(ids),
           tuple(spans), bf16_embedding, getattr(bundle.opts, "extend_method", "none"),
           getattr(bundle.opts, "scaling_factor", None))
    if key not in refs:
        t = time.perf_counter()
        ckpt, recipe = open_reference(bundle, reference)
        refs[key] = (reference_logits(ckpt, recipe, ids, spans, bf16_embedding, bundle.opts), time.perf_counter() - t)
    return ids, spans, targets, key, refs[key]


@dataclass
class Result:
    """One bundle's figures against its reference (per-position KLD kept for the plot)."""

    label: str
    bundle: str
    weight_type: str
    numerics: str
    metrics: dict[str, Any]
    kld: np.ndarray | None = field(repr=False, default=None)
    info: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        q = {} if self.kld is None else {f"kld_p{p}": float(np.percentile(self.kld, p)) for p in (50, 90)} | \
            {"kld_max": float(self.kld.max())}
        return {"label": self.label, "bundle": self.bundle, "weight_type": self.weight_type,
                "numerics": self.numerics, **self.metrics, **q, **self.info}


def describe_bundle(bundle: Bundle) -> dict[str, Any]:
    o = bundle.opts
    quant = getattr(bundle.manifest.input, "quantization", None) or {}
    bits = {4: "s4", 8: "s8"}.get(quant.get("bits"))
    return {"quant_method": quant.get("method") or "rtn", "quant_type": bits, "group_size": o.group_size,
            "post_weight_type": o.post_weight_type, "hidden_state_type": o.hidden_state_type,
            "overrides": dict(o.overrides)}


def score(bundle: Bundle, label: str, numerics: str, ref: np.ndarray, values: np.ndarray, top_ids: np.ndarray | None,
          targets: np.ndarray) -> Result:
    """The bundle's Result from its logits (or top-k values and ids) and the reference's."""
    info = describe_bundle(bundle)
    if top_ids is None:
        metrics, kld = token_metrics(ref, values, targets), kl_divergence(ref, values)
    else:
        agree = float((top_ids[:, 0] == ref.argmax(-1)).mean())
        metrics = {"kld_mean": None, "kld_p99": None, "top1_agreement": agree, "ppl_ref": None, "ppl": None,
                   "n_tokens": int(len(targets))}
        kld = None
        info["note"] = (f"post_topk {bundle.opts.post_topk}: the post graph gives only the top {bundle.opts.post_topk} "
                        f"logits, so only top-1 agreement is measured; build with --post_topk 0 for KLD and perplexity")
    return Result(label, str(bundle.dir), bundle.opts.weight_type, numerics, metrics, kld, info)


def open_bundle(path: str | Path) -> Bundle:
    p = Path(path)
    if not (p / "manifest.json").is_file():
        raise GeneratorError(f"{p}: not a bundle folder (no manifest.json); build one with "
                             f"`python -m generator build ...` and pass its --output_path.")
    return Bundle(p)


def evaluate(bundle_dirs: list[str | Path], *, text: str, max_tokens: int | None = None, numerics: str = "board",
             reference: str | None = None, threads: int = 2, shared_pool: bool = False,
             bf16_embedding: bool = False, labels: list[str] | None = None, log=print,
             ref_cache: dict | None = None) -> dict[str, Any]:
    """Evaluate each bundle over `text` against its reference (references shared by bundles of the same
    checkpoint and tokens, and across calls given the same `ref_cache`). Returns {"results": [Result],
    "settings": {...}}."""
    from ..runtime.ort import check_numerics

    check_numerics(numerics)
    check_max_tokens(max_tokens)
    bundles = [open_bundle(d) for d in bundle_dirs]
    refs: dict[tuple, tuple[np.ndarray, float]] = {} if ref_cache is None else ref_cache
    results = []
    for n, bundle in enumerate(bundles):
        ids, spans, targets, key, (ref, ref_s) = reference_run(bundle, text, max_tokens, reference, bf16_embedding, refs)
        if ref.shape[1] != bundle.spec.vocab_size:
            raise GeneratorError(f"the reference {key[0]} has {ref.shape[1]} logits per token and the bundle "
                                 f"{bundle.dir} {bundle.spec.vocab_size}; --reference must be the same model.")
        t = time.perf_counter()
        values, top_ids = bundle_logits(bundle, ids, spans, numerics=numerics, threads=threads,
                                        shared_pool=shared_pool)
        seconds = time.perf_counter() - t
        label = labels[n] if labels else bundle.dir.name
        result = score(bundle, label, numerics, ref, values, top_ids, targets)
        result.info.update(reference=key[0], windows=len(spans), window=window_for(bundle),
                           bundle_seconds=round(seconds, 2), reference_seconds=round(ref_s, 2))
        results.append(result)
        del values
        log(f"{label}: {result.metrics['n_tokens']} tokens in {seconds:.1f} s")
    return {"results": results, "settings": {"numerics": numerics, "max_tokens": max_tokens,
                                             "reference_embedding": "bf16" if bf16_embedding else "fp32"}}
