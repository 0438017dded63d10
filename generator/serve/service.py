"""`python -m generator serve BUNDLE`: an OpenAI-compatible chat endpoint on the local runner.

The counterpart of ax-llm's ``main_api`` (same routes), on the engine ``python -m generator run`` uses.
Loopback only unless ``--host`` says otherwise; no authentication (put a proxy in front to expose it).

Routes
------
``POST /v1/chat/completions``
    OpenAI chat completions. ``messages`` is the whole conversation (system / developer, user and
    assistant messages; content a string or a list of ``{"type": "text", "text"}`` parts and, for a
    vision-language bundle, one ``{"type": "image_url", "image_url": {"url": "data:..."}}`` per user
    message: see messages.py and images.py; a remote URL is refused, the server has no network
    access; a text-only bundle refuses images with a 400 naming the part). Without a
    system message the server's system prompt is put first (``--system_prompt``, else the bundle's),
    so every conversation starts with the prefix the server keeps prefilled. The conversation is
    rendered with the bundle's chat template and only the tokens after the longest prefix already in
    the KV cache are prefilled (``usage.prompt_tokens_details.cached_tokens`` says how many were
    reused), as the board does with its tokenizer server.
    Fields: ``model`` (optional; must be an id of ``/v1/models``), ``stream``, ``stream_options.
    include_usage``, ``max_tokens`` / ``max_completion_tokens``, ``stop`` (string or up to 4),
    ``temperature`` (0 = greedy), ``top_p``, ``seed``, ``n`` (1 only), and as in main_api ``top_k``
    (or ``top-k``; ``top-p`` too) and ``repetition_penalty``. Without sampling fields,
    post_config.json applies. Other fields are ignored. Streaming sends ``data: {chat.completion.chunk}``
    server-sent events, then ``data: [DONE]``.
``GET /v1/models``, ``GET /v1/models/{id}``
    The one model (id = the bundle's model name).
``POST /v1/reset {"system_prompt"?}``
    Clear the KV cache and prefill the system prompt again (the given one becomes the server's
    default system prompt). Answers ``{"status": "ok", "precompute_len", "system_prompt"}``.
``POST /v1/stop`` (or GET, as main_api)
    Stop the answer being generated (it ends with ``finish_reason: "stop"``).
``GET /health`` (or ``/``)
    ``{"status": "ok", "model", "busy"}``.

One engine serves all requests, one at a time (a request waits up to ``--queue_timeout`` seconds
for the one before it, then gets 503). On a batching backend (``onnxruntime-fused``, by ``--backend`` or
``--config``'s llm_backend) up to ``--batch_size`` requests run at once with continuous batching and the
rest queue (generator/serve/batched.py); ``/health`` then adds ``running``, ``waiting``, ``batch_size``.
Errors are JSON, OpenAI style: ``{"error": {"message", "type", "param", "code"}}`` with 400 (bad JSON or
field, named in ``param``), 404, 405, 411, 413 or 503.

The routes and the HTTP plumbing are in generator/serve/http.py; this module holds the request
parsing and the service on the runner.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

from ..errors import GeneratorError
from .messages import ApiError, Message, parse_messages

__all__ = ["ApiError", "ChatService", "StopMatcher", "serve"]  # ApiError lives in messages.py

DEFAULT_PORT = 8000  # main_api's port (the command line is generator/cli/serve.py)


def _number(body: dict, key: str, rule_name: str | None = None):
    """body[key] (None if absent), in the range data/limits.yaml gives `rule_name` (default: the key),
    the same rule post_config.json and recipes are held to."""
    from ..limits import rule

    value = body.get(key)
    if value is None:
        return None
    problem = rule(rule_name or key).problem(value)
    if problem:
        raise ApiError(400, f"'{key}': {problem}", key)
    return value


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit = False

    def push(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.buf += piece
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.buf = self.buf[:cut], ""
            return out
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def record_answer(req: dict, finish: str, st, numerics: str) -> None:
    """An answer's finish_reason, usage and timings into `req` from its stats (TurnStats or a batched Request's:
    prompt_tokens, prefilled, generated, ttft_ms, decode_tok_s)."""
    req["finish_reason"] = finish
    req["usage"] = {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated,
                    "total_tokens": st.prompt_tokens + st.generated,
                    "prompt_tokens_details": {"cached_tokens": st.prompt_tokens - st.prefilled}}
    req["timings"] = {"ttft_ms": round(st.ttft_ms, 2), "decode_tok_s": round(st.decode_tok_s, 2)}
    if numerics != "board":  # speed in int8-activation numerics says so
        req["timings"]["numerics"] = numerics


class ChatService:
    """The model behind the HTTP layer: one engine, one request at a time."""

    def __init__(self, bundle_path: str | Path, *, system_prompt: str | None = None, kvcache_path: str | None = None,
                 model_name: str | None = None, max_tokens: int | None = None, queue_timeout: float = 600.0,
                 threads: int = 2, history: str = "used", seed: int | None = None, log=None,
                 shared_pool: bool = False, numerics: str = "board", backend: str | None = None,
                 config: str | None = None, batch_size: int | None = None):
        from ..contract import Bundle
        from ..runtime.chat import Chat
        from ..runtime.backends import open_engine
        from ..runtime.boost_config import load_config, sampling_settings
        from .batched import engine_options

        self.bundle = Bundle(bundle_path)
        cfg = load_config(config) if config else None  # --config boost.yaml; flags override it
        self.engine, self.backend = open_engine(self.bundle, backend, cfg, config, kvcache_path, threads=threads,
                                                history=history, shared_pool=shared_pool, numerics=numerics,
                                                **engine_options(backend, cfg, batch_size))
        self.chat = Chat(self.bundle, self.engine, system_prompt=system_prompt, seed=seed,
                         sampling=sampling_settings(cfg) if cfg else None)
        if cfg is not None and max_tokens is None:
            max_tokens = cfg.max_decode_length
        self.model_id = model_name or self.bundle.model
        self.aliases = {self.model_id, self.bundle.model, self.bundle.dir.name}
        self.max_tokens = max_tokens
        self.queue_timeout = queue_timeout
        self.kvcache_path = Path(kvcache_path) if kvcache_path else None
        self.log = log or (lambda msg: print(f"[I] {msg}", file=sys.stderr, flush=True))
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.created = int(time.time())
        self.batched = None  # a batching backend: many requests at once (batched.py)
        if self.backend.capabilities.get("batching"):
            from .batched import BatchedService

            self.batched = BatchedService(self.chat, self.engine, self.backend.name, queue_timeout=queue_timeout,
                                          log=self.log)
            self.precompute_len = self.batched.start_over()
            return
        with self.lock:
            self.precompute_len = self._start_over()

    # -- state ----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.batched.busy if self.batched else self.lock.locked()

    def health(self) -> dict:
        load = self.batched.load() if self.batched else {}  # running, waiting, batch_size
        return {"status": "ok", "model": self.model_id, "busy": self.busy, **load}

    def close(self) -> None:
        if self.batched:
            self.batched.close()

    def _start_over(self) -> int:
        from ..runtime.kvcache import start_over

        return start_over(self.chat, self.kvcache_path, self.log)

    def _acquire(self):
        if not self.lock.acquire(timeout=self.queue_timeout):
            raise ApiError(503, f"the model is busy (waited {self.queue_timeout:g} s for the request before)",
                           code="busy", kind="server_error")

    def reset(self, system_prompt: str | None = None) -> dict:
        if self.batched:  # waits for nothing: requests from now on get the new prefix
            if system_prompt is not None:
                self.chat.system_prompt = system_prompt
            self.precompute_len = self.batched.start_over()
            return {"status": "ok", "precompute_len": self.precompute_len, "system_prompt": self.chat.system_prompt}
        self._acquire()
        try:
            if system_prompt is not None:
                self.chat.system_prompt = system_prompt
            self.precompute_len = self._start_over()
            return {"status": "ok", "precompute_len": self.precompute_len, "system_prompt": self.chat.system_prompt}
        finally:
            self.lock.release()

    def stop(self) -> dict:
        if self.batched:
            return {"status": "ok", "was_running": self.batched.stop() > 0}
        self.stop_event.set()
        return {"status": "ok", "was_running": self.busy}

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "axgen",
                "context_length": self.engine.C}

    # -- requests ---------------------------------------------------------------------------------
    def prepare(self, body: dict) -> dict:
        """Validate a chat completion request; returns what `generate` needs (raises ApiError)."""
        model = body.get("model")
        if model is not None:
            if not isinstance(model, str):
                raise ApiError(400, "'model' must be a string", "model")
            if model not in self.aliases:
                raise ApiError(404, f"model {model!r} does not exist here; this server has {self.model_id!r} "
                                    f"(GET /v1/models)", "model", "model_not_found")
        messages, images = self._render(parse_messages(body))
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options")
        _number(body, "n")
        limit = None
        for key in ("max_completion_tokens", "max_tokens"):
            value = _number(body, key, "max_tokens")
            if value is not None:
                limit = value
                break
        if self.max_tokens is not None:
            limit = self.max_tokens if limit is None else min(limit, self.max_tokens)
        stop = body.get("stop")
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
        sampler = self._sampler_for(body)
        if messages[0]["role"] != "system" and self.chat.system_prompt:
            messages = [{"role": "system", "content": self.chat.system_prompt}] + messages
        from ..runtime.chat import ConversationRefused

        try:
            ids = self.chat.encode_conversation(messages)
        except ConversationRefused as exc:
            raise ApiError(400, f"the chat template refused the conversation: {exc}", "messages") from None
        if len(ids) >= self.engine.C:
            raise ApiError(400, f"the conversation is {len(ids)} tokens; this bundle's KV cache holds "
                                f"{self.engine.C} (--kv_cache_len) including the answer", "messages",
                           "context_length_exceeded")
        if self.batched:
            self.batched.check(ids, images)
        return {"ids": ids, "stream": stream, "include_usage": bool(opts.get("include_usage")), "limit": limit,
                "stops": stops, "sampler": sampler, "images": images}

    @property
    def takes_images(self) -> bool:
        """A vision-language bundle: a vision part, and a tokenizer that expands an image prompt."""
        return self.bundle.manifest.vision is not None and bool(self.chat.tok.tokenizer.supports_images)

    def _render(self, messages: list[Message]) -> tuple[list[dict[str, str]], list[Any]]:
        """{role, content} dicts (a user message with an image gets the tokenizer's image placeholder
        before its text) and the decoded images (uint8 RGB [H, W, 3]) in conversation order."""
        from .images import ImageRefused, decode_data_url, image_limits

        parts = [at_url for m in messages for at_url in m.images]
        if parts and not self.takes_images:
            raise ApiError(400, f"{parts[0][0]}: this model ({self.model_id}) takes no images: its bundle is "
                                f"text-only (no vision part)", parts[0][0])
        most = image_limits()["max_per_request"]
        if len(parts) > most:
            raise ApiError(400, f"{parts[most][0]}: {len(parts)} images in one request, over this server's limit "
                                f"of {most}", parts[most][0])
        images = []
        for where, url in parts:
            try:
                images.append(decode_data_url(url, where))
            except ImageRefused as exc:
                raise ApiError(400, exc.message, exc.param) from None
        tokenizer = self.chat.tok.tokenizer
        return [{"role": m.role, "content": tokenizer.user_content(m.text, img_prompt=bool(m.images))}
                for m in messages], images

    def _sampler_for(self, body: dict):
        """The request's sampler, or None for the server's (post_config.json, --seed)."""
        for name, alias in (("top_p", "top-p"), ("top_k", "top-k")):  # main_api's spellings
            if body.get(name) is None and body.get(alias) is not None:
                body[name] = body[alias]
        temperature = body.get("temperature")
        if not (type(temperature) in (int, float) and temperature == 0):  # 0: greedy, as OpenAI's API
            temperature = _number(body, "temperature")
        top_p = _number(body, "top_p")
        top_k = _number(body, "top_k")
        penalty = _number(body, "repetition_penalty")
        seed = _number(body, "seed")
        seed = None if seed is None else seed & ((1 << 64) - 1)
        if all(v is None for v in (temperature, top_p, top_k, penalty, seed)):
            return None
        cfg = {}
        if temperature is not None:
            if temperature == 0:  # OpenAI: deterministic
                cfg.update(enable_temperature=False, enable_top_p_sampling=False, enable_top_k_sampling=True, top_k=1)
            else:
                cfg.update(enable_temperature=True, temperature=float(temperature))
        if top_p is not None and temperature != 0:
            cfg.update(enable_top_p_sampling=top_p < 1, top_p=float(top_p))
        if top_k is not None and temperature != 0:
            cfg.update(enable_top_k_sampling=True, top_k=top_k)
        if penalty is not None:
            cfg.update(enable_repetition_penalty=penalty != 1, repetition_penalty=float(penalty))
        return self.chat.sampler(seed, **cfg)

    def generate(self, req: dict) -> Iterator[str]:
        """Text pieces of the answer; afterwards `req` holds finish_reason and usage. Holds the engine
        lock while it runs (close the iterator to release it early); on a batching backend, runs it with the
        others (batched.py)."""
        if self.batched:
            yield from self.batched.generate(req)
            return
        self._acquire()
        try:
            self.stop_event.clear()
            stops = StopMatcher(req["stops"])
            finish = "length"
            images = {"images": req["images"]} if req["images"] else {}  # a text request: the call as before
            with closing(self.chat.complete(req["ids"], req["limit"], req["sampler"], **images)) as answer:
                for piece in answer:
                    piece = stops.push(piece)
                    if piece:
                        yield piece
                    if stops.hit:
                        finish = "stop"
                        break
                    if self.stop_event.is_set():
                        finish = "stop"
                        break
                else:
                    if self.chat.stats.hit_eos:
                        finish = "stop"
                    tail = stops.flush()
                    if tail:
                        yield tail
            record_answer(req, finish, self.chat.stats, self.engine.numerics)
        finally:
            self.lock.release()


def serve(args) -> int:
    if not 0 <= args.port <= 65535:
        raise GeneratorError(f"--port must be in 0..65535, got {args.port}.")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise GeneratorError(f"--max_tokens must be >= 1, got {args.max_tokens}.")
    service = ChatService(args.bundle, system_prompt=args.system_prompt, kvcache_path=args.kvcache_path,
                          model_name=args.model_name, max_tokens=args.max_tokens, queue_timeout=args.queue_timeout,
                          threads=args.threads, history=args.history, seed=args.seed, shared_pool=True,
                          numerics=getattr(args, "numerics", "board"), backend=getattr(args, "backend", None),
                          config=getattr(args, "config", None), batch_size=getattr(args, "batch_size", None))
    from .http import ApiServer  # the HTTP layer loads the tokenizer server's plumbing: only when serving

    try:
        server = ApiServer((args.host, args.port), service, log_requests=args.log_requests)
    except OSError as exc:
        raise GeneratorError(f"Cannot listen on {args.host}:{args.port} (--host/--port): {exc}.") from None
    note = ", numerics fast (int8 activations, not the board's)" if service.engine.numerics == "fast" else ""
    print(f"[I] model {service.model_id}: precompute_len {service.precompute_len}, kv_cache_len {service.engine.C}"
          f"{note}", file=sys.stderr, flush=True)
    if service.batched:
        print(f"[I] {service.batched.describe()}", file=sys.stderr, flush=True)
    try:
        server.serve_until_interrupted()
    finally:
        service.close()
    return 0
