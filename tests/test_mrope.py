"""Qwen2.5-VL's decoder: multimodal RoPE (mRoPE) as recipe data, against transformers' own Qwen2.5-VL.

A tiny random Qwen2_5_VLForConditionalGeneration (transformers' config classes; a 1-layer vision tower
that the bundle ignores) is built through recipes/qwen2_5_vl.yaml at fp32 and s8. The reference is
transformers' Qwen2.5-VL language model fed the same [3, T] position ids (get_rope_index's for a
sequence with image pads, whose rows then differ; equal rows for text). Checked:
- runtime/mrope.py's positions against get_rope_index on crafted sequences, also turn by turn from a
  running start (what the runtime keeps between turns);
- every layer graph in every shape group against the reference layer's own inputs and outputs;
- the runner end to end: a text conversation (greedy tokens and logits) and one with image pads
  (fake image: the pad token's embedding) over several prefill chunks, a decode and a second turn
  that continues from the image's positions; every step's logits against one reference forward.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx import TensorProto

from generator.contract import STORAGE, Bundle, board_mask, from_storage, to_storage
from generator.errors import GeneratorError
from generator.runtime.engine import Engine
from generator.runtime.mrope import mrope_positions
from generator.runtime.ort import open_session, run_once
from generator.verify.checks import compare, failing_rows, thresholds, within
from models import SMALL_GROUPS, quiet_build, randomize
from tokenizer_fixtures import copy_tokenizer_files

BUILDS = {"fp32": ("fp32", "fp32", "fp32"), "s8": ("s8", "bf16", "s8")}  # weight, hidden state, post weight
SECTION = [2, 3, 3]  # head_dim 16: 8 rotated pairs
MERGE = 2


def _config(vocab: int):
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": SECTION})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=MERGE, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 3,
                            vision_start_token_id=vocab - 5, vision_end_token_id=vocab - 4, video_token_id=vocab - 2,
                            tie_word_embeddings=False)


@pytest.fixture(scope="module")
def vl(tmp_path_factory, tiny_tok):
    """(config, reference model, {build: Bundle}) for a tiny Qwen2.5-VL checkpoint."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok_dir, vocab = tiny_tok
    cfg = _config(vocab)
    torch.manual_seed(5)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    randomize(model, 5)
    ckpt = tmp_path_factory.mktemp("qwen2_5_vl")
    model.save_pretrained(ckpt, safe_serialization=True)
    copy_tokenizer_files(tok_dir, ckpt)
    assert "text_config" in json.loads((ckpt / "config.json").read_text())  # transformers 5's nested layout
    bundles = {}
    for build, (wt, ht, pt) in BUILDS.items():
        out = tmp_path_factory.mktemp(f"qwen2_5_vl_{build}") / "b"
        manifest = quiet_build(input_path=str(ckpt), output_path=str(out), weight_type=wt, hidden_state_type=ht,
                               post_weight_type=pt, check_level=0, **SMALL_GROUPS)
        assert manifest["recipe"]["name"] == "qwen2_5_vl"
        bundles[build] = Bundle(out)
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    return cfg, model.eval(), bundles


def rope_index(model, ids: list[int], grids: list[tuple[int, int, int]]) -> np.ndarray:
    """transformers' get_rope_index: [3, len(ids)]."""
    t = torch.tensor([ids])
    image = (t == model.config.image_token_id).int()
    pos, _ = model.model.get_rope_index(t, mm_token_type_ids=image,
                                        image_grid_thw=torch.tensor(grids) if grids else None)
    return pos[:, 0].numpy()


def with_images(vocab: int, cfg, parts) -> tuple[list[int], list[tuple[int, int, int]]]:
    """ids from parts: an int n = n text tokens, a (t, h, w) grid = start + image pads + end."""
    rng = np.random.default_rng(len(parts))
    ids, grids = [], []
    for part in parts:
        if isinstance(part, int):
            ids += rng.integers(0, vocab - 6, part).tolist()
        else:
            t, h, w = part
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // MERGE ** 2) + [cfg.vision_end_token_id]
            grids.append(part)
    return ids, grids


SEQUENCES = {
    "text": [30],
    "one image": [5, (1, 8, 12), 9],
    "image first": [(1, 4, 4), 7],
    "image last": [6, (1, 6, 4)],
    "two images": [3, (1, 4, 8), 4, (1, 10, 6), 5],
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_positions_match_get_rope_index_whole_and_turn_by_turn(vl, tiny_tok, name):
    cfg, model, _ = vl
    ids, grids = with_images(tiny_tok[1], cfg, SEQUENCES[name])
    ref = rope_index(model, ids, grids)
    kw = dict(image_token_id=cfg.image_token_id, spatial_merge_size=MERGE)
    assert np.array_equal(mrope_positions(ids, grids, **kw), ref)
    # turn by turn: each turn starts where the previous one left (its largest position + 1)
    for cut in range(1, len(ids)):
        if ids[cut - 1] == ids[cut] == cfg.image_token_id:
            continue  # a turn never splits an image
        first_grids = grids[:sum(1 for a, b in zip(ids[:cut], [None] + ids[:cut - 1])
                                 if a == cfg.image_token_id != b)]
        a = mrope_positions(ids[:cut], first_grids, **kw)
        b = mrope_positions(ids[cut:], grids[len(first_grids):], start=int(a.max()) + 1, **kw)
        assert np.array_equal(np.concatenate([a, b], axis=1), ref), cut


def test_position_errors_are_clear(vl):
    cfg, _, _ = vl
    kw = dict(image_token_id=cfg.image_token_id, spatial_merge_size=MERGE)
    with pytest.raises(GeneratorError, match="1 image.*2 image grid"):
        mrope_positions([1] + [cfg.image_token_id] * 4 + [2], [(1, 4, 4), (1, 4, 4)], **kw)
    with pytest.raises(GeneratorError, match="has 3 image tokens"):
        mrope_positions([cfg.image_token_id] * 3, [(1, 4, 4)], **kw)


def test_recipe_reads_the_split_and_the_graphs_take_three_rows(vl):
    import onnx

    _, _, bundles = vl
    b = bundles["fp32"]
    assert b.spec.position_rows == 3 and b.manifest.spec.rope["full_attention"]["mrope_section"] == SECTION
    for g in b.groups:
        graph = onnx.load(str(b.layer_file(0, g.index)), load_external_data=False).graph
        idx = next(i for i in graph.input if i.name == "indices")
        assert [d.dim_value for d in idx.type.tensor_type.shape.dim] == [3, g.tokens]


def capture(model, ids: list[int], pos: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer: input and output hidden states, K (after RoPE) and V rows, [L, T, ...]; and the logits."""
    lm = model.model.language_model
    inputs, outputs = [], []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: inputs.append((a[0] if a else kw["hidden_states"])[0]),
                                             with_kwargs=True) for layer in lm.layers]
    hooks += [layer.register_forward_hook(lambda m, a, out: outputs.append((out[0] if isinstance(out, tuple) else out)[0]))
              for layer in lm.layers]
    try:
        with torch.no_grad():
            out = lm(input_ids=torch.tensor([ids]), position_ids=torch.tensor(pos)[:, None, :], use_cache=True)
            logits = model.lm_head(out.last_hidden_state)[0]
    finally:
        for h in hooks:
            h.remove()
    cache = out.past_key_values
    flat = lambda t: t[0].transpose(0, 1).reshape(len(ids), -1).numpy()  # noqa: E731  [1, kv, T, d] -> [T, kv*d]
    return {"inputs": torch.stack(inputs).numpy(), "outputs": torch.stack(outputs).numpy(),
            "keys": np.stack([flat(layer.keys) for layer in cache.layers]),
            "values": np.stack([flat(layer.values) for layer in cache.layers]), "logits": logits.numpy()}


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("kind", ["text", "image pads"])
def test_every_layer_and_group_matches_qwen2_5_vl(vl, tiny_tok, build, kind):
    cfg, model, bundles = vl
    bundle = bundles[build]
    P, C = bundle.opts.prefill_len, bundle.opts.kv_cache_len
    length = SMALL_GROUPS["last_kv_cache_len"][-1] + P
    parts = [length] if kind == "text" else [9, (1, 8, 12), 31, (1, 4, 4), length - 9 - 26 - 31 - 6]
    ids, grids = with_images(tiny_tok[1], cfg, parts)
    assert len(ids) == length
    pos = rope_index(model, ids, grids)
    assert kind == "text" or not np.array_equal(pos[0], pos[1])
    cap = capture(model, ids, pos)
    hidden = bundle.opts.hidden_state_type
    dt, ot = STORAGE[hidden]
    kv, H = bundle.spec.kv_dim, bundle.spec.hidden_size
    rows = []
    for i in range(bundle.spec.num_hidden_layers):
        for g in bundle.groups:  # decode: the last token over the rest; prefill: a chunk after the group's history
            h, n, hist = (length - 1, 1, C) if g.index == 0 else (0 if g.dummy_history else g.history - 1, P - 1, g.history_rows)
            k, v = np.zeros((1, hist, kv), np.float32), np.zeros((1, hist, kv), np.float32)
            k[0, :h], v[0, :h] = cap["keys"][i, :h], cap["values"][i, :h]
            x = np.zeros((1, g.tokens, H), np.float32)
            x[0, :n] = cap["inputs"][i, h:h + n]
            idx = np.zeros((3, g.tokens), np.uint32)
            idx[:, :n] = pos[:, h:h + n]
            sess = open_session(bundle.layer_file(i, g.index), threads=1, quantized=bundle.opts.quantized)
            got = run_once(sess, {"K_cache": (to_storage(k, hidden), ot), "V_cache": (to_storage(v, hidden), ot),
                                  "indices": (idx, TensorProto.UINT32), "input": (to_storage(x, hidden), ot),
                                  "mask": (board_mask(hidden, g.tokens, hist, h), ot)},
                           {"K_cache_out": ((1, g.tokens, kv), dt, ot), "V_cache_out": ((1, g.tokens, kv), dt, ot),
                            "output": ((1, g.tokens, H), dt, ot)})
            want = {"K_cache_out": cap["keys"][i, h:h + n], "V_cache_out": cap["values"][i, h:h + n],
                    "output": cap["outputs"][i, h:h + n]}
            for name, ref in want.items():
                rows.append({"layer": i, "group": g.index, "tensor": name,
                             **compare(from_storage(got[name], hidden)[0, :n], ref)})
    assert {r["group"] for r in rows} == {g.index for g in bundle.groups} and len(bundle.groups) == 5
    bad = failing_rows(rows, thresholds(*BUILDS[build][:2])["layer"])
    assert not bad, bad[:3]


def _reference_logits(model, ids: list[int], pos: np.ndarray) -> np.ndarray:
    """One forward with the contract's bf16 embedding rows (as the board's table) at these positions."""
    lm = model.model.language_model
    with torch.no_grad():
        emb = lm.embed_tokens(torch.tensor([ids])).to(torch.bfloat16).float()
        out = lm(inputs_embeds=emb, position_ids=torch.tensor(pos)[:, None, :])
        return model.lm_head(out.last_hidden_state)[0].numpy()


@pytest.mark.parametrize("build", list(BUILDS))
def test_runner_text_conversation_matches_reference_greedy(vl, tiny_tok, build):
    """System prompt prefilled once, a 40-token turn over several chunks, greedy decoding; then a second turn."""
    cfg, model, bundles = vl
    bundle = bundles[build]
    vocab = tiny_tok[1]
    lim = thresholds(*BUILDS[build][:2])["end_to_end"]
    rng = np.random.default_rng(7)
    engine = Engine(bundle, threads=1)
    ids = rng.integers(0, vocab, 11).tolist()
    engine.prefill(ids)
    worst = (1.0, 0.0)
    for new in (40, 20):
        ids = ids + rng.integers(0, vocab, new).tolist()
        hidden = engine.prefill(ids[engine.precompute_len:])
        ours, tokens = [], []
        for _ in range(6):
            logits, _ = engine.logits(hidden)
            ours.append(logits.copy())
            tokens.append(int(np.argmax(logits)))
            hidden = engine.decode(tokens[-1])
        full = ids + tokens
        ref = _reference_logits(model, full, np.tile(np.arange(len(full)), (3, 1)))
        ref_tokens = [int(np.argmax(ref[len(ids) - 1 + s])) for s in range(len(tokens))]
        for s, got in enumerate(ours):
            m = compare(got, ref[len(ids) - 1 + s])
            worst = (min(worst[0], m["cosine"]), max(worst[1], m["max_rel_err"]))
        if build == "fp32":  # greedy decoding as transformers' (teacher-forced on our tokens)
            assert tokens == ref_tokens, (tokens, ref_tokens)
        ids = full
    assert within(*worst, lim), (worst, lim)


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("history", ["used", "board"])
def test_runner_with_image_positions_matches_reference(vl, tiny_tok, build, history):
    """A system prompt, then a turn with an image (pads as fake image rows) over several prefill chunks,
    a few decoded tokens, and a second text turn: the engine keeps the running position (next_position),
    so every step matches one reference forward with get_rope_index's positions for the whole sequence."""
    cfg, model, bundles = vl
    bundle = bundles[build]
    lim = thresholds(*BUILDS[build][:2])["end_to_end"]
    kw = dict(image_token_id=cfg.image_token_id, spatial_merge_size=MERGE)
    engine = Engine(bundle, threads=1, history=history)
    system, _ = with_images(tiny_tok[1], cfg, [11])
    engine.prefill(system)
    turn1, grids = with_images(tiny_tok[1], cfg, [4, (1, 8, 12), 6])  # 36 tokens: 3 chunks of 16
    turn2, _ = with_images(tiny_tok[1], cfg, [13])
    hidden = engine.prefill(turn1, mrope_positions(turn1, grids, start=engine.next_position, **kw))
    assert engine.next_position == 11 + 4 + 1 + 6 + 1 + 6 and engine.precompute_len == 11 + 36
    steps, decoded = [], []
    for _ in range(3):
        logits, _ = engine.logits(hidden)
        steps.append((len(system) + len(turn1) + len(decoded) - 1, logits.copy()))
        decoded.append(int(np.argmax(logits)))
        hidden = engine.decode(decoded[-1])
    hidden = engine.prefill(turn2)  # text: consecutive from next_position
    logits, _ = engine.logits(hidden)
    ids = system + turn1 + decoded + turn2
    steps.append((len(ids) - 1, logits))
    pos = rope_index(model, ids, grids)
    assert engine.next_position == pos.max() + 1
    ref = _reference_logits(model, ids, pos)
    worst = (1.0, 0.0)
    for at, got in steps:
        m = compare(got, ref[at])
        worst = (min(worst[0], m["cosine"]), max(worst[1], m["max_rel_err"]))
    assert within(*worst, lim), (worst, lim)
    # the same conversation with text positions is measurably different: the image's positions matter
    flat = _reference_logits(model, ids, np.tile(np.arange(len(ids)), (3, 1)))
    assert compare(steps[-1][1], flat[-1])["max_rel_err"] > 3 * max(worst[1], 1e-6)
    engine.rewind(len(system))
    assert engine.next_position == len(system)


def test_the_3b_variant_resolves_with_the_released_split():
    """qwen2.5-vl-3b's exact config (flat, {type: mrope, mrope_section: [16, 24, 24]}): the split the
    vendor's build log prints as rs_mrope_section, three position rows, plain RoPE frequencies."""
    from generator.inputs.synthetic import variant_config
    from generator.recipe import registry
    from generator.resolve.spec import resolve_spec

    recipe = registry().recipes["qwen2_5_vl"]
    spec = resolve_spec(recipe, variant_config(recipe, "qwen2.5-vl-3b"), model_name="qwen2.5-vl-3b", max_positions=2048)
    table = spec.rope["full_attention"]
    assert table.mrope_section == [16, 24, 24] and table.rotary_dim == 128 and table.kind == "default"
    assert table.pair_rows() == [0] * 16 + [1] * 24 + [2] * 24
    assert (spec.head_dim, spec.num_hidden_layers, spec.tie_word_embeddings) == (128, 36, True)
    assert "mrope_section=[16, 24, 24]" in spec.pretty()
    from generator.contract import position_rows

    assert position_rows(spec.rope) == 3 and position_rows(spec.model_dump()["rope"]) == 3


@pytest.mark.parametrize("scaling, match", [
    ({"type": "mrope", "mrope_section": [16, 24, 23]}, "summing to 64"),
    ({"type": "mrope"}, "needs 'mrope_section'"),
    ({"rope_type": "linear", "factor": 2.0, "mrope_section": [16, 24, 24]}, "with rope_type 'linear'"),
])
def test_a_bad_split_is_refused_clearly(scaling, match):
    from generator.inputs.synthetic import variant_config
    from generator.recipe import registry
    from generator.resolve.spec import resolve_spec

    recipe = registry().recipes["qwen2_5_vl"]
    raw = dict(variant_config(recipe, "qwen2.5-vl-3b"), rope_scaling=scaling)
    with pytest.raises(GeneratorError, match=match):
        resolve_spec(recipe, raw, model_name="x", max_positions=2048)


def test_text_bundles_record_no_split_and_take_one_row():
    from generator.resolve.rope import resolve_rope

    table = resolve_rope(None, theta=1e4, head_dim=16, partial_rotary_factor=1.0, interleaved=False,
                         max_position_embeddings=256, max_positions_used=96)
    assert "mrope_section" not in table.model_dump() and table.pair_rows() is None
    from generator.contract import position_rows

    assert position_rows({"full_attention": table.model_dump()}) == 1
