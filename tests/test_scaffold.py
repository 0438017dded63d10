"""`make new-recipe`: the cookiecutter scaffold, and an unknown architecture's error.

The scaffold of a Llama-architecture example must be a valid recipe whose generated conformance
test passes under pytest (in a subprocess, as a contributor runs it) against a tiny model; names
that exist are refused without touching the files. A checkpoint with an unknown architecture
fails with the list of supported ones and leaves no output directory.
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from generator.cli import main
from generator.errors import GeneratorError
from generator.paths import RECIPES_DIR
from generator.recipe import Registry, load_recipe, registry
from generator.recipe.scaffold import new_recipe
from generator.resolve.spec import resolve_spec
from models import SMALL_GROUPS, quiet_build

ROOT = Path(__file__).resolve().parent.parent


class Args:
    def __init__(self, root, **kw):
        self.root, self.no_input = str(root), kw.pop("no_input", True)
        self.name = kw.pop("name", None)
        self.architecture = kw.pop("architecture", None)
        self.hf_config_class = kw.pop("hf_config_class", None)
        self.description = kw.pop("description", None)
        assert not kw, kw


def test_llama_example_scaffolds_a_valid_recipe_whose_test_passes(tmp_path, tiny_llama):
    assert main(["new-recipe", "--name", "tinyllama_x", "--architecture", "LlamaForCausalLM", "--root", str(tmp_path),
                 "--no-input"]) == 0
    recipe_file = tmp_path / "recipes" / "tinyllama_x.yaml"
    test_file = tmp_path / "tests" / "test_recipe_tinyllama_x.py"
    recipe = load_recipe(recipe_file)
    assert recipe.name == "tinyllama_x" and recipe.architectures == ["LlamaForCausalLM"]
    # the skeleton is Llama: a Llama checkpoint resolves to the same spec as under the shipped recipe
    llama = registry(str(RECIPES_DIR)).recipes["llama"]
    cfg = json.loads((tiny_llama / "config.json").read_text())
    ours, theirs = (resolve_spec(r, cfg, model_name="m", max_positions=96).model_dump() for r in (recipe, llama))
    assert ours.pop("recipe") == "tinyllama_x" and theirs.pop("recipe") == "llama" and ours == theirs
    assert recipe.tensors == llama.tensors
    text = recipe_file.read_text()
    for field in ("weight_offset", "logit_softcap", "sliding_window", "layer_type_default", "partial_rotary_factor",
                  "interleaved", "parallel_residual", "residual_scale", "final_logit_softcap", "split:", "reference:",
                  "qk_norm:", "prefix:", "extends:"):
        assert field in text, field  # every quirk field is shown
    assert 'HF_CONFIG_CLASS = "LlamaConfig"' in test_file.read_text()

    env = dict(os.environ, AXGEN_RECIPES_DIR=str(tmp_path / "recipes"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(test_file)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "5 passed" in res.stdout, res.stdout[-2000:]


def test_existing_names_are_refused_and_left_alone(tmp_path, capsys):
    new_recipe(Args(tmp_path, name="fam", architecture="LlamaForCausalLM"))
    recipe_file = tmp_path / "recipes" / "fam.yaml"
    recipe_file.write_text(recipe_file.read_text() + "# my edits\n")
    before = recipe_file.read_text()
    with pytest.raises(GeneratorError, match="exists already"):
        new_recipe(Args(tmp_path, name="fam", architecture="Qwen2ForCausalLM"))
    assert recipe_file.read_text() == before
    # a test of that name alone is a collision too
    (tmp_path / "tests" / "test_recipe_solo.py").write_text("# mine\n")
    with pytest.raises(GeneratorError, match="test_recipe_solo.py"):
        new_recipe(Args(tmp_path, name="solo", architecture="LlamaForCausalLM"))
    assert not (tmp_path / "recipes" / "solo.yaml").exists()
    # a shipped recipe, through the command line (exit status 2, the message on stderr)
    assert main(["new-recipe", "--name", "llama", "--architecture", "LlamaForCausalLM", "--no-input"]) == 2
    assert "exists already" in capsys.readouterr().err


@pytest.mark.parametrize("kw,match", [
    (dict(name="Qwen-2", architecture="Qwen2ForCausalLM"), "must be lowercase letters"),
    (dict(name="fam", architecture="qwen2 model"), "must be a class name"),
    (dict(name="fam"), "needs --architecture"),
    (dict(), "needs --name and --architecture"),
])
def test_bad_or_missing_flags(tmp_path, kw, match):
    with pytest.raises(GeneratorError, match=match):
        new_recipe(Args(tmp_path, **kw))
    assert not (tmp_path / "recipes").exists()


def test_interactive_prompts_from_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("qwen2x\nQwen2ForCausalLM\n\n\n"))
    assert new_recipe(Args(tmp_path, no_input=False)) == 0
    recipe = load_recipe(tmp_path / "recipes" / "qwen2x.yaml")
    assert recipe.architectures == ["Qwen2ForCausalLM"]
    assert 'HF_CONFIG_CLASS = "Qwen2Config"' in (tmp_path / "tests" / "test_recipe_qwen2x.py").read_text()
    assert "qwen2x" in Registry(tmp_path / "recipes").recipes


def test_unknown_architecture_in_a_checkpoint_lists_the_supported_ones(tiny_llama, tmp_path):
    ckpt = Path(shutil.copytree(tiny_llama, tmp_path / "mystery"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(architectures=["MysteryForCausalLM"], model_type="mystery")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(GeneratorError) as e:
        quiet_build(input_path=str(ckpt), output_path=str(out), weight_type="fp32", hidden_state_type="fp32",
                    post_weight_type="fp32", **SMALL_GROUPS)
    msg = str(e.value)
    supported = sorted({a for r in registry().recipes.values() for a in r.architectures})
    assert "Unsupported architecture ['MysteryForCausalLM']" in msg, msg
    assert f"Supported architectures: {', '.join(supported)}." in msg and "LlamaForCausalLM" in supported
    assert "make new-recipe" in msg and "ADDING_A_MODEL.md" in msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
