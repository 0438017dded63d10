"""Mixed precision: --override PATTERN=TYPE (CLI over the recipe's overrides) lands in the graphs (read from
the graph files) and the manifest; --weight_type auto --kld_budget X picks per layer s4 or s8 within the budget
(generous budget: s4 everywhere; smaller budgets: never more s4; the chosen mix re-measured independently is
within the budget); with gptq (the s4 default) the s4 layers are measured and built from the cached all-s4
GPTQ checkpoint (codes bit-exact), --quant_method rtn as before; bad input is refused with the flag named."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from generator.accuracy.metrics import kl_divergence
from generator.cli import main
from generator.contract import Bundle
from generator.errors import GeneratorError
from generator.export.graphs import weight_type_for
from generator.export.quant import quantize
from generator.quantize.auto import calibration_ids, choose_mix, settings
from generator.quantize.calibrate import read_calibration
from generator.quantize.simulate import fake_quantize, load_float_model, window_logits
from generator.recipe import BuildDefaults
from generator.resolve.chips import get_chip
from generator.resolve.options import make_options
from generator.verify.checks import graph_weight_types
from models import SMALL_GROUPS, quiet_build, save_tiny, tiny_llama_config

GROUP_FLAGS = ["--prefill_len", "16", "--kv_cache_len", "96", "--last_kv_cache_len", "16", "--group_size", "16",
               "--no-progress", "-t", "fp32"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny models' forwards are fastest on one thread (and do not fight other test workers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory, tiny_tok):
    """A 4-layer tiny llama: enough layers for the mix to have a middle."""
    tok_dir, vocab = tiny_tok
    return save_tiny(tiny_llama_config(vocab, num_hidden_layers=4), tmp_path_factory.mktemp("llama4"), tok_dir, seed=4)


def test_cli_overrides_land_in_the_graphs_the_manifest_and_the_log(tiny_llama, tmp_path, capsys):
    out = tmp_path / "b"
    code = main(["build", "--input_path", str(tiny_llama), "--output_path", str(out), "-w", "s4",
                 "--override", "layers.0.*=s8", "--override", "layers.1.down_proj=bf16", "--override", "lm_head=fp8_e4m3",
                 *GROUP_FLAGS])
    err = capsys.readouterr().err
    assert code == 0, err
    b = Bundle(out)
    assert graph_weight_types(b.layer_file(0, 0)) == ["s8"]
    assert graph_weight_types(b.layer_file(1, 1)) == ["bf16", "s4"]
    assert graph_weight_types(b.post_file) == ["fp8_e4m3"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["overrides"] == {"layers.0.*": "s8", "layers.1.down_proj": "bf16", "lm_head": "fp8_e4m3"}
    log = " ".join(err.split())
    assert "layers.0.*: s8" in log and "lm_head: fp8_e4m3" in log  # the build log's summary names them


def test_cli_overrides_come_before_the_recipes():
    chip = get_chip("AX650")
    defaults = BuildDefaults(overrides={"layers.*": "s8", "lm_head": "bf16"})
    opts = make_options(defaults, chip, weight_type="s4", flag_overrides={"layers.0.*": "bf16"})
    assert list(opts.overrides) == ["layers.0.*", "layers.*", "lm_head"]
    assert weight_type_for(opts, "layers.0.qkv_proj", "s4") == "bf16"
    assert weight_type_for(opts, "layers.3.down_proj", "s4") == "s8"
    assert make_options(defaults, chip, weight_type="s4").overrides == {"layers.*": "s8", "lm_head": "bf16"}


@pytest.mark.parametrize("args, expected", [
    (["--override", "layers.0.*=s3"], "unknown weight type 's3'"),
    (["--override", "layers.0.*"], "must be PATTERN=TYPE"),
    (["--override", "layers.9.*=s8"], "matches no weight"),
    (["--override", "layers.*.gate_proj=s8"], "matches no weight"),
    (["--chip", "AX630C", "--override", "layers.0.*=fp16"], "not supported on AX620E"),
    (["-w", "auto"], "needs --kld_budget"),
    (["-w", "auto", "--kld_budget", "0"], "must be a number > 0"),
    (["-w", "auto", "--kld_budget", "-0.5"], "must be a number > 0"),
    (["-w", "s8", "--kld_budget", "0.1"], "only with --weight_type auto"),
])
def test_bad_mixed_precision_flags_are_refused_naming_the_flag(tiny_llama, tmp_path, capsys, args, expected):
    code = main(["build", "--input_path", str(tiny_llama), "--output_path", str(tmp_path / "b"), *args, *GROUP_FLAGS])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err.replace("\n", " ")
    assert ("--override" in err) or ("--kld_budget" in err)
    assert "Traceback" not in err and not (tmp_path / "b").exists()


def test_auto_with_a_generous_budget_is_s4_everywhere_and_recorded(llama4, tmp_path, capsys):
    """--quant_method rtn: the s4 layers are our RTN quantizer's codes of the fp32 weights, nothing calibrated."""
    out = tmp_path / "b"
    code = main(["build", "--input_path", str(llama4), "--output_path", str(out), "-w", "auto", "--kld_budget", "10",
                 "--quant_method", "rtn", *GROUP_FLAGS])
    err = capsys.readouterr().err
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    note = m["weight_type_auto"]
    assert m["options"]["weight_type"] == "s4" and m["options"]["overrides"] == {}
    assert note["kld_budget"] == 10 and note["layers"] == {str(i): "s4" for i in range(4)} and note["method"] == "rtn"
    assert 0 < note["kld_mean"] <= 10 and note["kld_mean_all_base"] < note["kld_mean"]
    assert "quantization" not in m["input"] and m["input"]["source"] == str(llama4)
    b = Bundle(out)
    assert all(graph_weight_types(b.layer_file(i, 0)) == ["s4"] for i in range(4))
    assert "KLD alone at s4 (rtn)" in err  # the table is in the build log
    w = load_file(llama4 / "model.safetensors")["model.layers.2.mlp.down_proj.weight"].float().numpy()
    codes, _ = quantize(np.ascontiguousarray(w.T), "s4", 16)
    assert np.array_equal(_initializer(b.layer_file(2, 0), "down_proj.qweight"), codes)


def _initializer(path, name: str) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    init = next(i for i in onnx.load(str(path)).graph.initializer if i.name == name)
    return numpy_helper.to_array(init, base_dir=str(path.parent)).astype(np.int64 if "qweight" in name else np.float32)


def _small_calibration():
    import yaml

    from generator.paths import DATA_DIR

    s = yaml.safe_load((DATA_DIR / "quantize.yaml").read_text())
    s["calibration"] = {"samples": 4, "seq_len": 32}
    return s


def test_auto_with_gptq_builds_the_cached_checkpoints_codes(llama4, tmp_path, monkeypatch):
    """The default s4 method (gptq): the pass measures each layer's s4 with the all-s4 GPTQ checkpoint's
    weights (checked against an independent KLD), the layers at s4 keep its codes and scales bit-exact, a
    layer kept at s8 (--override) is RTN s8 of the fp32 weights, and the manifest names gptq."""
    from generator.inputs.checkpoint import open_input
    from generator.quantize import calibrate

    monkeypatch.setenv("AXGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "settings", _small_calibration)
    m = quiet_build(input_path=str(llama4), output_path=str(tmp_path / "b"), weight_type="auto", kld_budget=10.0,
                    flag_overrides={"layers.0.*": "s8"}, hidden_state_type="fp32", post_weight_type="s8", **SMALL_GROUPS)
    note, quant = m["weight_type_auto"], m["input"]["quantization"]
    assert note["method"] == "gptq" and quant["method"] == "gptq" and quant["bits"] == 4
    assert note["layers"] == {str(i): "s4" for i in range(4)}  # measured without the --override
    assert quant["float"] == [f"layers.0.{k}" for k in ("down_proj", "gate_up_proj", "o_proj", "qkv_proj")]
    assert m["input"]["reference"] == str(llama4) and quant["held_out"] == settings()["tokens"]
    cache = tmp_path / "cache" / "quantized"
    all_s4, mixed = sorted(cache.iterdir())  # the all-s4 checkpoint, and it with layer 0 back at fp32
    assert mixed.name == f"{all_s4.name}-f{mixed.name.split('-f')[1]}"
    view = open_input(all_s4).gptq
    b = Bundle(tmp_path / "b")
    assert graph_weight_types(b.layer_file(0, 0)) == ["s8"]
    fp32 = load_file(llama4 / "model.safetensors")
    codes, scales = quantize(np.ascontiguousarray(fp32["model.layers.0.mlp.down_proj.weight"].float().numpy().T), "s8", 16)
    assert np.array_equal(_initializer(b.layer_file(0, 0), "down_proj.qweight"), codes)
    for i in (1, 2, 3):
        assert graph_weight_types(b.layer_file(i, 0)) == ["s4"]
        grid = view.grid(f"model.layers.{i}.mlp.down_proj.weight")
        assert np.array_equal(_initializer(b.layer_file(i, 0), "down_proj.qweight"), grid.codes)
        assert np.array_equal(_initializer(b.layer_file(i, 0), "down_proj.scales"), grid.scales)
    # layer 3's sensitivity: only its linears at the checkpoint's dequantized weights, the rest fp32
    ids = calibration_ids(llama4, read_calibration(None), settings()["tokens"])
    model = load_float_model(llama4)
    ref = window_logits(model, ids, settings()["window"])
    with torch.no_grad():
        for name, mod in model.model.layers[3].named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(view.weight(f"model.layers.3.{name}.weight"))
    kld = float(np.mean(kl_divergence(ref, window_logits(model, ids, settings()["window"]))))
    assert note["sensitivity"]["3"] == pytest.approx(kld, rel=1e-3, abs=1e-7)


def test_auto_with_gptq_and_no_layer_at_s4_builds_from_the_fp32_source(llama4, tmp_path, monkeypatch):
    from generator.quantize import calibrate

    monkeypatch.setenv("AXGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "settings", _small_calibration)
    m = quiet_build(input_path=str(llama4), output_path=str(tmp_path / "b"), weight_type="auto", kld_budget=10.0,
                    flag_overrides={"layers.*": "s8"}, hidden_state_type="fp32", post_weight_type="s8", **SMALL_GROUPS)
    assert m["weight_type_auto"]["method"] == "gptq" and "quantization" not in m["input"]
    assert m["input"]["source"] == str(llama4)
    assert all(graph_weight_types(Bundle(tmp_path / "b").layer_file(i, 0)) == ["s8"] for i in range(4))


def test_auto_measures_on_the_tail_calibration_holds_out(llama4):
    from transformers import AutoTokenizer

    from generator.quantize.calibrate import calibration_windows

    text = read_calibration(None)
    ids = AutoTokenizer.from_pretrained(str(llama4))(text, add_special_tokens=False)["input_ids"]
    assert calibration_ids(llama4, text, 96) == ids[-96:]
    fit = ids[:-96]  # every calibration window lies inside the text before the tail (and they reach its end)
    windows = [w.tolist() for w in calibration_windows(AutoTokenizer.from_pretrained(str(llama4)), text, 1000, 64, 96)]
    assert all(any(fit[s:s + 64] == w for s in range(len(fit) - 63)) for w in windows)
    assert windows[-1] == fit[len(fit) - 64 - (len(fit) - 64) % 32:][:64]
    short = text[:200]  # too short to split: the pass measures on its start
    assert calibration_ids(llama4, short, 96) == AutoTokenizer.from_pretrained(str(llama4))(short, add_special_tokens=False)["input_ids"][:96]


def test_auto_refuses_awq(llama4, tmp_path, capsys):
    code = main(["build", "--input_path", str(llama4), "--output_path", str(tmp_path / "b"), "-w", "auto",
                 "--kld_budget", "1", "--quant_method", "awq", *GROUP_FLAGS])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "--weight_type auto takes --quant_method rtn or gptq" in err and "Traceback" not in err


def measured(source, types: dict[int, str], ids, post: str) -> float:
    """The mix's mean KLD, measured afresh: a new fp32 model, fake-quantized as a whole, metrics' KL."""
    window = settings()["window"]
    model = load_float_model(source)
    ref = window_logits(model, ids, window)
    fake_quantize(model, lambda name: post if name == "lm_head" else types[int(name.split(".")[1])], 16)
    return float(np.mean(kl_divergence(ref, window_logits(model, ids, window))))


def test_auto_is_monotone_in_the_budget_and_each_mix_is_within_it(llama4):
    ids = calibration_ids(llama4, read_calibration(None), 96)
    model = load_float_model(llama4)
    run = lambda budget, allowed=("s8", "s4", "bf16"), post="s8": choose_mix(  # noqa: E731
        model, ids, budget=budget, group_size=16, post_weight_type=post, allowed=list(allowed))
    loose = run(10.0)
    assert set(loose.types.values()) == {"s4"}
    ranked = sorted(loose.sensitivity, key=loose.sensitivity.get)
    # budgets between the measured totals of growing s4 sets: each admits one more layer than the last
    totals = [loose.base_kld] + [t for _, _, t in loose.steps]
    mixes = [run(b) for b in sorted((a + c) / 2 for a, c in zip(totals, totals[1:]))]
    counts = [list(m.types.values()).count("s4") for m in mixes]
    assert counts == sorted(counts) and counts[0] < 4  # a larger budget never picks fewer s4
    for m in mixes:
        s4 = {i for i, t in m.types.items() if t == "s4"}
        assert s4 == set(ranked[:len(s4)])  # the least sensitive layers go to s4 first
        assert m.kld <= m.budget
        assert measured(llama4, m.types, ids, "s8") == pytest.approx(m.kld, rel=1e-3, abs=1e-7)
    # below every s8 model: the most sensitive layers fall back to bf16 where the chip has it, else refused
    # (the head kept fp32 here, so that the layers alone make the error)
    all_s8 = run(10.0, post="fp32").base_kld
    tight = run(all_s8 * 0.5, post="fp32")
    assert "bf16" in tight.types.values() and "s4" not in tight.types.values() and tight.kld <= tight.budget
    with pytest.raises(GeneratorError, match="too small"):
        run(all_s8 * 0.5, allowed=("s8", "s4"), post="fp32")
    # the model comes back unchanged
    np.testing.assert_array_equal(window_logits(model, ids, 64), window_logits(load_float_model(llama4), ids, 64))


def test_make_passes_override_and_kld_budget():
    """make OVERRIDE="a=s8 b=s8" WEIGHT_TYPE=auto KLD_BUDGET=x -> one --override per word, quoted."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["make", "-n", "-C", str(root), "-o", ".venv/.installed", "smollm2-135m-instruct",
                          "OVERRIDE=layers.0.*=s8 lm_head=s8", "WEIGHT_TYPE=auto", "KLD_BUDGET=0.05"],
                         capture_output=True, text=True, timeout=60).stdout
    assert "--override 'layers.0.*=s8' --override 'lm_head=s8'" in out
    assert "-w 'auto'" in out and "--kld_budget '0.05'" in out
