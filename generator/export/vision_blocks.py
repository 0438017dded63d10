"""Vision graph pieces beyond the plain ViT, each read from the resolved `VisionSpec` (data, not family
names): 2D rotary positions over the patch grid, window attention masks, merge-block token order and
patch merging, and the repeated-frame patch embedding. Qwen2.5-VL's tower is these pieces on the
generic builder (generator/export/vision.py); the equivalences with transformers'
Qwen2_5_VisionTransformerPretrainedModel are written at each function.

At a fixed --image_size every one of them is static: the rotary tables, the token order and the window
masks are computed here at build time and baked into the graph as constants.
"""

from __future__ import annotations

import numpy as np

from ..errors import GeneratorError
from ..recipe.vision import VisionSpec
from .onnx_graph import Graph


def merge_size(vspec: VisionSpec) -> int:
    return int(round(1 / vspec.downsample))


def fold_frames(w: np.ndarray, vspec: VisionSpec) -> np.ndarray:
    """A [C, 3, T, p, p] Conv3d kernel over T copies of one frame (the processor repeats an image
    temporal_patch_size times) is the Conv2d kernel summed over T."""
    if w.ndim == 5:
        if w.shape[2] != vspec.temporal_patch_size:
            raise GeneratorError(f"vision patch embedding has {w.shape[2]} frames per patch; the config says "
                                 f"temporal_patch_size {vspec.temporal_patch_size}.")
        return w.sum(axis=2)
    return w


def patch_hw(vspec: VisionSpec) -> np.ndarray:
    """[T, 2] (h, w) patch coordinates of the graph's tokens, in its token order: row-major, or
    merge-block-major (transformers' get_vision_position_ids: blocks row-major, s x s inside each)."""
    g = vspec.grid
    hh, ww = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    if vspec.merge_kind == "blocks":
        s = merge_size(vspec)
        hh = hh.reshape(g // s, s, g // s, s).transpose(0, 2, 1, 3)
        ww = ww.reshape(g // s, s, g // s, s).transpose(0, 2, 1, 3)
    return np.stack([hh.reshape(-1), ww.reshape(-1)], axis=-1)


def rope_2d_tables(vspec: VisionSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos, signed sin [T, 1, d] of the 2D rotary embedding (Qwen2_5_VLVisionRotaryEmbedding: d/4
    frequencies over d/2, the h angles then the w angles, the whole repeated twice; rotate_half).
    `x*cos + rotate_half(x)*sin` = `x*cos + swap_halves(x) * [-sin1, sin2]`."""
    d = vspec.hidden_size // vspec.num_attention_heads
    half = d // 2
    inv = 1.0 / (vspec.rope_theta ** (np.arange(0, half, 2, dtype=np.float64) / half))
    hw = patch_hw(vspec).astype(np.float64)
    ang = np.concatenate([hw[:, :1] * inv, hw[:, 1:] * inv], axis=-1)  # [T, d/2]
    ang = np.concatenate([ang, ang], axis=-1)  # [T, d]
    cos, sin = np.cos(ang), np.sin(ang)
    sin[:, :half] *= -1
    return cos[:, None].astype(np.float32), sin[:, None].astype(np.float32)


def apply_rope(g: Graph, x: str, heads: int, d: int, cos: str, sin: str) -> str:
    """[1, T, heads*d] rotated per head by the [T, 1, d] tables."""
    t = g.op("Reshape", x, g.ints(-1, heads, d))
    a, b = g.op("Split", t, g.ints(d // 2, d // 2), axis=-1, n_out=2)
    t = g.op("Add", g.op("Mul", t, cos), g.op("Mul", g.op("Concat", b, a, axis=-1), sin))
    return g.op("Reshape", t, g.ints(1, -1, heads * d))


def window_mask(vspec: VisionSpec) -> np.ndarray | None:
    """[T, T] additive mask of window attention (0 within a window, -1e9 across), or None when one
    window holds the whole grid. Windows are vspec.window merged patches a side from the top-left,
    the last ones cut short (transformers' get_vision_window_index pads at the bottom/right and
    drops the padding); attention is per window in any token order, so no reordering is needed."""
    if not vspec.window:
        return None
    s, n = merge_size(vspec), vspec.window
    hw = patch_hw(vspec) // s  # merged-patch coordinates
    per_row = -(-(vspec.grid // s) // n)
    win = (hw[:, 0] // n) * per_row + hw[:, 1] // n
    if (win == win[0]).all():
        return None
    return np.where(win[:, None] == win[None, :], 0.0, -1e9).astype(np.float32)


def uses_window(vspec: VisionSpec, layer: int) -> bool:
    return vspec.window > 0 and layer not in vspec.fullatt_blocks


def tokens_of(g: Graph, x: str, vspec: VisionSpec) -> str:
    """Conv output [1, C, g, g] -> [1, T, C] in the graph's token order."""
    c, grid = vspec.hidden_size, vspec.grid
    if vspec.merge_kind != "blocks":
        return g.op("Transpose", g.op("Reshape", x, g.ints(1, c, grid * grid)), perm=[0, 2, 1])
    s = merge_size(vspec)
    x = g.op("Reshape", x, g.ints(c, grid // s, s, grid // s, s))
    x = g.op("Transpose", x, perm=[1, 3, 2, 4, 0])  # [g/s, g/s, s, s, C]
    return g.op("Reshape", x, g.ints(1, grid * grid, c))


def merge_blocks(g: Graph, x: str, vspec: VisionSpec) -> str:
    """[1, T, C] in merge-block-major order -> [1, T/s^2, C s^2] (Qwen2_5_VLPatchMerger's view)."""
    s = merge_size(vspec)
    return g.op("Reshape", x, g.ints(1, -1, vspec.hidden_size * s * s))
