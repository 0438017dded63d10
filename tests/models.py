"""Tiny random-weight checkpoints made with transformers, and a quiet build helper for tests."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console

from tokenizer_fixtures import copy_tokenizer_files, make_qwen_style_dir

SMALL_GROUPS = dict(prefill_len=16, kv_cache_len=96, last_kv_cache_len=[16, 32, 64], group_size=16)


def tiny_tokenizer(target: Path) -> tuple[Path, int]:
    """A tiny byte-level BPE with a chat template; returns (dir, vocabulary size incl. added tokens)."""
    if not (target / "tokenizer.json").is_file():
        make_qwen_style_dir(target, img_token_num=0)
    vocab = json.loads((target / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + sum(1 for t in vocab["added_tokens"] if t["id"] >= len(vocab["model"]["vocab"]))
    return target, size


def randomize(model: torch.nn.Module, seed: int = 0, norm_noise: float = 0.3):
    """Weights with enough spread that every quirk shows in the outputs (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + norm_noise * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / np.sqrt(p.shape[-1])))


def save_tiny(config, target: Path, tokenizer_dir: Path, seed: int = 0, model_cls=None,
              edit: Callable[[dict], None] | None = None) -> Path:
    """Save a random model of `config` as safetensors + the tokenizer files into `target`; `edit`
    may rewrite the saved config.json (to drop keys real Hub configs do not have)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config) if model_cls is None else model_cls(config)
    randomize(model, seed)
    model.save_pretrained(target, safe_serialization=True)
    if edit:
        path = target / "config.json"
        cfg = json.loads(path.read_text())
        edit(cfg)
        path.write_text(json.dumps(cfg, indent=2))
    copy_tokenizer_files(tokenizer_dir, target)
    return target


def threads() -> int:
    """Intra-op threads for engines made in this test process: the process-wide pool's size if one
    exists (onnxruntime then refuses sessions with their own pools), else 1, which creates no global
    pool (one would break the plain onnxruntime sessions of other tests in this worker)."""
    from generator.runtime import ort

    return ort.global_pool_size() or 1


def token_ids(n: int, vocab: int, seed: int) -> list[int]:
    """n random token ids below vocab."""
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def tiny_llama_config(vocab: int, **overrides):
    from transformers import LlamaConfig

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=vocab, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=None)
    base.update(overrides)
    return LlamaConfig(**base)


def quiet_build(**kwargs):
    """pipeline.build without terminal noise; returns the manifest."""
    from generator.pipeline import build

    kwargs.setdefault("progress", False)
    kwargs.setdefault("console", Console(file=io.StringIO(), width=120))
    return build(**kwargs)
