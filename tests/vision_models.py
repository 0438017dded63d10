"""Shared steps of the InternVL-family vision tests (tests/test_vision_internvl*.py, test_vision_internlm2.py):
the teacher-forced first step of an image prompt, and the image-prompt end-to-end check against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import vision_rows
from models import threads
from tokenizer_fixtures import copy_tokenizer_files, make_qwen_style_dir

from generator.runtime.chat import Chat
from generator.runtime.engine import Engine
from generator.runtime.vision import image_rows


def tiny_tokenizer(factory, name: str) -> tuple[Path, dict[str, int], int]:
    """A Qwen-style tokenizer folder for a tiny InternVL2 checkpoint: the folder, its added tokens' ids and the
    vocabulary size that covers them."""
    tok_dir = make_qwen_style_dir(factory.mktemp(name), img_token_num=0)
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    size = max(max(vocab["model"]["vocab"].values()), *ids.values()) + 1
    return tok_dir, ids, size


def save_internvl_checkpoint(target: Path, weights: dict[str, np.ndarray], tok_dir: Path, llm: dict, template: str,
                             size: int, qkv_bias: bool, qk_normalization: bool, norm_type: str) -> None:
    """Writes a tiny InternVL2 checkpoint in the remote-code layout (InternVLChatModel, an InternViT of 2 layers
    of width 32, patch 14, `size`-pixel tiles) with `llm` as its llm_config and the tokenizer of `tok_dir`."""
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(target / "model.safetensors"))
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": size,
              "patch_size": 14, "qkv_bias": qkv_bias, "qk_normalization": qk_normalization, "norm_type": norm_type,
              "layer_norm_eps": 1e-6, "hidden_act": "gelu", "num_channels": 3}
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": template,
              "downsample_ratio": 0.5, "force_image_size": size, "select_layer": -1, "ps_version": "v2",
              "vision_config": vision, "llm_config": llm}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer_files(tok_dir, target)


def first_step_logits(chat: Chat, prompt: list[int], image: np.ndarray, keep: int = 0) -> np.ndarray:
    """The first step's logits for `prompt`, teacher-forced: the cache rewound to `keep` tokens, the rest of
    the prompt prefilled again with the image's rows in place."""
    e = chat.engine
    e.rewind(keep)
    e.image_rows = image_rows(prompt, [chat.vision().encode(image)], chat.b.manifest.vision.img_context_token_id)
    logits: list = []
    list(chat.gen.stream(prompt, 1, logits_out=logits))
    e.image_rows = {}
    return np.asarray(logits[0], np.float32)


def check_image_prompt_end_to_end(tiny, bundle, limits) -> None:
    """An image turn's greedy tokens (up to `generate`'s min_prefix) and its teacher-forced first-step logits
    (within `end_to_end`'s limits) against the bf16 transformers reference; `limits(bundle, kind)`."""
    # imported here: test_vision_internvl imports this module
    from test_vision_internvl import bf16_reference, metrics, pixel_values, reference_greedy, test_image

    model = bf16_reference(tiny[0])
    chat = Chat(bundle, Engine(bundle, threads=threads()), system_prompt="You are a bot.")
    chat.reset()
    image = test_image(seed=2)
    "".join(chat.turn("What is in the picture?", max_new_tokens=6, images=[image]))
    e, n = chat.engine, chat.stats.prompt_tokens
    prompt, ours = e.cached_ids[:n], e.cached_ids[n:]
    assert prompt.count(bundle.manifest.vision.img_context_token_id) == 4
    ref_tokens, ref_logits = reference_greedy(model, prompt, pixel_values(chat.vision().pixels(image), bundle), 6)
    k = min(len(ours), limits(bundle, "generate")["min_prefix"])
    assert ours[:k] == ref_tokens[:k]
    cos, rel = metrics(first_step_logits(chat, prompt, image), ref_logits)
    lim = limits(bundle, "end_to_end")
    assert cos >= lim["min_cosine"] and rel <= lim["max_rel_err"], (cos, rel)


def check_recorded_end_to_end(family: str, bundle, cos: float, rel: float, lim: dict, ours: list[int],
                              ref: list[int], reference: str, quirks) -> None:
    """Records an image turn's `image_end_to_end` row (vision_rows) and checks it: our greedy tokens equal the
    reference's (`ours`, `ref`: the compared prefixes), the first-step logits within `lim`, and the row has not
    outgrown the committed baseline."""
    ok = cos >= lim["min_cosine"] and rel <= lim["max_rel_err"]
    grown = vision_rows.record(family, bundle.opts.weight_type, "image_end_to_end", cos, rel, lim,
                               ok and ours == ref, reference, quirks)
    assert ours == ref, (ours, ref)
    assert ok, (cos, rel)
    assert not grown, grown
