"""Conformance of recipe '{{ cookiecutter.name }}' ({{ cookiecutter.architecture }}), scaffolded by `make new-recipe`.

A tiny random {{ cookiecutter.architecture }} made by transformers itself ({{ cookiecutter.hf_config_class }}), built at fp32 and at
s8, compared with transformers: every layer in every shape group with the reference's own inputs,
the post graph, and end to end through the runner (a cached system prompt, a prompt over several
prefill chunks, teacher-forced). Thresholds are data: generator/data/tolerances.yaml.

Make the tiny model exercise every quirk: put the config keys that switch them on in QUIRKS with
non-default values (a bias, a softcap, a window, a partial rotary factor...), so that a recipe
field that is wrong makes this test fail.
"""

{% raw %}import json

import pytest
import torch

from generator.contract import Bundle
from generator.inputs.checkpoint import open_input
from generator.progress import Progress
from generator.recipe import registry
from generator.verify.reference import capture, load_reference
from generator.resolve.spec import resolve_spec
from generator.verify.checks import conversation_check, failing_rows, layer_check, logits_check, thresholds, within
from models import SMALL_GROUPS, quiet_build, save_tiny, tiny_tokenizer, token_ids
{% endraw %}
NAME = "{{ cookiecutter.name }}"
ARCHITECTURE = "{{ cookiecutter.architecture }}"
HF_CONFIG_CLASS = "{{ cookiecutter.hf_config_class }}"
{% raw %}
# The tiny model's dimensions (GQA: 4 query heads share 2 KV heads) ...
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
# ... and the config keys that switch on this family's quirks, e.g. attention_bias=True.
QUIRKS = dict()

BUILDS = {  # name: (weight_type, hidden_state_type, post_weight_type)
    "fp32": ("fp32", "fp32", "fp32"),
    "s8": ("s8", "bf16", "s8"),
}


@pytest.fixture(scope="module")
def recipe():
    reg = registry()
    if NAME not in reg.recipes:
        pytest.fail(f"recipe '{NAME}' is not in {reg.dir} (set AXGEN_RECIPES_DIR to the directory holding {NAME}.yaml)")
    return reg.recipes[NAME]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import transformers

    tok_dir, vocab = tiny_tokenizer(tmp_path_factory.mktemp(f"{NAME}_tokenizer"))
    config = getattr(transformers, HF_CONFIG_CLASS)(vocab_size=vocab, **{**TINY, **QUIRKS})
    return save_tiny(config, tmp_path_factory.mktemp(NAME), tok_dir, model_cls=getattr(transformers, ARCHITECTURE))


@pytest.fixture(scope="module", params=list(BUILDS))
def built(request, checkpoint, recipe, tmp_path_factory):
    wt, ht, pt = BUILDS[request.param]
    out = tmp_path_factory.mktemp(f"{NAME}_{request.param}") / "bundle"
    quiet_build(input_path=str(checkpoint), output_path=str(out), recipe_name=NAME, weight_type=wt,
                hidden_state_type=ht, post_weight_type=pt, **SMALL_GROUPS)
    return Bundle(out), thresholds(wt, ht)


@pytest.fixture(scope="module")
def reference(checkpoint, recipe):
    return load_reference(open_input(checkpoint), recipe)


def test_recipe_declares_the_architecture_and_resolves(checkpoint, recipe):
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE] and ARCHITECTURE in recipe.architectures
    spec = resolve_spec(recipe, cfg, model_name=NAME, max_positions=SMALL_GROUPS["kv_cache_len"])
    assert spec.num_hidden_layers == TINY["num_hidden_layers"] and spec.hidden_size == TINY["hidden_size"]


def test_every_layer_and_group_matches(built, reference):
    bundle, limits = built
    ids = token_ids(SMALL_GROUPS["last_kv_cache_len"][-1] + SMALL_GROUPS["prefill_len"], bundle.spec.vocab_size, 0)
    cap = capture(reference, ids)
    rows = layer_check(bundle, cap, Progress(enabled=False))
    assert {r["group"] for r in rows} == {g.index for g in bundle.groups}
    lim = limits["layer"]
    bad = failing_rows(rows, lim)
    assert not bad, bad[:3]
    post = logits_check(bundle, cap)
    assert within(post["cosine"], post["max_rel_err"], limits["logits"]), post


def test_end_to_end_logits_match(built, reference):
    """System prompt prefilled once; a 40-token prompt (3 chunks of 16) on top, then a second turn
    reusing the cache; every step's logits against one transformers forward pass."""
    bundle, limits = built
    res = conversation_check(bundle, reference, system=11, turns=((40, 6), (20, 5)))
    lim = limits["end_to_end"]
    assert within(res["worst_cosine"], res["worst_rel_err"], lim), res
{% endraw %}
