"""Pre-quantized GPTQ checkpoints as input (the vendor doc's example is Qwen2.5-0.5B-Instruct-GPTQ-Int8).

A tiny random llama is packed here into GPTQ int8 / int4 (with an act-order g_idx permutation, the
v1 and v2 zero conventions, settings in config.json or quantize_config.json) by a packer written
independently of generator/inputs/gptq.py: per (group, output) an fp16 scale, codes round(w / scale) +
zero, packed bit field by bit field. The checkpoint reader must hand on exactly the packer's
dequantized weights; bundles built from it must pass the checks against transformers loaded with
those weights; bad GPTQ inputs must fail with messages naming the file and field.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from generator.inputs.checkpoint import open_input
from generator.errors import GeneratorError
from generator.recipe import LINEAR_TENSORS, registry
from generator.verify.reference import capture, load_reference
from generator.contract import Bundle
from generator.verify.checks import failing_rows, layer_check, logits_check, thresholds, within
from generator.progress import Progress
from models import SMALL_GROUPS, quiet_build, save_tiny, token_ids

# name: (bits, group_size, act_order, checkpoint_format, where the settings live, write g_idx)
CASES = {
    "int8": (8, 16, False, "gptq", "config.json", True),
    "int4": (4, 16, False, "gptq", "config.json", True),
    "int4_act_order": (4, 16, True, "gptq", "config.json", True),
    "int8_v2_quantize_config": (8, 32, False, "gptq_v2", "quantize_config.json", False),
}


def pack_gptq(w: np.ndarray, bits: int, group_size: int, g_idx: np.ndarray, fmt: str):
    """Symmetric GPTQ packing of w [out, in]; returns (tensors, dequantized w)."""
    out_f, in_f = w.shape
    maxq, zero = 2 ** bits - 1, 2 ** (bits - 1)
    groups = int(g_idx.max()) + 1
    scales = np.zeros((groups, out_f), np.float16)
    codes = np.zeros((in_f, out_f), np.int64)
    for g in range(groups):
        cols = np.flatnonzero(g_idx == g)
        amax = np.abs(w[:, cols]).max(axis=1)
        scales[g] = (2 * amax / maxq).astype(np.float16)  # GPTQ's symmetric scale, stored fp16
        s = scales[g].astype(np.float64)
        codes[cols] = np.clip(np.round(w[:, cols].astype(np.float64) / s[:, None]) + zero, 0, maxq).T
    deq = np.zeros((out_f, in_f), np.float32)
    for i in range(in_f):
        deq[:, i] = scales[g_idx[i]].astype(np.float32) * (codes[i] - zero).astype(np.float32)
    per = 32 // bits
    qweight = np.zeros((in_f // per, out_f), np.uint32)
    for r in range(in_f):
        qweight[r // per] |= codes[r].astype(np.uint32) << np.uint32(bits * (r % per))
    stored_zero = zero - 1 if fmt == "gptq" else zero  # v1 stores zero - 1
    qzeros = np.zeros((groups, out_f // per), np.uint32)
    for c in range(out_f):
        qzeros[:, c // per] |= np.uint32(stored_zero) << np.uint32(bits * (c % per))
    tensors = {"qweight": torch.from_numpy(qweight.view(np.int32)), "qzeros": torch.from_numpy(qzeros.view(np.int32)),
               "scales": torch.from_numpy(scales), "g_idx": torch.from_numpy(g_idx.astype(np.int32))}
    return tensors, deq


def make_gptq(src: Path, dst: Path, case: str) -> dict[str, np.ndarray]:
    """Pack every decoder linear of the float checkpoint `src` into `dst`; returns the expected weights."""
    bits, group_size, act_order, fmt, where, write_g_idx = CASES[case]
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    state = load_file(src / "model.safetensors")
    rng = np.random.default_rng(bits + group_size)
    out, expected = {}, {}
    for name, t in state.items():
        prefix = name[: -len(".weight")]
        if not (name.endswith(".weight") and prefix.rsplit(".", 1)[-1] in LINEAR_TENSORS):
            out[name] = t
            continue
        in_f = t.shape[1]
        if act_order:  # columns quantized in a random order: g_idx is a permutation of groups
            perm = rng.permutation(in_f)
            g_idx = np.empty(in_f, np.int64)
            g_idx[perm] = np.arange(in_f) // group_size
            assert np.any(np.diff(g_idx) < 0)
        else:
            g_idx = np.arange(in_f) // group_size
        packed, deq = pack_gptq(t.float().numpy(), bits, group_size, g_idx, fmt)
        if not write_g_idx:
            del packed["g_idx"]
        out.update({f"{prefix}.{k}": v for k, v in packed.items()})
        expected[name] = deq
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    qc = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": True, "damp_percent": 0.01,
          "true_sequential": True, "checkpoint_format": fmt}
    cfg = json.loads((dst / "config.json").read_text())
    if where == "config.json":
        cfg["quantization_config"] = {"quant_method": "gptq", **qc}
    else:
        (dst / "quantize_config.json").write_text(json.dumps(qc))
    cfg["torch_dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return expected


@pytest.fixture(scope="module")
def packed(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    return {case: (root / case, make_gptq(tiny_llama, root / case, case)) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_dequantized_weights_equal_the_packers(packed, case, tiny_llama):
    path, expected = packed[case]
    ckpt = open_input(path)
    names = ckpt.names()
    assert not any(n.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for n in names)
    assert names == open_input(tiny_llama).names()  # an ordinary checkpoint, as far as anyone can tell
    assert ckpt.kind == "gptq" and open_input(tiny_llama).kind == "hf"  # what callers ask instead of attributes
    for name, want in expected.items():
        assert ckpt.has(name) and ckpt.shape(name) == want.shape
        got = ckpt.tensor(name)
        assert got.dtype == np.float32 and np.array_equal(got, want), name
    # the quantization is real: close to the float weights, but not equal
    ref = open_input(tiny_llama)
    w = "model.layers.0.mlp.down_proj.weight"
    err = np.abs(ckpt.tensor(w) - ref.tensor(w)).max() / np.abs(ref.tensor(w)).max()
    assert 0 < err < (0.01 if CASES[case][0] == 8 else 0.15)


def test_reference_is_transformers_with_the_dequantized_weights(packed):
    path, expected = packed["int4_act_order"]
    model = load_reference(open_input(path), registry().recipes["llama"])
    params = dict(model.named_parameters())
    for name, want in expected.items():
        assert np.array_equal(params[name].detach().numpy(), want), name
    assert params["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32


@pytest.mark.parametrize("case,build", [("int4_act_order", "fp32"), ("int8", "s8")])
def test_bundle_from_gptq_passes_the_layer_checks(packed, case, build, tmp_path):
    wt, ht, pt = {"fp32": ("fp32", "fp32", "fp32"), "s8": ("s8", "bf16", "s8")}[build]
    path, _ = packed[case]
    out = tmp_path / "bundle"
    manifest = quiet_build(input_path=str(path), output_path=str(out), weight_type=wt, hidden_state_type=ht,
                           post_weight_type=pt, check_level=1, **SMALL_GROUPS)
    assert manifest["checks"]["passed"], manifest["checks"]["failures"]
    assert manifest["recipe"]["name"] == "llama"
    # and directly, per layer and shape group, with this test's thresholds
    bundle, limits = Bundle(out), thresholds(wt, ht)
    reference = load_reference(open_input(path), registry().recipes["llama"])
    ids = token_ids(80, bundle.spec.vocab_size, 0)
    cap = capture(reference, ids)
    rows = layer_check(bundle, cap, Progress(enabled=False))
    lim = limits["layer"]
    assert len({r["group"] for r in rows}) == 5
    bad = failing_rows(rows, lim)
    assert not bad, bad[:3]
    post = logits_check(bundle, cap)
    assert within(post["cosine"], post["max_rel_err"], limits["logits"])


# -- bad GPTQ inputs -----------------------------------------------------------------------------------

def damaged(packed, tmp_path, case="int4", config=None, quantization=None, tensors=None) -> Path:
    src, _ = packed[case]
    path = Path(shutil.copytree(src, tmp_path / "ckpt"))
    cfg = json.loads((path / "config.json").read_text())
    if quantization is not None:
        cfg["quantization_config"].update(quantization)
        cfg["quantization_config"] = {k: v for k, v in cfg["quantization_config"].items() if v is not None}
    if config is not None:
        config(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        state = load_file(path / "model.safetensors")
        tensors(state)
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def fails(path: Path, tmp_path: Path, *needles: str) -> str:
    out = tmp_path / "out"
    with pytest.raises(GeneratorError) as e:
        quiet_build(input_path=str(path), output_path=str(out), weight_type="fp32", hidden_state_type="fp32",
                    post_weight_type="fp32", **SMALL_GROUPS)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    return msg


@pytest.mark.parametrize("field,value,needles", [
    ("bits", 3, ["quantization_config.bits is 3", "bits 8 (int8) and 4 (int4)"]),
    ("bits", 2, ["quantization_config.bits is 2"]),
    ("sym", False, ["quantization_config.sym is False", "asymmetric GPTQ is not supported"]),
    ("quant_method", "awq", ["quantization_config.quant_method is 'awq'"]),
    ("checkpoint_format", "marlin", ["quantization_config.checkpoint_format is 'marlin'", "gptq, gptq_v2"]),
    ("group_size", 0, ["quantization_config.group_size is 0"]),
])
def test_unsupported_settings_name_the_file_and_field(packed, tmp_path, field, value, needles):
    path = damaged(packed, tmp_path, quantization={field: value})
    msg = fails(path, tmp_path, *needles)
    assert str(path / "config.json") in msg


def test_unsupported_setting_in_quantize_config_json(packed, tmp_path):
    src, _ = packed["int8_v2_quantize_config"]
    path = Path(shutil.copytree(src, tmp_path / "ckpt"))
    qc = json.loads((path / "quantize_config.json").read_text())
    (path / "quantize_config.json").write_text(json.dumps({**qc, "bits": 3}))
    fails(path, tmp_path, f"{path / 'quantize_config.json'}: bits is 3")
    for text, needle in (('{"bits": 8,', "not valid JSON"), ("[8]", "expected a JSON object")):
        (path / "quantize_config.json").write_text(text)
        msg = fails(path, tmp_path, f"{path / 'quantize_config.json'}: {needle}")
        assert "\n" not in msg, msg


def test_wrong_zero_convention_is_caught(packed, tmp_path):
    """A v1 checkpoint (zeros stored minus one) labelled gptq_v2 would be off by one step everywhere."""
    path = damaged(packed, tmp_path, quantization={"checkpoint_format": "gptq_v2"})
    fails(path, tmp_path, "model.layers.0.", "qzeros' holds the stored zero points [7]",
          "has zero point 8", "labelled 'gptq_v2'")


def test_group_size_contradicting_the_packing(packed, tmp_path):
    fails(damaged(packed, tmp_path, quantization={"group_size": 32}), tmp_path, "scale rows", "groups of 32")


def test_bits_contradicting_the_packing(packed, tmp_path):
    fails(damaged(packed, tmp_path, quantization={"bits": 8}), tmp_path, "the bits setting does not match the packing")


def test_packed_tensors_without_settings(packed, tmp_path):
    path = damaged(packed, tmp_path, config=lambda c: c.pop("quantization_config"))
    fails(path, tmp_path, ".qweight", "neither quantization_config", "quantize_config.json")


def test_settings_without_packed_tensors(tiny_llama, tmp_path):
    path = Path(shutil.copytree(tiny_llama, tmp_path / "ckpt"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": True}
    (path / "config.json").write_text(json.dumps(cfg))
    fails(path, tmp_path, "declares a GPTQ checkpoint", "no '.qweight' tensors")


def test_missing_scales_and_bad_g_idx(packed, tmp_path):
    name = "model.layers.1.self_attn.o_proj"
    path = damaged(packed, tmp_path, tensors=lambda s: s.pop(f"{name}.scales"))
    fails(path, tmp_path, f"'{name}' has a qweight but no '{name}.scales'")
    shutil.rmtree(path)

    def out_of_range(s):
        s[f"{name}.g_idx"] = s[f"{name}.g_idx"] + 1
    fails(damaged(packed, tmp_path, tensors=out_of_range), tmp_path, f"'{name}.g_idx' names groups 1..4", "has 4")


def test_act_order_without_g_idx(packed, tmp_path):
    name = "model.layers.0.mlp.up_proj"
    path = damaged(packed, tmp_path, case="int4_act_order", tensors=lambda s: s.pop(f"{name}.g_idx"))
    fails(path, tmp_path, f"'{name}' has no g_idx", "desc_act")


def test_qwen2_style_int8_like_the_vendor_example(tiny_tok, tmp_path_factory):
    """The vendor doc's input is Qwen2.5-0.5B-Instruct-GPTQ-Int8: q/k/v biases stay float next to
    the packed weights, and the head is tied to the (float) embeddings."""
    from transformers import Qwen2Config

    tok_dir, vocab = tiny_tok
    root = tmp_path_factory.mktemp("gptq_qwen2")
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=None)
    src = save_tiny(config, root / "float", tok_dir)
    expected = make_gptq(src, root / "int8", "int8")
    ckpt = open_input(root / "int8")
    assert ckpt.has("model.layers.0.self_attn.q_proj.bias") and not ckpt.has("lm_head.weight")
    assert all(np.array_equal(ckpt.tensor(n), w) for n, w in expected.items())
    out = root / "bundle"
    manifest = quiet_build(input_path=str(root / "int8"), output_path=str(out), weight_type="s8", hidden_state_type="bf16",
                           post_weight_type="s8", check_level=1, **SMALL_GROUPS)
    assert manifest["recipe"]["name"] == "qwen2" and manifest["spec"]["qkv_bias"] and manifest["spec"]["tie_word_embeddings"]
    assert manifest["checks"]["passed"], manifest["checks"]["failures"]


def test_the_gptq_view_uses_only_the_checkpoints_public_methods():
    """gptq.py reads the packed tensors through Checkpoint's stored_* methods, never its private members."""
    import ast

    import generator.inputs.gptq as gptq

    tree = ast.parse(Path(gptq.__file__).read_text())
    private = [f"line {n.lineno}: .{n.attr}" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
               and not (isinstance(n.value, ast.Name) and n.value.id == "self")]
    assert not private, private


# -- the build keeps a GPTQ checkpoint's own grid ---------------------------------------------------

def _bundle_array(path: Path, name: str) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    init = next(i for i in onnx.load(str(path)).graph.initializer if i.name == name)
    return numpy_helper.to_array(init, base_dir=str(path.parent))


@pytest.mark.parametrize("case, wt, group, kept", [("int4", "s4", 16, True), ("int8", "s8", 16, True),
                                                   ("int8_v2_quantize_config", "s8", 16, True), ("int4", "s4", 32, False),
                                                   ("int4_act_order", "s4", 16, False)])
def test_build_keeps_the_checkpoints_codes_when_they_fit(packed, tiny_llama, case, wt, group, kept, tmp_path, caplog):
    """int codes and scales of a GPTQ input land in the bundle bit-exact when the bits match the weight
    type and each build group lies inside a checkpoint group (g_idx trivial); otherwise re-quantized, logged."""
    path, _ = packed[case]
    out = tmp_path / "b"
    with caplog.at_level("WARNING", logger="generator.export.graphs"):
        quiet_build(input_path=str(path), output_path=str(out), weight_type=wt, hidden_state_type="fp32",
                    post_weight_type="s8", **dict(SMALL_GROUPS, group_size=group))
    layer = Bundle(out).layer_file(0, 0)
    codes = _bundle_array(layer, "down_proj.qweight").astype(np.int64)
    scales = _bundle_array(layer, "down_proj.scales")
    state = load_file(path / "model.safetensors")
    prefix = "model.layers.0.mlp.down_proj"
    bits = 4 if wt == "s4" else 8
    per = 32 // bits
    words = state[f"{prefix}.qweight"].numpy().view(np.uint32)
    mine = np.stack([(words >> np.uint32(bits * k)) & np.uint32(2 ** bits - 1) for k in range(per)], 1)
    mine = mine.reshape(-1, words.shape[1]).astype(np.int64) - 2 ** (bits - 1)  # [in, out] signed codes
    ck_scales = state[f"{prefix}.scales"].float().numpy()
    if kept:
        assert np.array_equal(codes, mine)
        rows = np.arange(scales.shape[0]) * group // CASES[case][1]  # a checkpoint group holds whole build groups
        assert np.array_equal(scales, ck_scales[rows])
        assert "re-quantized" not in caplog.text
    else:
        assert not np.array_equal(codes, mine)
        assert "down_proj: GPTQ codes re-quantized" in caplog.text
