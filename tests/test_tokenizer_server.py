"""Tests of the bundle tokenizer server (generator/runtime/tokenizer_server.py) and its client.

Every expected token id comes from transformers (``AutoTokenizer.apply_chat_template``) on the same
tokenizer folder; the server itself runs as a subprocess on a free loopback port and is spoken to
over HTTP. Two tokenizers: SmolLM2-135M-Instruct (the model the project ships; ChatML template in
chat_template.jinja) and a tiny byte-level BPE with a Qwen2.5-style template in
tokenizer_config.json that injects its own system prompt.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import select
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import tokenizer_fixtures as tf

if str(tf.REPO) not in sys.path:
    sys.path.insert(0, str(tf.REPO))

from generator.runtime.tokenizer_client import HttpTokenizer, SessionLostError, TokenizerServerError  # noqa: E402

# One xdist worker runs this module (make test: -n 2 --dist loadgroup), so the servers and the
# transformers references are built once.
pytestmark = pytest.mark.xdist_group("tokenizer_server")

SMOL_SYSTEM = "You are a concise assistant. Réponds brièvement."
UNICODE_TEXTS = [
    "你好，世界！今天天气怎么样？",
    "Emoji test 😀🚀👍🏽🇨🇳 done",
    "Mixed: café naïve 東京 🍣 — “quotes” ∑",
]
REPLACEMENT = "\ufffd"
CHECKS = yaml.safe_load((tf.REPO / "generator" / "data" / "tokenizer_server_checks.yaml").read_text())


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One tokenizer folder, its transformers reference and its running server."""

    name: str
    dir: Path
    ref: object  # transformers tokenizer
    server: tf.ServerProcess
    default_system: list  # the history a new session starts with

    def ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return list(self.ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, return_dict=False))

    def text_ids(self, text: str) -> list[int]:
        return list(self.ref.encode(text, add_special_tokens=False))


@pytest.fixture(scope="session")
def server_module():
    return tf.load_server_module()


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer_server")


@pytest.fixture(scope="session")
def smol_dir(work_dir):
    # A bundle's layout: <name>_tokenizer_uid.py next to <name>_tokenizer/
    return tf.make_smollm2_dir(work_dir / "bundle" / "smollm2_tokenizer", SMOL_SYSTEM)


@pytest.fixture(scope="session")
def qwen_dir(work_dir):
    return tf.make_qwen_style_dir(work_dir / "qwen_style")


@pytest.fixture(scope="session")
def smol_server(work_dir, smol_dir):
    script = smol_dir.parent / "smollm2_tokenizer_uid.py"
    shutil.copy(tf.SERVER_SCRIPT, script)
    server = tf.ServerProcess(script, [], work_dir)  # default --host and --tokenizer_dir
    yield server
    server.stop()


@pytest.fixture(scope="session")
def qwen_server(work_dir, qwen_dir):
    server = tf.ServerProcess(tf.SERVER_SCRIPT, ["--host", "127.0.0.1", "--tokenizer_dir", str(qwen_dir)], work_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cases(smol_dir, qwen_dir, smol_server, qwen_server):
    from transformers import AutoTokenizer

    return {
        "smol": Case("smol", smol_dir, AutoTokenizer.from_pretrained(smol_dir), smol_server,
                     [{"role": "system", "content": SMOL_SYSTEM}]),
        "qwen": Case("qwen", qwen_dir, AutoTokenizer.from_pretrained(qwen_dir), qwen_server, []),
    }


@pytest.fixture(params=["smol", "qwen"])
def case(request, cases) -> Case:
    return cases[request.param]


@pytest.fixture
def conn(case):
    connection = tf.Connection(case.server.port)
    yield connection
    connection.close()


def new_uid(connection: tf.Connection) -> str:
    return connection.get("/get_uid")["uid"]


def assert_error(status: int, payload, expected_status: int, contains: str = "") -> None:
    assert status == expected_status, (status, payload)
    assert isinstance(payload, dict) and isinstance(payload.get("error"), str), payload
    assert contains in payload["error"], payload


# ------------------------------------------------------------------------------------------------
# Standalone script: no transformers, CLI defaults
# ------------------------------------------------------------------------------------------------


def test_server_module_does_not_import_transformers(smol_dir):
    code = (
        "import json, sys, time; t = time.perf_counter();"
        "sys.path.insert(0, sys.argv[1]); import tokenizer_fixtures as tf;"
        "m = tf.load_server_module(); tok = m.ChatTokenizer(sys.argv[2]);"
        "print(json.dumps({'s': time.perf_counter() - t, 'modules': sorted(sys.modules)}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(smol_dir)],
                         capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    heavy = [m for m in result["modules"] if m.split(".")[0] in ("transformers", "torch", "numpy")]
    assert heavy == [], heavy
    print(f"import + load: {result['s']:.2f} s")


def test_cli_defaults(server_module, smol_server, smol_dir):
    args = server_module.parse_args([])
    assert (args.host, args.port, args.tokenizer_dir) == ("127.0.0.1", 12345, None)
    # The bundle's server was started without --host/--tokenizer_dir.
    assert smol_server.stdout().splitlines()[0] == f"Server running at http://127.0.0.1:{smol_server.port}"
    import psutil

    listening = [c.laddr for c in psutil.Process(smol_server.process.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", smol_server.port)]
    status, _, info = tf.request(smol_server.port, "GET", "/")
    assert status == 200 and Path(info["tokenizer_dir"]).resolve() == smol_dir.resolve()


def test_default_tokenizer_dir(server_module, tmp_path):
    (tmp_path / "qwen2.5_tokenizer").mkdir()
    assert server_module.default_tokenizer_dir(tmp_path / "qwen2.5_tokenizer_uid.py") == tmp_path / "qwen2.5_tokenizer"
    assert server_module.default_tokenizer_dir(tmp_path / "tokenizer_uid.py") == tmp_path / "tokenizer"
    (tmp_path / "tokenizer").mkdir()  # fallback when <name>_tokenizer does not exist
    assert server_module.default_tokenizer_dir(tmp_path / "other_tokenizer_uid.py") == tmp_path / "tokenizer"


def test_bad_tokenizer_dir_exits_with_message(tmp_path):
    out = subprocess.run([sys.executable, str(tf.SERVER_SCRIPT), "--port", "0",
                          "--tokenizer_dir", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "tokenizer.json" in out.stderr and "Server running" not in out.stdout


def test_template_refusing_the_default_system_prompt_fails_at_start(qwen_dir, tmp_path):
    """Gemma-like templates refuse a system message: a bundle configured with one must not start."""
    directory = shutil.copytree(qwen_dir, tmp_path / "no_system")
    (directory / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tf.write_ax_tokenizer(directory, bos_id=-1, eos_id=2, eos_ids=[2], system_prompt="Be nice.")
    out = subprocess.run([sys.executable, str(tf.SERVER_SCRIPT), "--port", "0",
                          "--tokenizer_dir", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "System role not supported" in out.stderr, out.stderr


# ------------------------------------------------------------------------------------------------
# Session protocol: ids equal transformers' apply_chat_template
# ------------------------------------------------------------------------------------------------


def test_reset_system_only(case, conn):
    uid = new_uid(conn)
    system = [{"role": "system", "content": "You answer in one sentence. 简短回答。"}]
    assert conn.post("/reset", {"uid": uid, "system_prompt": system[0]["content"]})["token_ids"] == \
        case.ids(system, add_generation_prompt=False)
    # No system_prompt: the default from ax_tokenizer.json ("" for qwen: no system message yet).
    expected = case.ids(case.default_system, False) if case.default_system else []
    assert conn.post("/reset", {"uid": uid})["token_ids"] == expected
    # Older boards reset with a GET.
    assert conn.get(f"/reset?uid={uid}")["token_ids"] == expected


def test_single_turn(case, conn):
    uid = new_uid(conn)
    prefix = conn.post("/reset", {"uid": uid})["token_ids"]
    answer = conn.post("/encode", {"uid": uid, "text": "What is the capital of France?"})
    expected = case.ids(case.default_system + [{"role": "user", "content": "What is the capital of France?"}], True)
    assert answer["token_ids"] == expected
    assert answer["diff"] == expected[len(prefix):] and answer["prefix_mismatch"] is False


def test_multi_turn_with_last_reply(case, conn):
    uid = new_uid(conn)
    system = [{"role": "system", "content": "Be helpful."}]
    history = list(system)
    conn.post("/reset", {"uid": uid, "system_prompt": "Be helpful."})
    turns = [("Hi there!", None), ("Tell me a joke.", "Hello! How can I help?"),
             ("Another one, 再来一个 😀", "Why did the chicken cross the road? 🐔")]
    for text, last_reply in turns:
        body = {"uid": uid, "text": text}
        if last_reply is not None:
            body["last_reply"] = last_reply
            history.append({"role": "assistant", "content": last_reply})
        held = case.ids(history, False)  # what the board holds: up to and including the reply
        history.append({"role": "user", "content": text})
        answer = conn.post("/encode", body)
        expected = case.ids(history, True)
        assert answer["token_ids"] == expected
        assert expected[:len(held)] == held and answer["diff"] == expected[len(held):]
        assert answer["prefix_mismatch"] is False


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_unicode_both_protocols(case, conn, text):
    uid = new_uid(conn)
    answer = conn.post("/encode", {"uid": uid, "text": text})
    assert answer["token_ids"] == case.ids(case.default_system + [{"role": "user", "content": text}], True)
    stateless = conn.post("/encode", {"text": text})
    assert stateless == {"token_ids": answer["token_ids"]}
    ids = case.text_ids(text)
    assert conn.post("/decode", {"uid": uid, "token_ids": ids})["text"] == text
    assert conn.post("/decode", {"token_ids": ids})["text"] == text


def test_stateless_protocol(case, conn):
    bos = json.loads((case.dir / "ax_tokenizer.json").read_text())["bos_id"]
    assert conn.get("/bos_id") == {"bos_id": bos}
    assert conn.get("/eos_id")["eos_id"] == case.ref.eos_token_id
    uid = new_uid(conn)
    assert conn.get(f"/bos_id?uid={uid}") == {"bos_id": bos}
    assert conn.get(f"/eos_id?uid={uid}&tokenizer_type=qwen")["eos_id"] == case.ref.eos_token_id
    expected = case.ids(case.default_system + [{"role": "user", "content": "hello"}], True)
    assert conn.post("/encode", {"text": "hello"}) == {"token_ids": expected}
    assert conn.post("/decode", {"token_ids": expected})["text"] == case.ref.decode(expected)


def test_template_injects_its_default_system_prompt(cases):
    """The Qwen-style template adds its own system message when the history has none."""
    case = cases["qwen"]
    with tf.Connection(case.server.port) as conn:
        uid = new_uid(conn)
        assert conn.post("/reset", {"uid": uid})["token_ids"] == []
        answer = conn.post("/encode", {"uid": uid, "text": "Who are you?"})
        assert answer["token_ids"] == case.ids([{"role": "user", "content": "Who are you?"}], True)
        assert answer["diff"] == answer["token_ids"]
        text = conn.post("/decode", {"token_ids": answer["token_ids"]})["text"]
        assert "You are Qwen, created by Alibaba Cloud" in text


def test_template_error_is_400_and_history_unchanged(cases):
    """The template refuses two user turns in a row: 400 with its message, the session is intact."""
    case = cases["qwen"]
    with tf.Connection(case.server.port) as conn:
        uid = new_uid(conn)
        first = conn.post("/encode", {"uid": uid, "text": "first"})
        status, _, payload = conn.request("POST", "/encode", {"uid": uid, "text": "second"})
        assert_error(status, payload, 400, "alternate")
        answer = conn.post("/encode", {"uid": uid, "text": "second", "last_reply": "ok"})
        history = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}]
        assert answer["token_ids"] == case.ids(history + [{"role": "user", "content": "second"}], True)
        assert answer["token_ids"][:len(first["token_ids"])] == first["token_ids"]
        assert answer["diff"] == answer["token_ids"][len(case.ids(history, False)):]


def test_template_features_match_transformers(server_module, cases):
    """tojson (no HTML escaping, no ASCII escaping), namespace, raise_exception, in-process."""
    case = cases["qwen"]
    tokenizer = server_module.ChatTokenizer(case.dir)
    messages = [{"role": "user", "content": "hi", "name": "José <b> & \"x\""}]
    for generation_prompt in (False, True):
        rendered = tokenizer.render(messages, generation_prompt)
        assert rendered == case.ref.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                        tokenize=False)
        assert '"José <b> & \\"x\\""' in rendered
    with pytest.raises(server_module.TemplateRenderError, match="Unknown role: tool"):
        tokenizer.render([{"role": "tool", "content": "x"}])
    # keys set to None are dropped before rendering, as transformers does (name is not "defined")
    messages = [{"role": "user", "content": "hi", "name": None}]
    assert tokenizer.render(messages) == case.ref.apply_chat_template(messages, tokenize=False)
    assert "name:" not in tokenizer.render(messages)


def test_history_rewriting_template_flags_prefix_mismatch(server_module, qwen_dir, tmp_path):
    """A template that only shows the last two messages changes earlier tokens: the whole
    conversation is sent again as diff, flagged."""
    from transformers import AutoTokenizer

    directory = tf.make_window_template_dir(qwen_dir, tmp_path / "window")
    ref = AutoTokenizer.from_pretrained(directory)
    session = server_module.ChatSession(server_module.ChatTokenizer(directory))
    assert session.tokenizer.chat_template_origin.endswith("chat_template.jinja")  # .jinja wins
    first = session.encode("a")
    assert first.prefix_mismatch is False
    second = session.encode("b", last_reply="r")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
               {"role": "assistant", "content": "r"}, {"role": "user", "content": "b"}]
    assert second.token_ids == list(ref.apply_chat_template(history, add_generation_prompt=True,
                                                            tokenize=True, return_dict=False))
    assert second.prefix_mismatch is True and second.diff == second.token_ids


def test_plain_tokenizer_without_template(server_module, tmp_path):
    """No chat template: tokenizer(text) with the post-processor's BOS; facts from tokenizer_config."""
    from transformers import AutoTokenizer

    directory = tf.make_plain_dir(tmp_path / "plain")
    ref = AutoTokenizer.from_pretrained(directory)
    tokenizer = server_module.ChatTokenizer(directory)  # no ax_tokenizer.json: fallbacks
    assert not tokenizer.has_chat_template
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_ids) == (ref.bos_token_id, ref.eos_token_id,
                                                                       [ref.eos_token_id])
    assert tokenizer.default_system_prompt == ""
    for text in ["Hello world", UNICODE_TEXTS[0]]:
        ids = tokenizer.encode_messages([{"role": "user", "content": text}], add_generation_prompt=True)
        assert ids == ref(text)["input_ids"] and ids[0] == ref.bos_token_id
    session = server_module.ChatSession(tokenizer)
    assert session.reset() == [] and session.encode("Hello world").token_ids == ref("Hello world")["input_ids"]


def test_special_token_only_in_config_is_added_like_transformers(server_module, qwen_dir, tmp_path):
    """A bos_token named in tokenizer_config.json but absent from tokenizer.json: transformers adds
    it as a special token (new id), the template can use it, and user text containing it maps to it."""
    from transformers import AutoTokenizer

    directory = shutil.copytree(qwen_dir, tmp_path / "new_bos")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|begin_of_text|>"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    ref = AutoTokenizer.from_pretrained(directory)
    tokenizer = server_module.ChatTokenizer(directory)
    assert tokenizer.vocab_size == len(ref)
    messages = [{"role": "user", "content": "a <|begin_of_text|> b <|im_end|> 你好"}]
    assert tokenizer.encode_messages(messages) == list(
        ref.apply_chat_template(messages, tokenize=True, return_dict=False))


@pytest.mark.parametrize("facts, message", [
    ({"eos_id": "2"}, '"eos_id" must be int'),
    ({"bos_id": 10 ** 6}, "is not a token id"),
    ({"eos_ids": [1, "x"]}, "list of ints"),
    ({"img_context_token": "<not one token>", "img_token_num": 2}, "not a single token"),
    ({"img_token_num": 3}, '"img_context_token" is not set'),
])
def test_invalid_ax_tokenizer_json(server_module, qwen_dir, tmp_path, facts, message):
    directory = shutil.copytree(qwen_dir, tmp_path / "bad")
    tf.write_ax_tokenizer(directory, **facts)
    with pytest.raises(server_module.TokenizerLoadError, match=message):
        server_module.ChatTokenizer(directory)


# ------------------------------------------------------------------------------------------------
# decode: Unicode, streaming, special tokens
# ------------------------------------------------------------------------------------------------


def test_decode_streaming_never_splits_characters(case, conn):
    text = " ".join(UNICODE_TEXTS)
    ids = case.text_ids(text)
    # The test means something only if some prefix ends inside a character.
    assert any(REPLACEMENT in case.ref.decode(ids[:k]) for k in range(len(ids)))
    uid = new_uid(conn)
    printed = ""
    for k in range(len(ids) + 1):
        answer = conn.post("/decode", {"uid": uid, "token_ids": ids[:k]})
        current = answer["text"]
        assert REPLACEMENT not in current, (k, current)
        assert current.startswith(printed), (k, printed, current)
        pending = answer["pending_ids"]
        assert current == case.ref.decode(ids[:k - pending]) and 0 <= pending <= 4
        printed += current[len(printed):]  # what a streaming client prints
    assert printed == text


def test_decode_special_tokens(case, conn):
    ids = case.ids(case.default_system + [{"role": "user", "content": "hi 😀"}], True)
    for skip in (False, True):
        answer = conn.post("/decode", {"token_ids": ids, "skip_special_tokens": skip})
        assert answer == {"text": case.ref.decode(ids, skip_special_tokens=skip), "pending_ids": 0}


# ------------------------------------------------------------------------------------------------
# VLM extras
# ------------------------------------------------------------------------------------------------


def test_image_tokens_and_img_prompt(cases):
    qwen, smol = cases["qwen"], cases["smol"]
    with tf.Connection(qwen.server.port) as conn:
        for name, token in tf.IMG_TOKENS.items():
            assert conn.get(f"/{name}") == {name: qwen.ref.convert_tokens_to_ids(token), "token": token,
                                            "img_token_num": 4}
        uid = new_uid(conn)
        answer = conn.post("/encode", {"uid": uid, "text": "Describe the picture.", "img_prompt": True})
        content = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>" + "Describe the picture."
        assert answer["token_ids"] == qwen.ids([{"role": "user", "content": content}], True)
        assert answer["token_ids"].count(qwen.ref.convert_tokens_to_ids("<IMG_CONTEXT>")) == 4
        stateless = conn.post("/encode", {"text": "Describe the picture.", "img_prompt": True})
        assert stateless["token_ids"] == answer["token_ids"]
    with tf.Connection(smol.server.port) as conn:
        status, _, payload = conn.request("GET", "/img_context_token")
        assert_error(status, payload, 404, "img_context_token")
        status, _, payload = conn.request("POST", "/encode", {"text": "x", "img_prompt": True})
        assert_error(status, payload, 400, "image")


# ------------------------------------------------------------------------------------------------
# Bad input: 4xx JSON, server alive
# ------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (method, path, raw body with UID placeholder, status, text in the error)
    ("POST", "/encode", "{not json", 400, "not valid JSON"),
    ("POST", "/encode", "[1, 2]", 400, "JSON object"),
    ("POST", "/encode", "\"just a string\"", 400, "JSON object"),
    ("POST", "/encode", "[" * 100000 + "]" * 100000, 400, "not valid JSON"),
    ("POST", "/encode", '{"uid": "UID"}', 400, 'missing field "text"'),
    ("POST", "/encode", '{"uid": "UID", "text": 5}', 400, '"text" must be a string'),
    ("POST", "/encode", '{"uid": "UID", "text": "x", "last_reply": 7}', 400, '"last_reply" must be a string'),
    ("POST", "/encode", '{"uid": "UID", "text": "x", "img_prompt": "yes"}', 400, '"img_prompt" must be a boolean'),
    ("POST", "/encode", '{"uid": "UID", "text": "\\ud800"}', 400, "lone UTF-16 surrogate"),
    ("POST", "/encode", '{"text": "ok \\udfff"}', 400, "lone UTF-16 surrogate"),
    ("POST", "/reset", '{"uid": "UID", "system_prompt": "\\ud83d"}', 400, "lone UTF-16 surrogate"),
    ("POST", "/encode", '{"uid": "UID", "text": "x", "\\ud800": 1}', 400, "lone UTF-16 surrogate"),
    ("POST", "/encode", '{"uid": "no-such-uid", "text": "x"}', 400, "Invalid uid"),
    ("POST", "/encode", '{"uid": 123, "text": "x"}', 400, "Invalid uid"),
    ("POST", "/encode", '{"text": "x", "last_reply": "y"}', 400, "needs a session"),
    ("POST", "/decode", '{"token_ids": "abc"}', 400, '"token_ids" must be a list'),
    ("POST", "/decode", '{"token_ids": [1, "a"]}', 400, "list of integers"),
    ("POST", "/decode", '{"token_ids": [1, true]}', 400, "list of integers"),
    ("POST", "/decode", '{"token_ids": [1.5]}', 400, "list of integers"),
    ("POST", "/decode", '{"token_ids": [-1]}', 400, "out of range"),
    ("POST", "/decode", '{"token_ids": [1000000000]}', 400, "out of range"),
    ("POST", "/decode", '{}', 400, 'missing field "token_ids"'),
    ("POST", "/decode", '{"uid": "no-such-uid", "token_ids": [1]}', 400, "Invalid uid"),
    ("POST", "/reset", '{}', 400, 'missing field "uid"'),
    ("POST", "/reset", '{"uid": "no-such-uid"}', 400, "Invalid uid"),
    ("POST", "/reset", '{"uid": "UID", "system_prompt": 3}', 400, '"system_prompt" must be a string'),
    ("GET", "/bos_id?uid=no-such-uid", None, 400, "Invalid uid"),
    ("GET", "/encode", None, 405, "POST"),
    ("POST", "/get_uid", "{}", 405, "GET"),
    ("PUT", "/encode", '{"text": "x"}', 405, "PUT"),
    ("DELETE", "/decode", None, 405, "DELETE"),
    ("BREW", "/encode", None, 405, "BREW"),
    ("GET", "/nope", None, 404, "unknown path"),
    ("POST", "/nope", "{}", 404, "unknown path"),
]


@pytest.mark.parametrize("method, path, raw, status, contains", BAD_REQUESTS,
                         ids=[f"{m} {p} {i}" for i, (m, p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_requests(cases, method, path, raw, status, contains):
    server = cases["smol"].server
    with tf.Connection(server.port) as conn:
        uid = new_uid(conn)
        data = None if raw is None else raw.replace("UID", uid).encode("utf-8")
        got_status, headers, payload = conn.request(method, path, raw=data)
        assert_error(got_status, payload, status, contains)
        if status == 405:
            assert headers["allow"]
        assert conn.get("/")["status"] == "ok"  # same connection (or a reconnect) still served
        # a failed request leaves the session usable
        assert conn.post("/encode", {"uid": uid, "text": "still fine"})["token_ids"]
    assert server.alive()


RAW_BAD_REQUESTS = [
    (b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n", 411, "Content-Length"),
    (b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n{\"text\": \"", 413, "over the limit"),
    (b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n", 413, "bytes"),
    (b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400, "Content-Length"),
    (b"POST /encode HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411, "chunked"),
    (b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n\xff\xfe{}", 400, "not valid JSON"),
    (b'POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\n{"text": "\xed\xa0\x80"}', 400, "not valid JSON"),
    (b"GARBAGE\r\n\r\n", 400, "Bad request"),
    (b"GET / HTTP/9.x\r\n\r\n", 400, "Bad request version"),
]


@pytest.mark.parametrize("data, status, contains", RAW_BAD_REQUESTS, ids=[str(i) for i in range(len(RAW_BAD_REQUESTS))])
def test_bad_raw_requests(cases, data, status, contains):
    server = cases["smol"].server
    got_status, _, payload = tf.raw_exchange(server.port, data)
    assert_error(got_status, payload, status, contains)
    assert tf.request(server.port, "GET", "/")[0] == 200 and server.alive()


# ------------------------------------------------------------------------------------------------
# Load, session bounds
# ------------------------------------------------------------------------------------------------


def test_concurrent_sessions(cases):
    """50 sessions at once, each a full board conversation, every answer checked."""
    case = cases["smol"]
    n = 50
    plans = []
    for i in range(n):  # expected values first: transformers is not used from the threads
        system = [{"role": "system", "content": f"You are assistant number {i}. 第{i}号助手。"}]
        user1 = [{"role": "user", "content": f"Question {i}: what is {i} + {i}? 😀"}]
        reply = f"{i} + {i} = {2 * i}. 答案是{2 * i} 🚀"
        assistant = [{"role": "assistant", "content": reply}]
        user2 = [{"role": "user", "content": f"And {i} * {i}?"}]
        reset = case.ids(system, False)
        first = case.ids(system + user1, True)
        held = case.ids(system + user1 + assistant, False)
        second = case.ids(system + user1 + assistant + user2, True)
        plans.append(dict(system=system[0]["content"], user1=user1[0]["content"], reply=reply,
                          reply_ids=case.text_ids(reply), user2=user2[0]["content"], reset=reset,
                          first=first, first_diff=first[len(reset):], second=second,
                          second_diff=second[len(held):]))
    barrier = threading.Barrier(n)

    def conversation(plan: dict) -> None:
        with tf.Connection(case.server.port) as conn:
            uid = new_uid(conn)
            barrier.wait(timeout=60)
            assert conn.post("/reset", {"uid": uid, "system_prompt": plan["system"]})["token_ids"] == plan["reset"]
            answer = conn.post("/encode", {"uid": uid, "text": plan["user1"]})
            assert (answer["token_ids"], answer["diff"]) == (plan["first"], plan["first_diff"])
            assert conn.post("/decode", {"uid": uid, "token_ids": plan["reply_ids"]})["text"] == plan["reply"]
            answer = conn.post("/encode", {"uid": uid, "text": plan["user2"], "last_reply": plan["reply"]})
            assert (answer["token_ids"], answer["diff"]) == (plan["second"], plan["second_diff"])

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(conversation, plan) for plan in plans]
        errors = [f.exception() for f in futures if f.exception() is not None]
    assert errors == [], errors[:3]
    assert case.server.alive()


def test_session_count_is_bounded_lru_and_evictions_are_logged(qwen_dir, work_dir):
    server = tf.ServerProcess(tf.SERVER_SCRIPT, ["--tokenizer_dir", str(qwen_dir), "--max_sessions", "3",
                                                 "--session_idle_s", "0"], work_dir)
    try:
        with tf.Connection(server.port) as conn:
            uids = [new_uid(conn) for _ in range(3)]
            conn.get(f"/bos_id?uid={uids[0]}")  # uids[0] is now the most recently used
            assert "evicted" not in server.stderr()  # under the cap nothing is dropped
            uids.append(new_uid(conn))  # evicts the least recently used: uids[1]
            status, _, payload = conn.request("GET", f"/bos_id?uid={uids[1]}")
            assert_error(status, payload, 400, "Invalid uid")
            for uid in (uids[0], uids[2], uids[3]):
                assert conn.post("/encode", {"uid": uid, "text": "x"})["token_ids"]
            assert conn.get("/")["sessions"] == 3
        evictions = [line for line in server.stderr().splitlines() if "evicted" in line]
        assert len(evictions) == 1 and f"session {uids[1]} evicted" in evictions[0], evictions
        assert "--max_sessions 3" in evictions[0]
    finally:
        server.stop()


def test_idle_sessions_expire_and_are_logged(qwen_dir, work_dir):
    server = tf.ServerProcess(tf.SERVER_SCRIPT, ["--tokenizer_dir", str(qwen_dir), "--session_idle_s", "0.5"],
                              work_dir)
    try:
        with tf.Connection(server.port) as conn:
            uid = new_uid(conn)
            assert conn.post("/encode", {"uid": uid, "text": "x"})["token_ids"]
            tf.wait_for(lambda: conn.get("/")["sessions"] == 0, CHECKS["wait_ceiling_s"], "the idle session expired")
            status, _, payload = conn.request("POST", "/encode", {"uid": uid, "text": "y"})
            assert_error(status, payload, 400, "Invalid uid")
            assert conn.post("/encode", {"uid": new_uid(conn), "text": "y"})["token_ids"]
        assert f"session {uid} expired" in server.stderr()
    finally:
        server.stop()


def test_default_idle_expiry_outlasts_a_board_conversation(server_module):
    """Idle expiry is not how sessions are bounded (the cap is): its default is days, and --help says it."""
    args = server_module.parse_args([])
    assert args.session_idle_s >= 24 * 3600 and args.max_sessions >= 1
    out = subprocess.run([sys.executable, str(tf.SERVER_SCRIPT), "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert f"{args.session_idle_s:g} s" in " ".join(out.split())


def test_session_table_with_fake_clock(server_module):
    now = [0.0]
    logged = []
    table = server_module.SessionTable(lambda: object.__new__(server_module.ChatSession), max_sessions=2,
                                       idle_s=10.0, clock=lambda: now[0], log=logged.append)
    a, _ = table.create()
    now[0] = 6.0
    b, _ = table.create()
    now[0] = 12.0  # a: idle 12 s, expired; b: 6 s
    assert table.get(a) is None and table.get(b) is not None
    assert len(logged) == 1 and logged[0].startswith(f"session {a} expired: unused for 12 s")
    now[0] = 21.0  # b was used at 12: idle 9 s, alive
    assert table.get(b) is not None
    c, _ = table.create()
    d, _ = table.create()  # cap 2: evicts b (least recently used)
    assert table.get(b) is None and table.get(c) is not None and table.get(d) is not None
    assert (len(table), table.expired, table.evicted) == (2, 1, 1)
    assert len(logged) == 2 and logged[1].startswith(f"session {b} evicted")


def test_encode_without_reset_uses_the_default_system_prompt_and_logs_it(cases):
    """A board that got "Invalid uid" takes a new uid and encodes without a reset: the session starts
    from the bundle's default system prompt, and the server log says so (once, naming the uid)."""
    case = cases["smol"]
    with tf.Connection(case.server.port) as conn:
        fresh, reset = new_uid(conn), new_uid(conn)
        conn.post("/reset", {"uid": reset, "system_prompt": "Custom."})
        for uid in (fresh, reset):
            conn.post("/encode", {"uid": uid, "text": "hi"})
        answer = conn.post("/encode", {"uid": fresh, "text": "again", "last_reply": "hello"})
    expected = case.ids(case.default_system + [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                               {"role": "user", "content": "again"}], True)
    assert answer["token_ids"] == expected
    line = tf.wait_for(lambda: [x for x in case.server.stderr().splitlines() if f"session {fresh}:" in x],
                       CHECKS["wait_ceiling_s"], "the server logged the encode without reset")
    assert len(line) == 1 and "without a /reset" in line[0] and repr(SMOL_SYSTEM) in line[0], line
    assert f"session {reset}:" not in case.server.stderr()


def test_history_is_bounded_per_session(qwen_dir, work_dir, cases):
    """Turn after turn of long text: past --max_history_tokens the encode is a 400 that says what to
    do, the history is unchanged (the turn can be retried shorter), and a reset starts over."""
    limit = 400
    case = cases["qwen"]
    server = tf.ServerProcess(tf.SERVER_SCRIPT, ["--tokenizer_dir", str(qwen_dir), "--max_history_tokens",
                                                 str(limit)], work_dir)
    try:
        with tf.Connection(server.port) as conn:
            uid = new_uid(conn)
            conn.post("/reset", {"uid": uid})
            history, reply = [], None
            while True:
                text = f"Turn {len(history)}: the quick brown fox jumps over the lazy dog. " * 3
                body = {"uid": uid, "text": text, **({"last_reply": reply} if reply else {})}
                status, _, payload = conn.request("POST", "/encode", body)
                if status != 200:
                    break
                history += ([{"role": "assistant", "content": reply}] if reply else []) + [{"role": "user", "content": text}]
                assert len(payload["token_ids"]) <= limit
                reply = "ok"
            assert_error(status, payload, 400, f"limit of {limit}")
            assert "--max_history_tokens" in payload["error"] and "/reset" in payload["error"]
            assert len(case.ids(history + [{"role": "assistant", "content": reply},
                                           {"role": "user", "content": text}], True)) > limit
            # unchanged history: a short turn still fits after the same reply
            full = history + [{"role": "assistant", "content": reply}, {"role": "user", "content": "ok?"}]
            assert len(case.ids(full, True)) <= limit  # (the test's own premise)
            answer = conn.post("/encode", {"uid": uid, "text": "ok?", "last_reply": reply})
            assert answer["token_ids"] == case.ids(full, True)
            status, _, payload = conn.request("POST", "/reset", {"uid": uid, "system_prompt": "long " * 1000})
            assert_error(status, payload, 400, f"limit of {limit}")
            assert conn.post("/reset", {"uid": uid})["token_ids"] == []
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------
# Client
# ------------------------------------------------------------------------------------------------


def test_http_client(cases):
    case = cases["smol"]
    client = HttpTokenizer(case.server.url, timeout=30)
    bos = json.loads((case.dir / "ax_tokenizer.json").read_text())["bos_id"]
    assert (client.bos_id, client.eos_id, client.eos_ids) == (bos, case.ref.eos_token_id, [case.ref.eos_token_id])
    system = [{"role": "system", "content": "Short answers."}]
    assert client.reset("Short answers.") == case.ids(system, False)
    user1 = [{"role": "user", "content": "你好 😀"}]
    token_ids, diff = client.encode("你好 😀")
    assert token_ids == case.ids(system + user1, True) and diff == token_ids[len(case.ids(system, False)):]
    reply = "你好！有什么可以帮你？"
    assert client.decode(case.text_ids(reply)) == reply
    assert client.decode(case.text_ids("😀")[:1]) == ""  # an incomplete character is held back
    history = system + user1 + [{"role": "assistant", "content": reply}]
    token_ids, diff = client.encode("Bye", last_reply=reply)
    assert token_ids == case.ids(history + [{"role": "user", "content": "Bye"}], True)
    assert diff == token_ids[len(case.ids(history, False)):] and client.last_prefix_mismatch is False
    assert client.reset() == case.ids(case.default_system, False)

    client.uid = "no-such-uid"
    with pytest.raises(SessionLostError, match="Invalid uid"):
        client.encode("x")
    client.new_session()
    assert client.encode("x")[0] == case.ids(case.default_system + [{"role": "user", "content": "x"}], True)


def test_http_client_keeps_one_connection(cases):
    case = cases["smol"]
    client = HttpTokenizer(case.server.url, timeout=30)
    sock = client._connection.sock
    client.reset()
    for text in ("one", "two"):
        client.encode(text, last_reply="ok")
        assert client.decode(case.text_ids(text)) == text
    assert client._connection.sock is sock and sock is not None
    client.close()


def test_http_client_reconnects_when_the_server_closes(server_module, smol_dir, monkeypatch, cases):
    """Connection: close after every POST (no TCP_QUICKACK), and a kept-alive connection the server
    dropped while idle: the client opens a new connection and the conversation goes on."""
    case = cases["smol"]
    monkeypatch.setattr(server_module, "TCP_QUICKACK", None)
    monkeypatch.setattr(server_module.TokenizerRequestHandler, "timeout", 0.2)  # idle connections close fast
    with in_process_server(server_module, smol_dir) as port:
        client = HttpTokenizer(f"http://127.0.0.1:{port}", timeout=30)
        system = case.ids(case.default_system, False)
        assert client.reset() == system
        assert client._connection.sock is None  # the server said Connection: close
        for text in ("one", "two", "three"):
            client.bos_id = client._get_int("/bos_id", "bos_id")  # a GET keeps the connection...
            sock = client._connection.sock
            assert sock is not None
            # ...until the server drops it for being idle; the next request still succeeds
            tf.wait_for(lambda: select.select([sock], [], [], 0)[0] and sock.recv(1, socket.MSG_PEEK) == b"",
                        CHECKS["wait_ceiling_s"], "the server closed the idle connection")
            token_ids, _ = client.encode(text, last_reply=None if text == "one" else "ok")
            assert token_ids[:len(system)] == system
        assert client.decode(case.text_ids("done 😀")) == "done 😀"
        client.close()


def test_http_client_refuses_a_bad_url():
    for url in ("127.0.0.1:12345", "ftp://host/", "http://:5", "http://host:99999"):
        with pytest.raises(TokenizerServerError, match="URL"):
            HttpTokenizer(url)


def test_http_client_names_the_url_when_no_server():
    with tf.unused_port() as port:
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(TokenizerServerError, match="is not answering") as info:
            HttpTokenizer(url, timeout=5)
    assert url in str(info.value)


# ------------------------------------------------------------------------------------------------
# Latency with a client like the board's (issue 14)
# ------------------------------------------------------------------------------------------------


def nagle_post_latencies(port: int, uid: str | None) -> tuple[list[float], int]:
    """Median-ready POST latencies (ms) of a NagleClient over CHECKS' request count, cycling through
    the protocol's POSTs (uid: reset, encode, decode; stateless: encode, decode); and its connects."""
    client = tf.NagleClient(port)
    bodies = ([("/reset", {"uid": uid}), ("/encode", {"uid": uid, "text": "Hello 😀"}),
               ("/decode", {"uid": uid, "token_ids": [1, 2, 3]})] if uid else
              [("/encode", {"text": "Hello 😀"}), ("/decode", {"token_ids": [1, 2, 3]})])
    times = []
    try:
        for i in range(CHECKS["nagle_client"]["requests"] + 5):  # 5 warm-up requests
            path, body = bodies[i % len(bodies)]
            start = time.perf_counter()
            status, payload = client.post(path, body)
            elapsed = (time.perf_counter() - start) * 1000
            assert status == 200, (path, payload)
            if i >= 5:
                times.append(elapsed)
    finally:
        client.close()
    return times, client.connects


def assert_fast(times: list[float], what: str) -> None:
    limit = CHECKS["nagle_client"]["max_median_ms"]
    median = statistics.median(times)
    assert median < limit, (f"{what}: median POST latency {median:.2f} ms over {len(times)} requests (limit "
                            f"{limit} ms; p90 {sorted(times)[len(times) * 9 // 10]:.2f} ms)")


@pytest.mark.parametrize("protocol", ["uid", "stateless"])
def test_post_latency_of_a_nagle_client_on_one_connection(cases, protocol):
    """ax-llm keeps one connection and writes a POST's headers and body separately with Nagle on: the
    server must ACK the headers at once, or the body waits for the delayed ACK (~40 ms a request)."""
    case = cases["smol"]
    with tf.Connection(case.server.port) as conn:
        uid = new_uid(conn) if protocol == "uid" else None
    times, connects = nagle_post_latencies(case.server.port, uid)
    assert_fast(times, f"{protocol} protocol, kept-alive connection")
    assert connects == 1  # the connection was kept: the speed does not come from reconnecting


def test_post_latency_without_tcp_quickack(server_module, smol_dir, monkeypatch):
    """Where TCP_QUICKACK does not exist the server answers POSTs with Connection: close, which the
    board's client follows with a new connection: as fast, for both protocols (in-process server)."""
    monkeypatch.setattr(server_module, "TCP_QUICKACK", None)
    with in_process_server(server_module, smol_dir) as port:
        with tf.Connection(port) as conn:
            uid = new_uid(conn)
        for protocol_uid in (uid, None):
            times, connects = nagle_post_latencies(port, protocol_uid)
            assert_fast(times, f"{'uid' if protocol_uid else 'stateless'} protocol, Connection: close")
            assert connects == len(times) + 5  # one connection per POST


@contextlib.contextmanager
def in_process_server(server_module, tokenizer_dir: Path) -> Iterator[int]:
    """A TokenizerHTTPServer on port 0 in a thread of this process (settings can be monkeypatched); its port."""
    app = server_module.TokenizerApp(server_module.ChatTokenizer(tokenizer_dir))
    server = server_module.TokenizerHTTPServer(("127.0.0.1", 0), app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


# ------------------------------------------------------------------------------------------------
# Start-up: port 0, port file, missing packages
# ------------------------------------------------------------------------------------------------


def test_port_zero_is_reported_on_stdout_and_in_the_port_file(qwen_dir, work_dir, tmp_path):
    port_file = tmp_path / "port"
    server = tf.ServerProcess(tf.SERVER_SCRIPT, ["--tokenizer_dir", str(qwen_dir), "--port_file", str(port_file)],
                              work_dir)  # ServerProcess passes --port 0 and reads the port from stdout
    try:
        assert port_file.read_text() == f"{server.port}\n" and server.port > 0
        assert tf.request(server.port, "GET", "/")[0] == 200
        assert [p.name for p in tmp_path.iterdir()] == ["port"]  # no partial file left behind
    finally:
        server.stop()
    assert server.process.returncode == 0  # SIGTERM stops it cleanly...
    assert not port_file.exists()  # ...and the port file goes with it


@pytest.mark.parametrize("package", ["tokenizers", "jinja2"])
def test_missing_package_is_one_line_saying_what_to_install(package):
    code = ("import runpy, sys; sys.modules[sys.argv[1]] = None; script = sys.argv[2]; sys.argv = [script, '--port', '0'];"
            "runpy.run_path(script, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code, package, str(tf.SERVER_SCRIPT)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "Server running" not in out.stdout
    assert out.stderr.strip().splitlines() == [
        f"error: {tf.SERVER_SCRIPT.name} needs the Python package '{package}': pip3 install tokenizers jinja2"], out.stderr


# ------------------------------------------------------------------------------------------------
# Hostile requests
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(smol_dir, work_dir):
    server = tf.ServerProcess(tf.SERVER_SCRIPT, ["--tokenizer_dir", str(smol_dir), "--body_timeout_s",
                                                 str(CHECKS["fuzz"]["body_timeout_s"])], work_dir)
    yield server
    server.stop()


def exchange(port: int, data: bytes) -> tuple[int, Any, float]:
    """Send ``data`` on a new connection; (status, decoded body, seconds until the answer)."""
    limit = CHECKS["fuzz"]["answer_within_s"]
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # answered and closed before reading it all
            pass
        response = http.client.HTTPResponse(sock)
        response.begin()
        payload = response.read()
    return response.status, tf._decode_answer(payload), time.monotonic() - start


def test_short_body_is_answered_408_within_seconds(fuzz_server):
    body = b'{"text": "hello"}'
    head = b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=CHECKS["wait_ceiling_s"]) as sock:
        sock.sendall(head + body)  # and then nothing, the connection open
        start = time.monotonic()
        response = http.client.HTTPResponse(sock)
        response.begin()
        payload = json.loads(response.read())
        elapsed = time.monotonic() - start
    assert response.status == 408 and "Content-Length of 100" in payload["error"], payload
    assert elapsed < CHECKS["fuzz"]["answer_within_s"], elapsed


MAX_BODY = 1 << 20  # the server's MAX_BODY_BYTES


def hostile_request(rng: random.Random, uid: str) -> bytes:
    """One random request, valid or not, as bytes: method, path, headers and body all mutated."""
    routes = [("POST", "/encode"), ("POST", "/decode"), ("POST", "/reset"), ("GET", "/reset"), ("GET", "/get_uid"),
              ("GET", "/bos_id"), ("GET", "/eos_id"), ("GET", "/img_context_token"), ("GET", "/")]
    method, path = rng.choice(routes)
    if rng.random() < 0.25:  # the wrong method, or a path that does not exist
        method = rng.choice(["POST", "GET", "PUT", "DELETE", "BREW"])
        path = rng.choice([path, "/nope", "/encode/x", "//", "/%ff%fe", "/reset?uid=" + "x" * 3000])
    if method == "GET" and rng.random() < 0.5:
        path += rng.choice([f"?uid={uid}", "?uid=no-such-uid", "?uid=%ED%A0%80", "?uid=&uid=", "?system_prompt=x"])
    values = [None, 0, -1, 1.5, 10 ** 30, True, "", "x", "\ud800", "a\udfffb", "😀", [], [1, "a"], [10 ** 12], [-5],
              [1, 2, 3], {"a": 1}, "y" * rng.choice([10, 5000, 200000]), json.loads("[" * 50 + "]" * 50)]
    body: dict = {k: v for k, v in {"uid": rng.choice([uid, uid, uid, "no-such-uid", 7, None, "\ud800"]),
                                    "text": "Hello 你好", "token_ids": [1, 2, 3], "last_reply": None,
                                    "system_prompt": None, "img_prompt": None,
                                    "skip_special_tokens": None}.items() if v is not None}
    for _ in range(rng.randrange(3)):
        body[rng.choice(["text", "text", "token_ids", "token_ids", "last_reply", "system_prompt", "img_prompt",
                         "skip_special_tokens", "\ud800", "extra"])] = rng.choice(values)
    raw = json.dumps(body).encode("utf-8") if rng.random() < 0.9 else json.dumps(rng.choice(values)).encode()
    mutation = rng.random()
    if mutation < 0.1 and raw:
        raw = raw[:rng.randrange(len(raw))]
    elif mutation < 0.2 and raw:
        at = rng.randrange(len(raw))
        raw = raw[:at] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4))) + raw[at + 1:]
    elif mutation < 0.23:
        raw = b"{" * (MAX_BODY + 1)
    framing, length = rng.random(), str(len(raw))
    if framing < 0.03:
        length = str(len(raw) + rng.randrange(1, 50))  # a short body: the server waits body_timeout_s
    elif framing < 0.08:
        length = rng.choice(["-1", "abc", "1e3", "", str(10 ** 12), " 5", "0x10"])
    elif framing < 0.12 and raw:
        length = str(rng.randrange(len(raw)))  # the rest would be read as the next request
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Content-Type: application/json",
             "Transfer-Encoding: chunked" if 0.12 <= framing < 0.15 else f"Content-Length: {length}"]
    if 0.15 <= framing < 0.18:
        lines.pop()  # no framing header at all
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + raw


def test_hostile_requests(fuzz_server):
    """Random and mutated requests to both protocols: every one is answered, within seconds, by a
    JSON error (4xx) or a 200, never a 500 or a traceback, and the server then serves a session."""
    rng = random.Random(CHECKS["fuzz"]["seed"])
    port = fuzz_server.port
    with tf.Connection(port) as conn:
        uid = new_uid(conn)
    statuses: dict[int, int] = {}
    for i in range(CHECKS["fuzz"]["requests"]):
        data = hostile_request(rng, uid)
        try:
            status, payload, elapsed = exchange(port, data)
        except (OSError, http.client.HTTPException) as exc:
            raise AssertionError(f"request {i} got no answer ({exc!r}): {data[:300]!r}") from None
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (i, status, payload, data[:300])
        if status >= 400:
            assert isinstance(payload, dict) and isinstance(payload.get("error"), str), (i, payload, data[:300])
        assert elapsed < CHECKS["fuzz"]["answer_within_s"], (i, elapsed, data[:300])
    assert len([s for s in statuses if s >= 400]) >= 5, statuses  # the run did reach many error paths
    assert "Traceback" not in fuzz_server.stderr(), fuzz_server.stderr()[-3000:]
    with tf.Connection(port) as conn:
        answer = conn.post("/encode", {"uid": uid, "text": "still here"})
        assert answer["token_ids"] and conn.get("/")["status"] == "ok"
    assert fuzz_server.alive()


# ------------------------------------------------------------------------------------------------
# What the bundle tells its user
# ------------------------------------------------------------------------------------------------


def test_bundle_readme_states_requirements_and_the_lost_session_limitation(server_module):
    """The bundle's README (rendered as bundle.py renders it) and its launchers name what the tokenizer
    server needs, as the server itself says it when a package is missing; the README explains a lost
    session and what to do, and lists the launchers."""
    from generator.contract import TOKENIZER_PORT
    from generator.export.bundle import template_env
    from generator.paths import TEMPLATES_DIR

    values = dict(model="demo", recipe="llama", chip="AX650", chip_lower="ax650", tokenizer_dir="demo_tokenizer",
                  tokenizer_port=TOKENIZER_PORT,
                  tokenizer_script="demo_tokenizer_uid.py", scripts=["run_demo_ax650.sh", "run_demo_axcl_x86.sh",
                                                                     "build_ax650.sh"])
    readme = " ".join(template_env().get_template("bundle_README.md.j2").render(**values).split())
    assert server_module.REQUIREMENTS in readme
    assert "`./run_demo_ax650.sh`" in readme and "`./run_demo_axcl_x86.sh`" in readme
    assert "Invalid uid" in readme and "without a /reset first" in readme and "type `reset`" in readme
    for option in ("--max_sessions", "--session_idle_s", "--max_history_tokens", "--port_file"):
        assert f"`{option}" in readme
        server_module.parse_args([option, "1"])  # a flag the server has
    launcher_header = (TEMPLATES_DIR / "run.sh.j2").read_text().split("set -euo pipefail")[0]
    assert server_module.REQUIREMENTS in launcher_header
