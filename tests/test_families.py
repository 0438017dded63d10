"""Every family as a recipe (YAML only), each proven against a reference implementation.

One tiny random-weight model per family, small but with every quirk of the family active (a sliding
window of a few tokens with prompts longer than it, rope scaling, partial / interleaved rotary,
softcaps, fused and packed tensors, scales), built at fp32 and at s8 (bf16 hidden states) and
compared with its reference:

  - per layer, every shape group (decode, the no-history prefill group, each history group) fed
    the reference's own inputs; the post graph on the reference's last hidden state;
  - end to end through the local runner: a cached system prompt, two turns in several prefill
    chunks, every step's logits (teacher-forced) against one reference forward pass;

  - at every boundary the graphs and the runner have: the last KV row, each prefill group filled to
    its cap, the sliding window's edge, the longrope switch (positions exactly at long_from - 1 and
    long_from);

within the data-driven thresholds of generator/data/tolerances.yaml. Each measurement is recorded
into docs/conformance.md (generator/verify/conformance.py), which `python -m generator list --verified`
prints; an error that outgrows the committed value by more than generator/data/conformance.yaml
allows fails as well.

References. Families transformers implements (llama, qwen2, gemma2, gemma3_text, phi, phi3) load
as they are with AutoModelForCausalLM. Remote-code families cannot be downloaded; each is proven
against a transformers architecture that computes the same function, with the checkpoint's tensors
re-laid out by the recipe's `reference` section (generator/verify/relayout.py, which never uses the
generator's own weight conversion). The equivalences:

  ChatGLM3 == transformers GlmForCausalLM, with
    query_key_value (rows [q: heads*d | k: groups*d | v: groups*d], bias likewise) cut into
    q_proj / k_proj / v_proj; dense -> o_proj; dense_h_to_4h -> gate_up_proj (GLM chunks it
    [gate | up] and computes silu(gate) * up, as ChatGLM's swiglu does); dense_4h_to_h -> down_proj;
    input/post_attention_layernorm and final_layernorm as they are (RMSNorm). Rotary: ChatGLM's
    RotaryEmbedding(kv_channels // 2) rotates the first half of each head in interleaved pairs
    (x0,x1),(x2,x3).. with base 10000 * rope_ratio; GLM with partial_rotary_factor 0.5 computes
    inv_freq over the same rot_dim = head_dim / 2 and repeat-interleaves cos/sin (rotate_half over
    even/odd lanes): the same rotation. Attention scale: ChatGLM divides q by sqrt(d) * layer_number
    and multiplies the scores by layer_number (query_key_layer_scaling), net 1 / sqrt(d), as GLM.
  InternLM2 (InternVL2-2B/8B) == transformers LlamaForCausalLM, with
    wqkv viewed as [kv_heads, heads/kv_heads + 2, head_dim, hidden]: q = [:, :g], k = [:, g],
    v = [:, g + 1] (InternLM2's rearrange "b q (h gs d) -> b q h gs d" with gs = g + 2);
    wo -> o_proj; w1 / w3 / w2 -> gate / up / down (InternLM2's w2(silu(w1 x) * w3 x));
    attention_norm / ffn_norm -> input / post_attention_layernorm; tok_embeddings, norm, output.
    Rotary is Llama's rotate_half; dynamic NTK scaling is transformers' 'dynamic' type. All under
    llm_config / language_model. in the InternVL chat checkpoint.
  InternVL2-1B == transformers Qwen2ForCausalLM on llm_config with the language_model. prefix removed.
  MiniCPM == transformers LlamaForCausalLM (untied), with the scales folded into the reference's
    weights: embed_tokens x scale_emb (MiniCPM multiplies the embeddings), o_proj and down_proj x
    scale_depth / sqrt(num_layers) (MiniCPM scales each branch before the residual add; the branch
    is linear in those weights), lm_head = embed_tokens x dim_model_base / hidden_size (MiniCPM
    divides the final hidden state by hidden_size / dim_model_base before its tied head).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from safetensors.numpy import save_file

from generator.verify import conformance
from generator.inputs.checkpoint import open_input
from generator.errors import GeneratorError
from generator.progress import Progress
from generator.recipe import registry
from generator.verify.reference import capture, load_reference
from generator.contract import MASK_VALUE, STORAGE, Bundle, from_storage, is_quantized, to_storage
from generator.runtime.ort import run_once as run_graph, session_options
from generator.verify.checks import (compare, conversation_check, failing_rows, layer_check, logits_check, thresholds,
                              within)
from models import SMALL_GROUPS, quiet_build, randomize, save_tiny, token_ids
from tokenizer_fixtures import copy_tokenizer_files

BUILDS = {"fp32": ("fp32", "fp32", "fp32"), "s8": ("s8", "bf16", "s8")}  # weight, hidden state, post weight
LENGTH = SMALL_GROUPS["last_kv_cache_len"][-1] + SMALL_GROUPS["prefill_len"]  # covers every group


# -- tiny checkpoints ---------------------------------------------------------------------------------

class Rand:
    """Random tensors for checkpoints written by hand (remote-code layouts)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def linear(self, out: int, inp: int) -> np.ndarray:
        return (self.rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(self, n: int) -> np.ndarray:
        return (1.0 + 0.3 * self.rng.standard_normal(n)).astype(np.float32)

    def bias(self, n: int) -> np.ndarray:
        return (0.1 * self.rng.standard_normal(n)).astype(np.float32)


def _write_checkpoint(target: Path, config: dict, tensors: dict[str, np.ndarray], tok_dir: Path) -> Path:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(target / "model.safetensors"))
    (target / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer_files(tok_dir, target)
    return target


def make_llama(target, tok_dir, vocab):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=True, attention_bias=True,
                      mlp_bias=True, bos_token_id=None, eos_token_id=None,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    return save_tiny(cfg, target, tok_dir)


def make_qwen2(target, tok_dir, vocab):
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=True, use_sliding_window=True,
                      sliding_window=6, max_window_layers=1, bos_token_id=None, eos_token_id=None,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    return save_tiny(cfg, target, tok_dir, edit=_drop_layer_types())


def _drop_layer_types(pattern_key: str | None = None, pattern: int | None = None):
    def edit(cfg):
        cfg.pop("layer_types", None)  # as on the Hub: the pattern comes from the family's rule
        if pattern_key:
            cfg[pattern_key] = pattern
    return edit


def make_gemma2(target, tok_dir, vocab):
    from transformers import Gemma2Config

    cfg = Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=24, vocab_size=vocab, max_position_embeddings=256, query_pre_attn_scalar=20,
                       attn_logit_softcapping=2.0, final_logit_softcapping=1.5, sliding_window=5,
                       hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                       bos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return save_tiny(cfg, target, tok_dir, edit=_drop_layer_types())


def make_gemma3(target, tok_dir, vocab):
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=16, vocab_size=vocab, max_position_embeddings=256, query_pre_attn_scalar=12,
                           sliding_window=5, sliding_window_pattern=3, tie_word_embeddings=True, pad_token_id=0,
                           eos_token_id=1, bos_token_id=2,
                           rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    return save_tiny(cfg, target, tok_dir, edit=_drop_layer_types("sliding_window_pattern", 3))


def make_phi(target, tok_dir, vocab):
    from transformers import PhiConfig

    cfg = PhiConfig(hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=vocab,
                    max_position_embeddings=256, hidden_act="gelu_new", layer_norm_eps=1e-5, tie_word_embeddings=False,
                    bos_token_id=None, eos_token_id=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4})
    return save_tiny(cfg, target, tok_dir)


PHI3_ORIGINAL = 64


def make_phi3(target, tok_dir, vocab):
    from transformers import Phi3Config

    cfg = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=vocab, max_position_embeddings=256, original_max_position_embeddings=PHI3_ORIGINAL,
                     sliding_window=6, tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                      "short_factor": [1.0, 1.3, 1.9, 2.6], "long_factor": [1.5, 3.0, 7.0, 13.0]})
    return save_tiny(cfg, target, tok_dir)


def make_minicpm(target, tok_dir, vocab):
    """MiniCPM's checkpoint layout is Llama's tensor names, tied head, plus its scale keys."""
    from transformers import LlamaConfig, LlamaForCausalLM

    L = 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False))
    randomize(model, 0)
    tensors = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
              "auto_map": {"AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": L, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "hidden_act": "silu", "scale_emb": 12, "dim_model_base": 16, "scale_depth": 1.4,
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    return _write_checkpoint(target, config, tensors, tok_dir)


def make_chatglm(target, tok_dir, vocab):
    """ChatGLM3's own layout (modeling_chatglm.py): transformer.encoder.layers.{i}..., fused
    query_key_value [q; k; v] with bias, fused dense_h_to_4h [gate; up], and the rotary inv_freq
    buffer real checkpoints carry."""
    r, L, H, heads, groups, d, ffn = Rand(1), 2, 64, 4, 2, 16, 96
    t = {"transformer.embedding.word_embeddings.weight": r.linear(vocab, H),
         "transformer.encoder.final_layernorm.weight": r.norm(H),
         "transformer.output_layer.weight": r.linear(vocab, H),
         "transformer.rotary_pos_emb.inv_freq": (1.0 / 20000.0 ** (np.arange(0, d // 2, 2) / (d // 2))).astype(np.float32)}
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        t[p + "input_layernorm.weight"] = r.norm(H)
        t[p + "self_attention.query_key_value.weight"] = r.linear((heads + 2 * groups) * d, H)
        t[p + "self_attention.query_key_value.bias"] = r.bias((heads + 2 * groups) * d)
        t[p + "self_attention.dense.weight"] = r.linear(H, heads * d)
        t[p + "post_attention_layernorm.weight"] = r.norm(H)
        t[p + "mlp.dense_h_to_4h.weight"] = r.linear(2 * ffn, H)
        t[p + "mlp.dense_4h_to_h.weight"] = r.linear(H, ffn)
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
              "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
              "num_layers": L, "hidden_size": H, "num_attention_heads": heads, "kv_channels": d,
              "multi_query_attention": True, "multi_query_group_num": groups, "ffn_hidden_size": ffn,
              "padded_vocab_size": vocab, "seq_length": 256, "layernorm_epsilon": 1e-5, "rmsnorm": True,
              "add_qkv_bias": True, "add_bias_linear": False, "post_layer_norm": True, "original_rope": True,
              "rope_ratio": 2.0, "apply_query_key_layer_scaling": True, "tie_word_embeddings": False,
              "eos_token_id": 2, "pad_token_id": 0}
    return _write_checkpoint(target, config, t, tok_dir)


def make_internvl2(target, tok_dir, vocab):
    """InternVL2 chat checkpoint with an InternLM2 LLM: llm_config, language_model.* tensors, wqkv
    packed per KV head [q x g, k, v], plus a whole tiny InternViT (vision_model.*, mlp1.*: the bundle's
    vision part; InternViT-6B's quirks: RMSNorm, q/k norm, no qkv bias; tests/test_vision_internlm2.py
    checks it against transformers' InternVL)."""
    from generator.recipe.vision import resolve_vision, vision_tensor_shapes

    r, L, H, heads, kv, d, inter = Rand(2), 2, 64, 4, 2, 16, 128
    g = heads // kv
    t = {"language_model.model.tok_embeddings.weight": r.linear(vocab, H),
         "language_model.model.norm.weight": r.norm(H),
         "language_model.output.weight": r.linear(vocab, H)}
    r.linear(32, 48), r.norm(4 * 32)  # draws the stream had here before the vision part: the LLM's weights unchanged
    for i in range(L):
        p = f"language_model.model.layers.{i}."
        t[p + "attention_norm.weight"] = r.norm(H)
        t[p + "attention.wqkv.weight"] = r.linear(kv * (g + 2) * d, H)
        t[p + "attention.wo.weight"] = r.linear(H, heads * d)
        t[p + "ffn_norm.weight"] = r.norm(H)
        t[p + "feed_forward.w1.weight"] = r.linear(inter, H)
        t[p + "feed_forward.w3.weight"] = r.linear(inter, H)
        t[p + "feed_forward.w2.weight"] = r.linear(H, inter)
    llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": H,
           "intermediate_size": inter, "num_hidden_layers": L, "num_attention_heads": heads, "num_key_value_heads": kv,
           "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
           "rope_scaling": {"type": "dynamic", "factor": 2.0}, "hidden_act": "silu", "bias": False,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56,
              "patch_size": 14, "qkv_bias": False, "qk_normalization": True, "norm_type": "rms_norm",
              "layer_norm_eps": 1e-6, "hidden_act": "gelu", "num_channels": 3}
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
              "downsample_ratio": 0.5, "force_image_size": 56, "select_layer": -1, "ps_version": "v2",
              "llm_config": llm, "vision_config": vision}
    v = registry().recipes["internvl2"].vision
    for name, (shape, kind) in vision_tensor_shapes(v, resolve_vision(v, config, H, None, "test")).items():
        t[name] = (r.norm(shape[0]) if kind == "norm" else r.bias(shape[0]) if kind == "bias" else
                   (r.rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32))
    return _write_checkpoint(target, config, t, tok_dir)


def make_internvl2_qwen2(target, tok_dir, vocab):
    """InternVL2-1B layout: a Qwen2 LLM under llm_config, its tensors under language_model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(cfg)
    randomize(model, 3)
    tensors = {f"language_model.{k}": v.numpy() for k, v in model.state_dict().items()}
    tensors["vision_model.embeddings.patch_embedding.weight"] = Rand(3).linear(32, 48)
    llm = cfg.to_dict()
    llm["architectures"] = ["Qwen2ForCausalLM"]
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "Hermes-2", "llm_config": llm}
    return _write_checkpoint(target, config, tensors, tok_dir)


def make_qwen2_5_vl(target, tok_dir, vocab):
    """Qwen2.5-VL as transformers >= 5 saves it: the language model's config under text_config, mRoPE
    sections [2, 3, 3] of head_dim 16, a 1-layer vision tower (visual.*, ignored by the bundle)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
                eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 3, vision_start_token_id=vocab - 5,
                           vision_end_token_id=vocab - 4, video_token_id=vocab - 2, tie_word_embeddings=False)
    return save_tiny(cfg, target, tok_dir, seed=4, model_cls=Qwen2_5_VLForConditionalGeneration)


@dataclass
class Family:
    recipe: str
    make: Callable
    reference: str
    quirks: list[str]
    long_from: int | None = None  # longrope: a forward whose largest position reaches this uses the long factors
    e2e: tuple[int, int, int, int, int] = (11, 40, 6, 20, 5)  # system, turn 1, forced 1, turn 2 new, forced 2
    notes: list[str] = field(default_factory=list)


FAMILIES = {
    "llama": Family("llama", make_llama, "transformers LlamaForCausalLM",
                    ["GQA", "llama3 rope scaling (factor 4, low/high freq 1/4, original 32)", "tied head",
                     "q/k/v/o and MLP biases (attention_bias, mlp_bias)"]),
    "qwen2": Family("qwen2", make_qwen2, "transformers Qwen2ForCausalLM",
                    ["q/k/v bias", "GQA", "rope theta 1e6", "tied head",
                     "sliding window 6 on layers >= max_window_layers (1) (config without layer_types), prompts of 80 tokens"]),
    "gemma2": Family("gemma2", make_gemma2, "transformers Gemma2ForCausalLM",
                     ["embedding x sqrt(hidden)", "RMSNorm (1+w)", "pre+post norms around attention and MLP",
                      "GeGLU (gelu tanh)", "attention logit softcap 2", "final logit softcap 1.5",
                      "query_pre_attn_scalar 20 != head_dim 24", "head_dim x heads != hidden",
                      "sliding window 5 on the layers transformers' default pattern picks (config without layer_types)"]),
    "gemma3": Family("gemma3", make_gemma3, "transformers Gemma3ForCausalLM",
                     ["Gemma2's block without softcaps", "q/k RMSNorm (1+w)", "global rope theta 1e4 with linear scaling x2",
                      "local (sliding) rope theta 100", "window pattern from sliding_window_pattern 3 (config without layer_types)",
                      "sliding window 5", "multi-query (1 KV head)"]),
    "phi": Family("phi", make_phi, "transformers PhiForCausalLM",
                  ["LayerNorm with bias", "parallel attention + MLP from one norm", "partial rotary 0.4 (8 of 20 dims)",
                   "GELU (tanh) MLP fc1/fc2 with biases", "q/k/v/dense biases", "lm_head bias", "untied head"]),
    "phi3": Family("phi3", make_phi3, "transformers Phi3ForCausalLM",
                   ["fused qkv_proj and gate_up_proj", "longrope short/long factors (original 64 of 256) with attention factor",
                    "partial rotary 0.5", "GQA", "sliding window 6 on every layer"], long_from=PHI3_ORIGINAL,
                   # end to end stays below long_from: one reference forward over the whole sequence would
                   # pick the long factors for every position, the runner (like transformers with a cache)
                   # per forward; the long factors are checked per layer instead
                   e2e=(7, 20, 4, 12, 4)),
    "minicpm": Family("minicpm", make_minicpm, "transformers LlamaForCausalLM, scales folded into its weights (re-layout)",
                      ["scale_emb 12 on embeddings", "residual branches x scale_depth/sqrt(L) (1.4/sqrt(2))",
                       "logits / (hidden/dim_model_base) (64/16)", "tied head", "GQA"]),
    "chatglm": Family("chatglm", make_chatglm, "transformers GlmForCausalLM (re-layout)",
                      ["fused query_key_value with bias", "multi-query groups (2 KV heads)",
                       "rotary on half the head dim, interleaved pairs", "rope_ratio 2 (theta 20000)",
                       "fused dense_h_to_4h (SwiGLU halves)", "ChatGLM config key names"]),
    "internvl2": Family("internvl2", make_internvl2, "transformers LlamaForCausalLM (re-layout of InternLM2)",
                        ["InternVL chat checkpoint: llm_config section, language_model. prefix, vision tensors ignored",
                         "packed grouped wqkv", "w1/w2/w3 names", "GQA", "dynamic NTK rope (inactive below 256)"]),
    "internvl2_qwen2": Family("internvl2_qwen2", make_internvl2_qwen2,
                              "transformers Qwen2ForCausalLM on llm_config (re-layout: prefix)",
                              ["InternVL chat checkpoint: llm_config section, language_model. prefix", "q/k/v bias",
                               "GQA", "untied head"]),
    "qwen2_5_vl": Family("qwen2_5_vl", make_qwen2_5_vl,
                         "transformers Qwen2ForCausalLM on text_config (text: mRoPE rows equal; tests/test_mrope.py: "
                         "Qwen2.5-VL itself, image positions)",
                         ["Qwen2_5_VLForConditionalGeneration checkpoint: text_config, visual.* ignored",
                          "mRoPE sections [2, 3, 3], indices [3, P]", "q/k/v bias", "GQA", "untied head"]),
}


# -- fixtures -------------------------------------------------------------------------------------------

def family_params():
    return [pytest.param(f, marks=pytest.mark.xdist_group(f"family-{f}"), id=f) for f in FAMILIES]


@pytest.fixture(scope="module", params=family_params())
def family(request, tmp_path_factory, tiny_tok):
    name = request.param
    fam = FAMILIES[name]
    tok_dir, vocab = tiny_tok
    ckpt = fam.make(tmp_path_factory.mktemp(f"ckpt_{name}"), tok_dir, vocab)
    recipe = registry().recipes[fam.recipe]
    bundles = {}
    for build, (wt, ht, pt) in BUILDS.items():
        out = tmp_path_factory.mktemp(f"bundle_{name}_{build}") / "b"
        # no model name: the recipe is detected from the checkpoint (InternVL: inside llm_config)
        manifest = quiet_build(input_path=str(ckpt), output_path=str(out), weight_type=wt, hidden_state_type=ht,
                               post_weight_type=pt, **SMALL_GROUPS)
        assert manifest["recipe"]["name"] == fam.recipe
        bundles[build] = Bundle(out)
    ref = load_reference(open_input(ckpt), recipe)
    return name, fam, ckpt, bundles, ref


class Groups:
    """A bundle seen through some of its shape groups (for layer_check)."""

    def __init__(self, bundle: Bundle, groups):
        self.spec, self.opts, self.groups, self.layer_file = bundle.spec, bundle.opts, list(groups), bundle.layer_file


def _max_position(group, length: int, prefill: int) -> tuple[int, int]:
    """(largest position, tokens needed) of a group's chunk in layer_check for a capture of `length`."""
    if group.index == 0:
        return length - 1, length
    start = 0 if group.dummy_history else group.history - 1
    return start + prefill - 2, start + prefill - 1


def layer_rows(fam: Family, bundle: Bundle, ref, vocab: int):
    """Layer-check rows for every group, and the capture the post check uses. With longrope the
    reference picks its factors from the largest position of the whole forward, so each group is
    checked against a capture whose length puts it on the same side of `long_from` as the graph."""
    P = bundle.opts.prefill_len
    ids = token_ids(LENGTH, vocab, 0)
    cap = capture(ref, ids)
    if fam.long_from is None:
        return layer_check(bundle, cap, Progress(enabled=False)), cap
    long_groups = [g for g in bundle.groups if _max_position(g, LENGTH, P)[0] >= fam.long_from]
    short_groups = [g for g in bundle.groups if g.index == 0 or _max_position(g, fam.long_from, P)[1] <= fam.long_from]
    assert {g.index for g in long_groups} | {g.index for g in short_groups} == {g.index for g in bundle.groups}
    assert [g for g in long_groups if g.index] and [g for g in short_groups if g.index]  # both regimes seen
    rows = layer_check(Groups(bundle, long_groups), cap, Progress(enabled=False))
    short = capture(ref, ids[:fam.long_from])
    rows += layer_check(Groups(bundle, short_groups), short, Progress(enabled=False))
    return rows, cap


def _record(name: str, fam: Family, build: str, check: str, cos: float, rel: float, lim: dict, passed: bool) -> str | None:
    """Write the measurement into docs/conformance.*; returns a complaint if the error outgrew the
    committed value (generator/data/conformance.yaml)."""
    return conformance.record(name, build, check, max_rel_err=rel, min_cosine=cos, passed=passed, reference=fam.reference,
                              quirks=fam.quirks, thresholds=lim)


# -- the checks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", list(BUILDS))
def test_every_layer_group_and_logits_match_reference(family, build, tiny_tok):
    name, fam, _, bundles, ref = family
    bundle = bundles[build]
    limits = thresholds(*BUILDS[build][:2])
    rows, cap = layer_rows(fam, bundle, ref, tiny_tok[1])
    assert {r["group"] for r in rows} == {g.index for g in bundle.groups} and len(bundle.groups) == 5
    assert {r["layer"] for r in rows} == set(range(bundle.spec.num_hidden_layers))
    lim = limits["layer"]
    cos, rel = min(r["cosine"] for r in rows), max(r["max_rel_err"] for r in rows)
    bad = failing_rows(rows, lim)
    grown = [_record(name, fam, build, "layers", cos, rel, lim, not bad)]
    post = logits_check(bundle, cap)
    lp = limits["logits"]
    post_ok = within(post["cosine"], post["max_rel_err"], lp)
    grown.append(_record(name, fam, build, "logits", post["cosine"], post["max_rel_err"], lp, post_ok))
    assert not bad, bad[:3]
    assert post_ok, post
    assert not any(grown), grown


@pytest.mark.parametrize("build", list(BUILDS))
def test_runner_end_to_end_matches_reference(family, build, tiny_tok):
    """A system prompt prefilled once; a prompt over several chunks on top; a second turn reusing
    the cache. Every step's logits against one reference forward over the whole sequence."""
    name, fam, _, bundles, ref = family
    bundle = bundles[build]
    lim = thresholds(*BUILDS[build][:2])["end_to_end"]
    n_sys, n1, f1, n2, f2 = fam.e2e
    assert n_sys + n1 + f1 + n2 + f2 <= bundle.opts.kv_cache_len
    res = conversation_check(bundle, ref, system=n_sys, turns=((n1, f1), (n2, f2)))
    worst_cos, worst_rel = res["worst_cosine"], res["worst_rel_err"]
    ok = within(worst_cos, worst_rel, lim)
    grown = _record(name, fam, build, "end_to_end", worst_cos, worst_rel, lim, ok)
    assert ok, (worst_cos, worst_rel, lim)
    assert not grown, grown


# -- positions exactly at every switch ----------------------------------------------------------------------

def placement_rows(bundle: Bundle, ref, ids: list[int], group, history: int, tokens: int) -> list[dict]:
    """Layer-check rows of one placement: `group`'s graphs with `history` cached rows and `tokens` new
    ones at positions history.., fed the reference's own inputs from one forward over exactly
    ids[:history + tokens] (so the forward's largest position is the chunk's, as for the runner)."""
    h, n, T = history, tokens, group.tokens
    rows_hist = bundle.opts.kv_cache_len if group.index == 0 else group.history_rows
    assert n <= T and h <= rows_hist and (h == 0 or not group.dummy_history)
    cap = capture(ref, ids[:h + n])
    hidden = bundle.opts.hidden_state_type
    dt, ot = STORAGE[hidden]
    kv, H = bundle.spec.kv_dim, bundle.spec.hidden_size
    mask = np.full((1, T, rows_hist + T), MASK_VALUE[hidden], np.float32)
    mask[0, :, :h] = 0
    mask[0, :, rows_hist:][np.tril(np.ones((T, T), bool))] = 0
    idx = np.zeros((bundle.spec.position_rows, T), np.uint32)  # mRoPE: 3 equal rows for text
    idx[:, :n] = np.arange(h, h + n)
    quantized = is_quantized(bundle.opts.weight_type)
    rows = []
    for i in range(bundle.spec.num_hidden_layers):
        k, v, x = np.zeros((1, rows_hist, kv), np.float32), np.zeros((1, rows_hist, kv), np.float32), np.zeros((1, T, H), np.float32)
        k[0, :h], v[0, :h], x[0, :n] = cap["keys"][i, :h], cap["values"][i, :h], cap["inputs"][i, h:h + n]
        sess = ort.InferenceSession(str(bundle.layer_file(i, group.index)), session_options(1, quantized),
                                    providers=["CPUExecutionProvider"])
        got = run_graph(sess, {"K_cache": (to_storage(k, hidden), ot), "V_cache": (to_storage(v, hidden), ot),
                               "indices": (idx, TensorProto.UINT32), "input": (to_storage(x, hidden), ot),
                               "mask": (to_storage(mask, hidden), ot)},
                        {name: ((1, T, H if name == "output" else kv), dt, ot) for name in ("K_cache_out", "V_cache_out", "output")})
        ref_out = {"K_cache_out": cap["keys"][i, h:], "V_cache_out": cap["values"][i, h:], "output": cap["outputs"][i, h:]}
        for name, want in ref_out.items():
            rows.append({"layer": i, "group": group.index, "history": h, "tokens": n, "tensor": name,
                         **compare(from_storage(got[name], hidden)[0, :n], want)})
    return rows


def switch_placements(fam: Family, bundle: Bundle) -> dict[str, tuple]:
    """name -> (group, history, tokens): every boundary the graphs have. The last KV row (decode at
    kv_cache_len - 1 over a full cache); each prefill group full (a whole chunk after exactly its
    history); the sliding window's edge (decode at window - 1: all keys inside; at window: key 0
    just outside); longrope's switch (decode and a prefill chunk ending at long_from - 1: short
    factors; at long_from: long factors)."""
    P, C = bundle.opts.prefill_len, bundle.opts.kv_cache_len
    decode = bundle.groups[0]
    out = {"last kv row": (decode, C - 1, 1)}
    for g in bundle.groups[1:]:
        out[f"group {g.index} full"] = (g, g.history, P)
    window = bundle.spec.sliding_window
    if window:
        out.update({"window - 1": (decode, window - 1, 1), "window": (decode, window, 1)})
    if fam.long_from is not None:
        f = fam.long_from
        chunk_group = next(g for g in bundle.groups[1:] if not g.dummy_history and g.history_rows >= f - P + 1)
        out.update({"longrope - 1 decode": (decode, f - 1, 1), "longrope decode": (decode, f, 1),
                    "longrope - 1 chunk": (chunk_group, f - P, P), "longrope chunk": (chunk_group, f - P + 1, P)})
    return out


@pytest.mark.parametrize("build", list(BUILDS))
def test_positions_exactly_at_every_switch_match_reference(family, build, tiny_tok):
    name, fam, _, bundles, ref = family
    bundle = bundles[build]
    lim = thresholds(*BUILDS[build][:2])["layer"]
    ids = token_ids(bundle.opts.kv_cache_len, tiny_tok[1], 3)
    bad, every = {}, []
    for where, (group, history, tokens) in switch_placements(fam, bundle).items():
        rows = placement_rows(bundle, ref, ids, group, history, tokens)
        every += rows
        failing = failing_rows(rows, lim)
        if failing:
            worst = min(failing, key=lambda r: r["cosine"])
            bad[where] = {k: worst[k] for k in ("layer", "group", "history", "tensor", "cosine", "max_rel_err")}
    grown = _record(name, fam, build, "switches", min(r["cosine"] for r in every), max(r["max_rel_err"] for r in every),
                    lim, not bad)
    assert not bad, bad
    assert not grown, grown


@pytest.mark.parametrize("history", ["board", "used"])
def test_runner_fills_every_group_to_its_cap_and_the_last_kv_row(family, history):
    """Through the runner: a 16-token system prompt (the 16-history group at its cap), a turn taking
    the cache to 32 (the 32 group's cap), one to 64 in two chunks (the 64 group's cap), then decodes
    up to the last KV row; every step's logits against one transformers forward (fp32 build: the
    tightest limits)."""
    name, fam, _, bundles, ref = family
    bundle = bundles["fp32"]
    if fam.long_from is not None:
        pytest.skip("one reference forward over the whole conversation picks the long factors for every position; "
                    "the longrope switch is checked per placement above")
    P, C = bundle.opts.prefill_len, bundle.opts.kv_cache_len
    assert [g.history for g in bundle.groups[2:]] == [P, 2 * P, 4 * P] and C == 6 * P  # the sizes below assume SMALL_GROUPS
    res = conversation_check(bundle, ref, system=P, turns=((P, 1), (2 * P - 1, C - 4 * P + 1)), history=history)
    assert res["prefilled"] == [P, 2 * P]
    lim = thresholds(*BUILDS["fp32"][:2])["end_to_end"]
    assert within(res["worst_cosine"], res["worst_rel_err"], lim), res


def test_every_family_of_the_issue_has_a_recipe_and_a_test():
    reg = registry()
    assert {f.recipe for f in FAMILIES.values()} <= set(reg.recipes)
    want = {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2-7b", "deepseek-r1-distill-qwen-1.5b",
            "deepseek-r1-distill-qwen-7b", "llama3.2-1b", "llama3.2-3b", "llama2-7b", "tinyllama-1.1b", "smollm-135m",
            "smollm-360m", "smollm-1.7b", "smollm2-360m", "smollm2-1.7b", "smollm2-135m-instruct",
            "deepseek-r1-distill-llama-8b", "gemma2-2b", "gemma3-270m", "gemma3-1b", "phi2", "phi3-mini",
            "phi3-mini-4k", "phi3-mini-128k", "minicpm-1b", "minicpm-2b", "chatglm3-6b", "internvl2-1b", "internvl2-2b",
            "internvl2-4b", "internvl2-8b"}
    assert want <= set(reg.variants)
    assert any(v.startswith("openbuddy-") and reg.variants[v] == "llama" for v in reg.variants)
    assert any(v.startswith("openbuddy-") and reg.variants[v] == "qwen2" for v in reg.variants)


# -- variant configs read as transformers reads them -------------------------------------------------------

def _transformers_view(recipe, raw: dict):
    """transformers' config for a variant: its own class, or the recipe's reference architecture."""
    import copy

    from transformers import AutoConfig

    from generator.verify.relayout import reference_config

    raw = copy.deepcopy(raw)  # transformers' config classes edit nested dicts (rope_scaling) in place
    if recipe.reference.architecture:
        import transformers

        cls = getattr(transformers, recipe.reference.architecture)
        return cls.config_class.from_dict(reference_config(recipe, raw))
    section = raw[recipe.config.section] if recipe.config.section else raw
    kwargs = {k: v for k, v in section.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return AutoConfig.for_model(section["model_type"], **kwargs)


def _inv_freq(tc, layer_type: str | None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rp = tc.rope_parameters
    params = rp[layer_type] if layer_type in rp else rp
    kind = params.get("rope_type", "default")
    if kind != "default":
        inv, attn = ROPE_INIT_FUNCTIONS[kind](tc, torch.device("cpu"), **({"layer_type": layer_type} if layer_type in rp else {}))
        return inv.numpy(), attn
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", 1.0) or 1.0))
    return 1.0 / (params["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)), 1.0


def test_every_variant_reads_like_transformers():
    """Each variant's exact config.json, resolved by its recipe, agrees with what transformers (or the
    reference architecture) derives from the same file: layer pattern, window, head_dim, RoPE
    frequencies and attention factor per layer type, vocabulary, tie."""
    from generator.resolve.spec import resolve_spec

    reg = registry()
    seen = 0
    for recipe in reg.recipes.values():
        for vname, v in recipe.variants.items():
            spec = resolve_spec(recipe, v.config, model_name=vname, max_positions=1023)
            tc = _transformers_view(recipe, v.config)
            L = spec.num_hidden_layers
            types = getattr(tc, "layer_types", None) or (
                ["sliding_attention"] * L if getattr(tc, "sliding_window", None) else ["full_attention"] * L)
            assert spec.layer_types == list(types), vname
            if "sliding_attention" in types:
                assert spec.sliding_window == tc.sliding_window, vname
            assert spec.head_dim == (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads), vname
            assert (spec.vocab_size, spec.hidden_size, spec.num_key_value_heads) == (
                tc.vocab_size, tc.hidden_size, tc.num_key_value_heads), vname
            if not recipe.reference.architecture:  # a re-layout may untie (MiniCPM's head is scaled)
                assert spec.tie_word_embeddings == bool(getattr(tc, "tie_word_embeddings", False)), vname
            for layer_type, table in spec.rope.items():
                nested = isinstance(tc.rope_parameters, dict) and layer_type in tc.rope_parameters
                inv, attn = _inv_freq(tc, layer_type if nested else None)
                np.testing.assert_allclose(table.inv_freq, inv, rtol=2e-6, err_msg=f"{vname} {layer_type}")
                assert table.attention_factor == pytest.approx(attn, rel=1e-6), vname
            seen += 1
    assert seen >= 30


def test_internvl_checkpoints_pick_the_recipe_of_their_language_model():
    reg = registry()
    for variant, recipe in (("internvl2-2b", "internvl2"), ("internvl2-1b", "internvl2_qwen2"),
                            ("internvl2-4b", "internvl2_phi3")):
        cfg = reg.recipes[recipe].variants[variant].config
        assert reg.by_architecture(cfg["architectures"], cfg["model_type"], cfg).name == recipe
    qwen = reg.recipes["qwen2"].variants["qwen2.5-0.5b"].config
    assert reg.by_architecture(qwen["architectures"], "qwen2", qwen).name == "qwen2"


# -- weight facts against the config -------------------------------------------------------------------------

@pytest.mark.xdist_group("family-chatglm")
def test_weight_facts_contradicting_the_config_are_errors(tmp_path, tiny_tok):
    tok_dir, vocab = tiny_tok
    (tmp_path / "glm").mkdir()
    ckpt = make_chatglm(tmp_path / "glm", tok_dir, vocab)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["add_qkv_bias"] = False  # but query_key_value.bias is in the checkpoint
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GeneratorError, match="query_key_value.bias"):
        quiet_build(input_path=str(ckpt), output_path=str(tmp_path / "out1"), **SMALL_GROUPS)
    cfg["add_qkv_bias"] = True
    cfg["tie_word_embeddings"] = True  # but output_layer differs from the embeddings
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GeneratorError, match="tie_word_embeddings"):
        quiet_build(input_path=str(ckpt), output_path=str(tmp_path / "out2"), **SMALL_GROUPS)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


# -- SYNTHETIC=1 ---------------------------------------------------------------------------------------------

SHRINK = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16}


def _shrunk(recipe, config: dict) -> dict:
    """A variant's config with small dimensions (same vocabulary, special ids and quirks), in the
    family's own key names."""
    cfg = json.loads(json.dumps(config))
    inner = cfg[recipe.config.section] if recipe.config.section else cfg
    for canonical, value in SHRINK.items():
        keys = recipe.config.aliases.get(canonical, [])
        keys = [keys] if isinstance(keys, str) else list(keys)
        for key in keys + [canonical]:
            if key in inner:
                if canonical == "num_key_value_heads":
                    value = min(value, inner[key])
                inner[key] = value
                break
    if isinstance(inner.get("layer_types"), list):
        inner["layer_types"] = inner["layer_types"][:SHRINK["num_hidden_layers"]]
    scaling = inner.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("mrope_section"):  # mRoPE: the same split of fewer rotated pairs
        section, pairs = scaling["mrope_section"], SHRINK["head_dim"] // 2
        scaled = [max(1, s * pairs // sum(section)) for s in section[:-1]]
        inner["rope_scaling"] = dict(scaling, mrope_section=scaled + [pairs - sum(scaled)])
    vision = cfg.get("vision_config")
    if isinstance(vision, dict) and "out_hidden_size" in vision:  # Qwen2.5-VL's tower, merged into the small LLM
        vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1],
                      out_hidden_size=SHRINK["hidden_size"])
    elif isinstance(vision, dict) and "num_hidden_layers" in vision:  # InternViT / SigLIP (HF key names)
        vision.update(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    return cfg


@pytest.fixture(scope="module")
def tiny_variants(tmp_path_factory):
    """A copy of recipes/ where every recipe has a '<recipe>-tiny' variant: its first variant's
    config.json with small dimensions."""
    import yaml

    from generator.paths import RECIPES_DIR

    target = tmp_path_factory.mktemp("recipes_tiny")
    for path in RECIPES_DIR.glob("*.yaml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        recipe = registry().recipes[data["name"]]
        first = next(v for v in recipe.variants.values() if v.config and not v.embedded)
        data["variants"][f"{data['name']}-tiny"] = {"description": "test", "config": _shrunk(recipe, first.config),
                                                    "chat_template": first.chat_template}
        (target / path.name).write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return target


def recipe_params():
    return [pytest.param(f.recipe, marks=pytest.mark.xdist_group(f"family-{name}"), id=f.recipe)
            for name, f in FAMILIES.items()]


@pytest.mark.parametrize("recipe_name", recipe_params())
def test_synthetic_build_verifies_for_every_family(recipe_name, tiny_variants, tmp_path, monkeypatch):
    """SYNTHETIC=1 end to end for every recipe (small dimensions, the variant's vocabulary and special
    ids): on-demand weights under the recipe's tensor names, which transformers' architecture (or the
    re-layout reference) must accept name by name, the generated tokenizer with the family's chat
    template, and check level 2."""
    monkeypatch.setenv("AXGEN_RECIPES_DIR", str(tiny_variants))
    monkeypatch.setenv("AXGEN_SYNTHETIC_CACHE", str(tmp_path / "cache"))
    # the generated tokenizer is byte-level: a long non-English system prompt takes many tokens
    m = quiet_build(model=f"{recipe_name}-tiny", synthetic=True, output_path=str(tmp_path / "b"), check_level=2,
                    **dict(SMALL_GROUPS, kv_cache_len=256))
    assert m["synthetic"] is True and m["checks"]["passed"], m["checks"]["failures"]
    assert m["input"]["files"]["weights"].startswith("synthetic")
    bundle = Bundle(tmp_path / "b")
    mod_ids = json.loads((bundle.tokenizer_dir / "ax_tokenizer.json").read_text())
    assert mod_ids["eos_ids"], "the synthetic tokenizer must know the family's end-of-turn token"
    # every id the model can produce decodes (the vocabulary is padded to the model's)
    from generator.runtime.chat import load_tokenizer_module

    tok = load_tokenizer_module(bundle).ChatTokenizer(bundle.tokenizer_dir)
    assert tok.vocab_size == bundle.spec.vocab_size
    tok.decode([bundle.spec.vocab_size - 1, 0])


@pytest.mark.xdist_group("synthetic-variant")
def test_synthetic_real_variant_builds_and_verifies(tmp_path, monkeypatch):
    """A real variant (SmolLM-135M-Instruct's exact config) with SYNTHETIC=1, check level 2."""
    monkeypatch.setenv("AXGEN_SYNTHETIC_CACHE", str(tmp_path / "cache"))
    m = quiet_build(model="smollm-135m", synthetic=True, output_path=str(tmp_path / "b"), check_level=2, **SMALL_GROUPS)
    assert m["checks"]["passed"], m["checks"]["failures"]
    assert m["spec"]["num_hidden_layers"] == 30 and m["spec"]["vocab_size"] == 49152


def test_synthetic_checkpoints_are_deterministic_and_lazy(tmp_path):
    from generator.inputs.synthetic import synthetic_checkpoint

    recipe = registry().recipes["qwen2"]
    a = synthetic_checkpoint(recipe, "qwen2.5-7b", cache_dir=tmp_path)
    b = synthetic_checkpoint(recipe, "qwen2.5-7b", cache_dir=tmp_path)
    assert a.dir == b.dir and not list(a.dir.glob("*.safetensors"))  # nothing big is written
    name = "model.layers.27.mlp.down_proj.weight"
    assert a.shape(name) == (3584, 18944) and "lm_head.weight" in a.names()  # 7B: untied head
    np.testing.assert_array_equal(a.tensor("model.layers.0.self_attn.q_proj.bias"), b.tensor("model.layers.0.self_attn.q_proj.bias"))


def test_a_variant_without_weights_names_both_ways_to_build_it():
    with pytest.raises(GeneratorError) as e:
        quiet_build(model="qwen2.5-0.5b")
    assert "INPUT=" in str(e.value) and "SYNTHETIC=1" in str(e.value)


def test_list_verified_shows_the_conformance_table(capsys, tmp_path, monkeypatch):
    """`list --verified` prints what was recorded, failures as FAIL (a table written here, not the
    committed one, whose rows the family tests above compute and assert)."""
    from generator.cli import main

    monkeypatch.setenv("AXGEN_CONFORMANCE_DIR", str(tmp_path))
    lim = thresholds("fp32", "fp32")["layer"]
    for fam, rel in (("chatglm", lim["max_rel_err"] / 10), ("gemma2", lim["max_rel_err"] * 10)):
        conformance.record(fam, "fp32", "end_to_end", max_rel_err=rel, min_cosine=1.0, passed=rel <= lim["max_rel_err"],
                           reference="ref", quirks=["q"], thresholds=lim)
    assert main(["list", "--verified"]) == 0
    out = capsys.readouterr().out
    for name in ("qwen2.5-0.5b", "gemma2-2b", "chatglm3-6b", "internvl2-8b"):
        assert name in out
    rows = {line.split()[1]: line for line in out.splitlines() if line.split()[1:2] in (["chatglm"], ["gemma2"])}
    assert "end_to_end" in rows["chatglm"] and "pass" in rows["chatglm"] and "1e-05" in rows["chatglm"]
    assert "FAIL" in rows["gemma2"] and "1e-03" in rows["gemma2"]
    assert "| gemma2 | end_to_end | 1e-03 (limit 0.0001) | - | FAIL |" in (tmp_path / "conformance.md").read_text()


def test_an_error_outgrowing_the_committed_value_is_reported(monkeypatch):
    import yaml

    rule = yaml.safe_load(conformance.GROWTH.read_text())
    committed = {"families": {"llama": {"checks": {"layers": {"s8": {"max_rel_err": "2e-02"}}}}}}
    monkeypatch.setattr(conformance, "committed", lambda: committed)
    limit = 0.1
    base = max(0.02, rule["noise_fraction"] * limit)
    assert conformance.growth("llama", "s8", "layers", base * rule["max_growth"], limit) is None
    grown = conformance.growth("llama", "s8", "layers", base * rule["max_growth"] * 1.01, limit)
    assert grown and "llama layers s8" in grown and "2e-02" in grown
    assert conformance.growth("llama", "fp32", "layers", 1.0, limit) is None  # nothing committed: nothing to outgrow
    # below the noise floor (a fraction of the limit) a result may move freely
    committed["families"]["llama"]["checks"]["layers"]["fp32"] = {"max_rel_err": "1e-07"}
    assert conformance.growth("llama", "fp32", "layers", rule["noise_fraction"] * 1e-4, 1e-4) is None


def test_the_committed_table_is_complete_and_passing():
    """The baseline the family tests compare with has every family, check and build, all passing."""
    data = conformance.committed()
    assert set(data["families"]) >= set(FAMILIES)
    for name in FAMILIES:
        checks = data["families"][name]["checks"]
        assert set(checks) == set(conformance.CHECKS), name
        for check, builds in checks.items():
            assert set(builds) == set(BUILDS) and all(b["passed"] for b in builds.values()), (name, check)
