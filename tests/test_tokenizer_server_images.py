"""The tokenizer server's image prompt (issue 10, board contract section 9) against transformers'
own processors: for the same conversation, ``/encode`` with ``"img_prompt": true`` (both protocols)
and the runtime's client give the ids that ``InternVLProcessor`` / ``Qwen2_5_VLProcessor`` give for
a conversation whose user turn holds an image part and a text part.

The processors are built offline on a tiny tokenizer folder of each family (tests/tokenizer_fixtures.py)
with an image the size of one tile, so they expand the image to exactly ``img_token_num`` context
tokens (InternVL: ``<img>`` + ``<IMG_CONTEXT>`` x N + ``</img>`` then "\\n" then the text; Qwen2.5-VL:
``<|vision_start|>`` + ``<|image_pad|>`` x N + ``<|vision_end|>`` then the text).
"""

from __future__ import annotations

import pytest

import tokenizer_fixtures as tf
from generator.runtime.tokenizer_client import HttpTokenizer, ImageTokens, TokenizerServerError

SYSTEM = "Be brief."
N = {"internvl": 6, "qwen_vl": 4}  # Qwen-VL: a square number (a grid of merged patches)


@pytest.fixture(scope="module", params=sorted(N))
def family(request, tmp_path_factory):
    """(name, tokenizer dir, processor, image, server) of one family."""
    name = request.param
    work = tmp_path_factory.mktemp(f"vl_{name}")
    directory = tf.make_vl_dir(work / f"{name}_tokenizer", name, N[name], system_prompt=SYSTEM)
    processor, image = tf.vl_reference_processor(directory, name, N[name])
    server = tf.ServerProcess(tf.SERVER_SCRIPT, ["--tokenizer_dir", str(directory)], work)
    yield name, directory, processor, image, server
    server.stop()


def reference(family, messages, add_generation_prompt=True) -> list[int]:
    _, _, processor, image, _ = family
    return tf.vl_reference_ids(processor, image, messages, add_generation_prompt)


def test_reference_expands_the_image_to_the_declared_count(family):
    name, _, processor, _, _ = family
    ids = reference(family, [{"role": "user", "content": ["image", "Hi"]}])
    assert ids.count(processor.image_token_id) == N[name]


def test_image_token_routes_give_the_processors_ids(family):
    name, _, processor, _, server = family
    vocab = processor.tokenizer
    with tf.Connection(server.port) as conn:
        for route, token in (("img_start_token", tf.VL_FAMILIES[name]["img_start_token"]),
                             ("img_context_token", tf.VL_FAMILIES[name]["img_context_token"]),
                             ("img_end_token", tf.VL_FAMILIES[name]["img_end_token"])):
            answer = conn.get(f"/{route}")
            assert answer == {route: vocab.convert_tokens_to_ids(token), "token": token, "img_token_num": N[name]}
        assert conn.get("/img_context_token")["img_context_token"] == processor.image_token_id
        uid = conn.get("/get_uid")["uid"]
        assert conn.get(f"/img_start_token?uid={uid}")["token"] == tf.VL_FAMILIES[name]["img_start_token"]


def test_uid_protocol_image_in_first_and_in_a_later_turn(family):
    """An image with the first question; then a text turn; then another image after the answers
    (the board keeps the cache between them: ``diff`` is what it prefills)."""
    server = family[4]
    system = [{"role": "system", "content": SYSTEM}]
    with tf.Connection(server.port) as conn:
        uid = conn.get("/get_uid")["uid"]
        prefix = conn.post("/reset", {"uid": uid})["token_ids"]
        assert prefix == reference(family, system, add_generation_prompt=False)
        turn1 = system + [{"role": "user", "content": ["image", "What is in the picture?"]}]
        answer = conn.post("/encode", {"uid": uid, "text": "What is in the picture?", "img_prompt": True})
        assert answer["token_ids"] == reference(family, turn1)
        assert answer["diff"] == answer["token_ids"][len(prefix):] and not answer["prefix_mismatch"]

        turn2 = turn1 + [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "What colour?"}]
        answer = conn.post("/encode", {"uid": uid, "text": "What colour?", "last_reply": "A cat."})
        assert answer["token_ids"] == reference(family, turn2)

        turn3 = turn2 + [{"role": "assistant", "content": "Grey."},
                         {"role": "user", "content": ["image", "And this one?"]}]
        held = reference(family, turn3[:-1], add_generation_prompt=False)  # up to "Grey."
        answer = conn.post("/encode", {"uid": uid, "text": "And this one?", "last_reply": "Grey.", "img_prompt": True})
        assert answer["token_ids"] == reference(family, turn3)
        assert answer["diff"] == answer["token_ids"][len(held):]


def test_image_after_a_text_turn_and_without_system_prompt(family):
    """The image comes only in the second turn, after a reset with no system message."""
    server = family[4]
    with tf.Connection(server.port) as conn:
        uid = conn.get("/get_uid")["uid"]
        assert conn.post("/reset", {"uid": uid, "system_prompt": ""})["token_ids"] == []
        conn.post("/encode", {"uid": uid, "text": "Hello"})
        messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                    {"role": "user", "content": ["image", "Look at this."]}]
        answer = conn.post("/encode", {"uid": uid, "text": "Look at this.", "last_reply": "Hi!", "img_prompt": True})
        assert answer["token_ids"] == reference(family, messages)


def test_stateless_protocol(family):
    server = family[4]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ["image", "Describe it."]}]
    with tf.Connection(server.port) as conn:
        answer = conn.post("/encode", {"text": "Describe it.", "img_prompt": True})
        assert answer["token_ids"] == reference(family, messages)
        plain = conn.post("/encode", {"text": "Describe it.", "img_prompt": False})
        assert plain["token_ids"] == reference(family, messages[:1] + [{"role": "user", "content": "Describe it."}])


def test_http_client_image_prompt(family):
    name, _, processor, _, server = family
    client = HttpTokenizer(server.url, timeout=30)
    vocab = processor.tokenizer
    ids = {k: vocab.convert_tokens_to_ids(v) for k, v in tf.VL_FAMILIES[name].items() if k.endswith("_token")}
    assert client.image_tokens() == ImageTokens(ids["img_start_token"], ids["img_context_token"],
                                                ids["img_end_token"], N[name])
    system = [{"role": "system", "content": SYSTEM}]
    prefix = client.reset()
    token_ids, diff = client.encode("What is it?", img_prompt=True)
    assert token_ids == reference(family, system + [{"role": "user", "content": ["image", "What is it?"]}])
    assert diff == token_ids[len(prefix):]
    start = token_ids.index(ids["img_context_token"])  # where the runtime writes the image's rows
    assert token_ids[start:start + N[name]] == [ids["img_context_token"]] * N[name]
    assert token_ids[start - 1] == ids["img_start_token"] and token_ids[start + N[name]] == ids["img_end_token"]
    client.close()


def test_text_only_server_has_no_image_tokens(tmp_path):
    directory = tf.make_qwen_style_dir(tmp_path / "text_tokenizer", img_token_num=0)
    server = tf.ServerProcess(tf.SERVER_SCRIPT, ["--tokenizer_dir", str(directory)], tmp_path)
    try:
        client = HttpTokenizer(server.url, timeout=30)
        assert client.image_tokens() is None
        with pytest.raises(TokenizerServerError, match="declares no image tokens") as info:
            client.encode("x", img_prompt=True)
        assert info.value.status == 400
    finally:
        server.stop()


@pytest.mark.parametrize("value", ["\n", 1, None])
def test_img_text_separator_is_checked(tmp_path, value):
    module = tf.load_server_module()
    directory = tf.make_vl_dir(tmp_path / "t", "internvl", 2)
    facts = {"img_token_num": 2, **tf.VL_FAMILIES["internvl"], "img_text_separator": value}
    tf.write_ax_tokenizer(directory, **facts)
    if isinstance(value, str):
        assert module.ChatTokenizer(directory).user_content("x", img_prompt=True).endswith("</img>\nx")
    else:
        with pytest.raises(module.TokenizerLoadError, match='"img_text_separator" must be str'):
            module.ChatTokenizer(directory)
