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

import pytest
import torch

from models import SMALL_GROUPS, quiet_build, randomize, threads
from test_vision_internvl import metrics, pixel_values, remote_layout, test_image
from vision_models import check_image_prompt_end_to_end, save_internvl_checkpoint, tiny_tokenizer

from generator.contract import Bundle, from_storage
from generator.recipe.registry import registry
from generator.runtime.vision import VisionEncoder
from generator.verify.checks import thresholds

SIZE = 56


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Phi3Config

    tok_dir, ids, size = tiny_tokenizer(tmp_path_factory, "vl_phi3_tok")
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
    llm = tc.to_dict()
    llm["architectures"] = ["Phi3ForCausalLM"]
    save_internvl_checkpoint(target, remote_layout(model), tok_dir, llm, "phi3-chat", SIZE, qkv_bias=True,
                             qk_normalization=False, norm_type="layer_norm")
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
    check_image_prompt_end_to_end(tiny, bundle, limits)
