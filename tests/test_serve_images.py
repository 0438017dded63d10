"""`serve` with OpenAI image content parts (issue 10): data: URLs decoded with Pillow into uint8 RGB
[H, W, 3] arrays (compared with Pillow's own decoding, EXIF orientation applied as transformers'
load_image does), the limits of generator/data/limits.yaml, and every refusal a 400 naming the
message and part: a remote URL (no network access), not base64, not an image, a truncated file, too
many bytes or pixels, an image in a non-user message, two in one message, and any image sent to a
text-only bundle.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from generator.limits import limits
from generator.serve.images import ImageRefused, decode_data_url
from generator.serve.messages import ApiError, parse_messages
from generator.serve.service import ChatService
from models import SMALL_GROUPS, quiet_build, threads

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode('ascii')}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def refusal(url: str, where: str = "messages[0].content[1]") -> str:
    with pytest.raises(ImageRefused) as info:
        decode_data_url(url, where)
    assert info.value.param == where and info.value.message.startswith(where + ": ")
    assert "\n" not in info.value.message
    return info.value.message


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------


def test_png_decodes_to_its_pixels():
    got = decode_data_url(data_url(encoded(Image.fromarray(PIXELS))), "m")
    assert got.dtype == np.uint8 and got.shape == (12, 20, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, PIXELS)


def test_jpeg_decodes_as_pillow_does():
    data = encoded(Image.fromarray(PIXELS), "JPEG", quality=90)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_data_url(data_url(data, "image/jpeg"), "m"), want)


def test_rgba_palette_and_grey_become_rgb():
    for image in (Image.fromarray(PIXELS).convert("RGBA"), Image.fromarray(PIXELS).convert("P"),
                  Image.fromarray(PIXELS).convert("L")):
        got = decode_data_url(data_url(encoded(image)), "m")
        np.testing.assert_array_equal(got, np.asarray(image.convert("RGB")))


def test_exif_orientation_is_applied_like_transformers_load_image():
    from PIL import ImageOps

    image = Image.fromarray(PIXELS)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(image, "JPEG", quality=95, exif=exif)
    got = decode_data_url(data_url(data, "image/jpeg"), "m")
    assert got.shape == (20, 12, 3)
    np.testing.assert_array_equal(got, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")))


def test_base64_with_line_breaks_and_any_media_type_case():
    data = base64.encodebytes(encoded(Image.fromarray(PIXELS))).decode("ascii")  # 76-character lines
    np.testing.assert_array_equal(decode_data_url(f"DATA:Image/PNG;BASE64,{data}", "m"), PIXELS)


# ------------------------------------------------------------------------------------------------
# Refusals: one sentence naming the part
# ------------------------------------------------------------------------------------------------

PNG = encoded(Image.fromarray(PIXELS))


@pytest.mark.parametrize("url, needle", [
    ("https://example.com/cat.png", "no network access"),
    ("http://127.0.0.1/cat.png", "no network access"),
    ("file:///etc/passwd", "must be a data: URL"),
    ("cat.png", "must be a data: URL"),
    ("data:image/png," + "x" * 10, "base64-encoded"),
    ("data:image/png;base64,@@@notbase64@@@", "not valid base64"),
    (data_url(b"GIF? no, just text, not an image at all"), "not an image"),
    (data_url(PNG[: len(PNG) // 2]), "truncated or corrupt"),
    (data_url(encoded(Image.fromarray(PIXELS), "JPEG")[:300], "image/jpeg"), "truncated or corrupt"),
    (data_url(encoded(Image.fromarray(PIXELS), "GIF"), "image/gif"), "GIF images are not taken"),
])
def test_bad_images_are_refused(url, needle):
    assert needle in refusal(url)


def test_limits_are_data(monkeypatch):
    lim = limits()["images"]
    monkeypatch.setitem(lim, "max_bytes", len(PNG) - 1)
    assert f"over this server's limit of {len(PNG) - 1} bytes" in refusal(data_url(PNG))
    monkeypatch.setitem(lim, "max_bytes", 10 << 20)
    monkeypatch.setitem(lim, "max_pixels", 12 * 20 - 1)
    assert "12" in refusal(data_url(PNG)) and "20x12 pixels" in refusal(data_url(PNG))
    monkeypatch.setitem(lim, "max_pixels", 1 << 20)
    monkeypatch.setitem(lim, "max_side", 19)
    assert "over this server's limit" in refusal(data_url(PNG))


def test_a_huge_image_is_refused_from_its_header():
    """A PNG whose header claims 60000 x 60000 pixels: refused before Pillow decodes any pixel."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
    png = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    message = refusal(data_url(png))
    assert "60000x60000 pixels" in message or "over this server's limit" in message, message


@pytest.mark.parametrize("messages, param, needle", [
    ([{"role": "assistant", "content": [image_part(data_url(PNG))]}, {"role": "user", "content": "x"}],
     "messages[0].content[0]", "user messages only"),
    ([{"role": "system", "content": [image_part(data_url(PNG))]}, {"role": "user", "content": "x"}],
     "messages[0].content[0]", "user messages only"),
    ([{"role": "user", "content": [image_part(data_url(PNG)), image_part(data_url(PNG)),
                                   {"type": "text", "text": "x"}]}],
     "messages[0].content", "2 images in one message"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]",
     "needs \"image_url\""),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]", "needs \"image_url\""),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": "x"}]}], "messages[0].content",
     "only text and image_url parts"),
])
def test_bad_image_parts(messages, param, needle):
    with pytest.raises(ApiError) as info:
        parse_messages({"messages": messages})
    assert (info.value.status, info.value.param) == (400, param) and needle in info.value.message


def test_parts_keep_text_order_and_image_urls():
    url = data_url(PNG)
    (message,) = parse_messages({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is "}, image_part(url), {"type": "text", "text": "this?"}]}]})
    assert message.text == "What is this?" and message.images == [("messages[0].content[1]", url)]
    (message,) = parse_messages({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": url}]}]})  # the URL as a bare string (some clients)
    assert message.images == [("messages[0].content[0]", url)]


# ------------------------------------------------------------------------------------------------
# A text-only bundle refuses images (before decoding them)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_service(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_images") / "b"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="s8", hidden_state_type="bf16",
                post_weight_type="s8", **SMALL_GROUPS)
    return ChatService(out, threads=threads())


@pytest.mark.parametrize("url", [data_url(PNG), "https://example.com/cat.png", "data:image/png;base64,@@"])
def test_text_only_bundle_refuses_any_image(text_service, url):
    body = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                         {"role": "user", "content": [{"type": "text", "text": "And this?"}, image_part(url)]}]}
    with pytest.raises(ApiError) as info:
        text_service.prepare(body)
    assert (info.value.status, info.value.param) == (400, "messages[2].content[1]")
    assert "takes no images" in info.value.message and "text-only" in info.value.message
    assert not text_service.takes_images
    text = text_service.prepare({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]})
    assert text["images"] == [] and text["ids"]


def test_text_only_bundle_refuses_images_over_http(text_service):
    import json
    import threading
    import urllib.request
    from urllib.error import HTTPError

    from generator.serve.http import MAX_BODY_BYTES, ApiServer

    server = ApiServer(("127.0.0.1", 0), text_service)
    assert server.max_body_bytes == MAX_BODY_BYTES  # text-only: the text body limit
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = {"messages": [{"role": "user", "content": [image_part(data_url(PNG)), {"type": "text", "text": "?"}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions",
                                         json.dumps(body).encode(), {"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(HTTPError) as info:
            opener.open(request, timeout=60)
        error = json.loads(info.value.read())["error"]
        assert info.value.code == 400 and error["param"] == "messages[0].content[0]"
        assert "takes no images" in error["message"] and error["type"] == "invalid_request_error"
    finally:
        server.shutdown()
        server.server_close()
