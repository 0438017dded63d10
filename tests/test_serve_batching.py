"""`serve --config boost.yaml` on the fused backend: many conversations at once with continuous batching.

An in-process server (port 0) with llm_backend onnxruntime-fused and batch_size 8 on a tiny bundle:
8 concurrent streaming clients on loopback (threads) all get the answer the same request gets alone
from a fresh server with the same config (greedy). The requests differ from the first block after the
system prompt's full blocks on, so no request shares another's computed rows (rows prefilled from a
different start differ in their last bits; runtime/batching.py). Also: /health counts, /v1/stop,
/v1/reset, a prompt over the pool (400), a queue timeout (503), the start-up line. Every wait has a
timeout.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from generator.contract import Bundle
from generator.serve.http import ApiServer
from generator.serve.service import ApiError, ChatService
from models import SMALL_GROUPS, quiet_build, threads

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60
USERS = ["Hello there", "Name three colors", "Quick: two plus two?", "Write a haiku about snow",
         "Tell me a story", "Blue sky, why?", "List some fruits", "Count to ten"]  # each starts otherwise
LIMITS = [12, 30, 20, 40, 25, 16, 35, 22]


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_batching") / "b"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="s8", hidden_state_type="bf16",
                post_weight_type="s8", **dict(SMALL_GROUPS, kv_cache_len=256, last_kv_cache_len=[16, 64, 192],
                                              group_size=32))
    return Bundle(out)


def config(tmp_path_factory, text: str) -> str:
    path = tmp_path_factory.mktemp("boost") / "boost.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


BOOST = "llm_backend: onnxruntime-fused\nbatch_size: 8\nblock_size: 16\n"


def start(bundle_dir, cfg: str, **kw):
    service = ChatService(bundle_dir, threads=threads(), config=cfg, log=lambda msg: None, **kw)
    server = ApiServer(("127.0.0.1", 0), service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stop(server):
    server.shutdown()
    server.server_close()
    server.service.close()


def raw(url: str, method: str, path: str, body=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    conn.close()
    return resp.status, payload


def stream(url: str, user: str, max_tokens: int) -> tuple[str, str, dict]:
    """One streaming chat over raw HTTP: (text, finish_reason, usage)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    body = {"messages": [{"role": "user", "content": user}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    text, finish, usage = "", None, None
    for line in resp.read().decode("utf-8").splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: "):])
        if event["choices"]:
            text += event["choices"][0]["delta"].get("content") or ""
            finish = event["choices"][0]["finish_reason"] or finish
        if event.get("usage"):
            usage = event["usage"]
    conn.close()
    return text, finish, usage


def hold_scheduler(service) -> threading.Event:
    """Park the batcher's thread in a task until the returned event is set (requests queue meanwhile)."""
    release, parked = threading.Event(), threading.Event()

    def park():
        parked.set()
        assert release.wait(WAIT)

    threading.Thread(target=service.batched.batcher.call, args=(park, WAIT), daemon=True).start()
    assert parked.wait(WAIT)
    return release


def wait_for(cond, what: str):
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_eight_concurrent_streams_equal_their_single_stream_answers(tiny, tmp_path_factory):
    cfg = config(tmp_path_factory, BOOST)
    alone_server, alone_url = start(tiny.dir, cfg)
    try:
        svc = alone_server.service
        ids = [svc.prepare({"messages": [{"role": "user", "content": u}]})["ids"] for u in USERS]
        shared = svc.precompute_len // 16 * 16  # the system prompt's full blocks
        assert len({tuple(i[shared:shared + 16]) for i in ids}) == len(USERS)  # no other block in common
        want = [stream(alone_url, u, n) for u, n in zip(USERS, LIMITS)]
    finally:
        stop(alone_server)
    assert all(w[2]["prompt_tokens_details"]["cached_tokens"] == shared > 0 for w in want)

    server, url = start(tiny.dir, cfg)
    try:
        svc = server.service
        assert svc.batched.batcher.batch_size == 8
        release = hold_scheduler(svc)  # all 8 queue first, then join the batch together
        got: list = [None] * len(USERS)

        def client(i):
            got[i] = stream(url, USERS[i], LIMITS[i])

        clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(USERS))]
        for c in clients:
            c.start()
        wait_for(lambda: raw(url, "GET", "/health")[1].get("waiting") == len(USERS), "8 queued requests")
        health = raw(url, "GET", "/health")[1]
        assert health["busy"] and health["running"] == 0 and health["batch_size"] == 8
        release.set()
        for c in clients:
            c.join(WAIT)
            assert not c.is_alive(), "a client did not finish in time"
        assert got == want
        assert svc.batched.batcher.peak == 8  # all decoded together
        assert raw(url, "GET", "/health")[1] == {"status": "ok", "model": tiny.model, "busy": False, "running": 0,
                                                  "waiting": 0, "batch_size": 8}
    finally:
        stop(server)


def test_stop_reset_pool_limit_and_queue_timeout(tiny, tmp_path_factory):
    cfg = config(tmp_path_factory, "llm_backend: onnxruntime-fused\nbatch_size: 2\nblock_size: 16\nnum_blocks: 12\n")
    server, url = start(tiny.dir, cfg, queue_timeout=0.05)
    try:
        svc = server.service
        # /v1/stop ends the running answers (finish_reason stop); the engine is held after 3 steps meanwhile
        batcher, ticks = svc.batched.batcher, threading.Semaphore(3)
        real = batcher.engine

        class Held:
            def step(self, seqs, tokens):
                assert ticks.acquire(timeout=WAIT)
                return real.step(seqs, tokens)

        batcher.engine = Held()
        req = svc.prepare({"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 150})
        pieces = svc.generate(req)
        assert next(pieces)
        status, body = raw(url, "POST", "/v1/stop", {})
        assert status == 200 and body == {"status": "ok", "was_running": True}
        ticks.release(10000)
        list(pieces)
        batcher.engine = real
        assert req["finish_reason"] == "stop" and req["usage"]["completion_tokens"] < 150
        # a prompt over the whole pool (12 blocks of 16 tokens): 400 naming it
        status, body = raw(url, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "word " * 48}], "max_tokens": 2})  # ~230 tokens
        assert status == 400 and "num_blocks 12" in body["error"]["message"] and body["error"]["param"] == "messages"
        # past --queue_timeout in the queue: 503
        release = hold_scheduler(svc)
        late: list = []
        client = threading.Thread(target=lambda: late.append(raw(url, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})), daemon=True)
        client.start()
        wait_for(lambda: svc.batched.batcher.waiting == 1, "a queued request")
        time.sleep(0.2)  # longer than its queue_timeout, while the scheduler is held
        release.set()
        client.join(WAIT)
        assert late and late[0][0] == 503 and "waited 0.05 s" in late[0][1]["error"]["message"]
        # /v1/reset: later requests start from the new system prompt, computed once
        status, body = raw(url, "POST", "/v1/reset", {"system_prompt": "Be brief. 简短"})
        assert status == 200 and body["system_prompt"] == "Be brief. 简短"
        status, resp = raw(url, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert status == 200 and resp["usage"]["prompt_tokens_details"]["cached_tokens"] == \
            body["precompute_len"] // 16 * 16
        assert resp["usage"]["prompt_tokens"] == len(svc.prepare({"messages": [
            {"role": "system", "content": "Be brief. 简短"}, {"role": "user", "content": "Hi"}]})["ids"])
    finally:
        stop(server)
    with pytest.raises(ApiError, match="takes no images"):
        svc.batched.check([1, 2], ["an image"])


def test_batch_size_flag_and_the_start_up_line(tiny, tmp_path_factory):
    from generator.errors import GeneratorError

    with pytest.raises(GeneratorError, match="--batch_size 4: backend 'onnxruntime' lacks batching"):
        ChatService(tiny.dir, threads=threads(), batch_size=4, log=lambda msg: None)
    cfg = config(tmp_path_factory, "llm_backend: onnxruntime-fused\nblock_size: 16\nnum_blocks: 40\n")
    proc = subprocess.Popen([sys.executable, "-m", "generator", "serve", str(tiny.dir), "--port", "0", "--config", cfg,
                             "--batch_size", "3", "--threads", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})
    try:
        line = proc.stdout.readline()
        assert line.startswith("Server running at http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=WAIT)
    assert "backend onnxruntime-fused: batch_size 3, block_size 16, num_blocks 40" in err
