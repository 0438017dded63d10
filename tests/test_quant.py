"""Group-wise quantization and the ONNX storage formats it writes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from generator.quant import dequantize, from_bf16_bits, pack_int4, quantize, to_bf16_bits


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


def test_bf16_bits_round_to_nearest_even():
    x = np.array([1.0, -2.5, 3.14159265, 65504.0, 1e-3, -65536.0], np.float32)
    bits = to_bf16_bits(x)
    back = from_bf16_bits(bits)
    assert bits[-1] == 0xC780  # the board's mask value
    np.testing.assert_allclose(back, x, rtol=2 ** -8)
    # 1 + 2^-8 is halfway between two bf16 values and rounds to even (1.0)
    assert from_bf16_bits(to_bf16_bits(np.array([1 + 2 ** -8], np.float32)))[0] == 1.0
