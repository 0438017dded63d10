"""The board cost model (generator/predict.py, data/board_cost.yaml): its calibration points, its sanity,
report/predicted.json in a build, and bad input."""

from __future__ import annotations

import json

import pytest

from generator.errors import GeneratorError
from generator.predict import (calibration, chip_cost, cost_data, fit, predict, predict_bundle, summary_line,
                               variant_spec)

CHIPS = ("AX650", "AX630C")


@pytest.mark.parametrize("chip", CHIPS)
def test_calibration_points_within_stated_error(chip):
    _, cost = chip_cost(chip)
    rows = calibration(chip)
    assert rows and {r["quantity"] for r in rows} == {"decode_tok_s", "ttft_ms"}
    stated = {(p["variant"], q): e for p in cost["calibration"] for q, e in p["error_pct"].items()}
    for r in rows:
        assert r["error_pct"] <= cost["error_pct"], r
        assert r["error_pct"] == pytest.approx(stated[(r["variant"], r["quantity"])], abs=0.05), r  # the data says it


def test_constants_are_the_fit():
    """The yaml's constants are what predict.fit() finds on the published points (AX630C: the AX650's overhead)."""
    ax650 = fit("AX650")
    for chip, got in (("AX650", ax650), ("AX630C", fit("AX630C", layer_overhead_ms=ax650["layer_overhead_ms"]))):
        _, cost = chip_cost(chip)
        assert cost["bandwidth_gbs"] == pytest.approx(got["bandwidth_gbs"], rel=0.01)
        assert cost["layer_overhead_ms"] == pytest.approx(got["layer_overhead_ms"], rel=0.01)
        assert cost["tflops"]["s8"] == pytest.approx(got["tflops"], rel=0.01)


def test_monotone():
    s8 = predict(*variant_spec("qwen2.5-0.5b", "AX650", weight_type="s8"), "AX650")
    s4 = predict(*variant_spec("qwen2.5-0.5b", "AX650", weight_type="s4"), "AX650")
    assert s4["decode_tok_s"] > s8["decode_tok_s"] and s4["cmm_mib"] < s8["cmm_mib"]
    long = predict(*variant_spec("qwen2.5-0.5b", "AX650", weight_type="s8", kv_cache_len=4095), "AX650")
    assert long["cmm_mib"] > s8["cmm_mib"] and long["decode_tok_s"] < s8["decode_tok_s"]
    small = predict(*variant_spec("qwen2.5-0.5b", "AX630C"), "AX630C")
    assert small["decode_tok_s"] < s8["decode_tok_s"] and small["ttft_ms"] > s8["ttft_ms"]
    big = predict(*variant_spec("qwen2.5-7b", "AX630C", weight_type="s8"), "AX630C")
    assert not big["fits"] and big["cmm_mib"] > big["chip_mib"] == 4096
    assert "does not fit" in summary_line(big) and "fits" in summary_line(s8)
    assert s8["predicted"] is True and s8["prompt_tokens"] == 128 and s8["basis"]


def test_build_writes_predicted(tmp_path, tiny_llama):
    from models import SMALL_GROUPS, quiet_build

    m = quiet_build(input_path=str(tiny_llama), output_path=str(tmp_path / "b"), chip="AX630C", weight_type="s4",
                    **SMALL_GROUPS)
    path = tmp_path / "b" / "report" / "predicted.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["predicted"] is True and on_disk["chip"] == "AX630C" and on_disk["fits"] is True
    assert m["predicted"] == on_disk
    again = predict_bundle(tmp_path / "b")  # the manifest records the chip's own name, AX620E
    assert again.pop("chip") == "AX620E" and again == {k: v for k, v in on_disk.items() if k != "chip"}
    assert "report/predicted.json" in m["files"]


def test_cli_predict(capsys):
    from generator.cli import main

    assert main(["predict", "qwen2.5-0.5b", "--chip", "AX630C", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["chip"] == "AX630C" and p["weight_type"] == "s8" and p["predicted"] is True


def test_bad_input(capsys):
    spec, opts = variant_spec("qwen2.5-0.5b", "AX650")
    with pytest.raises(GeneratorError, match=r"Unknown chip 'AX999' \(flag --chip"):
        predict(spec, opts, "AX999")
    from generator.cli import main

    assert main(["predict", "qwen2.5-0.5b", "--chip", "nope"]) == 2
    assert "Unknown chip 'nope'" in capsys.readouterr().err
    assert main(["predict", "no-such-model"]) == 2
    assert "Unknown model 'no-such-model'" in capsys.readouterr().err
    assert set(cost_data()["chips"]) == {"AX650", "AX620E"}
