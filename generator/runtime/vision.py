"""The image path of a vision-language bundle, as the board runtime does it (contract section 9).

One tile per image: the picture is resized to the vision graph's --image_size square with the
reference processor's interpolation (InternVL: bicubic, no aspect-ratio tiling in this single-tile
mode), fed as uint8 RGB NHWC (the normalisation is inside the graph), and the graph's output rows
overwrite the embedding rows of the prompt's image-context tokens, starting at the first one, before
prefill (`image_rows`, which the Chat hands to the Engine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto

from ..contract import STORAGE, Bundle
from ..errors import GeneratorError
from .ort import open_session, run_once

MAX_PIXELS = 64 * 1024 * 1024  # an image larger than this (decoded) is refused


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3]; a clear error for a missing, truncated or non-image file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise GeneratorError(f"image '{path}' is {im.width}x{im.height} pixels, more than {MAX_PIXELS} "
                                     f"decoded pixels; scale it down first.")
            return np.asarray(im.convert("RGB"), np.uint8)
    except FileNotFoundError:
        raise GeneratorError(f"image '{path}' does not exist.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise GeneratorError(f"'{path}' is not a readable image ({exc}); give a PNG, JPEG, BMP, GIF or "
                             f"WebP file.") from None


def check_image(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise GeneratorError(f"an image must be uint8 RGB [H, W, 3]; got {arr.dtype} {list(arr.shape)}.")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise GeneratorError(f"an image of {arr.shape[1]}x{arr.shape[0]} pixels is too large (at most "
                             f"{MAX_PIXELS} pixels).")
    return arr


def preprocess(image: np.ndarray, size: int, resize: str = "bicubic") -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 [1, size, size, 3], resized as the reference processor does
    (PIL's resampling filter of that name, as torchvision's Resize on a PIL image)."""
    from PIL import Image

    arr = check_image(image)
    if arr.shape[:2] != (size, size):
        method = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[resize]
        arr = np.asarray(Image.fromarray(arr).resize((size, size), method), np.uint8)
    return np.ascontiguousarray(arr[None])


class VisionEncoder:
    """The bundle's vision graph on onnxruntime: image -> [tokens, hidden] rows in the hidden-state type."""

    def __init__(self, bundle: Bundle, threads: int = 2, numerics: str = "board"):
        entry = bundle.manifest.vision
        if entry is None:
            raise GeneratorError(f"bundle '{bundle.dir}' is text-only (no vision part): it cannot take images.")
        path = bundle.dir / entry.graph
        if not path.is_file():
            raise GeneratorError(f"Bundle file {path} is missing; rebuild the bundle.")
        self.entry, self.hidden = entry, bundle.opts.hidden_state_type
        self.dtype, self.onnx_type = STORAGE[self.hidden]
        self.size, self.tokens, self.width = entry.image_size, entry.tokens, bundle.spec.hidden_size
        quantized = entry.weight_type in ("s8", "s4")
        self.sess = open_session(path, threads=threads, quantized=quantized, numerics=numerics)
        self.resampler = None  # two-stage (MiniCPM-V): the encoder's features go through the resampler graph
        if entry.resampler_graph:
            second = bundle.dir / entry.resampler_graph
            if not second.is_file():
                raise GeneratorError(f"Bundle file {second} is missing; rebuild the bundle.")
            self.resampler = open_session(second, threads=threads, quantized=quantized, numerics=numerics)
            self.features = (1, (entry.image_size // int(entry.spec["patch_size"])) ** 2, int(entry.spec["hidden_size"]))

    def pixels(self, image: np.ndarray) -> np.ndarray:
        return preprocess(image, self.size, self.entry.resize)

    def encode(self, image: np.ndarray) -> np.ndarray:
        """[tokens, hidden] in the bundle's hidden-state storage type (bf16 as uint16 bits)."""
        if self.resampler is None:
            out = run_once(self.sess, {"image": (self.pixels(image), TensorProto.UINT8)},
                           {"output": ((1, self.tokens, self.width), self.dtype, self.onnx_type)})
            return out["output"][0]
        feats = run_once(self.sess, {"image": (self.pixels(image), TensorProto.UINT8)},
                         {"output": (self.features, self.dtype, self.onnx_type)})["output"]
        out = run_once(self.resampler, {"input": (feats, self.onnx_type)},
                       {"output": ((1, self.tokens, self.width), self.dtype, self.onnx_type)})
        return out["output"][0]


def image_rows(ids: list[int], embeds: list[np.ndarray], context_id: int) -> dict[int, np.ndarray]:
    """Row overrides for `ids` (a conversation from position 0) whose last len(embeds) runs of context
    tokens are the new images (images earlier in the conversation are already in the cache): image k's
    rows overwrite the embedding rows from its run's first position. Each run must hold exactly the
    image's token count."""
    arr = np.asarray(ids)
    hits = np.flatnonzero(arr == context_id)
    runs = []  # (first, length) of each consecutive run of context tokens
    for pos in hits.tolist():
        if runs and runs[-1][0] + runs[-1][1] == pos:
            runs[-1][1] += 1
        else:
            runs.append([pos, 1])
    if embeds:  # a shorter run is a context token in the text (typed, or generated by the model), not an image
        runs = [r for r in runs if r[1] >= embeds[0].shape[0]]
    new = runs[len(runs) - len(embeds):] if len(runs) >= len(embeds) else []
    if len(new) != len(embeds):
        raise GeneratorError(f"the prompt holds {len(new)} new image placeholder(s) for {len(embeds)} image(s); "
                             f"the tokenizer's image expansion and the images sent do not agree.")
    out = {}
    for (first, length), rows in zip(new, embeds):
        if length != rows.shape[0]:
            raise GeneratorError(f"an image placeholder of {length} context tokens for an image of "
                                 f"{rows.shape[0]} embeddings: the tokenizer's img_token_num does not match "
                                 f"the vision graph.")
        out[first] = rows
    return out
