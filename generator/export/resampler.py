"""The perceiver resampler (MiniCPM-V's), generic over the resolved `VisionSpec`'s resampler fields.

    kv   = LayerNorm_kv(feats @ kv_proj^T)                       feats: the tower's [1, g*g, C]
    q    = LayerNorm_q(query) + query_pos                        [Q, E], Q learned queries
    out  = MultiheadAttention(q, kv + sincos(g, g), kv)          torch.nn.MultiheadAttention in/out proj
    rows = LayerNorm_post(out) @ proj                            [1, Q, E]

`sincos(g, g)` is the patch grid's 2D sin-cos table (MiniCPM-V's get_2d_sincos_pos_embed: the first
half of the features encodes the column, the second the row, each [sin, cos] over 10000^(-2i/(E/2)))
for the build's grid, computed here. The query side does not depend on the image, so it is folded at
conversion time: q = (LayerNorm_q(query) + query_pos) W_q^T + b_q, times the attention scale 1/sqrt(d),
is one fp32 constant [Q, E]. Linears take the build's weight type; norms and tables stay fp32.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..errors import GeneratorError
from ..recipe.vision import VisionSpec
from .graphs import linear, store_linear, store_vector
from .onnx_graph import Graph


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """[rows*cols, dim], row-major over the grid: [sincos(column), sincos(row)] per position."""
    col, row = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    return np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], axis=1).astype(np.float32)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def store_resampler(wf, inits: list, vspec: VisionSpec, w: dict[str, np.ndarray], wtype: str, group: int) -> dict:
    e, q_n, heads = vspec.llm_hidden_size, vspec.resampler_queries, vspec.resampler_heads
    query = w["resampler.query"].reshape(-1, e) if w["resampler.query"].size == q_n * e else None
    if query is None:
        raise GeneratorError(f"the resampler's query table has shape {list(w['resampler.query'].shape)}; the "
                             f"recipe says {q_n} queries of {e} features (the language model's width).")
    side = int(round(q_n ** 0.5))
    qpos = w.get("resampler.query_pos")
    qpos = sincos_2d(e, side, side) if qpos is None else qpos.reshape(q_n, e)
    in_w, in_b = np.split(w["resampler.in_proj.weight"], 3, axis=0), np.split(w["resampler.in_proj.bias"], 3)
    eps = vspec.resampler_norm_eps
    q = _layer_norm(query, w["resampler.ln_q.weight"], w["resampler.ln_q.bias"], eps) + qpos
    q = (q @ in_w[0].astype(np.float64).T + in_b[0]) * (e // heads) ** -0.5
    f32 = lambda name, a: inits.append(wf.tensor(name, np.ascontiguousarray(a, np.float32).tobytes(),  # noqa: E731
                                                 TensorProto.FLOAT, list(np.shape(a)))) or name
    vec = lambda key: store_vector(wf, inits, key, w[key])  # noqa: E731
    grid = vspec.grid
    return {
        "q": f32("resampler.q", q),
        "kv_pos": f32("resampler.kv_pos", sincos_2d(e, grid, grid)[None]),
        "kv_proj": store_linear(wf, inits, "resampler.kv_proj", w["resampler.kv_proj.weight"], None, wtype, group),
        "ln_kv": (vec("resampler.ln_kv.weight"), vec("resampler.ln_kv.bias")),
        "k": store_linear(wf, inits, "resampler.k_proj", in_w[1], in_b[1], wtype, group),
        "v": store_linear(wf, inits, "resampler.v_proj", in_w[2], in_b[2], wtype, group),
        "out": store_linear(wf, inits, "resampler.out_proj", w["resampler.out_proj.weight"],
                            w["resampler.out_proj.bias"], wtype, group),
        "ln_post": (vec("resampler.ln_post.weight"), vec("resampler.ln_post.bias")),
        "proj": store_linear(wf, inits, "resampler.proj", w["resampler.proj"].T, None, wtype, group),  # x @ proj
    }


def resampler_block(g: Graph, x: str, vspec: VisionSpec, refs: dict) -> str:
    """[1, g*g, C] tower features -> [1, Q, E] (fp32 inside)."""
    e, heads, q_n = vspec.llm_hidden_size, vspec.resampler_heads, vspec.resampler_queries
    d = e // heads
    eps = vspec.resampler_norm_eps
    kv = linear(g, x, refs["kv_proj"])
    kv = g.op("LayerNormalization", kv, *refs["ln_kv"], axis=-1, epsilon=eps)
    k = linear(g, g.op("Add", kv, refs["kv_pos"]), refs["k"])
    v = linear(g, kv, refs["v"])
    heads_of = lambda t, perm: g.op("Transpose", g.op("Reshape", t, g.ints(-1, heads, d)), perm=perm)  # noqa: E731
    scores = g.op("MatMul", heads_of(refs["q"], [1, 0, 2]), heads_of(k, [1, 2, 0]))  # [heads, Q, T]
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), heads_of(v, [1, 0, 2]))  # [heads, Q, d]
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[1, 0, 2]), g.ints(1, q_n, e))
    out = g.op("LayerNormalization", linear(g, ctx, refs["out"]), *refs["ln_post"], axis=-1, epsilon=eps)
    return linear(g, out, refs["proj"])
