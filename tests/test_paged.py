"""The paged KV block pool (runtime/paged.py): slots, prefix sharing, copy on write, exhaustion,
LRU eviction, and a seeded random walk of many operations checked against a plain model of what
each sequence wrote (reading K/V at slots(seq) must give that sequence's rows)."""

import random

import numpy as np
import pytest

from generator.errors import GeneratorError
from generator.runtime.paged import BlockPool, PoolExhausted

LAYERS, KV = 2, 3


def value(prefix) -> float:
    """The K row a real model writes depends on the tokens up to and including it: a stand-in."""
    return float(hash(tuple(prefix)) % 1_000_003)  # exact in float32


def small(prefix) -> float:
    return value(prefix) % 1021  # exact in float16 and uint16


def write(pool, seq, ids, fn=value):
    """Reserve, write K/V rows for `ids` (K = fn(prefix), V = K + 1) and commit; returns the slots."""
    slots = pool.reserve(seq, len(ids))
    prefix = list(seq.ids)
    for s, t in zip(slots, ids):
        prefix.append(t)
        pool.k[:, s] = fn(prefix)
        pool.v[:, s] = fn(prefix) + 1
    pool.commit(seq, ids)
    return slots


def expected(ids, fn=value):
    return np.array([fn(ids[:p + 1]) for p in range(len(ids))], np.float32)


def check_rows(pool, seq, fn=value):
    slots = pool.slots(seq)
    want = expected(seq.ids, fn)
    for layer in range(LAYERS):
        np.testing.assert_array_equal(pool.k[layer, slots, 0], want)
        np.testing.assert_array_equal(pool.v[layer, slots, 0], want + 1)


def state(pool, *seqs):
    return (pool.k.copy(), pool.v.copy(), pool._ref.copy(), pool.stats(), list(pool._free),
            list(pool._evictable), dict(pool._cache),
            [(list(s.ids), list(s.blocks), list(s._hashes), s._pending) for s in seqs])


def same_state(a, b):
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert a[3:] == b[3:]


def test_slots_follow_the_block_table():
    pool = BlockPool(LAYERS, KV, np.float32, block_size=4, num_blocks=8)
    a, b = pool.new_sequence(), pool.new_sequence()
    assert list(write(pool, a, [1, 2, 3, 4, 5, 6])) == [0, 1, 2, 3, 4, 5]
    assert list(write(pool, b, [7, 8])) == [8, 9]  # b gets block 2
    assert list(write(pool, a, [9, 10, 11])) == [6, 7, 12]  # a fills block 1 then takes block 3
    assert a.blocks == [0, 1, 3] and len(a) == 9 and list(pool.slots(a)) == [0, 1, 2, 3, 4, 5, 6, 7, 12]
    assert pool.used_blocks == 4 and pool.free_blocks == 4
    assert pool.k.shape == (LAYERS, 32, KV) and pool.k.dtype == np.float32
    check_rows(pool, a)
    check_rows(pool, b)
    assert pool.blocks_needed(a, 3) == 0 and pool.blocks_needed(a, 4) == 1 and pool.blocks_needed(a, 8) == 2


def test_two_sequences_with_the_same_40_token_prefix_share_two_blocks():
    pool = BlockPool(LAYERS, KV, np.float32, block_size=16, num_blocks=16)
    system = list(range(100, 140))
    a = pool.new_sequence()
    assert pool.attach_prefix(a, system + [1, 2]) == 0  # nothing cached yet
    write(pool, a, system + [1, 2])
    b = pool.new_sequence()
    prompt = system + [3, 4, 5]
    assert pool.attach_prefix(b, prompt) == 32
    assert b.blocks == a.blocks[:2] and b.ids == system[:32]
    write(pool, b, prompt[32:])
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]  # the third block is private
    assert pool.stats()["shared"] == 2 and pool.stats()["hits"] == 2
    assert pool.used_blocks == 4
    check_rows(pool, a)
    check_rows(pool, b)
    # the last prompt token is always computed: a prompt of exactly 32 cached tokens reuses 16
    c = pool.new_sequence()
    assert pool.attach_prefix(c, system[:32]) == 16
    # a different first block shares nothing, even with an equal second block
    d = pool.new_sequence()
    assert pool.attach_prefix(d, [0] + system[1:]) == 0 and d.blocks == []


def test_copy_on_write_keeps_the_other_sequence_and_the_cache_intact():
    pool = BlockPool(LAYERS, KV, np.uint16, block_size=16, num_blocks=8)
    fn = small
    system = list(range(40))
    a, b = pool.new_sequence(), pool.new_sequence()
    write(pool, a, system, fn)
    pool.attach_prefix(b, system + [7])
    write(pool, b, system[32:] + [7], fn)
    a_rows = pool.k[:, pool.slots(a)].copy()
    shared = b.blocks[1]
    pool.rewind(b, 20)  # into the shared second block
    assert b.blocks == a.blocks[:1] + [shared] and pool.blocks_needed(b, 5) == 1
    write(pool, b, [9, 9, 9, 9, 9], fn)
    assert b.blocks[0] == a.blocks[0] and b.blocks[1] != shared  # copied; the first block still shared
    np.testing.assert_array_equal(pool.k[:, pool.slots(a)], a_rows)  # a's rows unchanged
    np.testing.assert_array_equal(pool.k[:, pool.slots(b)[:20]], a_rows[:, :20])  # the copy has a's rows
    check_rows(pool, a, fn)
    check_rows(pool, b, fn)
    # a sequence alone in a cached block copies too: the cache keeps what it says it holds
    pool.free(b)
    pool.rewind(a, 24)
    write(pool, a, [5], fn)
    assert a.blocks[1] != shared
    c = pool.new_sequence()
    assert pool.attach_prefix(c, system) == 32 and c.blocks[1] == shared
    check_rows(pool, c, fn)


def test_exhaustion_changes_nothing_and_a_free_makes_room():
    pool = BlockPool(LAYERS, KV, np.float16, block_size=4, num_blocks=4)
    a, b = pool.new_sequence(), pool.new_sequence()
    write(pool, a, list(range(10)), small)  # 3 blocks
    write(pool, b, [1], small)
    before = state(pool, a, b)
    with pytest.raises(PoolExhausted) as err:
        pool.reserve(b, 8)  # needs 2 more blocks; 0 free
    message = str(err.value)
    assert "block_size 4" in message and "num_blocks 4" in message and "needs 2 more blocks" in message
    assert "only 0 of" in message and err.value.needed == 2 and err.value.free == 0
    assert isinstance(err.value, GeneratorError)
    same_state(before, state(pool, a, b))
    pool.free(a)
    write(pool, b, list(range(8)), small)
    assert pool.used_blocks == 3
    check_rows(pool, b, small)


def test_exhaustion_counts_the_copy_on_write_block():
    pool = BlockPool(LAYERS, KV, np.float32, block_size=4, num_blocks=3)
    a, b, c = pool.new_sequence(), pool.new_sequence(), pool.new_sequence()
    write(pool, a, list(range(8)))
    assert pool.attach_prefix(b, list(range(8)) + [1]) == 8  # b shares a's 2 blocks
    write(pool, c, [1])  # the third block: the pool is full
    pool.rewind(b, 6)
    before = state(pool, a, b, c)
    assert pool.blocks_needed(b, 1) == 1 and pool.blocks_needed(b, 2) == 1 and pool.blocks_needed(b, 3) == 2
    with pytest.raises(PoolExhausted):
        pool.reserve(b, 1)  # the copy needs a block
    same_state(before, state(pool, a, b, c))
    pool.free(c)
    write(pool, b, [9])
    check_rows(pool, a)
    check_rows(pool, b)


def test_cached_blocks_are_evicted_least_recently_released_first():
    pool = BlockPool(LAYERS, KV, np.float32, block_size=4, num_blocks=4)
    a, b = pool.new_sequence(), pool.new_sequence()
    write(pool, a, [1, 2, 3, 4])
    write(pool, b, [5, 6, 7, 8])
    pool.free(a)
    pool.free(b)
    assert pool.free_blocks == 4 and pool.used_blocks == 0 and pool.stats()["cached"] == 2
    c = pool.new_sequence()
    write(pool, c, list(range(10, 18)))  # takes the 2 never-used blocks; evicts nothing
    assert pool.stats()["cached"] == 4
    probe = pool.new_sequence()
    assert pool.attach_prefix(probe, [1, 2, 3, 4, 0]) == 4  # a's block is still there: it is now recent
    pool.free(probe)
    write(pool, c, [30])  # needs one block: b's was released longest ago
    for prompt, reused in (([5, 6, 7, 8, 0], 0), ([1, 2, 3, 4, 0], 4), (list(range(10, 18)) + [0], 8)):
        seq = pool.new_sequence()
        assert pool.attach_prefix(seq, prompt) == reused, prompt
        pool.free(seq)
    check_rows(pool, c)


def test_freeing_everything_returns_every_block():
    pool = BlockPool(LAYERS, KV, np.float32, block_size=4, num_blocks=16)
    seqs = [pool.new_sequence() for _ in range(4)]
    for i, seq in enumerate(seqs):
        prompt = [1, 2, 3, 4, 5, 6, 7, 8, i]
        pool.attach_prefix(seq, prompt)
        write(pool, seq, prompt[len(seq):])
    assert pool.stats()["shared"] == 2 and pool._ref[seqs[0].blocks[0]] == 4
    for seq in seqs:
        pool.free(seq)
    assert pool.free_blocks == 16 and pool.used_blocks == 0 and not pool._ref.any()
    with pytest.raises(GeneratorError, match="already freed"):
        pool.free(seqs[0])
    with pytest.raises(GeneratorError, match="already freed"):
        pool.reserve(seqs[1], 1)
    assert not pool._ref.any() and (pool._ref >= 0).all()


def test_bad_arguments_are_clear_errors():
    for kwargs, key in (({"block_size": 0}, "block_size"), ({"num_blocks": -1}, "num_blocks"),
                        ({"block_size": 2.5}, "block_size"), ({"num_blocks": True}, "num_blocks")):
        args = {"block_size": 4, "num_blocks": 4} | kwargs
        with pytest.raises(GeneratorError, match=key):
            BlockPool(LAYERS, KV, np.float32, **args)
    with pytest.raises(GeneratorError, match="uint16"):
        BlockPool(LAYERS, KV, np.int8, 4, 4)
    pool = BlockPool(LAYERS, KV, np.float32, 4, 4)
    seq = pool.new_sequence()
    write(pool, seq, [1, 2, 3])
    with pytest.raises(GeneratorError, match="only 1 were reserved"):
        pool.reserve(seq, 1)
        pool.commit(seq, [1, 2])
    with pytest.raises(GeneratorError, match="holds 3"):
        pool.rewind(seq, 4)
    with pytest.raises(GeneratorError, match="empty sequence"):
        pool.attach_prefix(seq, [1, 2, 3, 4, 5])
    with pytest.raises(GeneratorError, match="does not belong"):
        BlockPool(LAYERS, KV, np.float32, 4, 4).slots(seq)


@pytest.mark.parametrize("seed", range(3))
def test_random_operations_against_a_plain_model(seed):
    rng = random.Random(seed)
    pool = BlockPool(LAYERS, KV, np.float32, block_size=4, num_blocks=24)
    prefixes = [[rng.randrange(4) for _ in range(rng.randrange(3, 14))] for _ in range(3)]
    model = {}  # seq -> list of (token, value written for it)
    exhausted = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.25 or not model:
            seq = pool.new_sequence()
            prompt = rng.choice(prefixes) + [rng.randrange(4) for _ in range(rng.randrange(1, 6))]
            reused = pool.attach_prefix(seq, prompt)
            assert reused % 4 == 0 and reused < len(prompt) and seq.ids == prompt[:reused]
            model[seq] = [(t, value(prompt[:i + 1])) for i, t in enumerate(prompt[:reused])]
            new = prompt[reused:]
        else:
            seq = rng.choice(list(model))
            if op < 0.4:
                pool.free(seq)
                del model[seq]
                new = None
            elif op < 0.55:
                length = rng.randrange(len(seq) + 1)
                pool.rewind(seq, length)
                del model[seq][length:]
                new = None
            else:
                new = [rng.randrange(4) for _ in range(rng.randrange(1, 7))]
        if new:
            before = state(pool, *model)
            try:
                write(pool, seq, new)
            except PoolExhausted:
                exhausted += 1
                same_state(before, state(pool, *model))
            else:
                ids = [t for t, _ in model[seq]] + new
                model[seq] = [(t, value(ids[:i + 1])) for i, t in enumerate(ids)]
        held = {}
        for s, rows in model.items():
            assert s.ids == [t for t, _ in rows]
            slots = pool.slots(s)
            for layer in range(LAYERS):
                np.testing.assert_array_equal(pool.k[layer, slots, 0], [v for _, v in rows])
                np.testing.assert_array_equal(pool.v[layer, slots, 2], [v + 1 for _, v in rows])
            assert len(s.blocks) == -(-len(s) // 4)
            for b in s.blocks:
                held[b] = held.get(b, 0) + 1
        assert {b: int(pool._ref[b]) for b in held} == held and int(pool._ref.sum()) == sum(held.values())
        assert pool.used_blocks == len(held) and pool.free_blocks + len(held) == 24
    assert pool.stats()["hits"] > 0 and exhausted > 0  # the walk did share blocks and did run out
    for seq in list(model):
        pool.free(seq)
    assert pool.free_blocks == 24 and not pool._ref.any()
