"""`python -m generator serve`: the OpenAI-compatible endpoint, spoken to with the openai client and raw HTTP.

Expected answers are computed without the server: the conversation rendered by transformers'
apply_chat_template, generated greedily by the runner's Engine/Generator on a separate engine (same
prefill history, so the same floating-point path), decoded by the bundle's tokenizer.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from generator.contract import Bundle
from generator.runtime.chat import load_tokenizer_module
from generator.runtime.engine import Engine
from generator.runtime.generation import Generator, Sampler
from generator.serve.service import ApiError, ChatService, StopMatcher
from generator.serve.http import ApiServer
from models import SMALL_GROUPS, quiet_build, threads

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_tiny") / "b"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="s8", hidden_state_type="bf16",
                post_weight_type="s8", **dict(SMALL_GROUPS, kv_cache_len=256, last_kv_cache_len=[16, 64, 192]))
    return Bundle(out)


def start(bundle_dir, **kw):
    service = ChatService(bundle_dir, threads=threads(), **kw)
    server = ApiServer(("127.0.0.1", 0), service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def served(tiny):
    server, url = start(tiny.dir)
    yield server, url
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(served, monkeypatch):
    from openai import OpenAI

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


class Reference:
    """Greedy answers computed without the server: template by transformers, runner engine, bundle decoder."""

    def __init__(self, bundle: Bundle):
        from transformers import AutoTokenizer

        self.bundle = bundle
        self.hf = AutoTokenizer.from_pretrained(bundle.tokenizer_dir)
        self.decoder = load_tokenizer_module(bundle).ChatTokenizer(bundle.tokenizer_dir)
        self.engine = Engine(bundle, threads=threads())
        eos = self.decoder.eos_ids or bundle.spec.eos_token_ids
        self.gen = Generator(self.engine, eos, Sampler(bundle.sampling))

    def ids(self, messages, system: str | None = None):
        system = self.bundle.system_prompt if system is None else system
        if messages[0]["role"] != "system" and system:
            messages = [{"role": "system", "content": system}] + messages
        return list(self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False))

    def prefill_system(self, system: str | None = None):
        system = self.bundle.system_prompt if system is None else system
        self.engine.reset()
        self.engine.prefill(list(self.hf.apply_chat_template([{"role": "system", "content": system}],
                                                             tokenize=True, return_dict=False)))

    def answer(self, messages, max_tokens=None, system=None) -> tuple[str, str, int]:
        out = self.gen.generate(self.ids(messages, system), max_tokens)
        text_ids = [t for t in out if t not in self.gen.eos]
        finish = "stop" if self.gen.stats.hit_eos else "length"
        return self.decoder.decode(text_ids), finish, self.gen.stats.prompt_tokens - self.gen.stats.prefilled


@pytest.fixture(scope="module")
def ref(tiny):
    r = Reference(tiny)
    r.prefill_system()
    return r


def reset_both(served, ref, system=None):
    service = served[0].service
    service.reset(system if system is not None else service.bundle.system_prompt)
    ref.prefill_system(system)


def raw(url: str, method: str, path: str, body=None, raw_body: bytes | None = None, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    try:
        payload = json.loads(payload)
    except ValueError:
        pass
    return resp.status, dict(resp.getheaders()), payload


# ------------------------------------------------------------------------------------------------


def test_models(client, served, tiny):
    assert [m.id for m in client.models.list().data] == [tiny.model]
    status, _, card = raw(served[1], "GET", f"/v1/models/{tiny.model}")
    assert status == 200 and card["id"] == tiny.model and card["context_length"] == tiny.opts.kv_cache_len
    status, _, err = raw(served[1], "GET", "/v1/models/gpt-4")
    assert status == 404 and err["error"]["code"] == "model_not_found"


def test_chat_non_streaming_and_streaming_match_the_runner(client, served, ref, tiny):
    reset_both(served, ref)
    messages = [{"role": "user", "content": "Hello 你好 😀"}]
    want, finish, cached = ref.answer(messages, 8)
    reset_both(served, ref)
    resp = client.chat.completions.create(model=tiny.model, messages=messages, max_tokens=8)
    assert resp.choices[0].message.content == want and resp.choices[0].finish_reason == finish
    assert resp.usage.prompt_tokens == len(ref.ids(messages)) and resp.usage.completion_tokens == 8
    assert resp.usage.prompt_tokens_details.cached_tokens == cached  # the system prompt was prefilled once
    reset_both(served, ref)
    stream = client.chat.completions.create(model=tiny.model, messages=messages, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == want and finishes == [finish]
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def test_multi_turn_reuses_the_cache(client, served, ref, tiny):
    reset_both(served, ref)
    turn1 = [{"role": "user", "content": "Name a color."}]
    want1, _, _ = ref.answer(turn1, 6)
    turn2 = turn1 + [{"role": "assistant", "content": want1}, {"role": "user", "content": "Another 另一个?"}]
    want2, _, cached2 = ref.answer(turn2, 6)
    reset_both(served, ref)
    got1 = client.chat.completions.create(model=tiny.model, messages=turn1, max_tokens=6)
    got2 = client.chat.completions.create(model=tiny.model, messages=turn2, max_tokens=6)
    assert got1.choices[0].message.content == want1 and got2.choices[0].message.content == want2
    assert got2.usage.prompt_tokens_details.cached_tokens == cached2 > got1.usage.prompt_tokens // 2


def test_reset_sets_the_system_prompt(served, ref, tiny):
    status, _, body = raw(served[1], "POST", "/v1/reset", {"system_prompt": "Be brief. 简短"})
    sys_ids = ref.hf.apply_chat_template([{"role": "system", "content": "Be brief. 简短"}], tokenize=True,
                                         return_dict=False)
    assert status == 200 and body["precompute_len"] == len(sys_ids) and body["system_prompt"] == "Be brief. 简短"
    ref.prefill_system("Be brief. 简短")
    messages = [{"role": "user", "content": "Hi"}]
    want, _, cached = ref.answer(messages, 5, system="Be brief. 简短")
    status, _, resp = raw(served[1], "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 5})
    assert status == 200 and resp["choices"][0]["message"]["content"] == want
    assert resp["usage"]["prompt_tokens"] == len(ref.ids(messages, "Be brief. 简短"))
    assert resp["usage"]["prompt_tokens_details"]["cached_tokens"] == cached >= len(sys_ids)
    reset_both(served, ref)


def test_stop_strings(client, served, ref, tiny):
    messages = [{"role": "user", "content": "Count"}]
    reset_both(served, ref)
    full, _, _ = ref.answer(messages, 12)
    assert len(full) >= 4
    stop = full[2:4]
    want = full[:full.index(stop)]
    for stream in (False, True):
        reset_both(served, ref)
        resp = client.chat.completions.create(model=tiny.model, messages=messages, max_tokens=12, stop=[stop],
                                              stream=stream)
        if stream:
            chunks = list(resp)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
            assert text == want and finish == ["stop"]
        else:
            assert resp.choices[0].message.content == want and resp.choices[0].finish_reason == "stop"


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END", "xy"])
    assert m.push("abcE") == "abc" and m.push("N") == "" and m.push("Q") == "ENQ" and not m.hit
    assert m.push("1x") == "1" and m.push("y2") == "" and m.hit


def test_concurrent_requests_are_served_one_at_a_time(served, ref, tiny):
    messages = [{"role": "user", "content": "Tell me something"}]
    reset_both(served, ref)
    want, _, _ = ref.answer(messages, 6)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: raw(served[1], "POST", "/v1/chat/completions",
                                              {"messages": messages, "max_tokens": 6}), range(4)))
    assert [r[0] for r in results] == [200] * 4
    assert {r[2]["choices"][0]["message"]["content"] for r in results} == {want}


def test_client_leaving_a_stream_frees_the_engine(served, tiny):
    host, port = served[1].removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "Go on and on"}], "stream": True,
                       "max_tokens": 200}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b"data: " not in received:  # headers and the first event may come in separate reads
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    started = time.monotonic()
    status, _, resp = raw(served[1], "POST", "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert status == 200 and resp["usage"]["completion_tokens"] == 2
    assert time.monotonic() - started < 30
    assert not served[0].service.busy


def test_stop_endpoint_ends_the_answer(served, tiny):
    """POST /v1/stop while an answer is being generated (paused after its first piece) ends it."""
    service = served[0].service
    req = service.prepare({"messages": [{"role": "user", "content": "Go"}], "max_tokens": 150})
    pieces = service.generate(req)
    assert next(pieces)
    status, _, body = raw(served[1], "POST", "/v1/stop", {})
    assert status == 200 and body == {"status": "ok", "was_running": True}
    list(pieces)
    assert req["finish_reason"] == "stop" and req["usage"]["completion_tokens"] < 150
    assert not service.busy


BAD = [
    ("invalid json", "POST", "/v1/chat/completions", None, b"{nope", 400, None, "not valid JSON"),
    ("not an object", "POST", "/v1/chat/completions", [1], None, 400, None, "JSON object"),
    ("no messages", "POST", "/v1/chat/completions", {}, None, 400, "messages", "missing field 'messages'"),
    ("empty messages", "POST", "/v1/chat/completions", {"messages": []}, None, 400, "messages", "non-empty"),
    ("bad role", "POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, None, 400,
     "messages[0].role", "robot"),
    ("image part", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None, 400,
     "messages[0].content[0]", "takes no images"),
    ("audio part", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, None, 400,
     "messages[0].content", "only text and image_url parts"),
    ("content number", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, None, 400,
     "messages[0].content", "string or a list"),
    ("ends with assistant", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, None, 400,
     "messages[1].role", "last message"),
    ("max_tokens 0", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 0},
     None, 400, "max_tokens", ">= 1"),
    ("max_tokens str", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "max_tokens": "5"}, None, 400, "max_tokens", "integer"),
    ("temperature", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "temperature": 3}, None, 400, "temperature", "<= 2"),
    ("top_p 0", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_p": 0}, None,
     400, "top_p", "> 0"),
    ("n 2", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 2}, None, 400, "n",
     "<= 1"),
    ("stream str", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "stream": "yes"},
     None, 400, "stream", "true or false"),
    ("stop list", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "stop": ["a", "b", "c", "d", "e"]}, None, 400, "stop", "up to 4"),
    ("unknown model", "POST", "/v1/chat/completions",
     {"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}]}, None, 404, "model", "gpt-4o"),
    ("too long", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]}, None, 400,
     "messages", "KV cache holds"),
    ("reset prompt type", "POST", "/v1/reset", {"system_prompt": 3}, None, 400, "system_prompt", "string"),
    ("GET completions", "GET", "/v1/chat/completions", None, None, 405, None, "use POST"),
    ("DELETE models", "DELETE", "/v1/models", None, None, 405, None, "use GET"),
    ("unknown path", "GET", "/v2/nothing", None, None, 404, None, "no route"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_get_a_clear_4xx(case, served):
    _, method, path, body, raw_body, status, param, needle = case
    got_status, headers, payload = raw(served[1], method, path, body, raw_body)
    assert got_status == status, payload
    err = payload["error"]
    assert needle in err["message"] and err["param"] == param, err
    if status == 405:
        assert headers["Allow"]
    # the server is still healthy
    assert raw(served[1], "GET", "/health")[2]["status"] == "ok"


def test_body_limits(served):
    host, port = served[1].removeprefix("http://").split(":")
    for head, status in ((b"Content-Length: 99999999\r\n", 413), (b"Transfer-Encoding: chunked\r\n", 411), (b"", 411)):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == status
            assert "error" in json.loads(response.read())


def test_serve_command_binds_loopback(tiny, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "generator", "serve", str(tiny.dir), "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})
    try:
        line = proc.stdout.readline()
        assert line.startswith("Server running at http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.strip().rsplit(":", 1)[1])
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == "LISTEN"]
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
        status, _, models = raw(f"http://127.0.0.1:{port}", "GET", "/v1/models")
        assert status == 200 and models["data"][0]["id"] == tiny.model
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "generator", "serve", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "not a bundle" in bad.stderr


@pytest.mark.xdist_group("smollm2")
def test_smollm2_serves_a_streaming_chat(smollm2_bundle, monkeypatch):
    """The embedded SmolLM2 bundle: a streaming request through the openai client answers, the same
    text as the runner computes on its own and as the non-streaming answer."""
    from openai import OpenAI

    out, manifest = smollm2_bundle
    server, url = start(out)
    try:
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        stream = client.chat.completions.create(model=manifest["model"], messages=messages, max_tokens=12, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        text = "".join(pieces)
        assert len([p for p in pieces if p]) > 1 and text.strip()
        again = client.chat.completions.create(model=manifest["model"], messages=messages, max_tokens=12)
        assert again.choices[0].message.content == text
        assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 1
    finally:
        server.shutdown()
        server.server_close()
    ref = Reference(Bundle(out))
    ref.prefill_system()
    assert ref.answer(messages, 12)[0] == text


def test_serve_kvcache_path(tiny, tmp_path):
    logs = []
    first = ChatService(tiny.dir, threads=threads(), kvcache_path=str(tmp_path / "kv"), log=logs.append)
    assert logs[-1] == f"generate kvcache to path: {tmp_path / 'kv'}"
    second = ChatService(tiny.dir, threads=threads(), kvcache_path=str(tmp_path / "kv"), log=logs.append)
    assert logs[-1] == f"load kvcache from path: {tmp_path / 'kv'} success, precompute_len: {first.precompute_len}"
    assert second.engine.cached_ids == first.engine.cached_ids
    second.reset("Another prompt")  # a new system prompt: the cache is made again for it
    assert "another system prompt" in logs[-2] and logs[-1].startswith("generate kvcache")
    assert json.loads((tmp_path / "kv" / "config.json").read_text())["system_prompt"] == "Another prompt"


def test_sampling_fields(served, ref, tiny):
    """temperature 0 is the greedy answer; sampling with a seed repeats itself; another seed differs."""
    messages = [{"role": "user", "content": "Pick words"}]
    reset_both(served, ref)
    greedy, _, _ = ref.answer(messages, 8)

    def ask(**fields):
        status, _, resp = raw(served[1], "POST", "/v1/chat/completions",
                              {"messages": messages, "max_tokens": 8, **fields})
        assert status == 200, resp
        return resp["choices"][0]["message"]["content"]

    assert ask(temperature=0) == greedy
    sampled = {"temperature": 1.5, "top_k": 100}
    first = ask(seed=7, **sampled)
    assert ask(seed=7, **sampled) == first and ask(seed=7, temperature=1.5, **{"top-k": 100}) == first
    assert any(ask(seed=s, **sampled) != first for s in (8, 9, 10))
    assert ask() == greedy  # post_config.json again for requests without sampling fields


def test_chat_gives_the_service_what_it_needs(tiny, monkeypatch):
    """The service goes through Chat's public methods: conversations rendered by the bundle's template
    (a refusal is a 400 naming messages), and a sampler that applies to one answer only, even one
    closed early."""
    from generator.runtime.chat import ConversationRefused

    service = ChatService(tiny.dir, threads=threads())
    chat = service.chat
    messages = [{"role": "user", "content": "hi"}]
    want = load_tokenizer_module(tiny).ChatTokenizer(tiny.tokenizer_dir).encode_messages(messages,
                                                                                          add_generation_prompt=True)
    assert chat.encode_conversation(messages) == list(want)

    def refuse(messages, add_generation_prompt=False):
        raise chat.tok_module.TemplateRenderError("roles must alternate")

    monkeypatch.setattr(chat.tok.tokenizer, "encode_messages", refuse)
    with pytest.raises(ConversationRefused, match="roles must alternate"):
        chat.encode_conversation(messages)
    with pytest.raises(ApiError) as err:
        service.prepare({"messages": messages})
    assert (err.value.status, err.value.param) == (400, "messages") and "roles must alternate" in err.value.message

    sampler = chat.sampler(7, enable_temperature=True, temperature=1.5)
    assert sampler.cfg == tiny.sampling.model_copy(update={"enable_temperature": True, "temperature": 1.5})
    default = chat.gen.sampler
    answer = chat.complete(list(want), 4, sampler)
    next(answer)
    assert chat.gen.sampler is sampler
    answer.close()
    assert chat.gen.sampler is default
    pieces = list(chat.complete(list(want), 3))
    assert len(pieces) == chat.stats.generated and chat.gen.sampler is default
