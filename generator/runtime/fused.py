"""The fused runtime graph: every layer of a bundle, the final norm and the lm_head in one onnxruntime
session, batch-aware, with the KV cache read from a paged block pool (runtime/paged.py). Built in memory
from the bundle's own graphs' weights (nothing written; never shipped to the board: the board keeps
the per-layer contract graphs); the runner is runtime/fused_engine.py.

Tokens are flattened: `hidden` [1, N, H] (N = B*S: B sequences of S new tokens each, storage dtype);
`positions` [B, S]. Everything per token is export/graphs.py's own helpers, unchanged (norms,
activations, RoPE tables, the q scale folded into q_proj as stored, qk norms, biases, parallel residual,
post norms, softcaps); only attention is batch-aware: per layer each sequence's keys are its pool rows
(`k_pool.{i}` / `v_pool.{i}` [R, n_kv, d] gathered at `slots` [B, T+S]: its past_b slots, then any slot) with
the chunk's own new K/V, rounded to the storage type, scattered in at positions past_b..past_b+S-1 (`scatter`
[B, S, 2], built by the runtime once per step): every key in position order, as the pool holds it, padding
only trailing. So a sequence's logits are bit for bit the same batched or alone (a key's
column does not depend on the batch) and whether its prompt ran in one chunk, in several or after a
prefix-cache hit (a key's value and column do not depend on the chunk it came in). The additive `mask`
[B, grp*S, S+T] the runtime builds is causal by position (each query row's mask repeated for the grp query
heads of a KV head; `mask_window` too for sliding-window layers). GQA groups the query heads of each KV head
as graphs.py does (no repeated K/V).
Rounding point: the per-layer graphs attend to the chunk's own new K/V unrounded (fp32), the past as
stored; here the chunk's own K/V are seen rounded too (tiny models: 6e-3 (llama) to 3e-2 (gemma2, logits
softcapped to 1.5) relative on logits against the per-layer graphs, tolerances.yaml
`board_vs_layers_stored_kv`; with the chunk's K/V unrounded it was 4e-5 to 8e-3, but a sequence's logits then
depended on its chunking). Outputs:
`k_new.{i}` / `v_new.{i}` [B, S, n_kv, d] in the storage dtype (the runtime stores them in the pool) and
`logits` [B, vocab] fp32 of each sequence's last token. The board's rounding points are kept: the
hidden state is rounded to hidden_state_type between layers, K/V are stored rounded and the logits
are rounded as the post graph's output is, so board numerics make this a faithful emulator.

Linears, by numerics:
- "board": fp32 activations on the stored weights: the board's numbers. s8 / fp8: codes x scales as fp32
  weights (ort.py dequantize: DequantizeLinear's own arithmetic), fp32 MatMul; s4: MatMulNBits at
  accuracy_level 1 on the bundle's codes (each code x scale in fp32, then fp32 products: the same numbers,
  the bundle's memory, ~2x faster than the per-layer graphs); bf16 / fp16 / fp32: fp32 MatMul.
- "fast": s8 / s4 weights as com.microsoft MatMulNBits built from the bundle's own codes, re-blocked
  exactly to NBITS_BLOCK (s8: block 32, a group-128 scale repeated over four blocks; s4: 128, at most its group; codes +
  2^(bits-1) as unsigned, no zero_points input) at accuracy_level 4: onnxruntime quantizes the
  activations to int8 per block (like llama.cpp's Q8_0). Other weight types run as in board numerics.
Big weights reach onnxruntime as OrtValues over numpy arrays (SessionOptions.add_initializer: no
protobuf over 2 GB); the graph declares them as external initializers it never reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..contract import MASK_VALUE, Bundle
from ..errors import GeneratorError
from ..export.graphs import FP8_ONNX, Linear, apply_rope, block_tail, from_f32, norm, qkv_heads, rope_tables, to_f32
from ..export.onnx_graph import DTYPES, Graph
from ..resolve.spec import ArchSpec
from .ort import dequantize

# MatMulNBits block length of "fast" numerics by weight bits (= the int8 activation block), at most the scale
# group. Measured on SmolLM2-135M (512 tokens, KLD vs fp32; board numerics s8 0.00262, s4 0.1441):
#   s8: block 16 0.00454 (1.7x), 32 0.00613 (2.3x), 64 0.00847, 128 0.01258 (4.8x, today's per-layer fast)
#   s4: block 32 0.1477 (1.025x), 64 0.1492, 128 0.1518 (1.054x)
# Blocks of 16 and 32 also give each row the same result whatever the number of rows (onnxruntime 1.32; 64 and
# 128 do not: M=8 vs M=1 differ by ~5e-7), which keeps a batched sequence's logits bit for bit those of the same
# sequence alone. s8 takes 32 (16 is slower). s4 takes 128 (its group: EVEN_ROWS keeps rows exact): on a 7B s4
# (quiet machine, 2 threads) decode 102-123 ms/token vs 131-136 at block 32, TTFT (91 tokens) 1604 vs 2321 ms, RSS
# 5.98 vs 6.88 GB (1.05x vs 1.37x the codes' bytes), load peak 11.9 vs 13.6 GB; SmolLM2 s4 TTFT 25 vs 30 ms, decode
# 131-150 vs 144-155 tok/s (the pads cost a little on a small model), KLD 0.1491 vs 0.1469 (board 0.1437: 1.037x vs 1.022x).
NBITS_BLOCK = {8: 32, 4: 128}
# blocks over 32 (s4 at its group 128: ~1.2x faster 4-bit products, 1.05x the bundle's bytes instead of 1.37x) take
# rows in pairs, the odd last row through a one-row kernel (~1e-6 apart): EVEN_ROWS pads every such product to an
# even row count (the last row repeated, its result dropped), so a row's result does not depend on the batch
EVEN_ROWS = True
# board numerics of s4 weights: MatMulNBits at accuracy_level 1 (fp32 activations; each weight code * scale,
# one fp32 multiplication, as DequantizeLinear): the board's numbers with the bundle's memory, ~4x faster
# than an fp32 MatMul here. s8 keeps fp32 weights (onnxruntime's 8-bit kernel has no fp32-activation path:
# 2 ms for a 576x3072 product vs 64 us for 4 bits).
BOARD_NBITS4 = True
# attention as ONNX's Attention op (opset 23) instead of MatMul / Softmax / MatMul with head reshapes: 1308 -> 1037
# nodes and ~5% faster decode at 2 threads on SmolLM2 s8 fast (131-151 vs 126-128 tok/s), but its kernel sums in
# an order that depends on the padded key count, so a batched sequence's logits differ from the same sequence
# alone (up to 1.2 on bf16 logits of ~25); off, to keep batched answers equal to single-stream ones bit for bit
ATTENTION_OP = False
BITS = {TensorProto.INT8: 8, TensorProto.INT4: 4}
NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
              "post_feedforward_layernorm", "q_norm", "k_norm")
LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "up_proj", "down_proj")


def arch_spec(bundle: Bundle) -> ArchSpec:
    """The bundle's recorded spec as the graphs' ArchSpec; text only (mRoPE bundles refused)."""
    spec = ArchSpec.model_validate(bundle.spec.model_dump())
    if bundle.spec.position_rows != 1 or bundle.manifest.vision is not None:
        raise GeneratorError(f"backend 'onnxruntime-fused' runs text bundles only; {bundle.dir} has images / "
                             f"mRoPE positions: use --backend onnxruntime.")
    return spec


def read_initializers(path: Path) -> dict[str, np.ndarray | tuple[int, np.ndarray]]:
    """A bundle graph's external initializers: name -> array (INT4 / INT8 codes as int8, fp8 codes as
    (ONNX type, uint8 bits), bf16 as fp32 values)."""
    if not path.is_file():
        raise GeneratorError(f"Bundle file {path} is missing; rebuild the bundle.")
    model = onnx.load(str(path), load_external_data=False)
    out: dict = {}
    for t in model.graph.initializer:
        if not t.external_data:
            continue
        if t.data_type in FP8_ONNX.values():
            u = onnx.TensorProto()
            u.CopyFrom(t)
            u.data_type = TensorProto.UINT8
            out[t.name] = (t.data_type, numpy_helper.to_array(u, base_dir=str(path.parent)))
            continue
        a = numpy_helper.to_array(t, base_dir=str(path.parent))
        if t.data_type in BITS:
            a = a.astype(np.int8)
        elif a.dtype != np.float32:
            a = a.astype(np.float32)  # bf16 / fp16 values, exactly
        out[t.name] = a
    return out


@dataclass
class Weights:
    """What the fused graph reads: name -> array, handed to onnxruntime without copies."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, name: str, a: np.ndarray) -> str:
        self.arrays[name] = np.ascontiguousarray(a)
        return name

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def nbits_block(group: int, bits: int) -> int:
    """The MatMulNBits block for a scale group: NBITS_BLOCK[bits], or the group itself when smaller (>= 16,
    a power of two: onnxruntime's limits); the group must be a whole number of blocks."""
    block = min(NBITS_BLOCK[bits], group)
    if block < 16 or block & (block - 1) or group % block:
        raise GeneratorError(f"fast numerics need group_size a multiple of {NBITS_BLOCK[bits]} (or a power of two "
                             f">= 16); this bundle has {group}: use --numerics board.")
    return block


def nbits_weight(codes: np.ndarray, scales: np.ndarray, bits: int, group: int, block: int | None = None):
    """MatMulNBits B [N, K/block, block*bits/8] (uint8) and scales [N, K/block] from stored int codes
    [K, N] with scales [K/group, N]: the same codes, each group's scale repeated over its blocks (exact
    when block divides the group). K is padded to whole blocks with the zero point's code."""
    k, n = codes.shape
    block = block or nbits_block(group, bits)
    nb = -(-k // block)
    u = np.full((n, nb * block), 1 << (bits - 1), np.uint8)
    u[:, :k] = (codes.T.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)  # element 2j in the low nibble
    rows = np.minimum(np.arange(nb) * block // group, scales.shape[0] - 1)
    s = np.ascontiguousarray(scales[rows].T, np.float32)  # [N, nb]
    return np.ascontiguousarray(u.reshape(n, nb, block * bits // 8)), s


class FusedBuilder:
    """Builds the fused graph and its weights; `numerics` "board" or "fast"."""

    def __init__(self, bundle: Bundle, numerics: str):
        self.b, self.numerics = bundle, numerics
        self.spec, self.opts = arch_spec(bundle), bundle.opts
        self.dt = DTYPES[self.opts.hidden_state_type]
        self.g = Graph(f"{self.spec.model_type}_fused")
        self.w = Weights()

    # -- weights ---------------------------------------------------------------------------------
    def linear(self, x: str, tensors: dict, prefix: str, name: str, rows: tuple | None = None) -> str:
        """x @ the stored weight (+ bias); `rows`: (pads, axis, count) making x's rows even (self.rows by default)."""
        g, w = self.g, self.w
        full = f"{prefix}{name}"
        bias = tensors.get(f"{name}.bias")
        if f"{name}.qweight" in tensors:
            codes, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
            k, n = codes.shape
            bits, group = BITS[self._types[f"{name}.qweight"]], self.opts.group_size
            if scales.shape[0] != -(-k // group):
                raise GeneratorError(f"{prefix}{name}: {scales.shape[0]} scale rows for K={k} and group_size {group}.")
            exact = self.numerics == "board" and bits == 4 and BOARD_NBITS4 and group >= 16 and not group & (group - 1)
            if self.numerics == "fast" or exact:  # board: fp32 activations (level 1) on the codes as stored
                block = group if exact else nbits_block(group, bits)
                qb, sc = nbits_weight(codes, scales, bits, group, block)
                pads, axis, count = rows or self.rows
                even = EVEN_ROWS and not exact and block > 32
                y = g.op("MatMulNBits", g.op("Pad", x, pads, mode="edge") if even else x, w.add(f"{full}.nbits", qb),
                         w.add(f"{full}.nscales", sc), domain="com.microsoft",
                         K=k, N=n, bits=bits, block_size=block, accuracy_level=1 if exact else 4)
                if even:
                    y = g.op("Slice", y, g.ints(0), count, g.ints(axis))
            else:
                y = g.op("MatMul", x, w.add(f"{full}.weight", dequantize(codes, scales, 0, group)))
        elif f"{name}.scales" in tensors:  # fp8 codes + per-output-channel scales
            dtype, bits8 = tensors[f"{name}.weight"]
            import ml_dtypes

            f8 = bits8.view(ml_dtypes.float8_e4m3fn if dtype == TensorProto.FLOAT8E4M3FN else ml_dtypes.float8_e5m2)
            y = g.op("MatMul", x, w.add(f"{full}.weight", dequantize(f8, tensors[f"{name}.scales"], 1, 0)))
        else:
            y = g.op("MatMul", x, w.add(f"{full}.weight", tensors[f"{name}.weight"]))
        return g.op("Add", y, w.add(f"{full}.bias", bias)) if bias is not None else y

    def _read(self, path: Path) -> dict:
        model = onnx.load(str(path), load_external_data=False)
        self._types = {t.name: t.data_type for t in model.graph.initializer}
        return read_initializers(path)

    def norms(self, tensors: dict, prefix: str) -> dict:
        out = {}
        for n in NORM_NAMES:
            if f"{n}.weight" in tensors:
                out[n] = (self.w.add(f"{prefix}{n}.weight", tensors[f"{n}.weight"]),
                          self.w.add(f"{prefix}{n}.bias", tensors[f"{n}.bias"]) if f"{n}.bias" in tensors else None)
        return out

    # -- the graph -------------------------------------------------------------------------------
    def build(self) -> tuple[onnx.ModelProto, Weights]:
        g, s, dt = self.g, self.spec, self.dt
        hid, kv = s.hidden_size, s.kv_dim
        x_in = g.input("hidden", dt, [1, "N", hid])
        positions = g.input("positions", TensorProto.INT64, ["B", "S"])
        # masks [B, grp*S, S+T]: each query row's mask, repeated for the grp query heads of a KV head (row g*S + s)
        mask = g.input("mask", TensorProto.FLOAT, ["B", "GS", "ST"])
        slots = g.input("slots", TensorProto.INT64, ["B", "T"])
        # where each sequence's new rows go among its keys: (b, past_b + s) [B, S, 2]
        self.scatter = g.input("scatter", TensorProto.INT64, ["B", "S", 2])
        window = g.input("mask_window", TensorProto.FLOAT, ["B", "GS", "ST"]) if "sliding_attention" in s.layer_types else None
        self.bs = g.op("Shape", positions)  # [B, S]
        self.rows = self.even_rows(g.op("Shape", x_in, start=1, end=2), 1)  # the N token rows of [1, N, H]
        masks = {"full_attention": g.op("Unsqueeze", mask, g.ints(1))}  # [B, 1, rows, S+T]
        if window:
            masks["sliding_attention"] = g.op("Unsqueeze", window, g.ints(1))
        tables: dict[str, tuple[str, str]] = {}
        x = to_f32(g, x_in, dt)
        for i in range(s.num_hidden_layers):
            lt = s.layer_types[i]
            if lt not in tables:
                tables[lt] = rope_tables(g, s, lt, positions)
            x = self.layer(i, x, slots, masks[lt], tables[lt])
        self.post(x)
        model = g.model([], f"{s.model_name}: all layers, batch-aware, paged KV ({self.numerics} numerics)")
        if ATTENTION_OP:
            model.opset_import[0].version = 23
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return model, self.w

    def even_rows(self, count: str, axis: int) -> tuple[str, str, int]:
        """(Pad's pads adding count % 2 rows on `axis` of a 3-D tensor, axis, count) for EVEN_ROWS."""
        g = self.g
        pads = [g.ints(0)] * 6
        pads[3 + axis] = g.op("Mod", count, g.ints(2))
        return g.op("Concat", *pads, axis=0), axis, count

    def round(self, x: str) -> str:
        """The board's rounding point: x through the storage type and back (none for fp32)."""
        return to_f32(self.g, from_f32(self.g, x, self.dt), self.dt)

    def layer(self, i: int, x: str, slots: str, mask: str, rope: tuple[str, str]) -> str:
        g, s, dt = self.g, self.spec, self.dt
        t = self._read(self.b.layer_file(i, 0))
        p = f"l{i}."
        refs = self.norms(t, p)
        kv, d, n_h, n_kv = s.kv_dim, s.head_dim, s.num_attention_heads, s.num_key_value_heads
        grp = n_h // n_kv
        table = s.rope[s.layer_types[i]]
        cos, sin = rope
        h = norm(g, x, s.norm, refs["input_layernorm"])
        qkv = self.linear(h, t, p, "qkv_proj")
        rot = lambda v, heads: apply_rope(g, v, cos, sin, table.rotary_dim, d, table.interleaved, heads)  # noqa: E731
        q4, k4, v = qkv_heads(g, s, refs, qkv, rot)
        if ATTENTION_OP:
            return self.attention_op(i, x, h, t, p, refs, q4, k4, v, slots, mask)
        bs_heads = g.op("Concat", self.bs, g.ints(n_kv, d), axis=0)
        k_chunk = g.op("Reshape", k4, bs_heads)  # [B, S, n_kv, d]
        v_chunk = g.op("Reshape", v, bs_heads)
        k_st, v_st = from_f32(g, k_chunk, dt), from_f32(g, v_chunk, dt)  # as the pool will hold them
        k_all, v_all = self.keys(i, k_st, v_st, slots, [n_kv, d])  # [B, S+T, n_kv, d] fp32
        k_t = g.op("Transpose", k_all, perm=[0, 2, 3, 1])  # [B, n_kv, d, S+T]
        v_t = g.op("Transpose", v_all, perm=[0, 2, 1, 3])  # [B, n_kv, S+T, d]
        qg = g.op("Reshape", q4, g.op("Concat", self.bs, g.ints(n_kv, grp, d), axis=0))  # [B, S, n_kv, grp, d]
        qg = g.op("Reshape", g.op("Transpose", qg, perm=[0, 2, 3, 1, 4]), g.ints(0, 0, -1, d))  # [B, n_kv, grp*S, d]
        scores = g.op("MatMul", qg, k_t)  # [B, n_kv, grp*S, S+T]
        if s.attn_logit_softcap:
            cap = g.const(s.attn_logit_softcap)
            scores = g.op("Mul", g.op("Tanh", g.op("Div", scores, cap)), cap)
        probs = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
        ctx = g.op("Reshape", g.op("MatMul", probs, v_t), g.ints(0, 0, grp, -1, d))  # [B, n_kv, grp, S, d]
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 3, 1, 2, 4]), g.ints(1, -1, s.q_dim))
        return self.rest(i, x, h, t, p, refs, ctx, k_st, v_st, ["B", "S", n_kv, d])

    def keys(self, i, k_st, v_st, slots, heads) -> tuple[str, str]:
        """One layer's keys and values [B, S+T, *heads] fp32 (the pool's [R, kv] rows are bound as [R, *heads]):
        the pool's rows at `slots` (each sequence's past, then any slot), the chunk's stored rows (k_st / v_st)
        scattered in at past_b..past_b+S-1: every key in position order, as stored, padding only trailing."""
        g, dt = self.g, self.dt
        k_pool, v_pool = (g.input(f"{n}_pool.{i}", dt, ["R", *heads]) for n in "kv")
        return tuple(to_f32(g, g.op("ScatterND", g.op("Gather", pool, slots, axis=0), self.scatter, new), dt)
                     for pool, new in ((k_pool, k_st), (v_pool, v_st)))

    def attention_op(self, i, x, h, t, p, refs, q4, k4, v, slots, mask) -> str:
        """Attention as ONNX's Attention (opset 23: GQA by kv_num_heads, additive mask, softcap before the mask)
        on [B, S, heads*d] rows: keys in position order as in the MatMul form."""
        g, s, dt = self.g, self.spec, self.dt
        kv = s.kv_dim
        bs_kv = g.op("Concat", self.bs, g.ints(kv), axis=0)
        k_chunk, v_chunk = g.op("Reshape", k4, bs_kv), g.op("Reshape", v, bs_kv)  # [B, S, kv]
        k_st, v_st = from_f32(g, k_chunk, dt), from_f32(g, v_chunk, dt)
        k_all, v_all = self.keys(i, k_st, v_st, slots, [kv])  # [B, S+T, kv]
        q3 = g.op("Reshape", q4, g.op("Concat", self.bs, g.ints(s.q_dim), axis=0))
        ctx = g.op("Attention", q3, k_all, v_all, mask, q_num_heads=s.num_attention_heads,
                   kv_num_heads=s.num_key_value_heads, scale=1.0, softcap=float(s.attn_logit_softcap or 0.0))
        ctx = g.op("Reshape", ctx, g.ints(1, -1, s.q_dim))
        return self.rest(i, x, h, t, p, refs, ctx, k_st, v_st, ["B", "S", kv])

    def rest(self, i, x, h, t, p, refs, ctx, k_st, v_st, kv_shape) -> str:
        """o_proj, the residuals and the MLP; the layer's K/V outputs (k_st / v_st: in the storage dtype)."""
        g, s, dt = self.g, self.spec, self.dt
        out = self.round(block_tail(g, s, refs, x, h, ctx, lambda y, key: self.linear(y, t, p, key)))
        # outputs last: Graph.output renames the producer's value in the nodes that exist so far
        g.output(k_st, f"k_new.{i}", dt, kv_shape)
        g.output(v_st, f"v_new.{i}", dt, kv_shape)
        return out

    def post(self, x: str):
        """Each sequence's last token: final norm, lm_head, softcap, rounded as the post graph's output."""
        g, s = self.g, self.spec
        t = self._read(self.b.post_file)
        last = g.op("Slice", g.op("Reshape", x, g.op("Concat", self.bs, g.ints(s.hidden_size), axis=0)),
                    g.ints(-1), g.ints(np.iinfo(np.int64).max), g.ints(1))  # [B, 1, H]
        refs = {"norm": (self.w.add("post.norm.weight", t["norm.weight"]),
                         self.w.add("post.norm.bias", t["norm.bias"]) if "norm.bias" in t else None)}
        rows = self.even_rows(g.op("Slice", self.bs, g.ints(0), g.ints(1)), 0)  # the B rows of [B, 1, H]
        logits = self.linear(norm(g, last, s.final_norm, refs["norm"]), t, "post.", "lm_head", rows)
        if s.final_logit_softcap:
            cap = g.const(s.final_logit_softcap)
            logits = g.op("Mul", g.op("Tanh", g.op("Div", logits, cap)), cap)
        logits = g.op("Reshape", self.round(logits), g.ints(-1, s.vocab_size))
        g.output(logits, "logits", TensorProto.FLOAT, ["B", s.vocab_size])


def declare_external(model: onnx.ModelProto, weights: Weights, location: str) -> onnx.ModelProto:
    """Declare every weight as an external initializer (type and shape only) whose data the session gets
    from SessionOptions.add_initializer; `location`: an existing file of the bundle, never read."""
    for name, a in weights.arrays.items():
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape,
                        data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value=location)
        model.graph.initializer.append(t)
    return model


def mask_value(hidden: str) -> float:
    """The blocked value added to attention scores (the board mask's, as fp32)."""
    return float(MASK_VALUE[hidden])
