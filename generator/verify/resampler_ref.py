"""The reference of a vision part with a perceiver resampler (MiniCPM-V), for the vision checks.

transformers has no MiniCPM-V class, so the whole model is put together from references that exist:
  - the tower: the recipe's `vision.reference` class (transformers' SiglipVisionModel), its tensors
    re-laid out by the recipe's `vision.reference.tensors` (a leading batch axis of a checkpoint table,
    timm's pos_embed [1, n, C], is dropped where the reference's nn.Embedding is [n, C]); the position
    table interpolated by transformers itself (interpolate_pos_encoding);
  - the resampler: MiniCPM-V's Resampler.forward over torch.nn.MultiheadAttention, loaded from the
    checkpoint tensors the recipe's `vision.tensors.resampler` names; its 2D sin-cos tables are written
    here again (numpy), not taken from the generator's conversion (generator/export/resampler.py);
  - the decoder: the recipe's own reference (verify/reference.py load_reference), with the contract's
    bf16 embedding table.
`WholeReference` answers what generator/verify/vision.py asks of a whole vision-language reference:
`model.model.get_image_features(pixel_values=...).pooler_output`, `get_input_embeddings()` and
`model(inputs_embeds=...).logits`.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..errors import GeneratorError
from .relayout import source_tensor


def sincos_2d(dim: int, h: int, w: int) -> np.ndarray:
    """MiniCPM-V's get_2d_sincos_pos_embed: np.meshgrid(w, h), the column's half first."""
    def one(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), 0)
    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)


def make_resampler(w: dict, heads: int, eps: float):
    """MiniCPM-V 2.0's Resampler (adaptive) with the checkpoint's weights `w` (canonical names)."""
    import torch

    class Resampler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            q, e = w["resampler.query"].shape
            self.query = torch.nn.Parameter(w["resampler.query"])
            side = int(round(q ** 0.5))
            pos = w.get("resampler.query_pos")
            self.pos_embed = torch.nn.Parameter(pos if pos is not None else torch.from_numpy(sincos_2d(e, side, side)))
            self.kv_proj = torch.nn.Linear(w["resampler.kv_proj.weight"].shape[1], e, bias=False)
            self.attn = torch.nn.MultiheadAttention(e, heads)
            self.ln_q, self.ln_kv, self.ln_post = (torch.nn.LayerNorm(e, eps=eps) for _ in range(3))
            self.proj = torch.nn.Parameter(w["resampler.proj"])

        def forward(self, x, tgt_size):
            pos = torch.from_numpy(sincos_2d(self.query.shape[1], *tgt_size))
            x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
            n = x.shape[1]
            q = self.ln_q(self.query)
            out = self.attn(q.unsqueeze(1).repeat(1, n, 1) + self.pos_embed.unsqueeze(1), x + pos.unsqueeze(1), x)[0]
            return self.ln_post(out.permute(1, 0, 2)) @ self.proj

    r = Resampler()
    with torch.no_grad():
        r.kv_proj.weight.copy_(w["resampler.kv_proj.weight"])
        r.attn.in_proj_weight.copy_(w["resampler.in_proj.weight"])
        r.attn.in_proj_bias.copy_(w["resampler.in_proj.bias"])
        r.attn.out_proj.weight.copy_(w["resampler.out_proj.weight"])
        r.attn.out_proj.bias.copy_(w["resampler.out_proj.bias"])
        for k in ("ln_q", "ln_kv", "ln_post"):
            getattr(r, k).weight.copy_(w[f"resampler.{k}.weight"])
            getattr(r, k).bias.copy_(w[f"resampler.{k}.bias"])
    return r.eval()


class WholeReference:
    def __init__(self, tower, resampler, lm, grid: int):
        self.tower, self.resampler, self.lm, self.grid = tower, resampler, lm, grid
        self.model = self  # verify/vision.py asks model.model.get_image_features

    def get_image_features(self, pixel_values, **_):
        feats = self.tower(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state
        return SimpleNamespace(pooler_output=self.resampler(feats, (self.grid, self.grid)))

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def __call__(self, inputs_embeds):
        return self.lm(inputs_embeds=inputs_embeds)


def resampler_reference(tower, ckpt, recipe, bundle, mapping, env: dict, where: str) -> WholeReference:
    import torch

    from ..recipe.vision import VisionSpec, vision_tensor_names
    from .reference import load_reference

    loaded = {}
    for key, param in tower.state_dict().items():
        src = mapping(key)
        if src is None:
            raise GeneratorError(f"{where}: no checkpoint tensor for reference tensor {key}.")
        t = source_tensor(ckpt.torch_tensor, src, env, f"{where}, tensor {key}")
        if tuple(t.shape) != tuple(param.shape) and t.dim() == param.dim() + 1 and t.shape[0] == 1:
            t = t[0]  # timm's [1, n, C] table for nn.Embedding's [n, C]
        if tuple(t.shape) != tuple(param.shape):
            raise GeneratorError(f"{where}: {src} gives shape {tuple(t.shape)} for {key}, which needs {tuple(param.shape)}.")
        loaded[key] = t
    tower.load_state_dict(loaded, strict=True)
    vspec = VisionSpec(**bundle.manifest.vision.spec)
    w = {k: ckpt.torch_tensor(name).float() for k, name in vision_tensor_names(recipe.vision, vspec).items()
         if k.startswith("resampler.")}
    resampler = make_resampler(w, vspec.resampler_heads, vspec.resampler_norm_eps)
    lm = load_reference(ckpt, recipe)
    emb = lm.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(emb.to(torch.bfloat16).to(torch.float32))
    return WholeReference(tower.eval(), resampler, lm, vspec.grid)
