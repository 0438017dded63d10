"""fp8 weights (-w / --post_weight_type fp8_e4m3 | fp8_e5m2): the graphs store FLOAT8 initializers with one
fp32 scale per output channel, onnxruntime's DequantizeLinear computes what a numpy (ml_dtypes) dequantization
of them computes, the stored codes are the ml_dtypes rounding of the checkpoint's weights, and a chip without
fp8 refuses the flag before any work."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

from generator.cli import main
from generator.contract import Bundle
from generator.errors import GeneratorError
from generator.verify.checks import graph_weight_types
from models import SMALL_GROUPS, quiet_build

FP8 = {"fp8_e4m3": (ml_dtypes.float8_e4m3fn, onnx.TensorProto.FLOAT8E4M3FN, 448.0),
       "fp8_e5m2": (ml_dtypes.float8_e5m2, onnx.TensorProto.FLOAT8E5M2, 57344.0)}


@pytest.fixture(scope="module", params=sorted(FP8))
def fp8_bundle(request, tiny_llama, tmp_path_factory):
    wt = request.param
    out = tmp_path_factory.mktemp(wt) / "b"
    m = quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type=wt, post_weight_type=wt,
                    hidden_state_type="fp32", check_level=1, **SMALL_GROUPS)
    return wt, out, m


def initializers(path) -> dict[str, onnx.TensorProto]:
    model = onnx.load(str(path))  # external data read from the bundle folder
    return {t.name: t for t in model.graph.initializer}


def test_fp8_graphs_store_float8_codes_with_per_channel_scales(fp8_bundle, tiny_llama):
    wt, out, m = fp8_bundle
    dtype, onnx_type, top = FP8[wt]
    b = Bundle(out)
    assert m["options"]["weight_type"] == wt and m["options"]["post_weight_type"] == wt
    for i in range(b.spec.num_hidden_layers):
        assert graph_weight_types(b.layer_file(i, 0)) == [wt]
    assert graph_weight_types(b.post_file) == [wt]
    head = load_file(str(tiny_llama / "model.safetensors"))["lm_head.weight"].astype(np.float32)  # [V, H]
    inits = initializers(b.post_file)
    codes, scales = inits["lm_head.weight"], inits["lm_head.scales"]
    assert codes.data_type == onnx_type and list(codes.dims) == [head.shape[1], head.shape[0]]
    q = np.frombuffer(codes.raw_data, np.uint8).view(dtype).reshape(list(codes.dims))
    s = np.frombuffer(scales.raw_data, np.float32)
    # independent rounding: each output channel's largest |w| lands on the format's largest finite value
    want_s = np.abs(head).max(axis=1) / np.float32(top)
    np.testing.assert_allclose(s, want_s, rtol=1e-6)
    np.testing.assert_array_equal(q.view(np.uint8), (head.T / s).astype(dtype).view(np.uint8))
    assert np.abs(q.astype(np.float32)).max(axis=0).tolist() == [top] * head.shape[0]


def test_fp8_post_graph_runs_in_onnxruntime_like_numpy_dequantization(fp8_bundle, tiny_llama):
    """onnxruntime's CPU DequantizeLinear on the float8 initializer equals ml_dtypes' value times the scale."""
    wt, out, _ = fp8_bundle
    dtype = FP8[wt][0]
    b = Bundle(out)
    inits = initializers(b.post_file)
    q = np.frombuffer(inits["lm_head.weight"].raw_data, np.uint8).view(dtype).reshape(list(inits["lm_head.weight"].dims))
    w = q.astype(np.float32) * np.frombuffer(inits["lm_head.scales"].raw_data, np.float32)
    norm_w = load_file(str(tiny_llama / "model.safetensors"))["model.norm.weight"].astype(np.float32)
    x = np.random.default_rng(3).standard_normal((1, 1, b.spec.hidden_size)).astype(np.float32)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    got = ort.InferenceSession(str(b.post_file), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    h = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * norm_w
    want = (h @ w.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_fast_numerics_runs_fp8_weights_on_shared_fp32_copies(fp8_bundle):
    """onnxruntime has no int8-activation kernel for float8: fast numerics gives fp8 graphs the board's
    dequantized fp32 weights (else DequantizeLinear runs on every call) and board's outputs to round-off."""
    from generator.runtime.ort import open_session

    _, out, _ = fp8_bundle
    b = Bundle(out)
    x = np.random.default_rng(4).standard_normal((1, 1, b.spec.hidden_size)).astype(np.float32)
    fast = open_session(b.post_file, threads=1, quantized=True, numerics="fast")
    board = open_session(b.post_file, threads=1, quantized=True, numerics="board")
    assert fast.board_weights and set(fast.board_weights) == set(board.board_weights)
    want = board.run(None, {"input": x})[0]  # the same weights; fast keeps prepacking (another summation order)
    np.testing.assert_allclose(fast.run(None, {"input": x})[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fp8_builds_pass_the_layer_check(fp8_bundle):
    wt, _, m = fp8_bundle
    checks = m["checks"]
    assert checks["passed"], checks["failures"]
    assert checks["layer"]["post"]["weight_types"] == [wt]
    assert checks["thresholds"]["layer"]["min_cosine"] < 0.999  # fp8's own limits, not fp32's


@pytest.mark.parametrize("flag", [["-w", "fp8_e4m3"], ["--post_weight_type", "fp8_e5m2"]])
def test_fp8_on_a_chip_without_it_is_refused_naming_the_flag(tiny_llama, tmp_path, capsys, flag):
    code = main(["build", "--input_path", str(tiny_llama), "--output_path", str(tmp_path / "b"), "--chip", "AX630C",
                 *flag, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert flag[1] in err and {"-w": "--weight_type"}.get(flag[0], flag[0]) in err
    assert "AX620E" in err and "s8" in err
    assert not (tmp_path / "b").exists()


def test_fp8_type_refused_from_the_api_too(tiny_llama, tmp_path):
    with pytest.raises(GeneratorError, match="fp8_e4m3.*not supported on AX620E"):
        quiet_build(input_path=str(tiny_llama), output_path=str(tmp_path / "b"), chip="AX630C", weight_type="fp8_e4m3")
