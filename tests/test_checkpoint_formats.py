"""Checkpoint formats give identical bundles; the graphs are plain, checkable ONNX."""

import hashlib
import json
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file

from generator.contract import Bundle
from models import SMALL_GROUPS, quiet_build

OPTS = dict(weight_type="s8", hidden_state_type="bf16", **SMALL_GROUPS)


def weights_digest(bundle: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bundle.glob("*.data"))}


@pytest.fixture(scope="module")
def reference_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("fmt") / "single"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), **OPTS)
    return out


def test_sharded_safetensors_give_the_same_bundle(tiny_llama, reference_bundle, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((tiny_llama / f).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    quiet_build(input_path=str(sharded), output_path=str(tmp_path / "out"), **OPTS)
    assert weights_digest(tmp_path / "out") == weights_digest(reference_bundle)


def test_pytorch_bin_is_read_weights_only(tiny_llama, reference_bundle, tmp_path, monkeypatch):
    ckpt = tmp_path / "bin"
    ckpt.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (ckpt / f).write_bytes((tiny_llama / f).read_bytes())
    torch.save(load_file(tiny_llama / "model.safetensors"), ckpt / "pytorch_model.bin")
    seen = []
    original = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    quiet_build(input_path=str(ckpt), output_path=str(tmp_path / "out"), **OPTS)
    assert seen and all(seen)
    assert weights_digest(tmp_path / "out") == weights_digest(reference_bundle)


def test_a_pickle_with_code_is_refused(tiny_llama, tmp_path):
    from generator.errors import GeneratorError

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    torch.save({"x": Evil()}, ckpt / "pytorch_model.bin")
    with pytest.raises(GeneratorError, match="weights-only"):
        quiet_build(input_path=str(ckpt), output_path=str(tmp_path / "out"), **OPTS)
    assert not (tmp_path / "out").exists()


def test_graphs_are_standard_onnx_with_the_contract_io(reference_bundle):
    bundle = Bundle(reference_bundle)
    spec, opts = bundle.spec, bundle.opts
    for g in bundle.groups:
        path = bundle.layer_file(0, g.index)
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert {op.domain for op in model.opset_import} == {""} and model.opset_import[0].version == 21
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        ins = {v.name: dims(v) for v in model.graph.input}
        outs = {v.name: dims(v) for v in model.graph.output}
        assert list(ins) == ["K_cache", "V_cache", "indices", "input", "mask"]
        assert list(outs) == ["K_cache_out", "V_cache_out", "output"]
        rows, p = g.history_rows, g.tokens
        assert ins == {"K_cache": [1, rows, spec.kv_dim], "V_cache": [1, rows, spec.kv_dim], "indices": [1, p],
                       "input": [1, p, spec.hidden_size], "mask": [1, p, rows + p]}
        assert outs == {"K_cache_out": [1, p, spec.kv_dim], "V_cache_out": [1, p, spec.kv_dim],
                        "output": [1, p, spec.hidden_size]}
        assert model.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.UINT32
        # every group of a layer points at the same weights file
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {f"llama_p{opts.prefill_len}_l0_together.data"}
    assert [g.history for g in bundle.groups] == [opts.kv_cache_len, 0, *opts.last_kv_cache_len]


def test_synthetic_checkpoints_hold_exactly_what_the_recipe_reads():
    """SYNTHETIC=1 tensors come from the recipe's map: the unused-tensor check passes for every variant,
    and a tensor the map does not read would fail it."""
    from generator.errors import GeneratorError
    from generator.recipe import registry
    from generator.resolve.spec import resolve_spec
    from generator.inputs.synthetic import SyntheticCheckpoint, tensor_plan
    from generator.export.weights import WeightSource

    checked = 0
    for recipe in registry().recipes.values():
        for name, variant in recipe.variants.items():
            if not variant.config:
                continue
            spec = resolve_spec(recipe, dict(variant.config), model_name=name, max_positions=1, where=name)
            plan = tensor_plan(recipe, spec)
            WeightSource(SyntheticCheckpoint(Path("."), dict(variant.config), plan, 0, name), recipe, spec)
            plan["model.extra.weight"] = plan[next(iter(plan))]
            with pytest.raises(GeneratorError, match="model.extra.weight"):
                WeightSource(SyntheticCheckpoint(Path("."), dict(variant.config), plan, 0, name), recipe, spec)
            checked += 1
    assert checked >= len(registry().recipes)


def _without_chat_template(source: Path, target: Path) -> Path:
    """A copy of a checkpoint whose tokenizer has no chat template (as a base model's GGUF imports)."""
    import shutil

    shutil.copytree(source, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_a_tokenizer_without_chat_template_gets_the_recipes(tiny_tok, tmp_path):
    from transformers import Qwen2Config
    from generator.recipe import registry
    from models import save_tiny

    tok_dir, vocab = tiny_tok
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=None)
    ckpt = _without_chat_template(save_tiny(cfg, tmp_path / "qwen", tok_dir), tmp_path / "base")
    manifest = quiet_build(input_path=str(ckpt), output_path=str(tmp_path / "out"), **OPTS)
    bundle = tmp_path / "out" / manifest["tokenizer"]["dir"]
    template = registry().recipes["qwen2"].chat.templates["chatml"]
    assert (bundle / "chat_template.jinja").read_text() == template.jinja
    im_end = json.loads((tok_dir / "tokenizer.json").read_text())
    im_end = next(t["id"] for t in im_end["added_tokens"] if t["content"] == "<|im_end|>")
    assert im_end in json.loads((bundle / "ax_tokenizer.json").read_text())["eos_ids"]
    note = manifest["tokenizer"]["chat_template"]
    assert note["source"] == "recipe 'qwen2' template 'chatml'" and note["eos_ids"] == [im_end]
    recorded = json.loads((tmp_path / "out" / "manifest.json").read_text())["tokenizer"]["chat_template"]
    assert recorded == note


def test_a_recipe_template_the_vocabulary_cannot_spell_is_not_used(tiny_llama, tmp_path):
    ckpt = _without_chat_template(tiny_llama, tmp_path / "base")
    manifest = quiet_build(input_path=str(ckpt), output_path=str(tmp_path / "out"), **OPTS)
    note = manifest["tokenizer"]["chat_template"]
    assert note["source"] is None and "<|begin_of_text|>" in note["note"]  # llama3's tokens
    assert not (tmp_path / "out" / manifest["tokenizer"]["dir"] / "chat_template.jinja").exists()


def test_a_tokenizer_with_its_own_template_keeps_it(reference_bundle, tiny_llama):
    manifest = json.loads((reference_bundle / "manifest.json").read_text())
    assert "chat_template" not in manifest["tokenizer"]
    ours = (reference_bundle / manifest["tokenizer"]["dir"] / "chat_template.jinja").read_text()
    assert ours == json.loads((tiny_llama / "tokenizer_config.json").read_text())["chat_template"]


def test_every_input_kind_is_one_tensor_source(tiny_llama, tmp_path):
    """HF directories and synthetic checkpoints are initialised TensorSources with a `kind`; a source that
    leaves out part of the protocol cannot be made."""
    from generator.errors import GeneratorError
    from generator.inputs.checkpoint import Checkpoint, open_input
    from generator.inputs.source import TensorSource
    from generator.inputs.synthetic import SyntheticCheckpoint

    hf = open_input(tiny_llama)
    assert isinstance(hf, TensorSource) and hf.kind == "hf" and hf.config_where == f"{tiny_llama}/config.json"
    as_gguf = Checkpoint(tiny_llama, source="/models/x.gguf", gguf=True)  # what open_input makes of an imported .gguf
    assert as_gguf.kind == "gguf" and as_gguf.config_where == "/models/x.gguf" and as_gguf.dir == Path(tiny_llama)
    plan = {"model.embed_tokens.weight": ((8, 4), "embed", 1.0), "model.norm.weight": ((4,), "norm", 0.0)}
    syn = SyntheticCheckpoint(tmp_path, {"hidden_size": 4}, plan, 0, "synthetic:x")
    assert isinstance(syn, TensorSource) and syn.kind == "synthetic"
    assert (syn.dir, syn.config, syn.source, syn.config_where) == (tmp_path, {"hidden_size": 4}, "synthetic:x",
                                                                   "synthetic:x/config.json")
    assert syn.names() == set(plan) and syn.shape("model.norm.weight") == (4,) and syn.file_of("x") == "synthetic:x"
    assert syn.tokenizer_files() == []
    with pytest.raises(GeneratorError, match="has no tensor 'nope'"):
        syn.tensor("nope")
    with pytest.raises(GeneratorError, match="has no tensor 'nope'"):
        hf.tensor("nope")

    class Partial(TensorSource):
        kind = "hf"

        def names(self):
            return set()

    with pytest.raises(TypeError, match="abstract"):
        Partial(tmp_path, {}, "partial")
