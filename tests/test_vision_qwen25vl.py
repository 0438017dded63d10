"""Qwen2.5-VL whole (vision tower + mRoPE language model) against transformers' Qwen2.5-VL.

A tiny random `Qwen2_5_VLForConditionalGeneration` (a 2-block vision tower: block 0 windowed, block 1
full attention; 112 px images of 14 px patches, an 8x8 patch grid, 2x2 merge: 16 image tokens in
four 2x2-token windows; a 2-layer decoder with mRoPE sections [2, 3, 3]) is saved by transformers and
built through recipes/qwen2_5_vl.yaml at fp32 and s8. The checkpoint is transformers' own layout
(visual.* read by the recipe's vision part as it is). The image token ids are the config's: the tiny
tokenizer's special tokens 3, 4, 5 stand for <|vision_start|>, <|image_pad|>, <|vision_end|>
(vision.token_ids). References: `model.model.visual` on Qwen2VLImageProcessor's pixel values of the
same resized picture (the vision graph); the whole model with input_ids + pixel_values +
image_grid_thw, which computes its own mRoPE positions (get_rope_index), for greedy tokens and logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vision_rows
from models import SMALL_GROUPS, quiet_build, randomize, threads
from vision_models import check_recorded_end_to_end

from generator.contract import Bundle, from_storage
from generator.runtime.chat import Chat
from generator.runtime.engine import Engine
from generator.runtime.mrope import mrope_positions
from generator.runtime.vision import VisionEncoder
from generator.verify.checks import thresholds

SIZE = 112
START, IMAGE, END = 3, 4, 5  # the tiny tokenizer's <img>, <IMG_CONTEXT>, </img>
FAMILY = "qwen2_5_vl"  # conformance rows qwen2_5_vl/vision (tests/vision_rows.py)
REFERENCE = "transformers Qwen2_5_VLForConditionalGeneration (its own layout and mRoPE positions)"
QUIRKS = ["Conv3d patch embed (temporal 2) folded to Conv2d", "2D RoPE, RMSNorm, q/k/v bias, SwiGLU with bias",
          "window attention (block 0, window 56 px) and full attention (block 1)", "2x2 patch merger: 16 image tokens",
          "mRoPE sections [2, 3, 3] in the decoder, the image turn over several prefill chunks"]


def test_image(size: int = 90, seed: int = 0) -> np.ndarray:
    """A small RGB picture made by code (not square: it is resized)."""
    h, w = size, size + 14
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2) * 200.0], -1)
    img += np.random.default_rng(seed).normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


test_image.__test__ = False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tokenizer_fixtures import copy_tokenizer_files

    tok_dir, vocab = tiny_tok
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, vision_start_token_id=START,
                           vision_end_token_id=END, video_token_id=vocab - 2, tie_word_embeddings=False)
    torch.manual_seed(11)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    randomize(model, 11)
    ckpt = tmp_path_factory.mktemp("tiny_qwen25vl")
    model.save_pretrained(ckpt, safe_serialization=True)
    copy_tokenizer_files(tok_dir, ckpt)
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    model.model.visual.config._attn_implementation = "eager"
    return model.eval(), ckpt, tmp_path_factory


def build(tiny, wtype: str, **kw):
    model, ckpt, factory = tiny
    out = factory.mktemp(f"qvl_{wtype}")
    quiet_build(input_path=str(ckpt), output_path=str(out), weight_type=wtype, post_weight_type=wtype,
                hidden_state_type="fp32", image_size=SIZE, **{**SMALL_GROUPS, **kw})
    return Bundle(out)


@pytest.fixture(scope="module", params=["fp32", "s8"])
def bundle(request, tiny):
    return build(tiny, request.param, kv_cache_len=192)


def processor_inputs(pixels: np.ndarray):
    """transformers' image processor on the graph's (already resized) uint8 picture."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Qwen2VLImageProcessorPil()(images=[pixels[0]], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def metrics(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    a, r = ours.reshape(-1).astype(np.float64), ref.reshape(-1).astype(np.float64)
    return float(a @ r / (np.linalg.norm(a) * np.linalg.norm(r))), float(np.abs(a - r).max() / np.abs(r).max())


def limits(b: Bundle, kind: str) -> dict:
    return thresholds(b.opts.weight_type, b.opts.hidden_state_type)[kind]


def test_vision_graph_matches_reference(tiny, bundle):
    v = bundle.manifest.vision
    assert (v.image_size, v.tokens, v.image_grid, v.spatial_merge_size) == (SIZE, 16, [1, 8, 8], 2)
    assert (v.img_start_token_id, v.img_context_token_id, v.img_end_token_id) == (START, IMAGE, END)
    enc = VisionEncoder(bundle, threads=threads())
    image = test_image()
    pv, grid = processor_inputs(enc.pixels(image))
    assert grid.tolist() == [v.image_grid]
    ours = from_storage(enc.encode(image), bundle.opts.hidden_state_type)
    with torch.no_grad():
        ref = tiny[0].model.visual(pv, grid_thw=grid).pooler_output.numpy()
    assert ours.shape == ref.shape == (16, 64)
    lim = limits(bundle, "layer")
    per_token = [metrics(ours[t], ref[t])[0] for t in range(16)]  # cosine per image token
    rel = metrics(ours, ref)[1]
    ok = min(per_token) >= lim["min_cosine"] and rel <= lim["max_rel_err"]
    grown = vision_rows.record(FAMILY, bundle.opts.weight_type, "vision", min(per_token), rel, lim, ok, REFERENCE,
                               QUIRKS)
    assert ok, (per_token, rel)
    assert not grown, grown


def bf16_reference(model):
    """The reference with the contract's bf16 embedding table (what the board reads)."""
    import copy

    ref = copy.deepcopy(model)
    emb = ref.model.language_model.embed_tokens.weight
    with torch.no_grad():
        emb.copy_(emb.to(torch.bfloat16).to(torch.float32))
    return ref


def reference_logits(model, ids: list[int], pv, grid) -> np.ndarray:
    """transformers' last-position logits for `ids` (its own mRoPE positions from get_rope_index)."""
    t = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids=t, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(t == IMAGE).int(),
                     use_cache=False).logits[0, -1].numpy()


def reference_greedy(model, ids: list[int], pv, grid, steps: int) -> tuple[list[int], np.ndarray]:
    ids, out, first = list(ids), [], None
    for _ in range(steps):
        logits = reference_logits(model, ids, pv, grid)
        first = logits if first is None else first
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out, first


def rope_index(model, ids: list[int], grid) -> np.ndarray:
    t = torch.tensor([ids])
    pos, _ = model.model.get_rope_index(t, mm_token_type_ids=(t == IMAGE).int(), image_grid_thw=grid)
    return pos[:, 0].numpy()


def teacher_forced(chat: Chat, prompt: list[int], image: np.ndarray, keep: int) -> np.ndarray:
    """The first step's logits of `prompt` with the cache kept up to `keep`, through the Chat's path."""
    from generator.runtime.mrope import prefill_with_images
    from generator.runtime.vision import image_rows

    e, v = chat.engine, chat.b.manifest.vision
    e.rewind(keep)
    e.image_rows = image_rows(prompt, [chat.vision().encode(image)], v.img_context_token_id)
    prefill_with_images(e, prompt, v)
    logits: list = []
    list(chat.gen.stream(prompt, 1, logits_out=logits))
    e.image_rows = {}
    return np.asarray(logits[0], np.float32)


def test_image_prompt_end_to_end(tiny, bundle):
    model = bf16_reference(tiny[0])
    chat = Chat(bundle, Engine(bundle, threads=threads()), system_prompt="You are a bot.")
    chat.reset()
    image = test_image(seed=2)
    "".join(chat.turn("What is in the picture?", max_new_tokens=6, images=[image]))
    e, n = chat.engine, chat.stats.prompt_tokens
    prompt, ours = e.cached_ids[:n], e.cached_ids[n:]
    assert prompt.count(IMAGE) == 16 and prompt[prompt.index(IMAGE) - 1] == START and END in prompt
    assert n > 2 * SMALL_GROUPS["prefill_len"]  # the image turn spans several prefill chunks
    pv, grid = processor_inputs(chat.vision().pixels(image))
    # the positions the turn took: the engine's running offset equals transformers' after the prompt
    ref_pos = rope_index(model, prompt, grid)
    assert np.array_equal(mrope_positions(prompt, [tuple(grid[0].tolist())], image_token_id=IMAGE), ref_pos)
    assert e._next[n] == ref_pos.max() + 1 and e._next[n] < n  # the image's tokens share positions
    ref_tokens, ref_logits = reference_greedy(model, prompt, pv, grid, 6)
    k = min(len(ours), limits(bundle, "generate")["min_prefix"])
    cos, rel = metrics(teacher_forced(chat, prompt, image, 0), ref_logits)
    lim = limits(bundle, "end_to_end")
    check_recorded_end_to_end(FAMILY, bundle, cos, rel, lim, ours[:k], ref_tokens[:k], REFERENCE, QUIRKS)


def test_image_in_a_later_turn_then_text(tiny, bundle):
    """A cached system prompt and a text turn, then the image turn (only its part prefilled, from the
    running offset), then a text turn that continues after the image's positions."""
    model = bf16_reference(tiny[0])
    chat = Chat(bundle, Engine(bundle, threads=threads()), system_prompt="You are a bot.")
    system = chat.reset()
    assert chat.engine.precompute_len == system
    "".join(chat.turn("Hello there.", max_new_tokens=3))
    image = test_image(seed=3)
    "".join(chat.turn("And this?", max_new_tokens=4, images=[image]))
    e, n = chat.engine, chat.stats.prompt_tokens
    assert chat.stats.prefilled < n
    prompt, ours = e.cached_ids[:n], e.cached_ids[n:]
    pv, grid = processor_inputs(chat.vision().pixels(image))
    ref_tokens, ref_logits = reference_greedy(model, prompt, pv, grid, 4)
    if bundle.opts.weight_type == "fp32":  # s8: a random tiny model's top two logits may be closer than s8's error
        assert ours == ref_tokens[:len(ours)]
    lim = limits(bundle, "end_to_end")
    cos, rel = metrics(teacher_forced(chat, prompt, image, prompt.index(IMAGE)), ref_logits)
    assert cos >= lim["min_cosine"] and rel <= lim["max_rel_err"], (cos, rel)
    # a text turn after the image: its positions continue from the image turn's offset
    "".join(chat.turn("Thanks.", max_new_tokens=1))
    n2 = chat.stats.prompt_tokens
    whole = e.cached_ids[:n2]
    assert chat.stats.prefilled < n2 - prompt.index(IMAGE)  # the image stayed in the cache
    assert e._next[n2] == rope_index(model, whole, grid).max() + 1
    e.rewind(n2 - 1)
    logits: list = []
    list(chat.gen.stream(whole, 1, logits_out=logits))
    cos, rel = metrics(np.asarray(logits[0], np.float32), reference_logits(model, whole, pv, grid))
    assert cos >= lim["min_cosine"] and rel <= lim["max_rel_err"], (cos, rel)


@pytest.mark.parametrize("wtype", ["fp32", "s8"])
def test_check_levels_verify_the_vision_part(tiny, wtype):
    """-c 2: the vision graph vs transformers' Qwen2_5_VLForConditionalGeneration (the checkpoint's own
    config and names; Qwen2VLImageProcessor's patches) and the check picture + prompt end to end with
    mRoPE positions on both sides."""
    model, ckpt, factory = tiny
    out = factory.mktemp(f"qvl_checks_{wtype}")
    m = quiet_build(input_path=str(ckpt), output_path=str(out), weight_type=wtype, post_weight_type=wtype,
                    hidden_state_type="fp32", image_size=SIZE, check_level=2, **dict(SMALL_GROUPS, kv_cache_len=255))
    v = m["checks"]["vision"]
    assert m["checks"]["passed"], m["checks"]["failures"]
    assert v["passed"] and v["generate"]["passed"] and v["tokens"] == 16
    assert v["min_token_cosine"] > 0.999 and (out / "report" / "vision_check.json").is_file()
    png = out / "report" / "vision_check.png"  # the per-token plot, as the layer check's
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(v["token_rel_errs"]) == v["tokens"]


def test_complete_with_images_takes_the_same_positions(tiny, bundle):
    """serve's path (Chat.complete with every image of the conversation) gives the turn's tokens."""
    image = test_image(seed=5)
    chat = Chat(bundle, Engine(bundle, threads=threads()), system_prompt="You are a bot.")
    chat.reset()
    "".join(chat.turn("Look.", max_new_tokens=4, images=[image]))
    n = chat.stats.prompt_tokens
    prompt, ours = chat.engine.cached_ids[:n], chat.engine.cached_ids[n:]
    other = Chat(bundle, Engine(bundle, threads=threads()), system_prompt="You are a bot.")
    other.reset()
    "".join(other.complete(prompt, max_new_tokens=4, images=[image]))
    assert other.engine.cached_ids[n:] == ours and other.engine._next[n] == chat.engine._next[n]


def test_committed_vision_rows():
    """docs/conformance.json (the baseline) has qwen2_5_vl/vision at fp32 and s8, all passing."""
    vision_rows.assert_committed(FAMILY)
