"""InternVL2-4B's layout (InternViT + pixel shuffle + mlp1 + Phi-3 decoder) against transformers' InternVL.

A tiny random InternVL (2 ViT layers, 56 px images of 14 px patches: 4 image tokens; a 2-layer Phi3
with longrope and a sliding window, as Phi-3-mini-128k) is made by transformers
(`InternVLForConditionalGeneration` with a Phi3 text config) and saved in the remote-code
`InternVLChatModel` layout recipes/internvl2_phi3.yaml reads (the re-layout of
tests/test_vision_internvl.py). Built at fp32 and s8: the vision graph against `get_image_features`
and an image + prompt through the Chat against the reference's greedy tokens and first logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from models import SMALL_GROUPS, quiet_build, randomize, threads
from test_vision_internvl import bf16_reference, metrics, pixel_values, reference_greedy, remote_layout, test_image
from tokenizer_fixtures import copy_tokenizer_files, make_qwen_style_dir

from generator.contract import Bundle, from_storage
from generator.recipe.registry import registry
from generator.runtime.chat import Chat
from generator.runtime.engine import Engine
from generator.runtime.vision import VisionEncoder, image_rows
from generator.verify.checks import thresholds

SIZE = 56


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Phi3Config

    tok_dir = make_qwen_style_dir(tmp_path_factory.mktemp("vl_phi3_tok"), img_token_num=0)
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    size = max(max(vocab["model"]["vocab"].values()), *ids.values()) + 1
    vc = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=SIZE, patch_size=14, attention_bias=True, layer_norm_eps=1e-6)
    tc = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=size, max_position_embeddings=1024,
                    original_max_position_embeddings=256, sliding_window=1000, tie_word_embeddings=False,
                    pad_token_id=0, bos_token_id=None, eos_token_id=None,
                    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                     "short_factor": [1.0, 1.02, 1.05, 1.1, 1.3, 1.6, 1.9, 2.0],
                                     "long_factor": [1.1, 1.5, 2.0, 3.0, 5.0, 9.0, 15.0, 30.0]})
    cfg = InternVLConfig(vision_config=vc, text_config=tc, image_token_id=ids["<IMG_CONTEXT>"], downsample_ratio=0.5,
                         tie_word_embeddings=False)
    torch.manual_seed(11)
    model = InternVLForConditionalGeneration(cfg).eval()
    randomize(model, 11)
    target = tmp_path_factory.mktemp("tiny_internvl2_phi3")
    save_file({k: np.ascontiguousarray(v) for k, v in remote_layout(model).items()}, str(target / "model.safetensors"))
    llm = tc.to_dict()
    llm["architectures"] = ["Phi3ForCausalLM"]
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": SIZE,
              "patch_size": 14, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
              "layer_norm_eps": 1e-6, "hidden_act": "gelu", "num_channels": 3}
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "phi3-chat",
              "downsample_ratio": 0.5, "force_image_size": SIZE, "select_layer": -1, "ps_version": "v2",
              "vision_config": vision, "llm_config": llm}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer_files(tok_dir, target)
    return model, target, tmp_path_factory


@pytest.fixture(scope="module", params=["fp32", "s8"])
def bundle(request, tiny):
    out = tiny[2].mktemp(f"vl_phi3_{request.param}")
    quiet_build(input_path=str(tiny[1]), output_path=str(out), recipe_name="internvl2_phi3", weight_type=request.param,
                post_weight_type=request.param, hidden_state_type="fp32", image_size=SIZE, **SMALL_GROUPS)
    return Bundle(out)


def limits(b: Bundle, kind: str) -> dict:
    return thresholds(b.opts.weight_type, b.opts.hidden_state_type)[kind]


def test_the_checkpoint_picks_this_recipe(tiny):
    cfg = json.loads((tiny[1] / "config.json").read_text())
    assert registry().by_architecture(cfg["architectures"], cfg["model_type"], cfg).name == "internvl2_phi3"


def test_vision_graph_matches_reference(tiny, bundle):
    v = bundle.manifest.vision
    assert (v.image_size, v.tokens) == (SIZE, 4)
    assert set(bundle.spec.layer_types) == {"sliding_attention"}
    enc = VisionEncoder(bundle, threads=threads())
    image = test_image()
    pixels = enc.pixels(image)
    ours = from_storage(enc.encode(image), bundle.opts.hidden_state_type)
    with torch.no_grad():
        ref = tiny[0].model.get_image_features(pixel_values=pixel_values(pixels, bundle), vision_feature_layer=-1,
                                               vision_feature_select_strategy="default").pooler_output[0].numpy()
    assert ours.shape == ref.shape == (4, bundle.spec.hidden_size)
    lim = limits(bundle, "layer")
    per_token = [metrics(ours[t], ref[t])[0] for t in range(4)]
    assert min(per_token) >= lim["min_cosine"] and metrics(ours, ref)[1] <= lim["max_rel_err"], per_token


def test_image_prompt_end_to_end(tiny, bundle):
    model = bf16_reference(tiny[0])
    chat = Chat(bundle, Engine(bundle, threads=threads()), system_prompt="You are a bot.")
    chat.reset()
    image = test_image(seed=2)
    "".join(chat.turn("What is in the picture?", max_new_tokens=6, images=[image]))
    e, n = chat.engine, chat.stats.prompt_tokens
    prompt, ours = e.cached_ids[:n], e.cached_ids[n:]
    ctx = bundle.manifest.vision.img_context_token_id
    assert prompt.count(ctx) == 4
    ref_tokens, ref_logits = reference_greedy(model, prompt, pixel_values(chat.vision().pixels(image), bundle), 6)
    k = min(len(ours), limits(bundle, "generate")["min_prefix"])
    assert ours[:k] == ref_tokens[:k]
    e.rewind(0)  # teacher-forced first step against the reference's logits
    e.image_rows = image_rows(prompt, [chat.vision().encode(image)], ctx)
    logits: list = []
    list(chat.gen.stream(prompt, 1, logits_out=logits))
    e.image_rows = {}
    cos, rel = metrics(np.asarray(logits[0], np.float32), ref_logits)
    lim = limits(bundle, "end_to_end")
    assert cos >= lim["min_cosine"] and rel <= lim["max_rel_err"], (cos, rel)
