"""Calibrated quantization (generator/quantize/): GPTQ/AWQ against RTN, the GPTQ checkpoint writer, the
build keeping the checkpoint's codes, and bad input. Tiny random llama (tests/models.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file

from generator.cli import main
from generator.contract import Bundle
from generator.errors import GeneratorError
from generator.inputs.checkpoint import open_input
from generator.quantize import calibrate
from generator.quantize.calibrate import calibration_windows, quantize_model, read_calibration
from generator.quantize.gptq import HessianAccumulator, gptq, rtn
from generator.quantize.simulate import load_float_model
from generator.quantize.writer import write_checkpoint
from generator.recipe import registry
from generator.verify.reference import load_reference
from models import SMALL_GROUPS, quiet_build

GROUP = 16
TEXT = ("The quick brown fox jumps over the lazy dog. Calibration text for a tiny model, with numbers 1 2 3 "
        "and some punctuation; it is repeated to make enough tokens.\n") * 40


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def windows(tiny_llama):
    from transformers import AutoTokenizer

    return calibration_windows(AutoTokenizer.from_pretrained(str(tiny_llama)), TEXT, 8, 32)


def test_gptq_lowers_a_linear_output_error_vs_rtn():
    """On correlated inputs (what calibration activations look like), ||XW - XQ|| of GPTQ < RTN's."""
    rng = np.random.default_rng(0)
    k, n = 128, 32
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = (rng.standard_normal((1024, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))).astype(np.float32)
    acc = HessianAccumulator(k)
    acc.add(torch.from_numpy(x))
    assert torch.allclose(acc.h, torch.from_numpy(2.0 / len(x) * x.T.astype(np.float64) @ x), rtol=1e-4, atol=1e-3)
    for bits in (4, 8):
        err = lambda r: float(np.mean((x @ w.T - x @ r.dequantize().T) ** 2))  # noqa: E731
        base, calibrated = rtn(w, bits, GROUP), gptq(w, acc.h, bits, GROUP)
        assert err(calibrated) < 0.9 * err(base)
        qmax = 2 ** (bits - 1) - 1
        assert calibrated.codes.min() >= -qmax - 1 and calibrated.codes.max() <= qmax
        # the scales are fp16 values: the checkpoint stores them exactly
        assert np.array_equal(calibrated.scales.astype(np.float32).astype(np.float16), calibrated.scales)


def test_rtn_is_quant_py_on_fp16_scales():
    from generator.export.quant import quantize

    w = np.random.default_rng(1).standard_normal((24, 64)).astype(np.float32)
    q, _ = quantize(np.ascontiguousarray(w.T), "s4", GROUP)
    r = rtn(w, 4, GROUP)
    assert np.mean(r.codes.T == q) > 0.97  # only fp16 rounding of the scales moves a code


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_calibrated_methods_lower_the_model_output_error_vs_rtn(tiny_llama, windows):
    """Logits of the whole quantized model vs the float model's on a calibration-like window."""
    ids = windows[1].tolist()
    ref = _logits(load_float_model(tiny_llama), ids)
    errs = {}
    for method in ("rtn", "gptq", "awq", "awq+gptq"):
        model = load_float_model(tiny_llama)
        quantize_model(model, method, 4, GROUP, windows)
        errs[method] = float(np.mean((_logits(model, ids) - ref) ** 2))
    assert max(errs["gptq"], errs["awq"], errs["awq+gptq"]) < errs["rtn"], errs


@pytest.fixture(scope="module")
def written(tiny_llama, windows, tmp_path_factory):
    model = load_float_model(tiny_llama, untie=False)
    results = quantize_model(model, "gptq", 4, GROUP, windows)
    out = tmp_path_factory.mktemp("gptq_out") / "ckpt"
    write_checkpoint(model, results, 4, GROUP, open_input(tiny_llama).dir, out,
                     {"method": "gptq", "source": str(tiny_llama)})
    return out, model, results


def independent_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [out, in] signed -> qweight [in / per, out] with plain loops (AutoGPTQ's layout)."""
    per, zero = 32 // bits, 2 ** (bits - 1)
    out_f, in_f = codes.shape
    q = np.zeros((in_f // per, out_f), np.uint32)
    for r in range(in_f):
        q[r // per] |= (codes[:, r].astype(np.int64) + zero).astype(np.uint32) << np.uint32(bits * (r % per))
    return q.view(np.int32)


def test_written_checkpoint_packing_and_config(written):
    out, _, results = written
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: cfg[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == \
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": False,
         "checkpoint_format": "gptq"}
    state = load_file(out / "model.safetensors")
    prefix = "model.layers.0.self_attn.q_proj"
    assert np.array_equal(state[f"{prefix}.qweight"].numpy(), independent_pack(results[prefix].codes, 4))
    assert np.all(state[f"{prefix}.qzeros"].numpy().view(np.uint32) == 0x77777777)  # v1: zero 8 stored as 7
    assert state[f"{prefix}.scales"].dtype == torch.float16
    assert (out / "tokenizer.json").is_file()


def test_written_checkpoint_loads_in_transformers_with_the_quantized_weights(written, windows):
    """transformers' model from config.json (quantization_config dropped) + the dequantized weights
    (inputs/gptq.py) computes what the quantized model computed."""
    out, model, _ = written
    reference = load_reference(open_input(out), registry().recipes["llama"])
    ids = windows[0].tolist()
    np.testing.assert_allclose(_logits(reference, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


def _initializer(path, name) -> np.ndarray:
    m = onnx.load(str(path))
    t = next(i for i in m.graph.initializer if i.name == name)
    return numpy_helper.to_array(t, base_dir=str(path.parent))


def test_build_keeps_the_checkpoints_codes_and_scales(written, tmp_path):
    out, _, results = written
    bundle_dir = tmp_path / "b"
    m = quiet_build(input_path=str(out), output_path=str(bundle_dir), weight_type="s4", hidden_state_type="fp32",
                    post_weight_type="s8", **SMALL_GROUPS)
    assert m["input"]["reference"] == json.loads((out / "config.json").read_text())["quantization_config"]["meta"]["source"]
    b = Bundle(bundle_dir)
    layer = b.layer_file(0, 0)
    codes = _initializer(layer, "down_proj.qweight").astype(np.int8)
    scales = _initializer(layer, "down_proj.scales")
    r = results["model.layers.0.mlp.down_proj"]
    assert np.array_equal(codes, r.codes.T)
    assert np.array_equal(scales, r.scales.astype(np.float32))
    gu = _initializer(layer, "gate_up_proj.qweight").astype(np.int8)
    assert np.array_equal(gu, np.concatenate([results[f"model.layers.0.mlp.{p}_proj"].codes.T for p in ("gate", "up")], 1))
    qkv_scales = _initializer(layer, "qkv_proj.scales")
    q = results["model.layers.0.self_attn.q_proj"]
    attn = np.float32(b.spec.attention_scale) if hasattr(b.spec, "attention_scale") else np.float32(1 / np.sqrt(16))
    assert np.array_equal(qkv_scales[:, :q.scales.shape[1]], q.scales.astype(np.float32) * attn)


def test_default_s4_build_calibrates_and_records_the_reference(tiny_llama, calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("AXGEN_CACHE", str(tmp_path / "cache"))
    m = quiet_build(input_path=str(tiny_llama), output_path=str(tmp_path / "b"), weight_type="s4",
                    hidden_state_type="fp32", post_weight_type="s8", calib_data=str(calib_file), check_level=1,
                    **SMALL_GROUPS)
    assert m["input"]["quantization"]["method"] == "gptq"
    assert m["model"] == tiny_llama.name.lower()
    assert m["input"]["reference"] == str(tiny_llama)
    assert m["checks"]["passed"], m["checks"]["failures"]
    cached = list((tmp_path / "cache" / "quantized").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    # the same inputs again: the cache is reused, nothing new written
    stamp = (cached[0] / "model.safetensors").stat().st_mtime_ns
    again = calibrate.cached_quantize(str(tiny_llama), "gptq", "s4", GROUP, str(calib_file))
    assert again == cached[0] and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert list((tmp_path / "cache" / "quantized").iterdir()) == cached
    # the same files at another path reuse the cache, and the bundle names the path it was built from
    copy = tmp_path / tiny_llama.name
    shutil.copytree(tiny_llama, copy)
    m2 = quiet_build(input_path=str(copy), output_path=str(tmp_path / "b2"), weight_type="s4",
                     hidden_state_type="fp32", post_weight_type="s8", calib_data=str(calib_file), check_level=0,
                     **SMALL_GROUPS)
    assert m2["input"]["reference"] == str(copy)
    assert list((tmp_path / "cache" / "quantized").iterdir()) == cached


# -- bad input ---------------------------------------------------------------------------------------

SMALL_FLAGS = ["--prefill_len", "16", "--kv_cache_len", "96", "--last_kv_cache_len", "16", "32", "64",
               "--group_size", "16"]


def _fails(capsys, argv, *needles):
    assert main(argv + SMALL_FLAGS) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_unknown_method(tiny_llama, tmp_path, capsys):
    _fails(capsys, ["build", "--input_path", str(tiny_llama), "--output_path", str(tmp_path / "o"), "-w", "s4",
                    "--quant_method", "magic", "--no-progress"], "--quant_method 'magic' is unknown", "gptq")


def test_method_on_a_float_weight_type(tiny_llama, tmp_path, capsys):
    _fails(capsys, ["build", "--input_path", str(tiny_llama), "--output_path", str(tmp_path / "o"), "-w", "fp32",
                    "--quant_method", "gptq", "--no-progress"], "--quant_method gptq", "'fp32'")


@pytest.mark.parametrize("content, needle", [(b"", "is empty"), (b"   \n", "is empty"),
                                             (b"\x89PNG\r\n\x1a\n\x00\x00", "binary"), (b"\xff\xfe\xfa", "not UTF-8")])
def test_bad_calibration_file(tiny_llama, tmp_path, capsys, content, needle):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(content)
    _fails(capsys, ["build", "--input_path", str(tiny_llama), "--output_path", str(tmp_path / "o"), "-w", "s4",
                    "--calib_data", str(bad), "--no-progress"], str(bad), needle)
    with pytest.raises(GeneratorError, match=needle):
        read_calibration(bad)


def test_missing_calibration_file(tmp_path):
    with pytest.raises(GeneratorError, match="does not exist"):
        read_calibration(tmp_path / "nope.txt")


def test_quantize_command_writes_a_checkpoint(tiny_llama, calib_file, tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "settings", _small_settings)
    out = tmp_path / "q"
    assert main(["quantize", "--input_path", str(tiny_llama), "--output_path", str(out), "--quant_method", "awq",
                 "-w", "s8", "--group_size", str(GROUP), "--calib_data", str(calib_file)]) == 0
    ckpt = open_input(out)
    assert ckpt.kind == "gptq" and ckpt.gptq.cfg.bits == 8
    assert json.loads((out / "config.json").read_text())["quantization_config"]["meta"]["method"] == "awq"


def _small_settings():
    import yaml

    from generator.paths import DATA_DIR

    s = yaml.safe_load((DATA_DIR / "quantize.yaml").read_text())
    s["calibration"] = {"samples": 4, "seq_len": 32}
    return s

