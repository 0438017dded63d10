"""`serve` on a batching backend (`onnxruntime-fused`): many conversations at once.

ChatService (service.py) hands its requests here when the chosen backend's capabilities say
``batching``: a runtime/batching.py Batcher runs them with continuous batching (up to ``batch_size``
decoded together, the rest queued; sequences join and leave between decode steps) on one paged KV
pool. The server's system prompt is prefilled once into a sequence the batcher keeps, so every
conversation starting with it shares its full blocks (``cached_tokens`` counts them). Each request's
tokens are turned into text by the same StreamDecoder and StopMatcher as one-at-a-time serving, with
its own sampler (the request's fields, else post_config.json / --config with a seed drawn from the
server's generator). A request that can never fit the pool gets 400 naming it; one that waits past
--queue_timeout gets 503; POST /v1/stop cancels every running request; POST /v1/reset swaps the kept
prefix without waiting (requests already running keep theirs).
"""

from __future__ import annotations

import threading
from typing import Iterator

from ..errors import GeneratorError
from ..runtime.batching import Batcher, RequestFailed
from ..runtime.generation import Sampler, StreamDecoder
from .messages import ApiError

DEFAULT_BATCH_SIZE = 8  # a batching backend without --batch_size or a config's batch_size


def engine_options(backend: str | None, cfg, batch_size: int | None) -> dict:
    """Options for open_engine from --batch_size and the config's batch_size / block_size / num_blocks,
    for the backend that --backend or the config's llm_backend names (open_engine reports a bad name)."""
    from ..runtime import backends

    name = backend or (cfg.llm_backend if cfg is not None and cfg.llm_backend else backends.DEFAULT)
    try:
        cls = backends.get(name)
    except GeneratorError:
        return {}
    if not cls.capabilities.get("batching"):
        if batch_size is not None and batch_size > 1:
            raise GeneratorError(f"--batch_size {batch_size}: backend {name!r} lacks batching (batch_size 1 only; "
                                 f"--backend onnxruntime-fused batches).")
        return {}
    given = cfg.model_fields_set if cfg is not None else set()
    if batch_size is None:
        batch_size = cfg.batch_size if "batch_size" in given else DEFAULT_BATCH_SIZE
    options = {"batch_size": batch_size}
    for key in ("block_size", "num_blocks"):
        if cfg is not None and getattr(cfg, key) is not None:
            options[key] = getattr(cfg, key)
    return options


class BatchedService:
    """The many-users half of ChatService: a Batcher on the engine, text streaming per request."""

    def __init__(self, chat, engine, backend_name: str, *, queue_timeout: float, log):
        self.chat, self.engine, self.backend_name = chat, engine, backend_name
        self.queue_timeout = queue_timeout
        self.batcher = Batcher(engine, batch_size=int(engine.batch_size), eos_ids=chat.gen.eos, log=log,
                               queue_timeout=queue_timeout)
        self._seed_lock = threading.Lock()

    def describe(self) -> str:
        pool = self.batcher.pool
        return (f"backend {self.backend_name}: batch_size {self.batcher.batch_size}, block_size {pool.block_size}, "
                f"num_blocks {pool.num_blocks} ({pool.block_size * pool.num_blocks} tokens of KV)")

    def start_over(self) -> int:
        """Prefill the chat's system prompt into the kept prefix sequence; returns its token count."""
        ids = list(self.chat.tok.reset(self.chat.system_prompt))
        self.chat.system_ids = ids
        return self.batcher.set_prefix(ids, timeout=self.queue_timeout)

    def load(self) -> dict:
        return {"running": self.batcher.running, "waiting": self.batcher.waiting,
                "batch_size": self.batcher.batch_size}

    @property
    def busy(self) -> bool:
        return self.batcher.running + self.batcher.waiting > 0

    def stop(self) -> int:
        return self.batcher.cancel_running()

    def close(self) -> None:
        self.batcher.close()

    def check(self, ids: list[int], images: list) -> None:
        """400 for what this backend can never answer: images, or a prompt over the KV pool."""
        if images:
            raise ApiError(400, f"backend {self.backend_name!r} takes no images (serve the bundle with "
                                f"--backend onnxruntime)", "messages")
        try:
            self.batcher.check_fits(ids)
        except RequestFailed as exc:
            raise ApiError(400, str(exc), "messages", "context_length_exceeded") from None

    def _sampler(self, sampler: Sampler | None) -> Sampler:
        """The request's own sampler, or the server's settings with a seed drawn from its generator."""
        if sampler is not None:
            return sampler
        base = self.chat.gen.sampler
        with self._seed_lock:
            seed = int(base.rng.integers(1 << 62))
        return Sampler(base.cfg, seed)

    def generate(self, req: dict) -> Iterator[str]:
        """As ChatService.generate: text pieces, then finish_reason, usage and timings in `req`."""
        from .service import StopMatcher, record_answer

        request = self.batcher.submit(req["ids"], self._sampler(req["sampler"]), req["limit"])
        stops = StopMatcher(req["stops"])
        decoder = StreamDecoder(self.chat.tok.decode, self.chat.gen.eos)
        finish = "length"
        try:
            for tok in request.tokens():
                piece = stops.push(decoder.push(tok))
                if piece:
                    yield piece
                if stops.hit:
                    finish = "stop"
                    break
            else:
                if request.stats.hit_eos or request._cancelled:
                    finish = "stop"
                tail = stops.flush()
                if tail:
                    yield tail
        except RequestFailed as exc:
            if exc.reason == "queue_timeout":
                raise ApiError(503, f"the model is busy: {exc}", code="busy", kind="server_error") from None
            if exc.reason != "too_big" or request.stats.generated == 0:
                status = 400 if exc.reason == "too_big" else 503
                raise ApiError(status, str(exc), "messages" if status == 400 else None,
                               kind="invalid_request_error" if status == 400 else "server_error") from None
            # it outgrew the pool while alone: the answer ends here, as at kv_cache_len
        finally:
            request.cancel()  # the client left or a stop string matched: free its place (no-op when done)
        record_answer(req, finish, request.stats, self.engine.numerics)
