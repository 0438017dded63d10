"""mRoPE positions (Qwen2-VL / Qwen2.5-VL): the [3, n] temporal/height/width position ids of a turn.

The rule is transformers' `Qwen2_5_VLModel.get_rope_index` for images: text tokens take one position
on all three rows, counting on; each run of image-pad tokens is one image whose LLM grid is
(t, h / merge, w / merge) for its patch grid (t, h, w) and the vision tower's spatial_merge_size, and
its tokens take (start + t_i, start + h_i, start + w_i) in (t, h, w) order; text after an image
continues from start + max(h / merge, w / merge), the largest position so far + 1. `start` is where
the turn begins: the runtime keeps it between turns (Engine.next_position), so a turn computed alone
gets the positions the whole conversation would. tests/test_mrope.py checks it against transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import GeneratorError


def mrope_positions(ids: Sequence[int], grids: Sequence[Sequence[int]] = (), *, image_token_id: int | None = None,
                    spatial_merge_size: int = 2, start: int = 0) -> np.ndarray:
    """[3, len(ids)] int64 positions of `ids` beginning at `start`; `grids`: the (t, h, w) patch grid of
    each image, in order, one per run of `image_token_id` in `ids` (no grids: all text)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    grids = [tuple(int(x) for x in g) for g in grids]
    out = np.zeros((3, ids.size), np.int64)
    is_image = (ids == image_token_id) if grids and image_token_id is not None else np.zeros(ids.size, bool)
    # runs of equal modality: [(is_image, begin, end)]
    edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), ids.size]
    runs = [(bool(is_image[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    n_images = sum(1 for img, _, _ in runs if img)
    if n_images != len(grids) and grids:
        raise GeneratorError(f"The prompt has {n_images} image(s) (runs of image token {image_token_id}) but "
                             f"{len(grids)} image grid(s) were given.")
    pos, k = int(start), 0
    for img, a, b in runs:
        if not img:
            out[:, a:b] = np.arange(pos, pos + b - a)
            pos += b - a
            continue
        t, h, w = grids[k]
        k += 1
        if h % spatial_merge_size or w % spatial_merge_size:
            raise GeneratorError(f"Image grid {(t, h, w)} is not divisible by spatial_merge_size {spatial_merge_size}.")
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        if t * gh * gw != b - a:
            raise GeneratorError(f"Image {k} has {b - a} image tokens, but its grid {(t, h, w)} with "
                                 f"spatial_merge_size {spatial_merge_size} gives {t * gh * gw}.")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        out[:, a:b] = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos
        pos += max(gh, gw)
    return out


def prefill_with_images(engine, ids: Sequence[int], entry) -> None:
    """An image turn on an mRoPE bundle: prefill `ids` from the engine's cached length up to (not
    including) the last token with the turn's mRoPE positions, starting at engine.next_position (the
    running offset, so later turns continue correctly); every run of image tokens in that span is an
    image at the bundle's image size (entry: the manifest's vision entry, its image_grid). The last
    token then runs through the generator as usual (its position is next_position). No-op for a
    bundle whose layers take one position row, or whose vision part has no image grid."""
    if engine.rows != 3 or entry is None or not entry.image_grid:
        return
    start = engine.precompute_len
    tail = list(ids[start:len(ids) - 1])
    if not tail:
        return
    ctx = entry.img_context_token_id
    is_img = np.asarray(tail) == ctx
    runs = int(is_img[0]) + int(np.count_nonzero(is_img[1:] & ~is_img[:-1]))
    positions = mrope_positions(tail, [entry.image_grid] * runs, image_token_id=ctx,
                                spatial_merge_size=entry.spatial_merge_size, start=engine.next_position)
    engine.prefill(tail, positions)
