"""SYNTHETIC=1: a checkpoint with the variant's exact config.json and deterministic random weights.

Nothing is downloaded and nothing big is written: the checkpoint directory (under
.cache/synthetic/) holds config.json, generation_config.json and a generated tokenizer; every tensor
is produced on demand from (seed, tensor name), so a 7B variant builds in the memory of one layer.
The tensor names and shapes are the recipe's own map (tensors.layer / split) applied to the
resolved spec; for families transformers implements, the reference model loads the same tensors by
name and refuses names its architecture lacks, so the recipe's map is checked against transformers.

Weights (documented in the build manifest as `synthetic`):
  (noise is uniform with the stated standard deviation, drawn per tensor name; uniform is several
  times faster to draw than Gaussian and a 7B variant draws 7e9 of them)
  - linear weights std 1/sqrt(fan_in); biases std 0.05;
  - norm weights 1 + std 0.1 as the model computes them (stored minus a recipe weight_offset);
  - the embedding table std 4/embedding_scale, so the scaled rows the first layer sees have std 4;
  - an untied head is the embedding table plus noise of half its std.
  Why: with every layer adding O(1) to the residual stream (Gemma's post-norms do so whatever the
  weights), small embeddings and an independent head give near-tied logits for every token (the
  argmax of 100k Gaussians), which any quantization reorders, and the level-2 check would compare
  noise. With strong embeddings and a head correlated with them, the last token's identity
  dominates the final hidden state: greedy decoding is decisive (such a model mostly repeats its
  input) and the check compares something stable. The per-layer check is unaffected by this choice.

Tokenizer: the family's chat template (recipe chat.templates) over a small byte-level BPE trained
on a fixed text, with the template's special tokens at their real ids (from the recipe and the
config's bos/eos ids) and the rest of the vocabulary filled with `<|synthetic_N|>` tokens, so that
every id a random model can generate decodes (the tokenizer server rejects ids beyond its vocabulary).
Text is tokenized as bytes; ids differ from the real tokenizer's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import GeneratorError
from ..paths import CACHE_DIR
from ..recipe import ChatTemplate, Recipe
from ..recipe.tensors import LAYER, MODEL, bias_expected, expected_shapes, norm_offset
from ..resolve.spec import ArchSpec, resolve_spec
from .source import TensorSource, sha256_file

CACHE = CACHE_DIR / "synthetic"
FORMAT = 2
EMBED_STD = 4.0  # of the embedding rows as the first layer sees them (after the family's embedding scale)
BPE_SIZE = 1000
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 1+1=2, 2+2=4, 3*7=21, 10/2=5.",
    "You are a helpful assistant. Answer the question briefly and correctly, please.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "你好，世界！今天天气很好。我们去公园散步吧。人工智能正在改变世界。",
    "Hello world, this is a synthetic tokenizer for random-weight builds of real model configs.",
    "system user assistant model Instruct Output: think step by step",
]


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def tensor_plan(recipe: Recipe, spec: ArchSpec) -> dict[str, tuple[tuple[int, ...], str, float]]:
    """HF tensor name -> (shape, kind, std-ish parameter), from the recipe's tensor map."""
    shapes = expected_shapes(spec)
    t = recipe.tensors
    h, v = spec.hidden_size, spec.vocab_size
    emb_std = EMBED_STD / (spec.embedding_scale or 1.0)
    plan: dict[str, tuple[tuple[int, ...], str, float]] = {
        f"{t.embed_tokens}.weight": ((v, h), "embed", emb_std),
        f"{t.norm}.weight": ((h,), "norm", spec.final_norm.weight_offset),
    }
    if MODEL["norm"].bias(spec):
        plan[f"{t.norm}.bias"] = ((h,), "bias", 0.0)
    if not spec.tie_word_embeddings:
        if not t.lm_head:
            raise GeneratorError(f"Recipe '{recipe.name}': the head is untied but tensors.lm_head is not set.")
        plan[f"{t.lm_head}.weight"] = ((v, h), "head", emb_std)
    if spec.lm_head_bias:
        plan[f"{t.lm_head}.bias"] = ((v,), "bias", 0.0)
    for i in range(spec.num_hidden_layers):
        for key, path in t.paths().items():
            split = t.split.get(key)
            parts = [p for p in (split.into if split else [key]) if p in shapes]
            if not parts:
                continue
            base = path.format(i=i)
            rows = sum(shapes[p][0] for p in parts)
            if key in LAYER and LAYER[key].kind == "norm":
                plan[f"{base}.weight"] = ((rows,), "norm", norm_offset(spec, key))
            else:
                plan[f"{base}.weight"] = ((rows, shapes[parts[0]][1]), "linear", 0.0)
            if any(bias_expected(spec, p) for p in parts):
                plan[f"{base}.bias"] = ((rows,), "bias", 0.0)
    return plan


class SyntheticCheckpoint(TensorSource):
    """A tensor source whose tensors are generated on demand (deterministic per name)."""

    kind = "synthetic"

    def __init__(self, directory: Path, config: dict, plan: dict, seed: int, source: str):
        super().__init__(directory, config, source)
        self.plan = plan
        self.seed = seed
        self._embed_name = next(n for n, p in plan.items() if p[1] == "embed")

    def names(self) -> set[str]:
        return set(self.plan)

    def has(self, name: str) -> bool:
        return name in self.plan

    def shape(self, name: str) -> tuple[int, ...]:
        return self.plan[name][0]

    def _noise(self, name: str, shape) -> np.ndarray:
        """Zero-mean, unit-variance noise (uniform: several times faster to draw than Gaussian)."""
        x = np.random.default_rng(_seed(self.seed, name)).random(shape, dtype=np.float32)
        x -= np.float32(0.5)
        x *= np.float32(np.sqrt(12.0))
        return x

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.plan:
            raise self.missing(name)
        shape, kind, p = self.plan[name]
        x = self._noise(name, shape)
        if kind in ("linear", "conv"):  # conv [out, in, kh, kw]: fan-in in * kh * kw
            x *= np.float32(1.0 / np.sqrt(np.prod(shape[1:])))
        elif kind == "table":  # vision class token and position table
            x *= np.float32(0.02)
        elif kind == "norm":  # the model computes (stored + offset) ~ 1 + N(0, 0.1^2)
            x = np.float32(1.0 - p) + np.float32(0.1) * x
        elif kind == "bias":
            x *= np.float32(0.05)
        elif kind == "embed":
            x *= np.float32(p)
        elif kind == "head":  # embed + noise, in place: two vocab-sized tables at a time, not four
            x *= np.float32(0.5 * p)
            x += self.tensor(self._embed_name)
        return x

    def torch_tensor(self, name: str):
        import torch

        return torch.from_numpy(self.tensor(name))

    def fingerprint(self) -> dict[str, str]:
        return {"config.json": sha256_file(self.dir / "config.json"), "weights": f"synthetic (format {FORMAT}, seed {self.seed}): generated on demand"}


# -- tokenizer -------------------------------------------------------------------------------------

def _special_ids(template: ChatTemplate, config: dict, vocab: int) -> dict[str, int | None]:
    first = lambda v: (v[0] if v else None) if isinstance(v, list) else v  # noqa: E731
    ids: dict[str, int | None] = dict(template.special_tokens)
    for token, key in ((template.bos_token, "bos_token_id"), (template.eos_token, "eos_token_id"),
                       (template.pad_token, "pad_token_id")):
        taken = {i for t, i in ids.items() if t != token}
        if token and ids.get(token) is None and first(config.get(key)) not in taken:
            ids[token] = first(config.get(key))
    seen: dict[int, str] = {}
    for token, i in ids.items():
        if i is None:
            continue
        if not 0 <= i < vocab:
            raise GeneratorError(f"chat template special token {token!r} has id {i}, outside the vocabulary ({vocab}).")
        if i in seen:
            raise GeneratorError(f"chat template special tokens {seen[i]!r} and {token!r} both have id {i}.")
        seen[i] = token
    return ids


def write_tokenizer(target: Path, template: ChatTemplate, config: dict, vocab_size: int) -> dict[str, int]:
    """A byte-level BPE padded to `vocab_size`, the template's special tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _special_ids(template, config, vocab_size)
    trainer = trainers.BpeTrainer(vocab_size=min(BPE_SIZE, vocab_size - len(specials)), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(trained.to_str())["model"]
    taken = {i: t for t, i in specials.items() if i is not None}
    vocab: dict[str, int] = {}
    free = (i for i in range(vocab_size) if i not in taken)
    for token, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        if token not in specials:
            vocab[token] = next(free)
    for token, i in specials.items():
        vocab[token] = i if i is not None else next(free)
    final = vocab
    for i in free:
        final[f"<|synthetic_{i}|>"] = i
    if len(final) != vocab_size:
        raise GeneratorError(f"synthetic tokenizer: {len(final)} tokens for a vocabulary of {vocab_size}.")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=final, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=template.bos_token, eos_token=template.eos_token,
                                   pad_token=template.pad_token, chat_template=template.jinja,
                                   extra_special_tokens=[t for t in specials if t not in
                                                         (template.bos_token, template.eos_token, template.pad_token)])
    fast.save_pretrained(target)
    return {t: final[t] for t in specials}


# -- the checkpoint ---------------------------------------------------------------------------------

def variant_config(recipe: Recipe, variant: str | None) -> dict:
    v = recipe.variants.get(variant) if variant else None
    if v is None or not v.config:
        raise GeneratorError(f"SYNTHETIC=1 needs a model variant with its config.json in recipe '{recipe.name}' "
                             f"(variants: {', '.join(recipe.variants) or 'none'}).")
    return copy.deepcopy(v.config)  # a copy: transformers' config classes edit nested dicts in place


def synthetic_checkpoint(recipe: Recipe, variant: str | None, *, config: dict | None = None, seed: int = 0,
                         cache_dir: Path | None = None, spec: ArchSpec | None = None) -> SyntheticCheckpoint:
    """Random weights with the exact config of `variant` (or an explicit config.json dict). `spec`: the
    config's resolved spec when the caller has it (a build does), else it is resolved here."""
    config = copy.deepcopy(config) if config is not None else variant_config(recipe, variant)
    name = variant or recipe.name
    if spec is None:
        spec = resolve_spec(recipe, config, model_name=name, max_positions=1, where=f"recipe variant {name}")
    template = recipe.chat_template(variant)
    if template is None:
        raise GeneratorError(f"Recipe '{recipe.name}' has no chat template for a synthetic tokenizer (chat.template).")
    plan = tensor_plan(recipe, spec)
    from ..recipe.vision import vision_section

    if recipe.vision is not None and vision_section(recipe.vision, config) is not None:
        from ..recipe.vision import resolve_vision, vision_tensor_shapes

        vspec = resolve_vision(recipe.vision, config, spec.hidden_size, None, recipe.source)
        plan.update({n: (shape, kind, 0.0) for n, (shape, kind) in vision_tensor_shapes(recipe.vision, vspec).items()})
    key = hashlib.sha256(json.dumps([FORMAT, seed, config, template.model_dump()], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("AXGEN_SYNTHETIC_CACHE") or CACHE)
    directory = root / f"{name}-{key}"
    if not (directory / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            ids = write_tokenizer(tmp, template, config, spec.vocab_size)
            eos = list(spec.eos_token_ids)
            if template.eos_token and ids[template.eos_token] not in eos:
                eos.append(ids[template.eos_token])
            gen = {"bos_token_id": spec.bos_token_id, "eos_token_id": eos}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            (tmp / "synthetic.json").write_text(json.dumps({
                "what": "SYNTHETIC=1 checkpoint: the variant's exact config.json, deterministic random weights "
                        "generated on demand (none stored), a generated byte-level tokenizer",
                "recipe": recipe.name, "variant": variant, "seed": seed, "format": FORMAT,
                "special_tokens": ids}, indent=2, ensure_ascii=False) + "\n")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
            try:
                os.replace(tmp, directory)
            except OSError:  # another process made it first
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return SyntheticCheckpoint(directory, config, plan, seed, f"synthetic:{name}")
