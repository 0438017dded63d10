"""Continuous batching (runtime/batching.py): requests joining and leaving the running batch mid-decode,
preemption under a small KV pool, a request too big for the pool, cancel, engine failures and close,
each checked against the same prompts run alone, one by one (greedy: identical tokens).

First on a fake engine with the fused engine's step() contract (a deterministic numpy "model" that
reads its context back from a real BlockPool through the block table, so wrong sharing or a lost block
changes its tokens), then on the real fused backend with a tiny bundle. Every wait has a timeout.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from generator.contract import Sampling
from generator.errors import GeneratorError
from generator.runtime.batching import Batcher, RequestFailed
from generator.runtime.generation import Sampler
from generator.runtime.paged import BlockPool, PoolExhausted

WAIT = 60  # seconds: the most any one wait in these tests may take
EOS = 0


def greedy() -> Sampler:
    return Sampler(Sampling(enable_top_k_sampling=False))


class FakeEngine:
    """FusedEngine.step's contract on a numpy model: token t at position p stores K = E[t] + P[p]; the
    logits of a token are tanh(a decayed sum of the K rows of its sequence, read from the pool) @ W."""

    def __init__(self, *, block_size=4, num_blocks=64, C=64, vocab=40, dim=16, seed=0, fail=None, gate=None,
                 ticks=None):
        self.pool = BlockPool(1, dim, np.float32, block_size, num_blocks)
        rng = np.random.default_rng(seed)
        self.E = rng.standard_normal((vocab, dim)).astype(np.float32)
        self.P = (0.5 * rng.standard_normal((C + 1, dim))).astype(np.float32)
        self.W = rng.standard_normal((dim, vocab)).astype(np.float32)
        self.C, self.numerics, self.vocab = C, "fake", vocab
        self.fail = fail  # fail(seq, tokens) -> True: raise (after reserving, as a crash mid-step would)
        self.gate = gate  # an Event every step waits for
        self.ticks = ticks  # a Semaphore: every step takes one permit
        self.batches: list[int] = []  # batch size of every step

    def step(self, seqs, tokens):
        assert len(seqs) == len(tokens) >= 1 and (len(seqs) == 1 or all(len(t) == 1 for t in tokens))
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        if self.ticks is not None:
            assert self.ticks.acquire(timeout=WAIT)
        pool = self.pool
        need = sum(pool.blocks_needed(s, len(t)) for s, t in zip(seqs, tokens))
        if need > pool.free_blocks:
            raise PoolExhausted(f"fake: {need} blocks needed, {pool.free_blocks} free (block_size "
                                f"{pool.block_size}, num_blocks {pool.num_blocks})", needed=need, free=pool.free_blocks)
        self.batches.append(len(seqs))
        out = []
        for seq, toks in zip(seqs, tokens):
            assert len(seq) + len(toks) <= self.C
            slots = pool.reserve(seq, len(toks))
            if self.fail is not None and self.fail(seq, toks):
                raise RuntimeError("fake engine: injected failure")
            pos = np.arange(len(seq), len(seq) + len(toks))
            pool.k[0, slots] = self.E[toks] + self.P[pos]
            pool.commit(seq, toks)
            rows = pool.k[0, pool.slots(seq)]
            decay = 0.7 ** np.arange(len(seq) - 1, -1, -1, dtype=np.float32)
            out.append(np.tanh(decay @ rows) @ self.W)
        return np.stack(out)


def alone(engine, prompt: list[int], max_new: int, eos=EOS) -> list[int]:
    """The reference: one prompt on its own, as a server would run it with nothing else running: the
    cached blocks of its prefix shared (the system prompt kept by the caller), the rest prefilled in one
    step. (Rows prefilled from another start differ in their last bits, enough to flip a tie of logits.)"""
    pool = engine.pool
    seq = pool.new_sequence()
    reused = pool.attach_prefix(seq, prompt)
    logits = engine.step([seq], [prompt[reused:]])
    out = []
    while True:
        tok = int(np.argmax(logits[0]))
        out.append(tok)
        if tok == eos or len(out) >= max_new or len(seq) >= engine.C:
            break
        logits = engine.step([seq], [[tok]])
    pool.free(seq)
    return out


def collect(req) -> list[int]:
    return list(req.tokens(timeout=WAIT))


def prompts(seed: int, lengths: list[int], vocab=40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, vocab, n)] for n in lengths]


@pytest.fixture
def batcher_of():
    made = []

    def make(engine, **kw):
        b = Batcher(engine, batch_size=kw.pop("batch_size", 4), eos_ids=kw.pop("eos_ids", [EOS]), **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def test_joining_and_leaving_mid_decode_gives_the_alone_tokens(batcher_of):
    system = prompts(1, [9])[0]
    ps = [system + p for p in prompts(2, [3, 11, 1, 6, 17, 4])]
    limits = [20, 7, 25, 3, 12, 30]
    ref = FakeEngine()
    ref.step([ref.pool.new_sequence()], [system])
    want = [alone(ref, p, n, eos=-1) for p, n in zip(ps, limits)]  # no EOS: budgets decide
    ticks = threading.Semaphore(6)  # the system prompt, the first prompt and 4 decode steps
    engine = FakeEngine(ticks=ticks)
    b = batcher_of(engine, batch_size=3, eos_ids=[])
    assert b.set_prefix(system, timeout=WAIT) == len(system)
    first = b.submit(ps[0], greedy(), limits[0])
    stream = first.tokens(timeout=WAIT)
    got0 = [next(stream) for _ in range(4)]  # the others join while the first is decoding
    reqs = [first] + [b.submit(p, greedy(), n) for p, n in zip(ps[1:], limits[1:])]
    ticks.release(1000)
    got = [got0 + list(stream)] + [collect(r) for r in reqs[1:]]
    assert got == want
    assert all(r.error is None and r.done.is_set() for r in reqs)
    assert max(engine.batches) == 3 and 2 in engine.batches  # batched, and never over batch_size
    # the system prompt's full blocks were shared: only the rest of each prompt was computed
    bs = engine.pool.block_size
    assert [r.stats.prefilled for r in reqs] == [len(p) - len(system) // bs * bs for p in ps]
    assert [r.stats.generated for r in reqs] == limits and not any(r.stats.hit_eos for r in reqs)
    assert b.running == b.waiting == 0


def test_eos_and_kv_cache_len_end_a_request(batcher_of):
    ps = prompts(3, [5, 8, 2, 12])
    eos = 4  # this fake model's greedy answers: the second one reaches it
    want = [alone(FakeEngine(C=24), p, 100, eos=eos) for p in ps]
    assert [w[-1] == eos for w in want] == [False, True, False, False]  # the others stop at kv_cache_len
    b = batcher_of(FakeEngine(C=24), batch_size=4, eos_ids=[eos])
    reqs = [b.submit(p, greedy()) for p in ps]
    assert [collect(r) for r in reqs] == want
    assert [r.stats.hit_eos for r in reqs] == [False, True, False, False]
    assert [len(p) + len(w) for p, w in zip(ps, want)][::2] == [25, 25]  # kv_cache_len 24 + the last token


def test_preemption_under_a_small_pool_keeps_the_tokens(batcher_of):
    ps = prompts(4, [6, 10, 3, 8, 5])
    limits = [24, 18, 30, 20, 26]
    want = [alone(FakeEngine(), p, n, eos=-1) for p, n in zip(ps, limits)]
    ticks = threading.Semaphore(0)
    engine = FakeEngine(num_blocks=16, ticks=ticks)  # 64 token rows for 5 requests of up to 38 tokens
    b = batcher_of(engine, batch_size=5, eos_ids=[])
    reqs = [b.submit(p, greedy(), n) for p, n in zip(ps, limits)]
    ticks.release(1000)  # all are queued before the first step
    assert [collect(r) for r in reqs] == want
    assert sum(r.preempted for r in reqs) > 0 and all(r.error is None for r in reqs)
    assert engine.pool.used_blocks == 0  # every block came back


def test_a_request_too_big_for_the_pool_fails_clearly_and_the_others_finish(batcher_of):
    engine = FakeEngine(num_blocks=8)  # 32 token rows
    b = batcher_of(engine, batch_size=3, eos_ids=[])
    small = prompts(5, [5, 7])
    want = [alone(FakeEngine(num_blocks=8), p, 6, eos=-1) for p in small]
    big = b.submit(prompts(6, [40])[0], greedy(), 4)  # 10 blocks for its prompt alone
    grows = b.submit(prompts(7, [20])[0], greedy(), 40)  # fits, then outgrows the whole pool alone
    reqs = [b.submit(p, greedy(), 6) for p in small]
    assert [collect(r) for r in reqs] == want
    with pytest.raises(RequestFailed, match="block_size 4.*num_blocks 8") as exc:
        collect(big)
    assert exc.value.reason == "too_big" and "block_size 4" in big.error
    with pytest.raises(RequestFailed, match="num_blocks 8") as exc:
        collect(grows)
    assert exc.value.reason == "too_big" and 0 < grows.stats.generated < 40
    with pytest.raises(RequestFailed, match="num_blocks 8"):
        b.check_fits(list(range(1, 34)))
    b.check_fits(list(range(1, 33)))


def test_cancel_ends_a_stream_and_frees_its_blocks(batcher_of):
    ticks = threading.Semaphore(4)  # two prefills and two decode steps, then one step per permit
    engine = FakeEngine(ticks=ticks)
    b = batcher_of(engine, batch_size=2, eos_ids=[])
    p, q = prompts(8, [6, 9])
    want_q = alone(FakeEngine(), q, 10, eos=-1)
    long = b.submit(p, greedy(), 50)
    other = b.submit(q, greedy(), 10)
    stream = long.tokens(timeout=WAIT)
    next(stream), next(stream)
    long.cancel()
    ticks.release(1000)
    rest = list(stream)  # ends without an error
    assert long.done.is_set() and long.error is None and 2 + len(rest) <= 5
    assert collect(other) == want_q
    waiting = [b.submit(p, greedy(), 50) for _ in range(3)]  # batch_size 2: one waits
    for r in waiting:
        r.cancel()
    for r in waiting:
        assert r.done.wait(WAIT) and r.error is None
    assert engine.pool.used_blocks == 0


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_an_engine_failure_fails_only_its_request(batcher_of, where):
    ps = prompts(9, [5, 7, 4])
    bad = ps[1]
    want = [alone(FakeEngine(), p, 12, eos=-1) for p in ps]

    def fail(seq, toks):  # the bad prompt's own prefill, or its 4th decode step
        if where == "prefill":
            return list(toks) == bad
        return seq.ids[:len(bad)] == bad and len(seq) + len(toks) >= len(bad) + 4

    logs = []
    ticks = threading.Semaphore(0)
    engine = FakeEngine(fail=fail, ticks=ticks)
    b = batcher_of(engine, batch_size=3, eos_ids=[], log=logs.append)
    reqs = [b.submit(p, greedy(), 12) for p in ps]
    ticks.release(1000)  # all are queued before the first step: they decode together
    got = [collect(reqs[0]), None, collect(reqs[2])]
    with pytest.raises(RequestFailed, match="injected failure"):
        collect(reqs[1])
    assert got[0] == want[0] and got[2] == want[2]
    assert reqs[1].stats.generated == (0 if where == "prefill" else 4)
    if where == "decode":
        assert any("retrying each alone" in m for m in logs)
    assert collect(b.submit(ps[0], greedy(), 12)) == want[0]  # still serving
    assert engine.pool.used_blocks == 0


def test_queue_timeout_and_close(batcher_of):
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    b = batcher_of(engine, batch_size=1, eos_ids=[], queue_timeout=0.05)
    p, q = prompts(10, [4, 4])
    first = b.submit(p, greedy(), 3)  # holds the only place while the gate is shut
    second = b.submit(q, greedy(), 3)
    time.sleep(0.2)  # past the second's queue_timeout while the first's prefill is held
    gate.set()
    assert first.done.wait(WAIT) and second.done.wait(WAIT)
    assert first.error is None and second.reason == "queue_timeout" and "waited 0.05 s" in second.error
    gate.clear()
    b.queue_timeout = None
    held = b.submit(p, greedy(), 3)
    queued = b.submit(q, greedy(), 3)
    b.close(timeout=0.2)  # the scheduler is stuck in a step (gate shut): close returns, then finishes
    gate.set()
    for r in (held, queued):
        assert r.done.wait(WAIT)
    assert queued.reason == "closed" and "shutting down" in queued.error
    late = b.submit(p, greedy(), 3)
    assert late.reason == "closed"
    with pytest.raises(GeneratorError, match="closed"):
        b.set_prefix(p)


def test_bad_arguments():
    with pytest.raises(GeneratorError, match="batch_size must be a whole number >= 1"):
        Batcher(FakeEngine(), batch_size=0, eos_ids=[EOS])
    b = Batcher(FakeEngine(), batch_size=1, eos_ids=[EOS])
    try:
        with pytest.raises(GeneratorError, match="at least one prompt token"):
            b.submit([], greedy())
        too_long = b.submit(list(range(1, 66)), greedy())
        assert too_long.reason == "too_big" and "kv_cache_len" in too_long.error
    finally:
        b.close()


# -- the real fused backend (runtime/fused_engine.py) on a tiny bundle ----------------------------------


@pytest.fixture(scope="module")
def fused_bundle(tiny_llama, tmp_path_factory):
    from generator.contract import Bundle
    from models import SMALL_GROUPS, quiet_build

    out = tmp_path_factory.mktemp("batching") / "b"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="s8", hidden_state_type="bf16",
                post_weight_type="s8", **dict(SMALL_GROUPS, group_size=32))  # MatMulNBits takes groups of 32
    return Bundle(out)


class Ticked:
    """An engine whose steps each wait for a permit (so the test decides when requests join)."""

    def __init__(self, engine, ticks: threading.Semaphore):
        self.engine, self.ticks = engine, ticks
        self.pool, self.C, self.numerics = engine.pool, engine.C, engine.numerics
        self.batches: list[int] = []

    def step(self, seqs, tokens):
        assert self.ticks.acquire(timeout=WAIT)
        self.batches.append(len(seqs))
        return self.engine.step(seqs, tokens)


@pytest.mark.parametrize("numerics", ["board", "fast"])
def test_fused_engine_batched_equals_alone(fused_bundle, numerics):
    from generator.runtime.fused_engine import FusedEngine
    from models import threads

    vocab = fused_bundle.spec.vocab_size
    system = prompts(12, [11], vocab)[0]
    ps = [system + p for p in prompts(13, [5, 20, 9, 1, 14], vocab)] + prompts(14, [30], vocab)
    limits = [30, 12, 40, 25, 8, 20]
    ref = FusedEngine(fused_bundle, threads=threads(), numerics=numerics, block_size=4)
    ref.step([ref.pool.new_sequence()], [system])  # kept, as set_prefix keeps it
    want = [alone(ref, p, n, eos=-1) for p, n in zip(ps, limits)]
    ticks = threading.Semaphore(6)  # the system prompt, the first prompt and 4 decode steps
    engine = Ticked(FusedEngine(fused_bundle, threads=threads(), numerics=numerics, block_size=4, num_blocks=24,
                                batch_size=4), ticks)  # 96 token rows: too few for all at once
    b = Batcher(engine, batch_size=4, eos_ids=[])
    try:
        b.set_prefix(system, timeout=WAIT)
        first = b.submit(ps[0], greedy(), limits[0])
        stream = first.tokens(timeout=WAIT)
        got0 = [next(stream) for _ in range(4)]
        reqs = [first] + [b.submit(p, greedy(), n) for p, n in zip(ps[1:], limits[1:])]
        big = b.submit(prompts(15, [90], vocab)[0], greedy(), 4)  # 23 blocks: over what the prefix leaves
        ticks.release(10000)
        got = [got0 + list(stream)] + [collect(r) for r in reqs[1:]]
        assert got == want
        assert max(engine.batches) == 4 and sum(r.preempted for r in reqs) > 0
        assert [r.stats.prefilled for r in reqs[:5]] == [len(p) - 8 for p in ps[:5]]  # 2 shared blocks of 4
        with pytest.raises(RequestFailed, match="block_size 4.*num_blocks 24"):
            collect(big)
        assert engine.pool.used_blocks == 3  # only the kept system prompt's blocks remain
    finally:
        b.close()
