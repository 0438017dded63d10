"""Tests of the bundle tokenizer server (templates/tokenizer/tokenizer_uid.py) and its client.

Every expected token id comes from transformers (``AutoTokenizer.apply_chat_template``) on the same
tokenizer folder; the server itself runs as a subprocess on a free loopback port and is spoken to
over HTTP. Two tokenizers: SmolLM2-135M-Instruct (the model the project ships; ChatML template in
chat_template.jinja) and a tiny byte-level BPE with a Qwen2.5-style template in
tokenizer_config.json that injects its own system prompt.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import tokenizer_fixtures as tf

if str(tf.REPO) not in sys.path:
    sys.path.insert(0, str(tf.REPO))

from generator.tokenizer_client import HttpTokenizer, SessionLostError, TokenizerServerError  # noqa: E402

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
    out = subprocess.run([sys.executable, str(tf.SERVER_SCRIPT), "--port", str(tf.free_port()),
                          "--tokenizer_dir", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "tokenizer.json" in out.stderr and "Server running" not in out.stdout


def test_template_refusing_the_default_system_prompt_fails_at_start(qwen_dir, tmp_path):
    """Gemma-like templates refuse a system message: a bundle configured with one must not start."""
    directory = shutil.copytree(qwen_dir, tmp_path / "no_system")
    (directory / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tf.write_ax_tokenizer(directory, bos_id=-1, eos_id=2, eos_ids=[2], system_prompt="Be nice.")
    out = subprocess.run([sys.executable, str(tf.SERVER_SCRIPT), "--port", str(tf.free_port()),
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
            assert conn.get(f"/{name}") == {name: qwen.ref.convert_tokens_to_ids(token), "token": token}
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


def test_session_count_is_bounded_lru(qwen_dir, work_dir):
    server = tf.ServerProcess(tf.SERVER_SCRIPT, ["--tokenizer_dir", str(qwen_dir), "--max_sessions", "3",
                                                 "--session_idle_s", "0"], work_dir)
    try:
        with tf.Connection(server.port) as conn:
            uids = [new_uid(conn) for _ in range(3)]
            conn.get(f"/bos_id?uid={uids[0]}")  # uids[0] is now the most recently used
            uids.append(new_uid(conn))  # evicts the least recently used: uids[1]
            status, _, payload = conn.request("GET", f"/bos_id?uid={uids[1]}")
            assert_error(status, payload, 400, "Invalid uid")
            for uid in (uids[0], uids[2], uids[3]):
                assert conn.post("/encode", {"uid": uid, "text": "x"})["token_ids"]
            assert conn.get("/")["sessions"] == 3
    finally:
        server.stop()


def test_idle_sessions_expire(qwen_dir, work_dir):
    server = tf.ServerProcess(tf.SERVER_SCRIPT, ["--tokenizer_dir", str(qwen_dir), "--session_idle_s", "1.0"],
                              work_dir)
    try:
        with tf.Connection(server.port) as conn:
            uid = new_uid(conn)
            assert conn.post("/encode", {"uid": uid, "text": "x"})["token_ids"]
            time.sleep(1.6)
            status, _, payload = conn.request("POST", "/encode", {"uid": uid, "text": "y"})
            assert_error(status, payload, 400, "Invalid uid")
            assert conn.get("/")["sessions"] == 0
            assert conn.post("/encode", {"uid": new_uid(conn), "text": "y"})["token_ids"]
    finally:
        server.stop()


def test_session_table_with_fake_clock(server_module):
    now = [0.0]
    table = server_module.SessionTable(lambda: object.__new__(server_module.ChatSession), max_sessions=2,
                                       idle_s=10.0, clock=lambda: now[0])
    a, _ = table.create()
    now[0] = 6.0
    b, _ = table.create()
    now[0] = 12.0  # a: idle 12 s, expired; b: 6 s
    assert table.get(a) is None and table.get(b) is not None
    now[0] = 21.0  # b was used at 12: idle 9 s, alive
    assert table.get(b) is not None
    c, _ = table.create()
    d, _ = table.create()  # cap 2: evicts b (least recently used)
    assert table.get(b) is None and table.get(c) is not None and table.get(d) is not None
    assert (len(table), table.expired, table.evicted) == (2, 1, 1)


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


def test_http_client_names_the_url_when_no_server():
    url = f"http://127.0.0.1:{tf.free_port()}"
    with pytest.raises(TokenizerServerError, match="is not answering") as info:
        HttpTokenizer(url, timeout=5)
    assert url in str(info.value)
