"""The canonical tensor table: one row per tensor the generic block reads (after llama.cpp gguf-py's
tensor_mapping.py, one table of names).

Each row states the canonical name, its kind (norm, linear, embedding), its shape as a function of
the resolved spec, whether the spec's block reads it, whether the checkpoint stores a `.bias` for
it, which of the spec's norms applies (norms only) and Llama's HF module path, the default a recipe
overrides only where its family differs. The recipe schema (names a recipe may map), the weight
converter (shapes, bias checks, norm offsets) and the synthetic checkpoint (its tensor plan) read
this table; nothing else states these facts. `whole_paths` fills a recipe's tensor map from it
(Llama's paths as defaults, the `prefix`).

The spec is the resolved ArchSpec (generator/resolve/spec.py); the table only reads its attributes,
so this module imports nothing from the later stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

Spec = Any  # generator.resolve.spec.ArchSpec (not imported: the recipe stage comes first)
Kind = Literal["norm", "linear", "embedding"]


@dataclass(frozen=True)
class Tensor:
    name: str
    kind: Kind
    shape: Callable[[Spec], tuple[int, ...]]
    used: Callable[[Spec], bool]  # the spec's block reads it
    bias: Callable[[Spec], bool]  # the checkpoint stores <path>.bias
    llama: str | None = None  # Llama's HF module path ({i} = layer): the recipe default
    norm: Callable[[Spec], Any] | None = None  # norms: the spec's NormSpec that computes it


def _hidden(s: Spec) -> tuple[int, ...]:
    return (s.hidden_size,)


def _head(s: Spec) -> tuple[int, ...]:
    return (s.head_dim,)


def _block_norm(s: Spec):
    return s.norm


def _qk_norm(s: Spec):
    return s.qk_norm


def _norm(name: str, used, norm=_block_norm, shape=_hidden, llama: str | None = None) -> Tensor:
    # a norm stores a bias exactly when it is a LayerNorm
    return Tensor(name, "norm", shape, used, lambda s: norm(s).kind == "layer_norm", llama, norm)


def _linear(name: str, shape, bias, used=lambda s: True, llama: str | None = None) -> Tensor:
    return Tensor(name, "linear", shape, used, bias, llama)


_ALWAYS = lambda s: True  # noqa: E731
_L = "model.layers.{i}."

# Per decoder layer, in the order the layer's weights are stored. Llama's `post_attention_layernorm`
# is applied *before* the MLP, so it is canonical `pre_feedforward_layernorm`; canonical
# `post_attention_layernorm` is Gemma2's sandwich norm after attention.
LAYER: dict[str, Tensor] = {t.name: t for t in (
    _norm("input_layernorm", _ALWAYS, llama=_L + "input_layernorm"),
    _norm("post_attention_layernorm", lambda s: s.post_attention_norm),
    _norm("pre_feedforward_layernorm", lambda s: not s.parallel_residual, llama=_L + "post_attention_layernorm"),
    _norm("post_feedforward_layernorm", lambda s: s.post_feedforward_norm),
    _linear("q_proj", lambda s: (s.q_dim, s.hidden_size), lambda s: s.qkv_bias, llama=_L + "self_attn.q_proj"),
    _linear("k_proj", lambda s: (s.kv_dim, s.hidden_size), lambda s: s.qkv_bias, llama=_L + "self_attn.k_proj"),
    _linear("v_proj", lambda s: (s.kv_dim, s.hidden_size), lambda s: s.qkv_bias, llama=_L + "self_attn.v_proj"),
    _linear("o_proj", lambda s: (s.hidden_size, s.q_dim), lambda s: s.o_bias, llama=_L + "self_attn.o_proj"),
    _norm("q_norm", lambda s: s.qk_norm is not None, norm=_qk_norm, shape=_head),
    _norm("k_norm", lambda s: s.qk_norm is not None, norm=_qk_norm, shape=_head),
    _linear("gate_proj", lambda s: (s.intermediate_size, s.hidden_size), lambda s: s.mlp_bias,
            used=lambda s: s.mlp_gated, llama=_L + "mlp.gate_proj"),
    _linear("up_proj", lambda s: (s.intermediate_size, s.hidden_size), lambda s: s.mlp_bias, llama=_L + "mlp.up_proj"),
    _linear("down_proj", lambda s: (s.hidden_size, s.intermediate_size), lambda s: s.mlp_bias,
            llama=_L + "mlp.down_proj"),
)}

# Once per model: the recipe's tensors.embed_tokens / norm / lm_head.
MODEL: dict[str, Tensor] = {t.name: t for t in (
    Tensor("embed_tokens", "embedding", lambda s: (s.vocab_size, s.hidden_size), _ALWAYS, lambda s: False,
           "model.embed_tokens"),
    Tensor("norm", "norm", _hidden, _ALWAYS, lambda s: s.final_norm.kind == "layer_norm", "model.norm",
           lambda s: s.final_norm),
    Tensor("lm_head", "linear", lambda s: (s.vocab_size, s.hidden_size), _ALWAYS, lambda s: s.lm_head_bias,
           "lm_head"),
)}

LAYER_TENSORS = tuple(LAYER)
LINEAR_TENSORS = tuple(n for n, t in LAYER.items() if t.kind == "linear")
NORMS = tuple(n for n, t in LAYER.items() if t.kind == "norm")
# the recipe's tensors.layer defaults: Llama's paths
LLAMA_LAYER = {n: t.llama for n, t in LAYER.items() if t.llama}


def expected_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Canonical layer tensor -> its shape, for the tensors this spec's block reads."""
    return {n: t.shape(spec) for n, t in LAYER.items() if t.used(spec)}


def bias_expected(spec: Spec, name: str) -> bool:
    """Whether the checkpoint stores a bias for canonical layer tensor `name` under this spec."""
    return LAYER[name].bias(spec)


def norm_offset(spec: Spec, name: str) -> float:
    """The weight offset folded into a norm's stored weight (Gemma's x * (1 + w)); 0 for a non-norm."""
    t = LAYER.get(name)
    return float(t.norm(spec).weight_offset) if t is not None and t.kind == "norm" else 0.0


def whole_paths(data: dict, fused_parts: set[str]) -> dict:
    """A recipe's `tensors` mapping made whole: Llama's path for each canonical layer tensor it neither
    maps nor cuts from a fused tensor (`fused_parts`; a null entry drops a default), the model-level
    defaults, and `prefix` put in front of every path (not of `ignore`) and then emptied, so that
    validating the result again changes nothing. A malformed mapping is returned as it is (the
    schema reports it)."""
    layer, prefix = data.get("layer", {}), data.get("prefix", "")
    if not (isinstance(layer, dict) and isinstance(prefix, str)):
        return data
    full = {k: v for k, v in LLAMA_LAYER.items() if k not in set(layer) | fused_parts}
    full.update(layer)
    order = {k: n for n, k in enumerate(LAYER_TENSORS)}  # table order, then fused names as written
    full = dict(sorted(full.items(), key=lambda kv: order.get(kv[0], len(order))))
    out = {**data, "layer": full, "prefix": ""}
    for key in ("embed_tokens", "norm", "lm_head"):
        out.setdefault(key, MODEL[key].llama)
    if prefix:
        add = lambda v: prefix + v if isinstance(v, str) else v  # noqa: E731
        out.update({k: add(out[k]) for k in ("embed_tokens", "norm", "lm_head")})
        out["layer"] = {k: add(v) for k, v in full.items()}
    return out
