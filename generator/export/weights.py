"""Weights: HF tensors -> canonical tensors, by recipe data, with conversion-time rewrites.

The recipe's tensor map says where each canonical tensor lives; fused checkpoint tensors are cut
into their canonical parts; and quirks that are pure weight algebra are applied here rather than
in the graph (llama.cpp's policy): Gemma's (1 + w) norm offset, MiniCPM's residual and logit
scales. Every fact the weights state is checked against the resolved spec: shapes, biases, the tied
head. A contradiction is an error, never a guess.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import numpy as np

from ..errors import GeneratorError
from ..inputs.source import TensorSource
from ..recipe import Recipe
from ..recipe.tensors import MODEL, NORMS, bias_expected, expected_shapes, norm_offset
from ..resolve.spec import ArchSpec

class WeightSource:
    """Canonical tensors of one checkpoint under one recipe (read lazily, one layer at a time)."""

    def __init__(self, ckpt: TensorSource, recipe: Recipe, spec: ArchSpec):
        self.ckpt, self.recipe, self.spec = ckpt, recipe, spec
        self.shapes = expected_shapes(spec)
        self.check_unused()

    def _name(self, path: str, i: int, suffix: str) -> str:
        return path.format(i=i) + "." + suffix

    def _layer_map(self, i: int):
        """(key, parts, weight name, bias name) of each mapped layer-i tensor this spec needs."""
        t = self.recipe.tensors
        for key, path in t.paths().items():
            parts = t.split[key].into if key in t.split else [key]
            if any(p in self.shapes for p in parts):
                yield key, parts, self._name(path, i, "weight"), self._name(path, i, "bias")

    def reads(self) -> set[str]:
        """Every checkpoint tensor name the build reads or checks (a bias the spec does not expect is
        checked, and refused, where it is read)."""
        t, spec = self.recipe.tensors, self.spec
        names = {f"{t.embed_tokens}.weight", f"{t.norm}.weight"}
        if spec.final_norm.kind == "layer_norm":
            names.add(f"{t.norm}.bias")
        if t.lm_head:
            names.update((f"{t.lm_head}.weight", f"{t.lm_head}.bias"))
        for i in range(spec.num_hidden_layers):
            for _, _, w_name, b_name in self._layer_map(i):
                names.update((w_name, b_name))
        return names

    def check_unused(self):
        """Fail on checkpoint tensors the recipe neither reads nor declares ignored (tensors.ignore):
        a tensor left out (a family's new q_norm, a config with fewer layers than the weights)
        otherwise builds and only shows as wrong numbers."""
        ignore = self.recipe.tensors.ignore
        unused = sorted(n for n in self.ckpt.names() - self.reads() if not any(fnmatchcase(n, p) for p in ignore))
        if unused:
            more = f" and {len(unused) - 6} more" if len(unused) > 6 else ""
            raise GeneratorError(f"Checkpoint '{self.ckpt.source}' has {len(unused)} tensor(s) that recipe "
                                 f"'{self.recipe.name}' with this config.json does not use: {', '.join(unused[:6])}{more}. "
                                 f"Leaving a tensor out changes the model's numbers: map it in the recipe's tensors "
                                 f"section, or, if the model does not need it (a vision tower, a rotary buffer), add "
                                 f"a pattern for it to tensors.ignore.")

    def _read(self, name: str, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
        if not self.ckpt.has(name):
            raise GeneratorError(f"Checkpoint '{self.ckpt.source}' lacks tensor '{name}' ({what}), which recipe "
                                 f"'{self.recipe.name}' maps there; the checkpoint does not match the recipe.")
        t = self.ckpt.torch_tensor(name)
        if not t.is_floating_point():
            raise GeneratorError(f"{self.ckpt.file_of(name)}: tensor '{name}' ({what}) has dtype "
                                 f"{str(t.dtype).removeprefix('torch.')}; expected floating point (fp32, fp16, bf16).")
        arr = t.float().numpy()
        if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):  # min/max propagate NaN
            bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
            raise GeneratorError(f"{self.ckpt.file_of(name)}: tensor '{name}' ({what}) holds {bad} NaN or infinite "
                                 f"values; the checkpoint is damaged or was saved from a diverged model.")
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise GeneratorError(f"Checkpoint tensor '{name}' ({what}) has shape {tuple(arr.shape)}, but config.json "
                                 f"with recipe '{self.recipe.name}' implies {tuple(shape)}. The checkpoint's config "
                                 f"contradicts its weights or the recipe.")
        return arr

    def _split(self, fused: np.ndarray, parts: list[str], layout: str, name: str) -> dict[str, np.ndarray]:
        sizes = [self.shapes[p][0] for p in parts]
        if fused.shape[0] != sum(sizes):
            raise GeneratorError(f"Fused tensor '{name}' has {fused.shape[0]} output rows; its parts {parts} need "
                                 f"{sum(sizes)} ({' + '.join(map(str, sizes))}).")
        if layout == "grouped":
            # per KV head: [q rows for the heads it serves, k rows, v rows] (InternLM2 wqkv)
            s = self.spec
            g, d = s.num_attention_heads // s.num_key_value_heads, s.head_dim
            rest = fused.shape[1:]
            grouped = fused.reshape(s.num_key_value_heads, g + 2, d, *rest)
            q = grouped[:, :g].reshape(s.q_dim, *rest)
            k = grouped[:, g].reshape(s.kv_dim, *rest)
            v = grouped[:, g + 1].reshape(s.kv_dim, *rest)
            return dict(zip(parts, (q, k, v)))
        out, start = {}, 0
        for part, size in zip(parts, sizes):
            out[part] = fused[start:start + size]
            start += size
        return out

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Canonical tensors of layer i: '<name>.weight' ([out, in] for linears) and '<name>.bias'; for a
        GPTQ-packed linear also '<name>.grid' (inputs.gptq.Grid, or why it has none)."""
        spec, t = self.spec, self.recipe.tensors
        out: dict[str, np.ndarray] = {}
        for key, parts, w_name, b_name in self._layer_map(i):
            split = t.split.get(key)
            w_shape = None if split else self.shapes[key]
            w = self._read(w_name, w_shape, f"layer {i} {key}")
            has_bias = self.ckpt.has(b_name)
            expect_bias = [bias_expected(spec, p) for p in parts]
            if has_bias and not any(expect_bias):
                raise GeneratorError(f"Checkpoint has '{b_name}', but config.json with recipe '{self.recipe.name}' says "
                                     f"{key} has no bias. Fix the recipe's bias setting or the checkpoint.")
            if any(expect_bias) and not has_bias:
                raise GeneratorError(f"Checkpoint lacks '{b_name}', but config.json with recipe '{self.recipe.name}' "
                                     f"says {key} has a bias.")
            b = self._read(b_name, None, f"layer {i} {key} bias") if has_bias else None
            if split:
                ws = self._split(w, parts, split.layout, w_name)
                bs = self._split(b, parts, split.layout, b_name) if b is not None else {}
                for p in parts:
                    if ws[p].shape != self.shapes[p]:
                        raise GeneratorError(f"Fused tensor '{w_name}' part {p} has shape {ws[p].shape}, expected {self.shapes[p]}.")
                    out[f"{p}.weight"] = np.ascontiguousarray(ws[p])
                    if p in bs:
                        out[f"{p}.bias"] = np.ascontiguousarray(bs[p])
            else:
                out[f"{key}.weight"] = w
                if b is not None:
                    out[f"{key}.bias"] = b
                gptq = getattr(self.ckpt, "gptq", None)
                if gptq is not None and gptq.is_packed(w_name):  # its own codes, for a build that keeps them
                    out[f"{key}.grid"] = gptq.grid(w_name)
        missing = [n for n in self.shapes if f"{n}.weight" not in out]
        if missing:
            raise GeneratorError(f"Recipe '{self.recipe.name}' gives no checkpoint tensor for {missing} of layer {i}.")
        return self._rewrite_layer(out)

    def _rewrite_layer(self, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.spec
        for n in NORMS:  # Gemma's x * (1 + w): the offset is folded into the stored weight
            if f"{n}.weight" in w and norm_offset(spec, n):
                w[f"{n}.weight"] = w[f"{n}.weight"] + np.float32(norm_offset(spec, n))
        if spec.residual_scale != 1.0:
            for n in ("o_proj", "down_proj"):
                for suffix in ("weight", "bias"):
                    if f"{n}.{suffix}" in w:
                        w[f"{n}.{suffix}"] = w[f"{n}.{suffix}"] * np.float32(spec.residual_scale)
                if not isinstance(w.get(f"{n}.grid", ""), str):
                    w[f"{n}.grid"] = w[f"{n}.grid"].scaled(spec.residual_scale)
        return w

    def embed_tokens(self) -> np.ndarray:
        """The input embedding table as the reference computes it (before embedding_scale)."""
        return self._read(self.recipe.tensors.embed_tokens + ".weight", MODEL["embed_tokens"].shape(self.spec),
                          "embed_tokens")

    def final_norm(self) -> dict[str, np.ndarray]:
        spec = self.spec
        base = self.recipe.tensors.norm
        shape = MODEL["norm"].shape(spec)
        out = {"weight": self._read(base + ".weight", shape, "final norm")}
        if MODEL["norm"].bias(spec):
            out["bias"] = self._read(base + ".bias", shape, "final norm bias")
        if spec.final_norm.weight_offset:
            out["weight"] = out["weight"] + np.float32(spec.final_norm.weight_offset)
        return out

    def lm_head(self, embed: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """lm_head [vocab, hidden] (+ bias), with the logit scale folded in."""
        spec, path = self.spec, self.recipe.tensors.lm_head
        name = f"{path}.weight" if path else None
        present = bool(name) and self.ckpt.has(name)
        if spec.tie_word_embeddings:
            w = embed if embed is not None else self.embed_tokens()
            if present:
                sep = self._read(name, (spec.vocab_size, spec.hidden_size), "lm_head")
                if not np.array_equal(sep, w):
                    raise GeneratorError(f"config.json says tie_word_embeddings is true, but the checkpoint has a separate "
                                         f"'{name}' that differs from the embedding table. Set tie_word_embeddings "
                                         f"to false in config.json if the head is untied.")
        else:
            if not present:
                raise GeneratorError(f"config.json says the head is untied (tie_word_embeddings false), but the "
                                     f"checkpoint has no '{name}'.")
            w = self._read(name, (spec.vocab_size, spec.hidden_size), "lm_head")
        out = {"weight": w}
        bias_name = f"{path}.bias" if path else None
        if spec.lm_head_bias:
            out["bias"] = self._read(bias_name, (spec.vocab_size,), "lm_head bias")
        elif bias_name and self.ckpt.has(bias_name):
            raise GeneratorError(f"Checkpoint has '{bias_name}', but recipe '{self.recipe.name}' says the head has no bias.")
        if spec.logit_scale != 1.0:
            out = {k: v * np.float32(spec.logit_scale) for k, v in out.items()}
        return out
