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


# ------------------------------------------------------------------------------------------------
# A vision-language bundle answers an image (the tiny InternVL2 of tests/test_vision_internvl.py)
# ------------------------------------------------------------------------------------------------

from test_vision_internvl import bf16_reference, build, pixel_values, reference_greedy, test_image  # noqa: E402
from test_vision_internvl import tiny as tiny_internvl  # noqa: E402,F401  (its module-scoped fixture)


@pytest.fixture(scope="module")
def vl_served(tiny_internvl):
    from generator.serve.http import ApiServer
    import threading

    bundle = build(tiny_internvl, "fp32")
    service = ChatService(bundle.dir, threads=threads(), system_prompt="You are a bot.")
    server = ApiServer(("127.0.0.1", 0), service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield bundle, service, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


def post(url: str, body: dict, stream: bool = False):
    import json
    import urllib.request
    from urllib.error import HTTPError

    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=120) as response:
            raw = response.read().decode()
            return response.status, raw if stream else json.loads(raw)
    except HTTPError as exc:
        return exc.code, json.loads(exc.read())


def greedy_with_image_at(model, ids: list[int], pv, rows, steps: int) -> list[int]:
    """transformers' greedy tokens for `ids` with the image features at `rows` (as reference_greedy,
    where a context id elsewhere is text)."""
    import torch

    ids, out, rows = list(ids), [], list(rows)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pv, vision_feature_layer=-1,
                                               vision_feature_select_strategy="default").pooler_output[0]
        for _ in range(steps):
            emb = model.model.language_model.embed_tokens(torch.tensor([ids])).clone()
            emb[0, rows] = feats
            out.append(int(model(inputs_embeds=emb).logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


def test_image_request_answers_like_transformers(vl_served, tiny_internvl):
    """An OpenAI vision request (a data: URL PNG) through serve: the prompt is the tokenizer server's
    image expansion, the answer transformers' greedy tokens on that prompt with the image features at
    the context rows; a follow-up that re-sends the image reuses the cache up to the image only."""
    bundle, service, url, _ = vl_served
    model = bf16_reference(tiny_internvl[0])
    image = test_image(seed=5)
    png = data_url(encoded(Image.fromarray(image)))
    ctx = bundle.manifest.vision.img_context_token_id
    tokenizer = service.chat.tok.tokenizer
    question = [{"type": "text", "text": "What is in the picture?"}, image_part(png)]  # the image goes first anyway
    status, answer = post(url, {"messages": [{"role": "user", "content": question}], "temperature": 0,
                                "max_tokens": 4})
    assert status == 200, answer
    prompt = tokenizer.encode_messages([{"role": "system", "content": "You are a bot."}, {"role": "user", "content":
                                        tokenizer.user_content("What is in the picture?", img_prompt=True)}], True)
    assert answer["usage"]["prompt_tokens"] == len(prompt) and prompt.count(ctx) == bundle.manifest.vision.tokens
    # InternVL's layout (InternVLProcessor: the image, "\n", then the text), from the bundle's ax_tokenizer.json
    assert "<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat is in the picture?" in tokenizer.decode(prompt)
    pv = pixel_values(service.chat.vision().pixels(image), bundle)
    ref_tokens, _ = reference_greedy(model, prompt, pv, 4)
    n = answer["usage"]["completion_tokens"]
    ours = service.chat.engine.cached_ids[len(prompt):]  # the tokens fed back (all but the last)
    assert len(ours) == n - 1 and ours == ref_tokens[:n - 1]
    eos = set(service.chat.gen.eos)
    assert answer["choices"][0]["message"]["content"] == tokenizer.decode([t for t in ref_tokens[:n] if t not in eos])

    reply = answer["choices"][0]["message"]["content"]
    follow = [{"role": "user", "content": question}, {"role": "assistant", "content": reply},
              {"role": "user", "content": "And the colours?"}]
    status, second = post(url, {"messages": follow, "temperature": 0, "max_tokens": 3})
    assert status == 200, second
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt.index(ctx)  # kept up to the image
    prompt2 = service.chat.engine.cached_ids[:second["usage"]["prompt_tokens"]]
    assert prompt2[:len(prompt)] == prompt  # the image run is the first turn's (a random reply may hold a stray context id)
    first = prompt.index(ctx)
    ref2 = greedy_with_image_at(model, prompt2, pv, range(first, first + bundle.manifest.vision.tokens), 3)
    n2 = second["usage"]["completion_tokens"]
    assert second["choices"][0]["message"]["content"] == tokenizer.decode([t for t in ref2[:n2] if t not in eos])

    status, streamed = post(url, {"messages": [{"role": "user", "content": question}], "temperature": 0,
                                  "max_tokens": 4, "stream": True}, stream=True)
    import json

    assert status == 200 and streamed.rstrip().endswith("data: [DONE]")
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == answer["choices"][0]["message"]["content"]  # the same answer, streamed


@pytest.mark.parametrize("url, needle", [
    ("https://example.com/cat.png", "no network access"),
    (data_url(PNG[: len(PNG) // 2]), "truncated or corrupt"),
    (data_url(b"not an image"), "not an image"),
])
def test_vision_bundle_refuses_bad_images(vl_served, url, needle):
    bundle, service, server_url, server = vl_served
    assert service.takes_images and server.max_body_bytes == limits()["images"]["max_request_bytes"]
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": [image_part(url), {"type": "text", "text": "?"}]}]}
    status, answer = post(server_url, body)
    assert status == 400 and answer["error"]["param"] == "messages[2].content[0]", answer
    assert needle in answer["error"]["message"]


def test_board_path_image_turn_through_the_bundles_tokenizer_server(vl_served, tmp_path):
    """The board's way (--tokenizer_type 2): the bundle's own tokenizer server script, the uid protocol
    with img_prompt through HttpTokenizer, gives the same image turn as the in-process tokenizer."""
    import tokenizer_fixtures as tf
    from generator.runtime.chat import Chat
    from generator.runtime.engine import Engine
    from generator.runtime.tokenizer_client import HttpTokenizer, ImageTokens

    bundle = vl_served[0]
    vision = bundle.manifest.vision
    server = tf.ServerProcess(bundle.tokenizer_server, [], tmp_path)  # its default --tokenizer_dir
    try:
        http = HttpTokenizer(server.url, timeout=30)
        assert http.image_tokens() == ImageTokens(vision.img_start_token_id, vision.img_context_token_id,
                                                  vision.img_end_token_id, vision.tokens)
        image = test_image(seed=9)
        answers = []
        for tokenizer in (http, None):
            chat = Chat(bundle, Engine(bundle, threads=threads()), tokenizer, system_prompt="You are a bot.")
            chat.reset()
            "".join(chat.turn("Hi.", max_new_tokens=2))
            text = "".join(chat.turn("What is this?", max_new_tokens=3, images=[image]))
            answers.append((text, list(chat.engine.cached_ids), chat.stats.prefilled))
        assert answers[0] == answers[1]
        assert answers[0][1].count(vision.img_context_token_id) >= vision.tokens
    finally:
        server.stop()
