"""Bad input: each case gives a clear one-paragraph error and leaves no partial bundle."""

import json
import shutil
from pathlib import Path

import pytest

from generator.export import graphs
from generator.errors import GeneratorError
from generator.paths import RECIPES_DIR
from models import SMALL_GROUPS, quiet_build


def assert_nothing_left(out: Path):
    assert not out.exists(), f"{out} exists after a failed build"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def fails(out: Path, match: str, **kwargs) -> str:
    kwargs.setdefault("output_path", str(out))
    with pytest.raises(GeneratorError) as e:
        quiet_build(**kwargs)
    msg = str(e.value)
    assert "\n\n" not in msg and msg.strip() == msg  # one paragraph
    assert match in msg, msg
    assert_nothing_left(out)
    return msg


@pytest.fixture
def ckpt(tiny_llama, tmp_path):
    """A private copy of the tiny llama checkpoint to damage."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "ckpt"))


def build_kwargs(path, **extra):
    kwargs = dict(input_path=str(path), weight_type="fp32", hidden_state_type="fp32", post_weight_type="fp32",
                  **SMALL_GROUPS)
    kwargs.update(extra)
    return kwargs


def test_malformed_recipe(tmp_path, monkeypatch):
    recipes = Path(shutil.copytree(RECIPES_DIR, tmp_path / "recipes"))
    text = (recipes / "llama.yaml").read_text()
    assert "\n  mlp: {bias: {expr: mlp_bias}}\n" in text  # gated is the schema's default: set it, wrongly
    (recipes / "llama.yaml").write_text(text.replace("  mlp: {bias: {expr: mlp_bias}}", "  mlp: {bias: {expr: mlp_bias}, gated: maybe}"))
    monkeypatch.setenv("AXGEN_RECIPES_DIR", str(recipes))
    msg = fails(tmp_path / "out", "block.mlp.gated", model="smollm2-135m-instruct")
    assert str(recipes / "llama.yaml") in msg and "boolean" in msg


def test_unknown_chip(ckpt, tmp_path):
    msg = fails(tmp_path / "out", "Unknown chip 'AX999'", chip="AX999", **build_kwargs(ckpt))
    assert "AX650" in msg and "AX620E" in msg


def test_weight_type_the_chip_does_not_support(ckpt, tmp_path):
    fails(tmp_path / "out", "weight type 'fp32' (--weight_type / make WEIGHT_TYPE=) is not supported on AX620E",
          chip="AX630C", **build_kwargs(ckpt, hidden_state_type="bf16", post_weight_type="s8"))


def test_prefill_groups_that_do_not_fit_the_cache(ckpt, tmp_path):
    fails(tmp_path / "out", "exceeds --kv_cache_len", **build_kwargs(ckpt, last_kv_cache_len=[16, 90]))


def test_missing_weights(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    fails(tmp_path / "out", "has no weights", **build_kwargs(ckpt))


def test_missing_shard(ckpt, tmp_path):
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(tmp_path / "out", "model-00002-of-00002.safetensors", **build_kwargs(ckpt))


def test_corrupt_safetensors(ckpt, tmp_path):
    (ckpt / "model.safetensors").write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00not json")
    fails(tmp_path / "out", "model.safetensors: not a readable safetensors file", **build_kwargs(ckpt))


def test_truncated_safetensors_fails_mid_build_without_a_partial_bundle(ckpt, tmp_path):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    fails(tmp_path / "out", "model.safetensors", **build_kwargs(ckpt))


def test_config_dimension_contradicting_weights(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    msg = fails(tmp_path / "out", "has shape", **build_kwargs(ckpt))
    assert "mlp" in msg and "(96, 64)" in msg


def test_bias_the_config_does_not_declare(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    import torch

    state = load_file(ckpt / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.ones(state["model.layers.0.self_attn.q_proj.weight"].shape[0])
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    fails(tmp_path / "out", "model.layers.0.self_attn.q_proj.bias", **build_kwargs(ckpt))


def test_tied_config_with_a_different_lm_head(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))
    fails(tmp_path / "out", "tie_word_embeddings is true, but the checkpoint has a separate 'lm_head.weight'",
          **build_kwargs(ckpt))


def test_interrupted_build_keeps_the_previous_bundle(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    quiet_build(**build_kwargs(ckpt, output_path=str(out)))
    before = (out / "manifest.json").read_text()
    original = graphs.layer_graph

    def interrupt(spec, opts, i, *args, **kwargs):
        if i == 1:
            raise KeyboardInterrupt
        return original(spec, opts, i, *args, **kwargs)

    monkeypatch.setattr("generator.export.bundle.layer_graph", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quiet_build(**build_kwargs(ckpt, output_path=str(out), weight_type="s8"))
    assert (out / "manifest.json").read_text() == before  # the old, complete bundle is untouched
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]


def _add_tensors(ckpt: Path, tensors: dict):
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    state.update(tensors)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_tensors_the_recipe_does_not_read_fail_unless_ignored(ckpt, tmp_path, monkeypatch):
    """A family that adds q/k norms, built with a recipe that forgets them, would only fail on numbers."""
    import torch

    cfg = json.loads((ckpt / "config.json").read_text())
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    norms = {f"model.layers.{i}.self_attn.{n}.weight": torch.ones(d) for i in range(2) for n in ("q_norm", "k_norm")}
    _add_tensors(ckpt, norms)
    msg = fails(tmp_path / "out", "4 tensor(s) that recipe 'llama'", **build_kwargs(ckpt))
    assert all(name in msg for name in norms) and "tensors.ignore" in msg
    recipes = Path(shutil.copytree(RECIPES_DIR, tmp_path / "recipes"))
    text = (recipes / "llama.yaml").read_text().replace('ignore: ["*.rotary_emb.inv_freq"]',
                                                        'ignore: ["*.rotary_emb.inv_freq", "*.self_attn.[qk]_norm.weight"]')
    (recipes / "llama.yaml").write_text(text)
    monkeypatch.setenv("AXGEN_RECIPES_DIR", str(recipes))
    quiet_build(**build_kwargs(ckpt, output_path=str(tmp_path / "ignored")))
    assert (tmp_path / "ignored" / "manifest.json").is_file()


def test_a_config_with_fewer_layers_than_the_weights(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    msg = fails(tmp_path / "out", "does not use", **build_kwargs(ckpt))
    assert "model.layers.1.mlp.down_proj.weight" in msg and "model.layers.0." not in msg


def test_non_float_and_non_finite_weights_name_tensor_and_file(ckpt, tmp_path):
    import torch

    name = "model.layers.1.self_attn.v_proj.weight"
    _add_tensors(ckpt, {name: torch.zeros(32, 64, dtype=torch.int8)})
    msg = fails(tmp_path / "out", f"tensor '{name}' (layer 1 v_proj) has dtype int8", **build_kwargs(ckpt))
    assert str(ckpt / "model.safetensors") in msg
    w = torch.randn(32, 64)
    w[3, 5] = float("nan")
    w[7, 1] = float("-inf")
    _add_tensors(ckpt, {name: w.to(torch.bfloat16)})
    fails(tmp_path / "out", f"tensor '{name}' (layer 1 v_proj) holds 2 NaN or infinite values", **build_kwargs(ckpt))


def test_config_json_that_is_not_an_object(ckpt, tmp_path):
    (ckpt / "config.json").write_text(json.dumps([json.loads((ckpt / "config.json").read_text())]))
    fails(tmp_path / "out", "config.json: expected a JSON object ({...}), got a JSON list", **build_kwargs(ckpt))


def test_corrupt_tokenizer_json(ckpt, tmp_path):
    (ckpt / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text()[:-40])
    fails(tmp_path / "out", f"{ckpt / 'tokenizer.json'}: not a loadable tokenizers file", **build_kwargs(ckpt))
