"""A tiny random llama, built at every weight type, checked against transformers.

Per layer (every shape group: decode, the no-history prefill group and each history group) with
the reference's own inputs, and end to end through the runner: a prompt spanning several prefill
chunks after a cached system prompt, teacher-forced, compared logit by logit. Thresholds are the
data in generator/data/tolerances.yaml.
"""

import numpy as np
import pytest
import torch

from generator.inputs.checkpoint import open_input
from generator.recipe import registry
from generator.verify.reference import bf16_embedding_input, capture, load_reference
from generator.contract import Bundle, Sampling
from generator.runtime.engine import Engine
from generator.runtime.generation import Generator, Sampler
from generator.verify.checks import conversation_check, failing_rows, layer_check, logits_check, thresholds, within
from generator.progress import Progress
from models import SMALL_GROUPS, quiet_build, token_ids

BUILDS = {  # name: (weight_type, hidden_state_type, post_weight_type)
    "fp32": ("fp32", "fp32", "fp32"),
    "s8": ("s8", "bf16", "s8"),
    "s4": ("s4", "bf16", "s8"),  # post weights are s8 or wider on every chip
    "bf16": ("bf16", "bf16", "bf16"),
    "fp16": ("fp16", "fp16", "fp16"),
}


@pytest.fixture(scope="module", params=list(BUILDS))
def built(request, tiny_llama, tmp_path_factory):
    wt, ht, pt = BUILDS[request.param]
    out = tmp_path_factory.mktemp(f"bundle_{request.param}") / "b"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type=wt, hidden_state_type=ht,
                post_weight_type=pt, **SMALL_GROUPS)
    return Bundle(out), thresholds(wt, ht)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return load_reference(open_input(tiny_llama), registry().recipes["llama"])


def test_every_layer_and_group_matches(built, reference):
    bundle, limits = built
    ids = token_ids(SMALL_GROUPS["last_kv_cache_len"][-1] + SMALL_GROUPS["prefill_len"], bundle.spec.vocab_size, 0)
    cap = capture(reference, ids)
    rows = layer_check(bundle, cap, Progress(enabled=False))
    groups = {r["group"] for r in rows}
    assert groups == {g.index for g in bundle.groups} and len(groups) == 5  # decode, no-history, 3 history groups
    assert {r["tensor"] for r in rows} == {"K_cache_out", "V_cache_out", "output"}
    lim = limits["layer"]
    bad = failing_rows(rows, lim)
    assert not bad, bad[:3]
    post = logits_check(bundle, cap)
    assert within(post["cosine"], post["max_rel_err"], limits["logits"])


@pytest.mark.parametrize("history", ["used", "board"])
def test_runner_logits_match_over_chunks_and_cached_system_prompt(built, reference, history):
    """System prompt prefilled once; a 40-token prompt (3 chunks of 16) on top; then a second turn
    that reuses everything cached (it starts after 57 cached tokens: the 64-history group, then the
    decode fallback). Every step's logits vs one transformers forward pass."""
    bundle, limits = built
    res = conversation_check(bundle, reference, system=11, turns=((40, 6), (20, 5)), history=history)
    # only new tokens are prefilled (turn 2: the last forced token, never decoded, + 20 new)
    assert res["prefilled"] == [40, 21]
    lim = limits["end_to_end"]
    assert within(res["worst_cosine"], res["worst_rel_err"], lim), res


def test_board_and_used_history_agree(built):
    """Binding only the used cache rows changes nothing but the floating-point summation order."""
    bundle, _ = built
    ids = token_ids(30, bundle.spec.vocab_size, 7)
    outs = []
    for history in ("used", "board"):
        engine = Engine(bundle, threads=1, history=history)
        logits = []
        Generator(engine, [], Sampler(Sampling())).generate(ids, forced=token_ids(5, bundle.spec.vocab_size, 8), logits_out=logits)
        outs.append(np.stack(logits))
    # the logits leave the graph in hidden_state_type: allow two units in its last place
    ulp = {"fp32": 2.0 ** -23, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}[bundle.opts.hidden_state_type]
    tol = max(1e-5, 2 * ulp)
    np.testing.assert_allclose(outs[0], outs[1], rtol=tol, atol=tol * np.abs(outs[1]).max())


@pytest.mark.parametrize("history", ["used", "board"])
def test_decoding_the_first_token_ignores_stale_cache_rows(built, history):
    """A decode at position 0 (after a reset, with old rows still in the cache) attends to the new
    token only, as a one-token prefill does."""
    bundle, _ = built
    tok = token_ids(1, bundle.spec.vocab_size, 11)
    engine = Engine(bundle, threads=1, history=history)
    engine.prefill(token_ids(6, bundle.spec.vocab_size, 12))
    engine.reset()
    decoded = engine.decode(tok[0]).copy()
    prefilled = Engine(bundle, threads=1, history=history).prefill(tok)
    np.testing.assert_array_equal(decoded, prefilled)

def test_group_selection_follows_the_contract(built):
    bundle, _ = built
    engine = Engine(bundle, threads=1)
    # smallest group whose capacity holds precompute_len + n; the no-history group holds one token
    assert [g.history for g in engine.pick_group(1)] == [0]
    assert [g.history for g in engine.pick_group(10)] == [16]
    assert [g.history for g in engine.pick_group(40)] == [64] * 3
    engine.prefill(token_ids(20, bundle.spec.vocab_size, 9))
    assert [g.history for g in engine.pick_group(20)] == [64] * 2
    # nothing holds 20 + 60 tokens: per chunk, the smallest group whose history fits; beyond every
    # group's history, None (those tokens run through the decode group)
    assert [g and g.history for g in engine.pick_group(60)] == [32, 64, 64, None]


def test_post_topk_returns_the_reference_top_k(tiny_llama, reference, tmp_path):
    """--post_topk K: the post graph outputs the K best logits and their indices; the runner samples
    among them (greedy = the first)."""
    out = tmp_path / "topk"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="fp32", hidden_state_type="fp32",
                post_weight_type="fp32", post_topk=8, **SMALL_GROUPS)
    bundle = Bundle(out)
    ids = token_ids(20, bundle.spec.vocab_size, 11)
    cap = capture(reference, ids)
    post = logits_check(bundle, cap)
    assert post["topk_index_match"] == 1.0 and post["max_rel_err"] <= thresholds("fp32", "fp32")["logits"]["max_rel_err"]
    engine = Engine(bundle, threads=1)
    got = Generator(engine, [], Sampler(Sampling())).generate(ids, 4)
    with torch.no_grad(), bf16_embedding_input(reference):
        ref = reference.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    assert got == ref


def test_a_graph_with_a_fixed_token_count_is_refused_for_used_history(tiny_llama, tmp_path):
    """The runner binds unpadded chunks only to graphs whose token dimension is symbolic once relaxed;
    a graph that bakes prefill_len into a node (an older generator's) gets a clear error, and the
    board's static shapes still run it."""
    import onnx
    from onnx import helper, numpy_helper

    from generator.errors import GeneratorError

    out = tmp_path / "b"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="fp32", hidden_state_type="fp32",
                post_weight_type="fp32", **SMALL_GROUPS)
    bundle = Bundle(out)
    path = bundle.layer_file(0, 1)
    model = onnx.load(str(path), load_external_data=False)
    last = next(n for n in model.graph.node if "output" in n.output)
    last.output[list(last.output).index("output")] = "output_unfixed"
    fixed = [1, bundle.opts.prefill_len, bundle.spec.hidden_size]
    model.graph.initializer.append(numpy_helper.from_array(np.array(fixed, np.int64), "fixed_shape"))
    model.graph.node.append(helper.make_node("Reshape", ["output_unfixed", "fixed_shape"], ["output"]))
    onnx.save(model, str(path))
    ids = token_ids(5, bundle.spec.vocab_size, 3)
    with pytest.raises(GeneratorError, match=r"g1\.onnx: outputs \['output'\] have a fixed token dimension.*--history board"):
        Engine(Bundle(out), threads=1).prefill(ids)
    assert Engine(Bundle(out), threads=1, history="board").prefill(ids).shape == (bundle.spec.hidden_size,)
