"""Group-wise quantization and the ONNX storage formats it writes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import ml_dtypes
import torch
from onnx import TensorProto, helper, numpy_helper

from generator.export.quant import dequantize, from_bf16_bits, pack_int4, quantize, to_bf16_bits


@pytest.mark.parametrize("wtype,qmax", [("s8", 127), ("s4", 7)])
@pytest.mark.parametrize("k", [256, 200])  # 200: a partial last block
def test_quantize_roundtrip_error_bounded(wtype, qmax, k):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, 48)).astype(np.float32)
    q, s = quantize(w, wtype, 64)
    assert q.dtype == np.int8 and q.shape == w.shape and s.shape == (-(-k // 64), 48)
    assert q.min() >= -qmax - 1 and q.max() <= qmax
    assert (q == -qmax - 1).any()  # the largest-magnitude value of a block lands on the lowest code
    err = np.abs(dequantize(q, s, 64) - w)
    step = np.abs(np.repeat(s, 64, axis=0)[:k])
    # rounding: half a step, except values of the opposite sign clipped at +qmax (one step at most)
    assert (err <= step + 1e-6).all()
    assert np.mean(err <= step * 0.5 + 1e-6) > 0.99


@pytest.mark.parametrize("wtype,onnx_type", [("s8", TensorProto.INT8), ("s4", TensorProto.INT4)])
def test_onnxruntime_dequantizes_our_layout(wtype, onnx_type):
    """Blocked DequantizeLinear (opset 21) on our bytes equals our own dequantization."""
    rng = np.random.default_rng(1)
    k, n, g = 96, 40, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, s = quantize(w, wtype, g)
    raw = q.tobytes() if wtype == "s8" else pack_int4(q)
    qt = helper.make_tensor("q", onnx_type, [k, n], raw, raw=True)
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=g)], "g", [],
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n])],
                              [qt, numpy_helper.from_array(s, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(got, dequantize(q, s, g))


def _bf16_cases() -> np.ndarray:
    """float32 values where truncation and round-to-nearest-even differ (and where they agree):
    ties to even and to odd, just above and below ties, subnormals, overflow to Inf, Inf, NaN."""
    hi = np.array([0x3F80, 0x3F81, 0x4049, 0xC2F7, 0x7F7F, 0x0001, 0x0042, 0x8033, 0x3380], np.uint32) << 16
    low = np.array([0x8000, 0x7FFF, 0x8001, 0x0001, 0xFFFF, 0x0000], np.uint32)  # tie, below, above, tiny, max, exact
    bits = (hi[:, None] | low[None, :]).ravel()
    special = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x00000000, 0x80000000,
                        0x7F7FFFFF, 0x00000001, 0x007FFFFF], np.uint32)
    return np.concatenate([bits, special]).view(np.float32)


def test_bf16_bits_round_to_nearest_even():
    x = _bf16_cases()
    with np.errstate(invalid="ignore"):  # casting NaN
        bits = to_bf16_bits(x)
        ref_ml = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    ref_torch = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(bits[~nan], ref_ml[~nan])
    np.testing.assert_array_equal(bits[~nan], ref_torch[~nan])
    back = from_bf16_bits(bits)
    assert np.isnan(back[nan]).all() and np.array_equal(np.signbit(back[nan]), np.signbit(x[nan]))  # NaN stays NaN
    truncated = (x.view(np.uint32) >> 16).astype(np.uint16)
    assert (bits[~nan] != truncated[~nan]).sum() >= 20  # the cases tell rounding from truncation
    # halfway cases round to the even neighbour: 1 + 2^-8 -> 1.0, 1 + 3 * 2^-8 -> 1 + 2^-6
    assert to_bf16_bits(np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)).tolist() == [0x3F80, 0x3F82]
    assert to_bf16_bits(np.array([np.finfo(np.float32).max], np.float32))[0] == 0x7F80  # rounds up to Inf
    assert to_bf16_bits(np.array([-65536.0], np.float32))[0] == 0xC780  # the board's mask value
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    np.testing.assert_array_equal(from_bf16_bits(every), every.view(ml_dtypes.bfloat16).astype(np.float32))
