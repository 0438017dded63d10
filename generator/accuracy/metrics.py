"""Token-level accuracy metrics of a model's logits against a reference's logits on the same positions.

All in float64 from log_softmax (natural log):
  kl_divergence  KL(ref || ours) per position: sum_v p_ref(v) * (log p_ref(v) - log p_ours(v))
  token_metrics  mean and 99th percentile of that KLD, top-1 agreement (the argmax of both is the same
                 token), perplexity of each on the target tokens (exp of the mean negative log-likelihood).
"""

from __future__ import annotations

import numpy as np

from ..errors import GeneratorError


def log_softmax(logits) -> np.ndarray:
    """float64 log_softmax over the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _pair(ref_logits, logits) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(ref_logits)
    ours = np.asarray(logits)
    if ref.ndim != 2 or ours.shape != ref.shape:
        raise GeneratorError(f"accuracy metrics: logits must be [T, V] of the same shape; got reference "
                             f"{tuple(ref.shape)} and ours {tuple(ours.shape)}")
    if not (np.isfinite(ref).all() and np.isfinite(ours).all()):
        raise GeneratorError("accuracy metrics: logits contain NaN or infinity")
    return ref, ours


def kl_divergence(ref_logits, logits) -> np.ndarray:
    """KL(ref || ours) at every position, float64 [T]."""
    ref, ours = _pair(ref_logits, logits)
    lp_ref, lp = log_softmax(ref), log_softmax(ours)
    kld = (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1)
    return np.maximum(kld, 0.0)  # rounding can leave -1e-17 where both are the same


def token_metrics(ref_logits, logits, targets) -> dict:
    """kld_mean, kld_p99, top1_agreement, ppl_ref, ppl, n_tokens over T positions; targets[t] is the token
    that follows position t (the next token of the text)."""
    ref, ours = _pair(ref_logits, logits)
    tgt = np.asarray(targets, dtype=np.int64).reshape(-1)
    if tgt.shape[0] != ref.shape[0] or ref.shape[0] == 0:
        raise GeneratorError(f"accuracy metrics: {tgt.shape[0]} targets for {ref.shape[0]} positions; expected "
                             f"one target per position and at least one position")
    if tgt.min() < 0 or tgt.max() >= ref.shape[1]:
        raise GeneratorError(f"accuracy metrics: target ids must be in [0, {ref.shape[1]}); got "
                             f"{int(tgt.min())}..{int(tgt.max())}")
    lp_ref, lp = log_softmax(ref), log_softmax(ours)
    kld = np.maximum((np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1), 0.0)
    rows = np.arange(tgt.shape[0])
    with np.errstate(over="ignore"):  # a random model's perplexity may be inf: that is the value
        ppl_ref, ppl = float(np.exp(-lp_ref[rows, tgt].mean())), float(np.exp(-lp[rows, tgt].mean()))
    return {
        "kld_mean": float(kld.mean()),
        "kld_p99": float(np.percentile(kld, 99)),
        "top1_agreement": float((ref.argmax(-1) == ours.argmax(-1)).mean()),
        "ppl_ref": ppl_ref,
        "ppl": ppl,
        "n_tokens": int(tgt.shape[0]),
    }
