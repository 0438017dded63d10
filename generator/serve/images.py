"""Images in serve's requests: OpenAI ``image_url`` content parts with ``data:`` URLs.

``{"type": "image_url", "image_url": {"url": "data:image/png;base64,...", "detail"?}}`` (the URL may
also be given as a bare string) is decoded here into what the runtime feeds the vision graph: a
``uint8`` RGB array ``[H, W, 3]`` at the picture's own size (the runtime resizes it, as the board
runtime does). The decoding follows transformers' ``load_image``: EXIF orientation applied, then
converted to RGB.

Limits are data (``images:`` in generator/data/limits.yaml): the formats Pillow must identify (PNG,
JPEG), the decoded byte size (checked on the base64 length before decoding), the pixel count and side
(read from the header before any pixel is decoded), the images per request. Every refusal is an
``ImageRefused`` naming the part (``messages[i].content[j]``) and saying why in one sentence: not a
``data:`` URL (a remote http(s) URL is never fetched: the server has no network access), not base64,
too large, not an image, a format not taken, a truncated or corrupt file.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import Any

import numpy as np

from ..limits import limits

_DATA_URL = re.compile(r"data:(?P<type>[^,;]*)(?P<params>(?:;[^,;]*)*),", re.IGNORECASE)
_SHOWN = 40  # characters of a refused URL shown in the message


class ImageRefused(ValueError):
    """An image part that cannot be used: ``message`` (one sentence) and ``param`` (the part)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def image_limits() -> dict[str, Any]:
    return limits()["images"]


def image_url_of(part: dict, where: str) -> str:
    """The URL of an ``image_url`` content part (an object with ``url``, or a bare string)."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise ImageRefused(f"{where}: an image_url part needs \"image_url\": {{\"url\": \"data:image/png;base64,...\"}}",
                           where)
    return url


def _shown(url: str) -> str:
    return url if len(url) <= _SHOWN else url[:_SHOWN] + "..."


def decode_data_url(url: str, where: str) -> np.ndarray:
    """The picture of a ``data:`` URL as uint8 RGB ``[H, W, 3]``; ImageRefused (naming ``where``) else."""
    lim = image_limits()
    head = url[:5].lower()
    if head.startswith(("http:", "https")):
        raise ImageRefused(f"{where}: remote image URLs are not fetched ({_shown(url)}): this server has no "
                           f"network access; send the image inline as a data: URL (data:image/png;base64,...)", where)
    match = _DATA_URL.match(url)
    if not match:
        raise ImageRefused(f"{where}: the image URL must be a data: URL (data:image/png;base64,...), got "
                           f"{_shown(url)!r}", where)
    if "base64" not in [p.strip().lower() for p in match.group("params").split(";")]:
        raise ImageRefused(f"{where}: the data: URL must be base64-encoded (data:image/png;base64,...)", where)
    payload = url[match.end():]
    if len(payload) * 3 // 4 > lim["max_bytes"] + 2:
        raise ImageRefused(f"{where}: the image is about {len(payload) * 3 // 4} bytes, over this server's limit of "
                           f"{lim['max_bytes']} bytes", where)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageRefused(f"{where}: the data: URL's payload is not valid base64", where) from None
    if len(data) > lim["max_bytes"]:
        raise ImageRefused(f"{where}: the image is {len(data)} bytes, over this server's limit of "
                           f"{lim['max_bytes']} bytes", where)
    return decode_image(data, where)


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Image file bytes -> uint8 RGB ``[H, W, 3]``, within the limits; ImageRefused else."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    lim = image_limits()
    formats = " or ".join(lim["formats"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageRefused(f"{where}: the data is not an image ({formats} expected)", where) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's own limit
            raise ImageRefused(f"{where}: the image is over this server's limit of {lim['max_pixels']} pixels "
                               f"({exc})", where) from None
        except (OSError, SyntaxError, ValueError) as exc:  # a header cut short
            raise ImageRefused(f"{where}: the image file is truncated or corrupt ({exc})", where) from None
        if image.format not in lim["formats"]:
            raise ImageRefused(f"{where}: {image.format} images are not taken ({formats} expected)", where)
        width, height = image.size
        if width * height > lim["max_pixels"] or max(width, height) > lim["max_side"]:
            raise ImageRefused(f"{where}: the image is {width}x{height} pixels, over this server's limit of "
                               f"{lim['max_pixels']} pixels and {lim['max_side']} per side", where)
        if width < 1 or height < 1:
            raise ImageRefused(f"{where}: the image is empty ({width}x{height})", where)
        try:
            image.load()
            image = ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as exc:
            raise ImageRefused(f"{where}: the {image.format} file is truncated or corrupt ({exc})", where) from None
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
