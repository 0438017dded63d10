"""Recipe schema, registry, spec resolution and their error messages."""

import textwrap

import pytest

from generator.errors import GeneratorError
from generator.recipe.expr import ExprError, evaluate
from generator.paths import RECIPES_DIR
from generator.recipe import Registry, load_recipe, registry
from generator.resolve.spec import read_config, resolve_spec

LLAMA = (RECIPES_DIR / "llama.yaml").read_text()


def with_block(text: str) -> str:
    """llama.yaml with `text` (lines indented under block:) added to its block section."""
    return LLAMA.replace("block:\n", "block:\n" + text, 1)


def write(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_recipes_load_and_variants_are_unique():
    reg = registry()
    assert "llama" in reg.recipes
    assert reg.variants["smollm2-135m-instruct"] == "llama"
    for recipe in reg.recipes.values():
        for v in recipe.variants.values():
            if v.config:  # every variant's own config resolves under its recipe
                resolve_spec(recipe, v.config, model_name="x", max_positions=256)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad", "name: bad\ndescription: [unclosed\n")
    with pytest.raises(GeneratorError) as e:
        load_recipe(path)
    assert str(path) in str(e.value) and "line" in str(e.value)


def test_unknown_field_names_the_field_path(tmp_path):
    path = write(tmp_path, "llama", with_block("  norm: {kind: rms_norm, colour: red}\n"))
    with pytest.raises(GeneratorError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and "block.norm.colour" in msg and "Extra inputs are not permitted" in msg


def test_wrong_value_names_field_and_expected(tmp_path):
    path = write(tmp_path, "llama", with_block("  norm: {kind: batch_norm}\n"))
    with pytest.raises(GeneratorError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "block.norm.kind" in msg and "rms_norm" in msg and "layer_norm" in msg and "batch_norm" in msg


def test_bad_expression_is_rejected(tmp_path):
    path = write(tmp_path, "llama", LLAMA.replace("  attention:\n", "  attention:\n    scale: {expr: \"__import__('os')\"}\n", 1))
    with pytest.raises(GeneratorError, match="block.attention.scale"):
        load_recipe(path)


def test_missing_block_tensor_is_reported(tmp_path):
    text = LLAMA.replace("tensors:\n", "tensors:\n  layer: {gate_proj: null}\n", 1)  # drops Llama's default
    with pytest.raises(GeneratorError, match="lacks gate_proj"):
        load_recipe(write(tmp_path, "llama", text))


def test_name_must_match_file(tmp_path):
    with pytest.raises(GeneratorError, match="must equal the file name"):
        load_recipe(write(tmp_path, "other", LLAMA))


def test_duplicate_variants_across_recipes(tmp_path):
    write(tmp_path, "llama", LLAMA)
    write(tmp_path, "llama2", LLAMA.replace("name: llama", "name: llama2"))
    with pytest.raises(GeneratorError, match="defined by both"):
        Registry(tmp_path)


def test_unknown_model_and_architecture_list_the_known_ones():
    reg = registry()
    with pytest.raises(GeneratorError, match="smollm2-135m-instruct"):
        reg.variant("no-such-model")
    with pytest.raises(GeneratorError) as e:
        reg.by_architecture(["MysteryForCausalLM"])
    assert "LlamaForCausalLM" in str(e.value) and "MysteryForCausalLM" in str(e.value)


def test_expressions_are_safe_and_useful():
    assert evaluate("scale_depth / sqrt(n)", {"scale_depth": 1.4, "n": 4}) == pytest.approx(0.7)
    assert evaluate("'sliding_attention' if (i + 1) % 2 else 'full_attention'", {"i": 0}) == "sliding_attention"
    for bad in ("x.__class__", "open('f')", "[1][0]", "lambda: 1"):
        with pytest.raises(ExprError):
            evaluate(bad, {"x": 1})


def test_config_reading_prefers_checkpoint_values_over_defaults():
    recipe = registry().recipes["llama"]
    cfg = read_config(recipe, {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192},
                               "hidden_size": 64, "num_attention_heads": 4})
    assert cfg["rope_theta"] == 5e5  # not the recipe default 10000
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["head_dim"] == 16 and cfg["num_key_value_heads"] == 4


def test_architecture_contradicting_recipe_is_an_error():
    recipe = registry().recipes["llama"]
    cfg = dict(recipe.variants["smollm2-135m-instruct"].config, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(GeneratorError, match="Qwen2ForCausalLM"):
        resolve_spec(recipe, cfg, model_name="x", max_positions=128)


@pytest.mark.parametrize("recipe_name, variant, switch", [
    ("phi", "phi2", {"qk_layernorm": True}),
    ("gemma3", "gemma3-270m", {"use_bidirectional_attention": True}),
    ("chatglm", "chatglm3-6b", {"rmsnorm": False}),
    ("chatglm", "chatglm3-6b", {"multi_query_attention": False}),
])
def test_config_switches_the_block_cannot_build_are_refused(recipe_name, variant, switch):
    recipe = registry().recipes[recipe_name]
    cfg = dict(recipe.variants[variant].config)
    resolve_spec(recipe, cfg, model_name="x", max_positions=128)  # the shipped config builds
    key = next(iter(switch))
    with pytest.raises(GeneratorError, match=rf"config.json: .*\({'not ' if switch[key] is False else ''}{key}\)"):
        resolve_spec(recipe, dict(cfg, **switch), model_name="x", max_positions=128)


def test_a_refusal_is_recipe_data(tmp_path):
    text = LLAMA.replace("config:\n", "config:\n  refuse:\n    - {when: {expr: \"hidden_size > 100\"}, reason: wide}\n", 1)
    recipe = load_recipe(write(tmp_path, "llama", text))
    cfg = dict(recipe.variants["smollm2-135m-instruct"].config)
    with pytest.raises(GeneratorError, match=r"wide \(hidden_size > 100\)"):
        resolve_spec(recipe, cfg, model_name="x", max_positions=128)
    bad = LLAMA.replace("config:\n", "config:\n  refuse:\n    - {when: {expr: \"__import__('os')\"}, reason: x}\n", 1)
    with pytest.raises(GeneratorError, match="refuse"):
        load_recipe(write(tmp_path, "llama", bad))
