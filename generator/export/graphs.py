"""Compile graphs: one generic decoder block for every family, and the post graph.

`store_layer` writes a layer's weights once (q/k/v fused into one MatMul, gate/up into one), in
the build's weight type; `layer_graph` emits the graph of one shape group with exactly the board
contract's inputs and outputs (K_cache, V_cache, indices, input, mask -> K_cache_out,
V_cache_out, output). Every quirk is read from the ArchSpec; nothing here knows a family's name.
Compute is fp32 inside; the boundaries use hidden_state_type. History lengths are derived from the
K_cache input's shape, so a runner may bind fewer history rows than the static shape says.
The block's pieces (qkv_heads, rope, block_tail, norms) are shared with the fused runtime graph
(runtime/fused.py), which is why this module stays whole at a little over 400 lines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fnmatch import fnmatch

import numpy as np
from onnx import TensorProto

from ..contract import ShapeGroup, is_fp8, is_quantized, position_rows
from ..errors import GeneratorError
from ..resolve.options import BuildOptions
from ..resolve.spec import ArchSpec, NormSpec
from .onnx_graph import DTYPES, Graph, WeightsFile
from .quant import fp8_scale, fp8_codes, pack_int4, quantize, to_bf16_bits
from ..inputs.gptq import Grid
from ..recipe.tensors import NORMS

LOG = logging.getLogger(__name__)

WINDOW_BLOCK = -1.0e9  # added on top of the mask for keys outside a sliding window


@dataclass
class Linear:
    """A stored MatMul weight [K, N] (+ bias [N])."""

    name: str
    wtype: str
    k: int
    n: int
    group: int = 0
    bias: str | None = None


FP8_ONNX = {"fp8_e4m3": TensorProto.FLOAT8E4M3FN, "fp8_e5m2": TensorProto.FLOAT8E5M2}


def weight_type_for(opts: BuildOptions, key: str, default: str) -> str:
    for pattern, wtype in opts.overrides.items():
        if fnmatch(key, pattern):
            return wtype
    return default


def fused_grid(w: dict, keys: tuple[str, ...], factors: list[float] | None = None) -> Grid | str | None:
    """The GPTQ codes of linears fused into one (q/k/v, gate/up), each part's scales times its factor;
    None when the source is not GPTQ-packed, a string saying why when it cannot keep them."""
    grids = [w.get(f"{k}.grid") for k in keys]
    if all(g is None for g in grids):
        return None
    bad = next((g for g in grids if not isinstance(g, Grid)), None)
    return (bad or "only some parts are GPTQ-packed") if bad is not None or None in grids else Grid.concat(grids, factors)


BLOCK_BYTES = 64 << 20  # fp32 bytes of one block of W's rows that store_linear converts at a time


def row_blocks(w_out_in: np.ndarray, group: int):
    """(k0, W[k0:k1] as contiguous fp32 [k1-k0, N]) of W = w_out_in.T, in blocks of about BLOCK_BYTES whose
    row counts are multiples of `group`, so every quantization group lies inside one block: quantizing
    block by block gives the whole-tensor result byte for byte, without whole-tensor temporaries
    (a 150k-vocab head otherwise needs several times its fp32 size)."""
    n, k = w_out_in.shape
    rows = max(1, BLOCK_BYTES // (4 * max(n, 1)))
    if group:
        rows = max(group, rows // group * group)
    for k0 in range(0, k, rows):
        yield k0, np.ascontiguousarray(w_out_in[:, k0:k0 + rows].T, dtype=np.float32)


def packed_int4(q: np.ndarray) -> np.ndarray:
    """pack_int4 of q [K, N] in row blocks: the same bytes, without its int16 whole-tensor temporaries."""
    k, n = q.shape
    rows = max(2, (BLOCK_BYTES // max(n, 1)) // 2 * 2)  # even, so every block but the last packs whole bytes
    return np.concatenate([np.frombuffer(pack_int4(q[r:r + rows]), np.uint8) for r in range(0, k, rows)])


def store_linear(wf: WeightsFile, inits: list, name: str, w_out_in: np.ndarray, bias: np.ndarray | None,
                 wtype: str, group: int, grid: Grid | str | None = None) -> Linear:
    """grid: the source's GPTQ codes and scales, stored as they are when they fit wtype and group (a
    GPTQ input keeps its grid bit-exact); otherwise the float weight is quantized here (logged), in
    row blocks (row_blocks) into the stored type's array."""
    n, k = w_out_in.shape  # stored as W = w_out_in.T [K, N]
    if is_quantized(wtype):
        kept = grid.for_build(wtype, group) if isinstance(grid, Grid) else grid
        if isinstance(kept, str):
            LOG.warning("%s: GPTQ codes re-quantized from the dequantized weights (%s)", name, kept)
        if isinstance(kept, tuple):
            q, scale = kept
        else:
            q, scales = np.empty((k, n), np.int8), []
            for k0, blk in row_blocks(w_out_in, group):
                qb, sb = quantize(blk, wtype, group)
                q[k0:k0 + len(qb)] = qb
                scales.append(sb)
            scale = np.concatenate(scales)
        raw = q if wtype == "s8" else packed_int4(q)
        inits.append(wf.tensor(f"{name}.qweight", raw, TensorProto.INT8 if wtype == "s8" else TensorProto.INT4, [k, n]))
        inits.append(wf.tensor(f"{name}.scales", scale.tobytes(), TensorProto.FLOAT, list(scale.shape)))
    elif is_fp8(wtype):  # fp8 codes + one fp32 scale per output channel (export/quant.py quantize_fp8)
        amax = np.zeros(n, np.float32)
        for _, blk in row_blocks(w_out_in, 0):
            np.maximum(amax, np.abs(blk).max(axis=0), out=amax)
        scale = fp8_scale(amax, wtype)
        q = np.empty((k, n), np.uint8)
        for k0, blk in row_blocks(w_out_in, 0):
            q[k0:k0 + len(blk)] = fp8_codes(blk, scale, wtype).view(np.uint8)
        inits.append(wf.tensor(f"{name}.weight", q, FP8_ONNX[wtype], [k, n]))
        inits.append(wf.tensor(f"{name}.scales", scale.tobytes(), TensorProto.FLOAT, [n]))
    elif wtype in ("bf16", "fp16"):
        out = np.empty((k, n), np.uint16 if wtype == "bf16" else np.float16)
        for k0, blk in row_blocks(w_out_in, 0):
            out[k0:k0 + len(blk)] = to_bf16_bits(blk) if wtype == "bf16" else blk.astype(np.float16)
        inits.append(wf.tensor(f"{name}.weight", out, TensorProto.BFLOAT16 if wtype == "bf16" else TensorProto.FLOAT16,
                               [k, n]))
    else:
        inits.append(wf.tensor(f"{name}.weight", np.ascontiguousarray(w_out_in.T, dtype=np.float32), TensorProto.FLOAT,
                               [k, n]))
    b = None
    if bias is not None:
        b = f"{name}.bias"
        inits.append(wf.tensor(b, np.asarray(bias, np.float32).tobytes(), TensorProto.FLOAT, [n]))
    return Linear(name, wtype, k, n, group, b)


def store_vector(wf: WeightsFile, inits: list, name: str, v: np.ndarray) -> str:
    inits.append(wf.tensor(name, np.asarray(v, np.float32).tobytes(), TensorProto.FLOAT, [int(np.size(v))]))
    return name


def store_layer(wf: WeightsFile, spec: ArchSpec, opts: BuildOptions, i: int, w: dict[str, np.ndarray]):
    """Write layer i's weights; returns (initializers, refs) for layer_graph."""
    inits: list[TensorProto] = []
    refs: dict[str, object] = {}
    wt = lambda key: weight_type_for(opts, f"layers.{i}.{key}", opts.weight_type)  # noqa: E731
    # conversion-time rewrite: q * attention_scale (RoPE is linear, so scaling before it is exact)
    scale = np.float32(spec.attention_scale)
    q_w, q_b = w["q_proj.weight"], w.get("q_proj.bias")
    if spec.qk_norm is not None:  # after the q norm: scale its weight (and a LayerNorm's bias)
        w = dict(w, **{f"q_norm.{p}": w[f"q_norm.{p}"] * scale for p in ("weight", "bias") if f"q_norm.{p}" in w})
    else:
        q_w, q_b = q_w * scale, (q_b * scale if q_b is not None else None)
    qkv_w = np.concatenate([q_w, w["k_proj.weight"], w["v_proj.weight"]], axis=0)
    qkv_b = (np.concatenate([q_b, w["k_proj.bias"], w["v_proj.bias"]]) if spec.qkv_bias else None)
    q_factor = 1.0 if spec.qk_norm is not None else float(scale)
    refs["qkv_proj"] = store_linear(wf, inits, "qkv_proj", qkv_w, qkv_b, wt("qkv_proj"), opts.group_size,
                                    fused_grid(w, ("q_proj", "k_proj", "v_proj"), [q_factor, 1.0, 1.0]))
    refs["o_proj"] = store_linear(wf, inits, "o_proj", w["o_proj.weight"], w.get("o_proj.bias"), wt("o_proj"), opts.group_size,
                                  fused_grid(w, ("o_proj",)))
    if spec.mlp_gated:
        gu_w = np.concatenate([w["gate_proj.weight"], w["up_proj.weight"]], axis=0)
        gu_b = np.concatenate([w["gate_proj.bias"], w["up_proj.bias"]]) if spec.mlp_bias else None
        refs["gate_up_proj"] = store_linear(wf, inits, "gate_up_proj", gu_w, gu_b, wt("gate_up_proj"), opts.group_size,
                                            fused_grid(w, ("gate_proj", "up_proj")))
    else:
        refs["up_proj"] = store_linear(wf, inits, "up_proj", w["up_proj.weight"], w.get("up_proj.bias"), wt("up_proj"), opts.group_size,
                                       fused_grid(w, ("up_proj",)))
    refs["down_proj"] = store_linear(wf, inits, "down_proj", w["down_proj.weight"], w.get("down_proj.bias"), wt("down_proj"), opts.group_size,
                                     fused_grid(w, ("down_proj",)))
    for norm in NORMS:
        if f"{norm}.weight" in w:
            refs[norm] = (store_vector(wf, inits, f"{norm}.weight", w[f"{norm}.weight"]),
                          store_vector(wf, inits, f"{norm}.bias", w[f"{norm}.bias"]) if f"{norm}.bias" in w else None)
    return inits, refs


# -- graph pieces -----------------------------------------------------------------------------

def linear(g: Graph, x: str, lin: Linear) -> str:
    if is_quantized(lin.wtype):
        w = g.op("DequantizeLinear", f"{lin.name}.qweight", f"{lin.name}.scales", axis=0, block_size=lin.group)
    elif is_fp8(lin.wtype):
        w = g.op("DequantizeLinear", f"{lin.name}.weight", f"{lin.name}.scales", axis=1)
    elif lin.wtype in ("bf16", "fp16"):
        w = g.op("Cast", f"{lin.name}.weight", to=TensorProto.FLOAT)
    else:
        w = f"{lin.name}.weight"
    y = g.op("MatMul", x, w)
    return g.op("Add", y, lin.bias) if lin.bias else y


def norm(g: Graph, x: str, spec: NormSpec, weight: tuple[str, str | None]) -> str:
    w, b = weight
    if spec.kind == "layer_norm":
        return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=spec.eps)
    # x / sqrt(mean(x^2) + eps) * w  (the pattern onnxruntime fuses into SimplifiedLayerNormalization)
    var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0)), g.ints(-1), keepdims=1)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", var, g.const(spec.eps))))
    return g.op("Mul", y, w)


def activation(g: Graph, x: str, kind: str) -> str:
    if kind == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
    if kind == "gelu":
        return g.op("Gelu", x, approximate="none")
    if kind == "gelu_tanh":
        return g.op("Gelu", x, approximate="tanh")
    if kind == "relu":
        return g.op("Relu", x)
    raise ValueError(kind)


def rope_tables(g: Graph, spec: ArchSpec, layer_type: str, indices: str) -> tuple[str, str]:
    """cos and signed sin for the rotated dims, broadcastable over heads: [1, P, 1, rot] (half-split)
    or [1, P, 1, rot/2, 1] (interleaved). With inverse frequencies laid out as (-f, f), one Sin gives
    (-sin, sin), so rotate_half(x) * sin becomes swap_halves(x) * signed_sin."""
    table = spec.rope[layer_type]
    half = np.asarray(table.inv_freq, np.float32)
    signed = lambda f: np.concatenate([-f, f]) if not table.interleaved else f  # noqa: E731
    inv = g.const(signed(half))
    if table.long_inv_freq is not None:
        # longrope: the long factors apply when the forward's largest position reaches long_from
        top = g.op("ReduceMax", g.op("Cast", indices, to=TensorProto.INT64), keepdims=0)
        use_long = g.op("GreaterOrEqual", top, g.const(table.long_from, np.int64))
        inv = g.op("Where", use_long, g.const(signed(np.asarray(table.long_inv_freq, np.float32))), inv)
    rows = table.pair_rows()
    if rows is not None:
        # mRoPE: indices [3, P] (temporal, height, width); each rotated dim takes its pair's row
        # (the (-f, f) layout repeats the pairs), then the same product as 1-D RoPE: [1, P, 1, rot]
        pick = g.const(np.asarray(rows + rows), np.int64)
        pos = g.op("Transpose", g.op("Gather", g.op("Cast", indices, to=TensorProto.FLOAT), pick, axis=0), perm=[1, 0])
        pos = g.op("Reshape", pos, g.ints(1, -1, 1, table.rotary_dim))
    else:
        shape = (1, -1, 1, 1) if not table.interleaved else (1, -1, 1, 1, 1)
        pos = g.op("Reshape", g.op("Cast", indices, to=TensorProto.FLOAT), g.ints(*shape))
    if table.interleaved:
        inv = g.op("Unsqueeze", inv, g.ints(-1))  # [rot/2, 1]
    freqs = g.op("Mul", pos, inv)
    cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
    if table.attention_factor != 1.0:
        f = g.const(table.attention_factor)
        cos, sin = g.op("Mul", cos, f), g.op("Mul", sin, f)
    return cos, sin


def apply_rope(g: Graph, x: str, cos: str, sin: str, rot: int, head_dim: int, interleaved: bool, heads: int) -> str:
    """x [1, P, heads, head_dim]; rotates the first `rot` dims (half-split pairs, or interleaved pairs)."""
    if rot < head_dim:
        x_rot, x_pass = g.op("Split", x, g.ints(rot, head_dim - rot), axis=-1, n_out=2)
    else:
        x_rot, x_pass = x, None
    if interleaved:
        pairs = g.op("Reshape", x_rot, g.ints(1, -1, heads, rot // 2, 2))
        even, odd = g.op("Split", pairs, g.ints(1, 1), axis=-1, n_out=2)
        new_even = g.op("Sub", g.op("Mul", even, cos), g.op("Mul", odd, sin))
        new_odd = g.op("Add", g.op("Mul", odd, cos), g.op("Mul", even, sin))
        y = g.op("Reshape", g.op("Concat", new_even, new_odd, axis=-1), g.ints(1, -1, heads, rot))
    else:
        x1, x2 = g.op("Split", x_rot, g.ints(rot // 2, rot // 2), axis=-1, n_out=2)
        swapped = g.op("Concat", x2, x1, axis=-1)
        y = g.op("Add", g.op("Mul", x_rot, cos), g.op("Mul", swapped, sin))
    return g.op("Concat", y, x_pass, axis=-1) if x_pass else y


def to_f32(g: Graph, x: str, dt: int) -> str:
    return x if dt == TensorProto.FLOAT else g.op("Cast", x, to=TensorProto.FLOAT)


def from_f32(g: Graph, x: str, dt: int) -> str:
    return x if dt == TensorProto.FLOAT else g.op("Cast", x, to=dt)


def qkv_heads(g: Graph, spec: ArchSpec, refs: dict, qkv: str, rope) -> tuple[str, str, str]:
    """The fused q/k/v projection split into q [1, N, n_h, d] and k [1, N, n_kv, d] heads, normed (qk_norm)
    and rotated by rope(t, heads), and v [1, N, kv]. Shared by the board graphs and the fused runtime graph."""
    n_h, n_kv, d, kv = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim, spec.kv_dim
    if spec.qk_norm is not None:
        q, k, v = g.op("Split", qkv, g.ints(spec.q_dim, kv, kv), axis=-1, n_out=3)
        q4 = norm(g, g.op("Reshape", q, g.ints(1, -1, n_h, d)), spec.qk_norm, refs["q_norm"])
        k4 = norm(g, g.op("Reshape", k, g.ints(1, -1, n_kv, d)), spec.qk_norm, refs["k_norm"])
        return rope(q4, n_h), rope(k4, n_kv), v
    qk, v = g.op("Split", qkv, g.ints(spec.q_dim + kv, kv), axis=-1, n_out=2)  # q and k heads rotate together
    qk4 = rope(g.op("Reshape", qk, g.ints(1, -1, n_h + n_kv, d)), n_h + n_kv)
    q4, k4 = g.op("Split", qk4, g.ints(n_h, n_kv), axis=2, n_out=2)
    return q4, k4, v


def block_tail(g: Graph, spec: ArchSpec, refs: dict, x: str, h: str, ctx: str, lin) -> str:
    """After attention (ctx): o_proj, residuals, MLP and post norms of the block with input x (normed: h);
    lin(y, key) applies the stored linear `key`. Shared by the board graphs and the fused runtime graph."""
    attn = lin(ctx, "o_proj")
    if spec.post_attention_norm:
        attn = norm(g, attn, spec.norm, refs["post_attention_layernorm"])
    if spec.parallel_residual:
        mlp_in, resid = h, g.op("Add", x, attn)
    else:
        resid = g.op("Add", x, attn)
        mlp_in = norm(g, resid, spec.norm, refs["pre_feedforward_layernorm"])
    if spec.mlp_gated:
        gate, up = g.op("Split", lin(mlp_in, "gate_up_proj"), g.ints(spec.intermediate_size, spec.intermediate_size),
                        axis=-1, n_out=2)
        act = g.op("Mul", activation(g, gate, spec.hidden_act), up)
    else:
        act = activation(g, lin(mlp_in, "up_proj"), spec.hidden_act)
    mlp = lin(act, "down_proj")
    if spec.post_feedforward_norm:
        mlp = norm(g, mlp, spec.norm, refs["post_feedforward_layernorm"])
    return g.op("Add", resid, mlp)


def layer_graph(spec: ArchSpec, opts: BuildOptions, i: int, group: ShapeGroup, refs: dict, inits: list) -> "onnx.ModelProto":  # noqa: F821
    dt = DTYPES[opts.hidden_state_type]
    hid, kv, d = spec.hidden_size, spec.kv_dim, spec.head_dim
    n_h, n_kv = spec.num_attention_heads, spec.num_key_value_heads
    grp = n_h // n_kv
    p, hist = group.tokens, group.history_rows
    layer_type = spec.layer_types[i]
    table = spec.rope[layer_type]
    g = Graph(f"{spec.model_type}_l{i}_g{group.index}")
    k_cache = g.input("K_cache", dt, [1, hist, kv])
    v_cache = g.input("V_cache", dt, [1, hist, kv])
    indices = g.input("indices", TensorProto.UINT32, [position_rows(spec.rope), p])  # [3, P] for mRoPE
    x_in = g.input("input", dt, [1, p, hid])
    mask = g.input("mask", dt, [1, p, hist + p])

    x = to_f32(g, x_in, dt)
    h = norm(g, x, spec.norm, refs["input_layernorm"])
    qkv = linear(g, h, refs["qkv_proj"])  # the attention scale is folded into q_proj (see store_layer)
    cos, sin = rope_tables(g, spec, layer_type, indices)
    rope = lambda t, heads: apply_rope(g, t, cos, sin, table.rotary_dim, d, table.interleaved, heads)  # noqa: E731
    q4, k4, v = qkv_heads(g, spec, refs, qkv, rope)
    k_new = g.op("Reshape", k4, g.ints(1, -1, kv))

    # attention over [history rows; this chunk]. GQA without repeating K/V: the query heads of each
    # KV head are grouped, [n_kv, grp * P, d] x [n_kv, d, T]. Only the static dims are written into
    # the graph; P and T come from the inputs' shapes, so a runner may bind fewer rows than declared.
    k_all = g.op("Concat", to_f32(g, k_cache, dt), k_new, axis=1)
    v_all = g.op("Concat", to_f32(g, v_cache, dt), v, axis=1)
    k_t = g.op("Transpose", g.op("Reshape", k_all, g.ints(-1, n_kv, d)), perm=[1, 2, 0])
    v_t = g.op("Transpose", g.op("Reshape", v_all, g.ints(-1, n_kv, d)), perm=[1, 0, 2])
    if p == 1:  # [1, 1, n_h, d] is already [n_kv, grp, d] in memory
        qg = g.op("Reshape", q4, g.ints(n_kv, grp, d))
    else:
        qg = g.op("Transpose", g.op("Reshape", q4, g.ints(-1, n_kv, grp, d)), perm=[1, 2, 0, 3])
        qg = g.op("Reshape", qg, g.ints(n_kv, -1, d))
        p_t = g.op("Slice", g.op("Shape", mask), g.ints(1), g.ints(3))  # [P, T]
    scores = g.op("MatMul", qg, k_t)
    if spec.attn_logit_softcap:
        cap = g.const(spec.attn_logit_softcap)
        scores = g.op("Mul", g.op("Tanh", g.op("Div", scores, cap)), cap)
    if p > 1:
        scores = g.op("Reshape", scores, g.op("Concat", g.ints(n_kv, grp), p_t, axis=0))
    m = to_f32(g, mask, dt)  # [1, P, T] broadcasts over [n_kv, grp, (P,) T]
    if layer_type == "sliding_attention":
        if table.mrope_section is not None:  # window positions are cache rows; mRoPE positions are not
            raise GeneratorError(f"{spec.model_name}: sliding-window attention with mRoPE is not supported.")
        # keys: history slot j is position j; chunk keys sit at `indices`. Block q - k >= window.
        pos = g.op("Cast", indices, to=TensorProto.FLOAT)
        hist_len = g.op("Squeeze", g.op("Slice", g.op("Shape", k_cache), g.ints(1), g.ints(2)), g.ints(0))
        hist_pos = g.op("Cast", g.op("Range", g.const(0, np.int64), hist_len, g.const(1, np.int64)), to=TensorProto.FLOAT)
        k_pos = g.op("Concat", hist_pos, g.op("Reshape", pos, g.ints(-1)), axis=0)  # [T]
        q_pos = g.op("Reshape", pos, g.ints(1, -1, 1))
        outside = g.op("GreaterOrEqual", g.op("Sub", q_pos, k_pos), g.const(float(spec.sliding_window)))
        m = g.op("Add", m, g.op("Where", outside, g.const(WINDOW_BLOCK), g.const(0.0)))
    probs = g.op("Softmax", g.op("Add", scores, m), axis=-1)
    if p == 1:
        ctx = g.op("Reshape", g.op("MatMul", probs, v_t), g.ints(1, 1, spec.q_dim))
    else:
        t_only = g.op("Slice", p_t, g.ints(1), g.ints(2))
        ctx = g.op("MatMul", g.op("Reshape", probs, g.op("Concat", g.ints(n_kv, -1), t_only, axis=0)), v_t)  # [n_kv, grp*P, d]
        ctx = g.op("Transpose", g.op("Reshape", ctx, g.ints(n_kv, grp, -1, d)), perm=[2, 0, 1, 3])
        ctx = g.op("Reshape", ctx, g.ints(1, -1, spec.q_dim))
    out = block_tail(g, spec, refs, x, h, ctx, lambda y, key: linear(g, y, refs[key]))
    g.output(from_f32(g, k_new, dt), "K_cache_out", dt, [1, p, kv])
    g.output(from_f32(g, v, dt), "V_cache_out", dt, [1, p, kv])
    g.output(from_f32(g, out, dt), "output", dt, [1, p, hid])
    doc = (f"{spec.model_name} layer {i} ({layer_type}), group {group.index} ({group.kind}: {p} token(s) after "
           f"{group.history} history rows{' (dummy)' if group.dummy_history else ''})")
    return g.model(inits, doc)


def store_post(wf: WeightsFile, spec: ArchSpec, opts: BuildOptions, final_norm: dict, head: dict):
    inits: list[TensorProto] = []
    refs = {"norm": (store_vector(wf, inits, "norm.weight", final_norm["weight"]),
                     store_vector(wf, inits, "norm.bias", final_norm["bias"]) if "bias" in final_norm else None),
            "lm_head": store_linear(wf, inits, "lm_head", head["weight"], head.get("bias"),
                                    weight_type_for(opts, "lm_head", opts.post_weight_type), opts.group_size)}
    return inits, refs


def post_graph(spec: ArchSpec, opts: BuildOptions, refs: dict, inits: list):
    dt = DTYPES[opts.hidden_state_type]
    g = Graph(f"{spec.model_type}_post")
    x = to_f32(g, g.input("input", dt, [1, 1, spec.hidden_size]), dt)
    logits = linear(g, norm(g, x, spec.final_norm, refs["norm"]), refs["lm_head"])
    if spec.final_logit_softcap:
        cap = g.const(spec.final_logit_softcap)
        logits = g.op("Mul", g.op("Tanh", g.op("Div", logits, cap)), cap)
    if opts.post_topk:
        values, idx = g.op("TopK", logits, g.ints(opts.post_topk), axis=-1, largest=1, sorted=1, n_out=2)
        g.output(from_f32(g, values, dt), "output", dt, [1, 1, opts.post_topk])
        g.output(g.op("Cast", idx, to=TensorProto.INT32), "indices", TensorProto.INT32, [1, 1, opts.post_topk])
    else:
        g.output(from_f32(g, logits, dt), "output", dt, [1, 1, spec.vocab_size])
    return g.model(inits, f"{spec.model_name} final norm + lm_head")
