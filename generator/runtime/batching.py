"""Continuous batching: many requests on one engine with a paged KV pool, driven by one scheduler thread.

The engine is the fused backend's (runtime/fused_engine.py): ``engine.step(seqs, tokens)`` feeds every
sequence its new tokens and returns the logits of each one's last token, with the K/V rows in
``engine.pool`` (a runtime/paged.py BlockPool). Only the scheduler thread touches the engine and the pool.

Policy (vLLM's, reduced to one process)
---------------------------------------
Each iteration of the scheduler thread:

1. Retire requests that were cancelled or waited past ``queue_timeout``.
2. Admit waiting requests, first come first served, while fewer than ``batch_size`` run and the pool
   has room for the joining prompt plus one block of headroom per running sequence. A joining request
   is prefilled alone: ``pool.attach_prefix`` shares the cached blocks of its prefix (the server's
   system prompt, kept in its own sequence, so every conversation reuses it), then
   ``engine.step([seq], [the rest of its prompt])``; its first token is sampled from those logits.
3. One decode step over every running sequence with its last sampled token; each row is sampled by
   the request's own Sampler (its own generated tokens as the repetition-penalty history), and the
   token goes to the request's queue at once (streaming). A request ends at an EOS id, at its
   ``max_new_tokens``, when its sequence holds ``kv_cache_len`` (engine.C) tokens, or when cancelled;
   its blocks are freed. So sequences join and leave between decode steps.

Pool exhaustion before a decode step preempts the most recently admitted running request: its K/V rows
are copied out (host memory, as vLLM's swap), its blocks freed, and it goes back to the front of the
queue with prompt + tokens so far. Readmitted, its rows are written back, not recomputed (a prefill
would give rows that differ in the last bits, enough to flip a near-tie of bf16 logits later): its
answer is exactly the one it would have given, its client only waits. Blocks still in the prefix cache
with the very same rows are shared again.
A request that alone needs more blocks than the pool can give fails with a clear error naming
block_size and num_blocks; the others go on. An exception in the engine fails the requests of that
step only: a failed decode step is retried per sequence (rewound first) to find the one at fault,
and the thread keeps serving. ``close()`` stops the thread and fails what is queued or running.

Over 400 lines: the scheduler and its Request are one state machine owned by one thread; split, the
invariants (who frees a sequence, when a stream ends) would live in two modules.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Callable, Iterator

import numpy as np

from ..errors import GeneratorError
from .generation import Sampler, TurnStats
from .paged import PoolExhausted

_END = object()


class RequestFailed(GeneratorError):
    """A request could not be (fully) answered. ``reason``: too_big (the pool or kv_cache_len cannot hold
    it), queue_timeout, engine (the engine raised), closed (the batcher was closed)."""

    def __init__(self, message: str, reason: str):
        self.reason = reason
        super().__init__(message)


class Request:
    """One submitted prompt: its tokens stream through `tokens()`; `stats` and `error` as it runs."""

    def __init__(self, ids: list[int], sampler: Sampler, budget: int, wake: Callable[[], None], numerics: str):
        self.prompt = list(ids)
        self.sampler = sampler
        self.budget = budget  # the most tokens it may generate
        self.out: list[int] = []  # generated so far (also the sampler's history)
        self.stats = TurnStats(prompt_tokens=len(ids), numerics=numerics)
        self.error: str | None = None
        self.reason: str | None = None
        self.preempted = 0  # times it was put back in the queue to free blocks
        self._saved = None  # (cached ids, K rows, V rows) while preempted
        self.seq = None  # its pool Sequence while running
        self.submitted = time.perf_counter()
        self.done = threading.Event()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = False
        self._admitted = False
        self._t_first: float | None = None
        self._wake = wake
        self._ended = False

    def cancel(self) -> None:
        """Stop generating (the stream ends without an error); a no-op once finished."""
        self._cancelled = True
        self._wake()

    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        """Each generated token as it comes (EOS included, as Generator.stream yields it); ends at EOS,
        the budget or a cancel; raises RequestFailed if the request failed. `timeout`: the longest wait
        for one token (None: no limit)."""
        while not self._ended:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise RequestFailed(f"no token within {timeout:g} s", "timeout") from None
            if item is _END:
                self._ended = True
                break
            yield item
        if self.error is not None:
            raise RequestFailed(self.error, self.reason or "engine")

    # -- the scheduler's side -----------------------------------------------------------------------
    def _push(self, tok: int) -> None:
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first = now
            self.stats.ttft_ms = (now - self.submitted) * 1000  # queueing included: what the client sees
        self.out.append(tok)
        st = self.stats
        st.generated = len(self.out)
        if st.generated > 1:
            st.decode_tok_s = (st.generated - 1) / max(now - self._t_first, 1e-9)
        self._queue.put(tok)

    def _end(self, error: str | None = None, reason: str | None = None) -> None:
        if not self.done.is_set():
            self.error, self.reason = error, reason
            self.done.set()
            self._queue.put(_END)


class Batcher:
    """One scheduler thread running `engine.step` for every submitted request (module docstring)."""

    def __init__(self, engine, *, batch_size: int, eos_ids, log=None, queue_timeout: float | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GeneratorError(f"batch_size must be a whole number >= 1; got {batch_size!r}")
        self.engine, self.pool = engine, engine.pool
        self.batch_size = batch_size
        self.eos = {int(t) for t in eos_ids}
        self.log = log or (lambda msg: None)
        self.queue_timeout = queue_timeout
        self.C = int(engine.C)
        self.numerics = getattr(engine, "numerics", "board")
        self.steps = 0  # decode steps run
        self.peak = 0  # the most requests decoded in one step
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # in admission order
        self._tasks: deque = deque()
        self._closed = False
        self._prefix = None  # the kept sequence of the shared prefix (set_prefix)
        self._thread = threading.Thread(target=self._loop, name="axgen-batcher", daemon=True)
        self._thread.start()

    # -- the public side (any thread) ------------------------------------------------------------------
    running = property(lambda self: len(self._running), doc="requests in the running batch")
    waiting = property(lambda self: len(self._waiting), doc="requests queued")

    def check_fits(self, ids: list[int]) -> None:
        """Raise RequestFailed (too_big) if a prompt of `ids` can never run: over kv_cache_len, or more
        blocks than the whole pool."""
        bs, n = self.pool.block_size, self.pool.num_blocks
        if len(ids) > self.C:
            raise RequestFailed(f"the prompt is {len(ids)} tokens; a sequence holds at most {self.C} "
                                f"(kv_cache_len)", "too_big")
        need = -(-len(ids) // bs)
        if need > n:
            raise RequestFailed(f"the prompt is {len(ids)} tokens: {need} KV blocks of block_size {bs}, more than "
                                f"the whole pool (num_blocks {n}, {n * bs} tokens); raise num_blocks or block_size",
                                "too_big")

    def submit(self, ids: list[int], sampler: Sampler, max_new_tokens: int | None = None) -> Request:
        """Queue a prompt; returns its Request at once (failed already if it can never run)."""
        ids = [int(t) for t in ids]
        if not ids:
            raise GeneratorError("a request needs at least one prompt token")
        budget = self.C - len(ids) + 1
        if max_new_tokens is not None:
            budget = min(budget, int(max_new_tokens))
        req = Request(ids, sampler, max(budget, 0), self._wake, self.numerics)
        try:
            self.check_fits(ids)
        except RequestFailed as exc:
            req._end(str(exc), exc.reason)
            return req
        if req.budget < 1:
            req._end()
            return req
        with self._cv:
            if self._closed:
                req._end("the server is shutting down (batcher closed)", "closed")
                return req
            self._waiting.append(req)
            self._cv.notify()
        return req

    def cancel_running(self) -> int:
        """Cancel every running request (POST /v1/stop); returns how many."""
        with self._cv:
            running = list(self._running)
        for req in running:
            req.cancel()
        return len(running)

    def set_prefix(self, ids: list[int], timeout: float | None = None) -> int:
        """Prefill `ids` (the server's system prompt) into a sequence kept until the next call, so every
        request starting with them shares their full blocks; the previous one is released (requests
        running on it keep their blocks). Runs on the scheduler thread between steps. Returns len(ids)."""
        ids = [int(t) for t in ids]

        def task():
            seq = None
            if ids:
                seq = self.pool.new_sequence()
                reused = self.pool.attach_prefix(seq, ids)
                try:
                    self.engine.step([seq], [ids[reused:]])
                except BaseException:
                    self.pool.free(seq)
                    raise
            old, self._prefix = self._prefix, seq
            if old is not None:
                self.pool.free(old)
            return len(ids)

        return self.call(task, timeout)

    def call(self, fn: Callable, timeout: float | None = None):
        """Run fn() on the scheduler thread between steps; its result (or exception) comes back here."""
        box: dict = {}
        done = threading.Event()
        with self._cv:
            if self._closed:
                raise GeneratorError("the batcher is closed")
            self._tasks.append((fn, box, done))
            self._cv.notify()
        if not done.wait(timeout):
            raise GeneratorError(f"the scheduler did not run the task within {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread; queued and running requests fail with 'closed'."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the scheduler thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._tasks or self._running or self._waiting):
                    self._cv.wait()
                if self._closed:
                    break
                tasks = list(self._tasks)
                self._tasks.clear()
            for fn, box, done in tasks:
                try:
                    box["result"] = fn()
                except BaseException as exc:  # handed to the caller
                    box["error"] = exc
                done.set()
            try:
                self._iteration()
            except Exception as exc:  # a bug of ours: fail what runs, keep serving
                self.log(f"batcher: {type(exc).__name__}: {exc}; failing the running requests")
                for req in list(self._running):
                    self._fail(req, f"internal error in the batch scheduler: {type(exc).__name__}: {exc}", "engine")
        self._shutdown()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _shutdown(self) -> None:
        with self._cv:
            pending = list(self._running) + list(self._waiting)
            tasks = list(self._tasks)
            self._tasks.clear()
        for req in pending:
            self._fail(req, "the server is shutting down (batcher closed)", "closed")
        for _fn, box, done in tasks:
            box["error"] = GeneratorError("the batcher is closed")
            done.set()
        if self._prefix is not None:
            self.pool.free(self._prefix)
            self._prefix = None

    def _iteration(self) -> None:
        now = time.perf_counter()
        with self._cv:
            waiting = list(self._waiting)
        for req in waiting:
            if req._cancelled:
                self._finish(req)
            elif self.queue_timeout is not None and not req._admitted and now - req.submitted > self.queue_timeout:
                self._fail(req, f"the request waited {self.queue_timeout:g} s for a place in the batch "
                                f"(batch_size {self.batch_size}, {self.running} running)", "queue_timeout")
        for req in list(self._running):
            if req._cancelled:
                self._finish(req)
        self._admit()
        if self._running:
            self._decode()

    def _admit(self) -> None:
        pool = self.pool
        while len(self._running) < self.batch_size:
            with self._cv:
                if not self._waiting:
                    return
                req = self._waiting[0]
            ids = req.prompt if req._saved is None else req._saved[0]  # preempted: its cached tokens
            seq = pool.new_sequence()
            reused = pool.attach_prefix(seq, ids)
            if req._saved is not None and reused:  # share only blocks holding its very rows
                k, v, at = req._saved[1], req._saved[2], pool.slots(seq)
                if not (np.array_equal(pool.k[:, at], k[:, :reused]) and np.array_equal(pool.v[:, at], v[:, :reused])):
                    pool.rewind(seq, 0)
                    reused = 0
            need = pool.blocks_needed(seq, len(ids) - reused)
            if need + len(self._running) > pool.free_blocks:  # a block of headroom per running sequence
                pool.free(seq)
                if self._running:
                    return  # wait for blocks to come free
                self._fail(req, self._too_big(len(ids), need), "too_big")
                continue
            with self._cv:
                self._waiting.popleft()
            if req._saved is not None:  # write its rows back; its next token is out[-1], already sampled
                slots = pool.reserve(seq, len(ids) - reused)
                pool.k[:, slots], pool.v[:, slots] = req._saved[1][:, reused:], req._saved[2][:, reused:]
                pool.commit(seq, ids[reused:])
                req._saved, req.seq = None, seq
                with self._cv:
                    self._running.append(req)
                continue
            try:
                logits = self.engine.step([seq], [ids[reused:]])
            except PoolExhausted as exc:
                pool.free(seq)
                if self._running:
                    with self._cv:
                        self._waiting.appendleft(req)
                    return
                self._fail(req, str(exc), "too_big")
                continue
            except Exception as exc:
                pool.free(seq)
                self._fail(req, f"the engine failed on this request's prompt: {type(exc).__name__}: {exc}", "engine")
                continue
            if not req._admitted:
                req._admitted = True
                req.stats.prefilled = len(req.prompt) - reused
            req.seq = seq
            with self._cv:
                self._running.append(req)
            self._emit(req, logits[0])

    def _too_big(self, tokens: int, need: int) -> str:
        bs, n = self.pool.block_size, self.pool.num_blocks
        return (f"the request needs {need} more KV blocks of block_size {bs} for its {tokens} tokens and the pool "
                f"(num_blocks {n}) has {self.pool.free_blocks} free with nothing else running; raise num_blocks "
                f"or block_size, or shorten the conversation")

    def _decode(self) -> None:
        pool = self.pool
        while len(self._running) > 1 and sum(pool.blocks_needed(r.seq, 1) for r in self._running) > pool.free_blocks:
            self._preempt(self._running[-1])
        batch = list(self._running)
        if len(batch) == 1 and pool.blocks_needed(batch[0].seq, 1) > pool.free_blocks:
            req = batch[0]
            self._fail(req, self._too_big(len(req.seq) + 1, pool.blocks_needed(req.seq, 1)), "too_big")
            return
        lengths = [len(r.seq) for r in batch]
        try:
            logits = self.engine.step([r.seq for r in batch], [[r.out[-1]] for r in batch])
        except PoolExhausted:  # the check above should prevent it; make room and try next iteration
            for r, n in zip(batch, lengths):
                pool.rewind(r.seq, n)
            self._preempt(batch[-1]) if len(batch) > 1 else self._fail(batch[0], self._too_big(lengths[0] + 1, 1),
                                                                       "too_big")
            return
        except Exception as exc:
            logits = self._isolate(batch, lengths, exc)
        self.steps += 1
        self.peak = max(self.peak, len(batch))
        for req, row in zip(batch, logits):
            if row is not None:
                self._emit(req, row)

    def _isolate(self, batch: list[Request], lengths: list[int], exc: Exception) -> list:
        """A failed batched step: run each sequence alone (rewound first) to fail only the one(s) at fault."""
        self.log(f"batcher: a decode step of {len(batch)} failed ({type(exc).__name__}: {exc}); retrying each alone")
        rows: list = []
        for req, n in zip(batch, lengths):
            self.pool.rewind(req.seq, n)
            if len(batch) == 1:
                err = exc
            else:
                try:
                    rows.append(self.engine.step([req.seq], [[req.out[-1]]])[0])
                    continue
                except Exception as again:
                    err = again
                    self.pool.rewind(req.seq, n)
            self._fail(req, f"the engine failed on this request: {type(err).__name__}: {err}", "engine")
            rows.append(None)
        return rows

    def _emit(self, req: Request, logits: np.ndarray) -> None:
        """Sample the request's next token from its logits row, stream it, retire the request if done."""
        try:
            tok = int(req.sampler(np.asarray(logits), req.out, None))
        except Exception as exc:
            self._fail(req, f"sampling failed: {type(exc).__name__}: {exc}", "engine")
            return
        req._push(tok)
        if tok in self.eos:
            req.stats.hit_eos = True
            self._finish(req)
        elif len(req.out) >= req.budget or len(req.seq) >= self.C:
            self._finish(req)

    def _preempt(self, req: Request) -> None:
        self.log(f"batcher: KV pool full, request of {len(req.prompt)}+{len(req.out)} tokens back to the queue")
        at = self.pool.slots(req.seq)
        req._saved = (list(req.seq.ids), self.pool.k[:, at], self.pool.v[:, at])  # fancy indexing: copies
        with self._cv:
            self._running.remove(req)
            self._waiting.appendleft(req)
        self.pool.free(req.seq)
        req.seq = None
        req.preempted += 1

    def _finish(self, req: Request, message: str | None = None, reason: str | None = None) -> None:
        with self._cv:
            for where in (self._running, self._waiting):
                if req in where:
                    where.remove(req)
        if req.seq is not None:
            self.pool.free(req.seq)
            req.seq = None
        if message is not None:
            self.log(f"batcher: request failed ({reason}): {message}")
        req._end(message, reason)

    _fail = _finish
