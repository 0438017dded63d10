"""The vision part's weight type: a chip-profile fact (chips.yaml vision_weight_types) and a build flag
(--vision_weight_type / make VISION_WEIGHT_TYPE=), on the tiny InternVL2 of tests/test_vision_internvl.py.

An s4 layer build on AX650 gets an s8 vision part by default (AX650 takes no s4 vision part): the vision
graph stores int8 weights, the manifest's vision entry says s8 and the layer check (-c 1, the vision check
held to the vision graph's own weight type) passes. A vision weight type the chip does not take is refused
before any work, naming the flag."""

from __future__ import annotations

import pytest

from models import SMALL_GROUPS, quiet_build
from test_vision_internvl import tiny  # noqa: F401  (the module fixture: a tiny InternVL2 checkpoint)

from generator.cli import main, make_parser
from generator.contract import Bundle
from generator.resolve.chips import get_chip
from generator.resolve.options import make_options
from generator.recipe.schema import BuildDefaults
from generator.verify.checks import graph_weight_types, limits_for


def test_s4_layers_get_an_s8_vision_part(tiny):  # noqa: F811
    _, ckpt, factory = tiny
    out = factory.mktemp("vl_s4")
    m = quiet_build(input_path=str(ckpt), output_path=str(out), recipe_name="internvl2_qwen2", weight_type="s4",
                    hidden_state_type="fp32", check_level=1, **SMALL_GROUPS)
    b = Bundle(out)
    assert b.opts.weight_type == "s4" and b.manifest.vision.weight_type == "s8"
    assert graph_weight_types(out / b.manifest.vision.graph) == ["s8"]
    vision = m["checks"]["vision"]  # -c 1: held to the s8 vision graph's limits, not the s4 layers'
    assert vision["passed"] and vision["limit"] == limits_for(["s8"], "fp32")["layer"]
    print(f"s4 layers, s8 vision part: worst token cosine {vision['min_token_cosine']:.6f}, "
          f"rel err {vision['max_rel_err']:.2e}")


def test_defaults_follow_the_chip():
    ax650, ax630c = get_chip("AX650"), get_chip("AX630C")
    assert make_options(BuildDefaults(weight_type="fp16"), ax650).vision_weight_type == "fp16"
    assert make_options(BuildDefaults(weight_type="s4"), ax650).vision_weight_type == "s8"
    assert make_options(BuildDefaults(weight_type="s4"), ax630c).vision_weight_type == "s8"
    assert make_options(BuildDefaults(vision_weight_type="bf16"), ax630c).vision_weight_type == "bf16"
    assert make_options(BuildDefaults(vision_weight_type="bf16"), ax650, vision_weight_type="fp32").vision_weight_type \
        == "fp32"


def test_a_vision_weight_type_the_chip_does_not_take_is_refused(tiny, tmp_path, capsys):  # noqa: F811
    _, ckpt, _ = tiny
    rc = main(["build", "--input_path", str(ckpt), "--recipe", "internvl2_qwen2", "--chip", "AX630C", "-w", "s4",
               "--vision_weight_type", "fp16", "--output_path", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--vision_weight_type" in err and "AX620E" in err and "s8, bf16" in err
    assert not (tmp_path / "out").exists()


def test_help_names_the_flag():
    build = make_parser()._subparsers._group_actions[0].choices["build"]
    text = " ".join(build.format_help().split())
    assert "--vision_weight_type {" in text and "vision part weight type" in text
