"""Recipe inheritance (`extends`), tensor-path defaults and prefix, `show-recipe`, the canonical
tensor table, and the quirks that are recipe data (q/k norm, nested config aliases)."""

import textwrap

import pytest
import yaml

from generator.cli import main
from generator.errors import GeneratorError
from generator.recipe import Recipe, Registry, load_recipe, registry
from generator.recipe.registry import merge
from generator.recipe.tensors import LAYER, LLAMA_LAYER, bias_expected, expected_shapes
from generator.resolve.spec import read_config, resolve_spec

PARENT = """\
    name: base
    description: a parent
    architectures: [LlamaForCausalLM]
    config:
      defaults: {rope_theta: 10000.0, rms_norm_eps: 1.0e-6, hidden_act: silu, tie_word_embeddings: false}
      aliases: {num_hidden_layers: [n_layer, num_layers]}
    block:
      attention: {qkv_bias: true, o_bias: false}
    tensors:
      ignore: ["*.inv_freq", "extra.*"]
    variants:
      base-tiny: {description: the parent's variant}
"""


def write(d, name, text):
    path = d / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_merge_is_deep_for_mappings_and_replaces_lists_and_scalars():
    parent = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1}
    child = {"a": {"b": 2, "c": [3], "d": {"g": 2}}, "h": None}
    assert merge(parent, child) == {"a": {"b": 2, "c": [3], "d": {"e": 1, "g": 2}}, "f": 1, "h": None}
    assert parent == {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1}  # inputs untouched


def test_child_states_only_its_difference(tmp_path):
    write(tmp_path, "base", PARENT)
    write(tmp_path, "child", """\
        name: child
        extends: base
        description: a child
        config:
          defaults: {rope_theta: 500000.0}
        block:
          attention: {o_bias: true}
        tensors:
          ignore: ["vision.*"]
        variants:
          child-tiny: {description: the child's variant}
    """)
    reg = Registry(tmp_path)
    child, base = reg.recipes["child"], reg.recipes["base"]
    assert child.config.defaults == dict(base.config.defaults, rope_theta=500000.0)  # mappings merge
    assert child.config.aliases == base.config.aliases
    assert (child.block.attention.qkv_bias, child.block.attention.o_bias) == (True, True)
    assert child.tensors.ignore == ["vision.*"]  # lists replace
    assert list(child.variants) == ["child-tiny"]  # variants (make targets) are not inherited
    assert reg.variants == {"base-tiny": "base", "child-tiny": "child"}


def test_inheritance_errors_name_the_file(tmp_path):
    a = write(tmp_path, "a", "name: a\nextends: b\ndescription: x\narchitectures: [X]\n")
    write(tmp_path, "b", "name: b\nextends: a\ndescription: x\narchitectures: [X]\n")
    with pytest.raises(GeneratorError, match=r"a\.yaml: 'extends' makes a cycle \(a -> b -> a\)"):
        load_recipe(a)
    own = write(tmp_path, "own", "name: own\nextends: own\ndescription: x\narchitectures: [X]\n")
    with pytest.raises(GeneratorError, match="cycle"):
        load_recipe(own)
    lost = write(tmp_path, "lost", "name: lost\nextends: nowhere\ndescription: x\narchitectures: [X]\n")
    with pytest.raises(GeneratorError, match=r"lost\.yaml: extends 'nowhere', but there is no recipe"):
        load_recipe(lost)
    for bad in ("../llama", "[llama]", "3"):
        path = write(tmp_path, "bad", f"name: bad\nextends: {bad}\ndescription: x\narchitectures: [X]\n")
        with pytest.raises(GeneratorError, match=r"bad\.yaml: field 'extends' must name a recipe"):
            load_recipe(path)
    # the child must carry its own name (the parent's would not match the file)
    write(tmp_path, "base", PARENT)
    anon = write(tmp_path, "anon", "extends: base\n")
    with pytest.raises(GeneratorError, match="'name' is 'base' but must equal the file name 'anon'"):
        load_recipe(anon)


def test_yaml_limits_apply_to_every_file_of_the_chain(tmp_path):
    write(tmp_path, "base", PARENT + "# " + "x" * 1_100_000 + "\n")
    child = write(tmp_path, "child", "name: child\nextends: base\ndescription: x\n")
    with pytest.raises(GeneratorError, match=r"base\.yaml: larger than .* bytes"):
        load_recipe(child)


def test_a_recipe_elsewhere_extends_a_shipped_one(tmp_path):
    path = write(tmp_path, "mygemma", "name: mygemma\nextends: gemma3\ndescription: mine\n"
                                      "block: {attention: {logit_softcap: 30.0}}\n")
    mine, gemma3 = load_recipe(path), registry().recipes["gemma3"]
    assert mine.variants == {} and mine.tensors == gemma3.tensors and mine.config == gemma3.config
    assert mine.block.attention.logit_softcap == 30.0 and mine.block.rope == gemma3.block.rope


def test_tensor_paths_default_to_llamas_with_prefix_and_null(tmp_path):
    t = registry().recipes["llama"].tensors
    assert t.paths() == LLAMA_LAYER and (t.embed_tokens, t.norm, t.lm_head) == ("model.embed_tokens", "model.norm", "lm_head")
    phi = registry().recipes["phi"].tensors
    assert phi.layer["gate_proj"] is None and phi.layer["pre_feedforward_layernorm"] is None
    assert "gate_proj" not in phi.provides() and phi.paths()["up_proj"] == "model.layers.{i}.mlp.fc1"
    phi3 = registry().recipes["phi3"].tensors  # the parts of a fused tensor are not defaulted
    assert not {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} & set(phi3.layer)
    assert phi3.paths()["down_proj"] == "model.layers.{i}.mlp.down_proj"
    ivl = registry().recipes["internvl2_qwen2"].tensors
    assert ivl.prefix == "" and ivl.embed_tokens == "language_model.model.embed_tokens"
    assert ivl.lm_head == "language_model.lm_head"
    assert ivl.paths() == {k: "language_model." + v for k, v in LLAMA_LAYER.items()}
    assert ivl.ignore == ["vision_model.*", "mlp1.*"]  # patterns over the whole checkpoint: not prefixed
    # validated tensors are whole: validating them again changes nothing (show-recipe output is a recipe)
    for recipe in registry().recipes.values():
        again = Recipe.model_validate(recipe.model_dump())
        assert again.tensors == recipe.tensors, recipe.name
    # a default the block cannot use must be dropped explicitly
    text = (tmp_path / "p.yaml")
    text.write_text("name: p\ndescription: x\narchitectures: [X]\nblock: {mlp: {gated: false}}\n")
    with pytest.raises(GeneratorError, match="gate_proj: null"):
        load_recipe(text)


def test_every_recipe_is_as_short_as_its_difference():
    """No shipped recipe restates a Llama tensor path, and the two near-copies extend their parent."""
    from generator.paths import RECIPES_DIR

    for path in RECIPES_DIR.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        layer = (data.get("tensors") or {}).get("layer") or {}
        prefix = (data.get("tensors") or {}).get("prefix", "")
        restated = [k for k, v in layer.items() if v is not None and prefix + LLAMA_LAYER.get(k, "") == prefix + v]
        assert not restated, (path.name, restated)
    assert yaml.safe_load((RECIPES_DIR / "gemma3.yaml").read_text())["extends"] == "gemma2"
    assert yaml.safe_load((RECIPES_DIR / "internvl2_qwen2.yaml").read_text())["extends"] == "qwen2"


@pytest.mark.parametrize("name", sorted(registry().recipes))
def test_show_recipe_prints_the_flattened_recipe(name, capsys):
    assert main(["show-recipe", name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# recipe {name} (") and "extends" not in yaml.safe_load(out)
    shown = Recipe.model_validate(yaml.safe_load(out))
    assert shown.model_dump() == registry().recipes[name].model_dump()


def test_show_recipe_of_an_unknown_name_lists_the_known(capsys):
    assert main(["show-recipe", "nope"]) == 2
    assert "Known recipes: chatglm, gemma2, gemma3" in capsys.readouterr().err


def test_the_tensor_table_states_shapes_and_biases():
    spec = resolve_spec(registry().recipes["phi"], registry().recipes["phi"].variants["phi2"].config,
                        model_name="x", max_positions=128)
    shapes = expected_shapes(spec)
    assert "gate_proj" not in shapes and "pre_feedforward_layernorm" not in shapes and "q_norm" not in shapes
    assert shapes["q_proj"] == (spec.q_dim, spec.hidden_size) and shapes["down_proj"] == (2560, 10240)
    assert bias_expected(spec, "input_layernorm") and bias_expected(spec, "o_proj")  # LayerNorm, biased dense
    g3 = registry().recipes["gemma3"]
    spec = resolve_spec(g3, g3.variants["gemma3-1b"].config, model_name="x", max_positions=128)
    assert expected_shapes(spec)["q_norm"] == (spec.head_dim,) and not bias_expected(spec, "q_norm")
    assert [n for n, t in LAYER.items() if t.kind == "linear"] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_qk_norm_is_recipe_data(tmp_path):
    g3 = registry().recipes["gemma3"]
    cfg = g3.variants["gemma3-1b"].config
    spec = resolve_spec(g3, cfg, model_name="x", max_positions=128)
    assert spec.qk_norm.model_dump() == {"kind": "rms_norm", "eps": spec.norm.eps, "weight_offset": 1.0}  # the block's
    path = write(tmp_path, "g", "name: g\nextends: gemma3\ndescription: x\n"
                              "block: {qk_norm: {kind: layer_norm, eps: {expr: 'rms_norm_eps * 10'}, weight_offset: 0.0}}\n")
    spec = resolve_spec(load_recipe(path), cfg, model_name="x", max_positions=128)
    assert spec.qk_norm.model_dump() == {"kind": "layer_norm", "eps": pytest.approx(spec.norm.eps * 10), "weight_offset": 0.0}
    assert spec.norm.weight_offset == 1.0 and bias_expected(spec, "k_norm")  # a LayerNorm reads a bias
    bad = write(tmp_path, "h", "name: h\nextends: gemma3\ndescription: x\nblock: {qk_norm: {eps: -1.0}}\n")
    with pytest.raises(GeneratorError, match=r"h\.yaml: invalid: block.qk_norm.eps"):
        load_recipe(bad)
    llama = registry().recipes["llama"]
    assert resolve_spec(llama, llama.variants["smollm2-135m-instruct"].config, model_name="x",
                        max_positions=128).qk_norm is None


def test_nested_config_aliases_read_transformers5_rope_parameters():
    """Gemma3's sliding-layer base under transformers 5 is an alias in its recipe, not code."""
    g3 = registry().recipes["gemma3"]
    cfg = {k: v for k, v in g3.variants["gemma3-1b"].config.items() if k not in ("rope_theta", "rope_local_base_freq")}
    cfg["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 12345.0}}
    spec = resolve_spec(g3, cfg, model_name="x", max_positions=128)
    assert spec.rope["sliding_attention"].theta == 12345.0 and spec.rope["full_attention"].theta == 1e6
    assert read_config(g3, dict(cfg, rope_local_base_freq=777.0))["rope_local_base_freq"] == 777.0  # top level wins
    # a recipe without the alias does not read it (no family-specific code left)
    llama = registry().recipes["llama"]
    assert "rope_local_base_freq" not in read_config(llama, {"rope_parameters": cfg["rope_parameters"]})


def test_qk_norm_fields_reach_the_weights_and_the_graph(tmp_path, monkeypatch):
    """A recipe extending gemma3 with LayerNorm q/k norms (eps 1e-3, no offset): the synthetic plan
    and the weight converter read their biases, and the graph normalises q and k with them."""
    import onnx

    from generator.contract import Bundle
    from models import SMALL_GROUPS, quiet_build

    g3 = registry().recipes["gemma3"]
    cfg = {k: v for k, v in g3.variants["gemma3-1b"].config.items() if k != "layer_types"}
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "g3ln.yaml").write_text(yaml.safe_dump({
        "name": "g3ln", "extends": "gemma3", "description": "Gemma 3 with LayerNorm q/k norms",
        "block": {"qk_norm": {"kind": "layer_norm", "eps": 1.0e-3, "weight_offset": 0.0}},
        "variants": {"g3ln-tiny": {"description": "test", "config": cfg}}}))
    monkeypatch.setenv("AXGEN_RECIPES_DIR", str(recipes))
    monkeypatch.setenv("AXGEN_SYNTHETIC_CACHE", str(tmp_path / "cache"))
    m = quiet_build(model="g3ln-tiny", synthetic=True, output_path=str(tmp_path / "b"), check_level=0,
                    weight_type="fp32", hidden_state_type="fp32", post_weight_type="fp32", **SMALL_GROUPS)
    assert m["spec"]["qk_norm"] == {"kind": "layer_norm", "eps": 1.0e-3, "weight_offset": 0.0}
    assert m["spec"]["norm"]["weight_offset"] == 1.0
    bundle = Bundle(tmp_path / "b")
    for group in bundle.groups:
        graph = onnx.load(str(bundle.layer_file(0, group.index)), load_external_data=False).graph
        ln = [n for n in graph.node if n.op_type == "LayerNormalization"]  # the block norms are RMSNorm
        assert len(ln) == 2, group
        assert all(next(a.f for a in n.attribute if a.name == "epsilon") == pytest.approx(1e-3) for n in ln)
        assert [n.input[2] for n in ln] == ["q_norm.bias", "k_norm.bias"]


def test_manifest_recipe_hash_covers_the_parents(tmp_path):
    """A bundle records the sha256 of the flattened recipe: editing only the parent changes the child's."""
    import shutil

    from generator.export.bundle import recipe_sha256
    from generator.paths import RECIPES_DIR

    for name in ("gemma2", "gemma3"):
        shutil.copy(RECIPES_DIR / f"{name}.yaml", tmp_path / f"{name}.yaml")
    before = recipe_sha256(Registry(tmp_path).recipes["gemma3"])
    assert before == recipe_sha256(Registry(tmp_path).recipes["gemma3"])  # deterministic
    parent = tmp_path / "gemma2.yaml"
    data = yaml.safe_load(parent.read_text())
    data.setdefault("sampling", {})["penalty_window"] = 7  # a field gemma3 inherits and does not restate
    parent.write_text(yaml.safe_dump(data))
    child = Registry(tmp_path).recipes["gemma3"]
    assert child.sampling.penalty_window == 7 and recipe_sha256(child) != before
