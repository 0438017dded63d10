"""Paged KV cache: a pool of fixed-size blocks shared by many sequences, with a prefix cache.

The fused backend (``onnxruntime-fused``) keeps the K and V rows of every sequence it serves in one
pool instead of one contiguous ``[L, C, kv]`` cache per conversation, so memory goes to the tokens
that exist, not to ``kv_cache_len`` per user. The design is vLLM's PagedAttention with automatic
prefix caching, reduced to what one process needs:

* The pool holds ``num_blocks`` blocks of ``block_size`` token rows. ``k`` and ``v`` are
  ``[layers, num_blocks * block_size, kv_dim]`` arrays in the storage dtype (uint16 bf16 bits,
  float16 or float32); slot ``s`` is row ``s % block_size`` of block ``s // block_size``. A
  :class:`Sequence` is a block table: token ``p`` of the sequence lives at slot
  ``blocks[p // block_size] * block_size + p % block_size`` (:meth:`BlockPool.slots`).
* Every block has a reference count (how many block tables hold it). A block with count 0 is on the
  free list or, if it holds a cached prefix, evictable.
* Prefix cache: a sequence's full block is registered under ``(parent hash, its block_size token
  ids)``, the parent hash being ``hash`` of the previous block's key (``None`` for the first), so a
  key stands for every token from the start. :meth:`BlockPool.attach_prefix` walks a new prompt's
  full blocks down this chain and shares each one found (the system prompt is computed once for all
  users). Tokens are compared exactly (they are in the dict key); only the parent link is a hash.
* Blocks in the prefix cache or held by two sequences are never written: extending a sequence that
  was rewound into one first copies it (all layers, K and V) into a private block (copy on write).
* A released cached block keeps its rows and is reused for something else only when the free list
  is empty, least recently released first (a sequence releases its blocks tail first, so prompt
  prefixes outlive conversation ends).
* :meth:`BlockPool.reserve` is atomic: it counts the blocks it needs first and raises
  :class:`PoolExhausted` (naming ``block_size``, ``num_blocks``, blocks free and needed) with
  nothing changed when the pool cannot give them.

Use: ``seq = pool.new_sequence(); reused = pool.attach_prefix(seq, prompt)``, then per step
``slots = pool.reserve(seq, n)`` (write K/V rows there), ``pool.commit(seq, new_ids)``; finally
``pool.free(seq)``. Not thread-safe: one scheduler thread owns the pool.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..errors import GeneratorError

DTYPES = (np.dtype(np.uint16), np.dtype(np.float16), np.dtype(np.float32))


class PoolExhausted(GeneratorError):
    """The pool has too few free blocks for a reservation; nothing was changed."""

    def __init__(self, message: str, *, needed: int, free: int):
        self.needed, self.free = needed, free
        super().__init__(message)


class Sequence:
    """One sequence's block table: ``ids`` (tokens whose K/V are in the pool) and ``blocks``."""

    def __init__(self, pool: BlockPool):
        self.ids: list[int] = []
        self.blocks: list[int] = []
        self._pool = pool
        self._hashes: list[int] = []  # hash of the key of each full, committed block
        self._pending = 0  # tokens reserved and not yet committed
        self._freed = False

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Sequence({len(self.ids)} tokens, blocks={self.blocks})"


def _count(value, what: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise GeneratorError(f"{what} must be a whole number >= {low} for the paged KV cache; got {value!r}")
    return int(value)


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` K/V rows for ``layers`` layers of ``kv_dim`` values."""

    def __init__(self, layers: int, kv_dim: int, dtype, block_size: int, num_blocks: int):
        self.block_size = _count(block_size, "block_size")
        self.num_blocks = _count(num_blocks, "num_blocks")
        layers, kv_dim = _count(layers, "layers"), _count(kv_dim, "kv_dim")
        dtype = np.dtype(dtype)
        if dtype not in DTYPES:
            raise GeneratorError(f"the paged KV cache stores uint16 (bf16 bits), float16 or float32; got {dtype}")
        shape = (layers, self.num_blocks * self.block_size, kv_dim)
        self.k, self.v = np.zeros(shape, dtype), np.zeros(shape, dtype)
        self._ref = np.zeros(self.num_blocks, np.int64)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._cache: dict[tuple, int] = {}  # (parent hash, token ids) -> block
        self._key_of: dict[int, tuple] = {}  # block -> its key, for every cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, count 0; oldest first
        self.hits = 0  # blocks shared by attach_prefix
        self.lookups = 0  # full prompt blocks attach_prefix looked up

    @property
    def free_blocks(self) -> int:
        """Blocks a reservation can take: never-used or released ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.free_blocks

    def stats(self) -> dict:
        return {"block_size": self.block_size, "num_blocks": self.num_blocks, "used": self.used_blocks,
                "free": self.free_blocks, "cached": len(self._key_of),
                "shared": int(np.count_nonzero(self._ref > 1)), "hits": self.hits, "lookups": self.lookups}

    def _check(self, seq: Sequence) -> None:
        if not isinstance(seq, Sequence) or seq._pool is not self:
            raise GeneratorError("this sequence does not belong to this KV block pool")
        if seq._freed:
            raise GeneratorError("this sequence was already freed (double free or use after free)")

    def _copy_needed(self, seq: Sequence, n: int) -> bool:
        """Is the block the next token goes to shared or cached (never written)?"""
        first = len(seq.ids) // self.block_size
        return n > 0 and first < len(seq.blocks) and (self._ref[seq.blocks[first]] > 1 or
                                                      seq.blocks[first] in self._key_of)

    def blocks_needed(self, seq: Sequence, n: int) -> int:
        """How many free blocks ``reserve(seq, n)`` takes (new blocks plus a copy on write)."""
        self._check(seq)
        total = -(-(len(seq.ids) + n) // self.block_size)
        return max(0, total - len(seq.blocks)) + int(self._copy_needed(seq, n))

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently released cached block
            block, _ = self._evictable.popitem(last=False)
            del self._cache[self._key_of.pop(block)]
        self._ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        if self._ref[block] <= 0:
            raise GeneratorError(f"KV block {block} released more often than it was taken (pool bookkeeping bug)")
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _trim(self, seq: Sequence, tokens: int) -> None:
        """Release the blocks of ``seq`` past the first ``tokens`` tokens, last first."""
        keep = -(-tokens // self.block_size)
        while len(seq.blocks) > keep:
            self._release(seq.blocks.pop())

    def new_sequence(self) -> Sequence:
        return Sequence(self)

    def attach_prefix(self, seq: Sequence, ids: list[int]) -> int:
        """Share the cached blocks holding a prefix of ``ids`` with the empty ``seq``.

        Returns the number of tokens reused: a multiple of ``block_size``, always less than
        ``len(ids)`` (the last prompt token is computed, for its logits).
        """
        self._check(seq)
        if seq.ids or seq.blocks:
            raise GeneratorError("attach_prefix needs an empty sequence (a new one, or one rewound to 0)")
        bs, parent = self.block_size, None
        for i in range((len(ids) - 1) // bs if ids else 0):
            key = (parent, tuple(int(t) for t in ids[i * bs:(i + 1) * bs]))
            self.lookups += 1
            block = self._cache.get(key)
            if block is None:
                break
            self._evictable.pop(block, None)
            self._ref[block] += 1
            parent = hash(key)
            seq.blocks.append(block)
            seq._hashes.append(parent)
            self.hits += 1
        seq.ids = [int(t) for t in ids[:len(seq.blocks) * bs]]
        return len(seq.ids)

    def reserve(self, seq: Sequence, n: int) -> np.ndarray:
        """int64 slots for the next ``n`` tokens of ``seq``; raises :class:`PoolExhausted` unchanged."""
        self._check(seq)
        n = _count(n, "reserve's token count", 0)
        needed = self.blocks_needed(seq, n)
        if needed > self.free_blocks:
            raise PoolExhausted(
                f"the paged KV cache is full: this step needs {needed} more blocks of block_size "
                f"{self.block_size} tokens and only {self.free_blocks} of num_blocks {self.num_blocks} are "
                f"free ({self.used_blocks} hold other sequences' tokens). Raise num_blocks (or block_size) in "
                f"the boost config, lower batch_size, or shorten the conversation.",
                needed=needed, free=self.free_blocks)
        bs, start = self.block_size, len(seq.ids)
        if self._copy_needed(seq, n):
            i = start // bs
            old, new = seq.blocks[i], self._take()
            rows, dst = slice(old * bs, (old + 1) * bs), slice(new * bs, (new + 1) * bs)
            self.k[:, dst] = self.k[:, rows]
            self.v[:, dst] = self.v[:, rows]
            seq.blocks[i] = new
            self._release(old)
        while len(seq.blocks) * bs < start + n:
            seq.blocks.append(self._take())
        seq._pending = n
        pos = np.arange(start, start + n, dtype=np.int64)
        return np.asarray(seq.blocks, np.int64)[pos // bs] * bs + pos % bs

    def commit(self, seq: Sequence, ids: list[int]) -> None:
        """The reserved rows of ``ids`` (at most the reserved count) are written: extend ``seq``."""
        self._check(seq)
        if len(ids) > seq._pending:
            raise GeneratorError(f"commit of {len(ids)} tokens but only {seq._pending} were reserved")
        seq.ids.extend(int(t) for t in ids)
        seq._pending = 0
        self._trim(seq, len(seq.ids))
        bs = self.block_size
        for i in range(len(seq._hashes), len(seq.ids) // bs):
            key = (seq._hashes[-1] if seq._hashes else None, tuple(seq.ids[i * bs:(i + 1) * bs]))
            block = seq.blocks[i]
            if key not in self._cache and block not in self._key_of:
                self._cache[key] = block
                self._key_of[block] = key
            seq._hashes.append(hash(key))

    def slots(self, seq: Sequence) -> np.ndarray:
        """int64 ``[len(seq)]``: the slot of each token whose K/V are in the pool."""
        self._check(seq)
        pos = np.arange(len(seq.ids), dtype=np.int64)
        return np.asarray(seq.blocks, np.int64)[pos // self.block_size] * self.block_size + pos % self.block_size

    def rewind(self, seq: Sequence, length: int) -> None:
        """Forget the tokens of ``seq`` after the first ``length`` (and any uncommitted reservation)."""
        self._check(seq)
        if _count(length, "rewind's length", 0) > len(seq):
            raise GeneratorError(f"rewind to {length!r} tokens: the sequence holds {len(seq)}")
        del seq.ids[length:]
        del seq._hashes[length // self.block_size:]
        seq._pending = 0
        self._trim(seq, length)

    def free(self, seq: Sequence) -> None:
        """Release all of ``seq``'s blocks (cached full ones stay cached until evicted)."""
        self.rewind(seq, 0)
        seq._freed = True
