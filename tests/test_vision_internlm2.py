"""InternVL2 with an InternLM2 decoder (recipes/internvl2.yaml: InternVL2-2B/8B) whole, against transformers' InternVL.

A tiny random InternVL (2 ViT layers, 56 px of 14 px patches: 4 image tokens; a 2-layer Llama text
model) is made by transformers (`InternVLForConditionalGeneration`) with InternViT-6B's quirks on:
RMSNorm (norm_type rms_norm), q/k RMSNorm over the whole width (use_qk_norm) and no q/k/v bias; it
is saved in the remote-code `InternVLChatModel` layout with an InternLM2 language model. The
equivalence (re-layout) is that of tests/test_vision_internvl.py for the tower and projector, plus

  remote code (checkpoint)                              transformers InternVL
  vision_model.encoder.layers.{i}.attn.q_norm/k_norm     model.vision_tower.encoder.layer.{i}.attention.q_norm/k_norm
  language_model.model.layers.{i}.attention.wqkv        per KV head [q x heads/kv, k, v] of self_attn.q/k/v_proj
  language_model.model.layers.{i}.attention.wo          self_attn.o_proj
  ...attention_norm / ffn_norm                          input_layernorm / post_attention_layernorm
  ...feed_forward.w1 / w3 / w2                          mlp.gate_proj / up_proj / down_proj
  language_model.model.tok_embeddings / norm, .output    model.language_model.embed_tokens / norm, lm_head

(InternLM2 is Llama's block once wqkv is unpacked; tests/test_families.py.) Built at fp32 and s8: the
vision graph against `get_image_features`, an image + prompt end to end against the reference's greedy
tokens and first logits, and -c 2 through the recipe's own vision.reference (re-layout by the recipe).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from models import SMALL_GROUPS, quiet_build, randomize, threads
from test_vision_internvl import limits, metrics, pixel_values, test_image
from vision_models import check_image_prompt_end_to_end, save_internvl_checkpoint, tiny_tokenizer

from generator.contract import Bundle, from_storage
from generator.runtime.vision import VisionEncoder

SIZE = 56
HEADS, KV, D = 4, 2, 16


def remote_layout(model) -> dict[str, np.ndarray]:
    """transformers InternVL (Llama text) -> the remote-code InternVLChatModel layout with InternLM2."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {}
    vt, n = "model.vision_tower.", model.config.vision_config.num_hidden_layers
    out["vision_model.embeddings.class_embedding"] = sd.pop(vt + "embeddings.cls_token")
    out["vision_model.embeddings.position_embedding"] = sd.pop(vt + "embeddings.position_embeddings")
    for p in ("weight", "bias"):
        out[f"vision_model.embeddings.patch_embedding.{p}"] = sd.pop(vt + f"embeddings.patch_embeddings.projection.{p}")
    for i in range(n):
        src, dst = f"{vt}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        out[dst + "attn.qkv.weight"] = np.concatenate([sd.pop(src + f"attention.{x}_proj.weight") for x in "qkv"])
        for a, b in (("attention.projection_layer", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[dst + f"{b}.{p}"] = sd.pop(src + f"{a}.{p}")
        for a, b in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("attention.q_norm", "attn.q_norm"),
                     ("attention.k_norm", "attn.k_norm")):  # RMSNorm: weight only
            out[dst + f"{b}.weight"] = sd.pop(src + f"{a}.weight")
        out[dst + "ls1"], out[dst + "ls2"] = sd.pop(src + "lambda_1"), sd.pop(src + "lambda_2")
    for a, b in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
        for p in ("weight", "bias"):
            out[f"mlp1.{b}.{p}"] = sd.pop(f"model.multi_modal_projector.{a}.{p}")
    lm, g = "model.language_model.", HEADS // KV
    out["language_model.model.tok_embeddings.weight"] = sd.pop(lm + "embed_tokens.weight")
    out["language_model.model.norm.weight"] = sd.pop(lm + "norm.weight")
    out["language_model.output.weight"] = sd.pop("lm_head.weight")
    for i in range(model.config.text_config.num_hidden_layers):
        src, dst = f"{lm}layers.{i}.", f"language_model.model.layers.{i}."
        q, k, v = (sd.pop(src + f"self_attn.{x}_proj.weight") for x in "qkv")
        q, k, v = q.reshape(KV, g, D, -1), k.reshape(KV, 1, D, -1), v.reshape(KV, 1, D, -1)
        out[dst + "attention.wqkv.weight"] = np.concatenate([q, k, v], axis=1).reshape(-1, q.shape[-1])
        for a, b in (("self_attn.o_proj", "attention.wo"), ("input_layernorm", "attention_norm"),
                     ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "feed_forward.w1"),
                     ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2")):
            out[dst + f"{b}.weight"] = sd.pop(src + f"{a}.weight")
    assert not sd, sorted(sd)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, LlamaConfig

    tok_dir, ids, size = tiny_tokenizer(tmp_path_factory, "vl_tok")
    vc = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=SIZE, patch_size=14, attention_bias=False, use_qk_norm=True,
                              norm_type="rms_norm", layer_norm_eps=1e-6)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
                     num_key_value_heads=KV, vocab_size=size, max_position_embeddings=256, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    cfg = InternVLConfig(vision_config=vc, text_config=tc, image_token_id=ids["<IMG_CONTEXT>"], downsample_ratio=0.5,
                         tie_word_embeddings=False)
    torch.manual_seed(11)
    model = InternVLForConditionalGeneration(cfg).eval()
    randomize(model, 11)
    target = tmp_path_factory.mktemp("tiny_internvl2_internlm2")
    llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": KV,
           "vocab_size": size, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
           "rope_scaling": None, "hidden_act": "silu", "bias": False, "tie_word_embeddings": False,
           "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    save_internvl_checkpoint(target, remote_layout(model), tok_dir, llm, "internlm2-chat", SIZE, qkv_bias=False,
                             qk_normalization=True, norm_type="rms_norm")
    return model, target, tmp_path_factory


def build(tiny, wtype: str, **kw):
    model, ckpt, factory = tiny
    out = factory.mktemp(f"vl_internlm2_{wtype}")
    m = quiet_build(input_path=str(ckpt), output_path=str(out), weight_type=wtype, post_weight_type=wtype,
                    hidden_state_type="fp32", image_size=SIZE, **{**SMALL_GROUPS, **kw})
    assert m["recipe"]["name"] == "internvl2"  # detected from llm_config's InternLM2ForCausalLM
    return Bundle(out), m


@pytest.fixture(scope="module", params=["fp32", "s8"])
def bundle(request, tiny):
    return build(tiny, request.param)[0]


def test_vision_graph_rms_qk_norm_matches_reference(tiny, bundle):
    v = bundle.manifest.vision
    assert (v.image_size, v.tokens) == (SIZE, 4)
    assert (v.spec["norm_kind"], v.spec["qk_norm"], v.spec["qkv_bias"]) == ("rms_norm", True, False)
    enc = VisionEncoder(bundle, threads=threads())
    image = test_image()
    pixels = enc.pixels(image)
    ours = from_storage(enc.encode(image), bundle.opts.hidden_state_type)
    with torch.no_grad():
        ref = tiny[0].model.get_image_features(pixel_values=pixel_values(pixels, bundle), vision_feature_layer=-1,
                                               vision_feature_select_strategy="default").pooler_output[0].numpy()
    assert ours.shape == ref.shape == (4, 64)
    lim = limits(bundle, "layer")
    per_token = [metrics(ours[t], ref[t])[0] for t in range(4)]
    rel = metrics(ours, ref)[1]
    assert min(per_token) >= lim["min_cosine"] and rel <= lim["max_rel_err"], (per_token, rel)


def test_image_prompt_end_to_end(tiny, bundle):
    check_image_prompt_end_to_end(tiny, bundle, limits)


def test_check_level_2_through_the_recipes_reference(tiny):
    """-c 2: the recipe's vision.reference (transformers InternVL with a Llama text model, the InternLM2
    wqkv unpacked by the recipe's grouped() re-layout) against the bundle."""
    _, m = build(tiny, "s8", check_level=2, kv_cache_len=255)
    v = m["checks"]["vision"]
    assert m["checks"]["passed"], m["checks"]["failures"]
    assert v["passed"] and v["generate"]["passed"] and v["tokens"] == 4
