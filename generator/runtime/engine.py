"""The engine: executes a bundle's ONNX graphs with onnxruntime the way the board does.

Contract section 5: the runtime owns the KV cache; the system prompt is prefilled once and kept
(`precompute_len`); each turn prefills only new tokens in chunks of `prefill_len` with the smallest
shape group whose capacity holds `precompute_len + n`; then decodes one token at a time with the
decode group, runs the post graph and samples per post_config.json until EOS.

Speed without changing results: caches, hidden states and positions live in preallocated buffers
bound through IO binding (runtime/ort.py); new K/V rows are written in place by binding the outputs to
their cache rows; all sessions share one intra-op thread pool. By default the layers are given only
the cache rows in use (`history="used"`): the rows the board passes masked out contribute exactly
zero, so the result is the board's up to floating-point summation order, while attention cost follows
the position instead of kv_cache_len. `history="board"` binds the full static shapes. The two modes
differ only in the `History` strategy below.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..contract import STORAGE, Bundle, ShapeGroup, board_mask, from_bf16_bits, from_storage
from ..errors import GeneratorError
from .ort import DEVICE, Binding, check_numerics, fixed_token_outputs, open_session, use_global_pool


class History:
    """How a history mode gives the layer graphs the KV cache (the only thing the modes differ in).

    relaxed: sessions load the graphs with symbolic history/token dimensions; in_place: a prefill
    chunk's new K/V rows are written straight into the cache (else through a padded scratch buffer)."""

    name: str
    relaxed: bool
    in_place: bool

    def decode_rows(self, engine: "Engine", pos: int) -> int:
        """History rows bound for decoding position `pos` (the first `pos` of them open)."""
        raise NotImplementedError

    def plan(self, engine: "Engine", n: int) -> list[ShapeGroup | None]:
        """The group of each chunk of an n-token prefill."""
        raise NotImplementedError

    def chunk(self, engine: "Engine", group: ShapeGroup, start: int, m: int) -> tuple[int, int, int]:
        """(history rows, token rows, open history rows) of an m-token chunk after `start` cached tokens."""
        raise NotImplementedError


class UsedRows(History):
    """Only the rows in use: the cached tokens as history, chunks unpadded, one prefill graph for all."""

    name, relaxed, in_place = "used", True, True

    def decode_rows(self, engine, pos):
        return max(pos, 1)  # a 0-row history is not allowed: row 0 is then masked

    def plan(self, engine, n):
        first_prefill = next(g for g in engine.b.groups if g.index > 0)
        return [first_prefill] * -(-n // engine.P)

    def chunk(self, engine, group, start, m):
        return max(start, 1), m, start


class BoardShapes(History):
    """The board's static shapes: the full cache for decode, each chunk in its group's shapes, padded."""

    name, relaxed, in_place = "board", False, False

    def decode_rows(self, engine, pos):
        return engine.C

    def plan(self, engine, n):
        return engine.pick_group(n)

    def chunk(self, engine, group, start, m):
        return group.history_rows, engine.P, 0 if group.dummy_history else start


HISTORY: dict[str, History] = {"used": UsedRows(), "board": BoardShapes()}


class Engine:
    """Owns the sessions, the KV cache and the buffers; prefill / decode / post as on the board.

    `numerics` (runtime/ort.py): "board" (default) computes what the board computes, quantized weights on
    their int grid with fp32 activations; "fast" quantizes activations to int8 (faster here, not the board's)."""

    def __init__(self, bundle: Bundle, *, threads: int = 2, history: str = "used", mmap_embed: bool = True,
                 shared_pool: bool = False, numerics: str = "board"):
        if history not in HISTORY:
            raise GeneratorError(f"history must be 'used' or 'board', got {history!r}")
        # board: weights on their int grid, fp32 activations (what the board computes); fast: int8 activations
        self.numerics = check_numerics(numerics)
        self.b, self.spec, self.opts = bundle, bundle.spec, bundle.opts
        self.history_mode, self.history = history, HISTORY[history]
        self.threads = threads
        self.shared_pool = shared_pool and threads > 1 and use_global_pool(threads)
        self.hidden = self.opts.hidden_state_type
        self.dtype, self.onnx_type = STORAGE[self.hidden]
        s, o = self.spec, self.opts
        self.L, self.C, self.P, self.H, self.kv = s.num_hidden_layers, o.kv_cache_len, o.prefill_len, s.hidden_size, s.kv_dim
        self.quantized = o.quantized
        embed = np.memmap(bundle.embed_file, dtype=np.uint16, mode="r", shape=(s.vocab_size, s.hidden_size))
        self.embed = embed if mmap_embed else np.array(embed)
        # one block for all caches: [L, C, kv]; row `pos` of layer i is K/V of position pos
        self.k_cache = np.zeros((self.L, self.C, self.kv), self.dtype)
        self.v_cache = np.zeros((self.L, self.C, self.kv), self.dtype)
        self.precompute_len = 0
        self.cached_ids: list[int] = []
        # image embeddings (runtime/vision.py image_rows): cache row -> [n, hidden] rows that overwrite the
        # token embeddings from that row on while prefilling (the board's VLM path); the Chat sets them
        self.image_rows: dict[int, np.ndarray] = {}
        # positions: `indices` has 3 rows (temporal, height, width) for mRoPE, else 1; _next[k] is the
        # position of the token after the first k cached ones (k for text; after an image, more)
        self.rows = self.spec.position_rows
        self._next: list[int] = [0]
        self._sessions: dict[tuple[int, int], object] = {}
        self._setup_decode()
        self._setup_post()

    # -- sessions ------------------------------------------------------------------------------
    def session(self, i: int, group: int):
        key = (i, group)
        if key not in self._sessions:
            path = self.b.layer_file(i, group)
            if not path.is_file():
                raise GeneratorError(f"Bundle file {path} is missing; rebuild the bundle.")
            relaxed = self.history.relaxed
            sess = open_session(path, threads=self.threads, quantized=self.quantized, shared_pool=self.shared_pool,
                                relaxed=relaxed, numerics=self.numerics)
            fixed = fixed_token_outputs(sess) if relaxed and group > 0 else []
            if fixed:  # a graph that bakes its token count into its nodes cannot run unpadded chunks
                raise GeneratorError(f"{path}: outputs {fixed} have a fixed token dimension, so this graph "
                                     f"cannot run with only the rows in use (history 'used'). The bundle was "
                                     f"built by an older generator: rebuild it, or run with --history board.")
            self._sessions[key] = sess
        return self._sessions[key]

    def binding(self, i: int, group: int) -> Binding:
        return Binding(self.session(i, group), self.onnx_type)

    # -- decode --------------------------------------------------------------------------------
    def _setup_decode(self):
        self.h_dec = [np.zeros((1, 1, self.H), self.dtype) for _ in range(2)]
        self.idx_dec = np.zeros((self.rows, 1), np.uint32)
        # per layer, the C-level calls decode() makes for each token (no per-token Python wrappers)
        self._dec_calls = []
        for i in range(self.L):
            io = self.binding(i, 0)
            io.input("indices", self.idx_dec, elem=TensorProto.UINT32)
            io.input("input", self.h_dec[i % 2])
            io.output("output", self.h_dec[(i + 1) % 2])
            self._dec_calls.append((*io.raw(), self.k_cache[i].ctypes.data, self.v_cache[i].ctypes.data))
        self.h_final_dec = self.h_dec[self.L % 2]

    @property
    def next_position(self) -> int:
        """The position the next token takes (precompute_len, plus what images added for mRoPE): where a
        turn's mRoPE positions start (runtime/mrope.py)."""
        return self._next[self.precompute_len]

    def decode(self, token: int, position: np.ndarray | None = None) -> np.ndarray:
        """Run one token at cache row precompute_len through all layers; returns its final hidden state.
        `position`: its `indices` column (rows values), else next_position on every row."""
        pos = self.precompute_len
        if pos >= self.C:
            raise GeneratorError(f"KV cache full ({self.C} tokens, --kv_cache_len); reset the conversation.")
        self._embed_into(self.h_dec[0][0], [token])
        if self.image_rows:  # a prefill past every prefill group's history runs token by token
            self._images_into(self.h_dec[0][0], pos)
        self.idx_dec[:, 0] = self.next_position if position is None else position
        rows = self.history.decode_rows(self, pos)
        mask = board_mask(self.hidden, 1, rows, pos)
        row = self.kv * self.k_cache.itemsize
        dev, ot, kv_shape, hist_shape = DEVICE, self.onnx_type, [1, 1, self.kv], [1, rows, self.kv]
        mask_shape, mask_ptr = list(mask.shape), mask.ctypes.data
        for run, bind_in, bind_out, k_base, v_base in self._dec_calls:
            bind_in("K_cache", dev, ot, hist_shape, k_base)
            bind_in("V_cache", dev, ot, hist_shape, v_base)
            bind_in("mask", dev, ot, mask_shape, mask_ptr)
            bind_out("K_cache_out", dev, ot, kv_shape, k_base + pos * row)
            bind_out("V_cache_out", dev, ot, kv_shape, v_base + pos * row)
            run()
        self.precompute_len = pos + 1
        self.cached_ids.append(token)
        self._next.append(int(self.idx_dec.max()) + 1)
        return self.h_final_dec[0, 0]

    # -- prefill -------------------------------------------------------------------------------
    def pick_group(self, n: int) -> list[ShapeGroup | None]:
        """Groups for the chunks of an n-token prefill after precompute_len cached tokens.

        The contract's rule: the smallest group whose capacity holds precompute_len + n. When none
        does, each chunk takes the smallest group whose history holds what is cached before it; a
        chunk that no group can take is None (its tokens then go through the decode group)."""
        prefill = [g for g in self.b.groups if g.index > 0]
        total = self.precompute_len + n
        fit = [g for g in prefill if g.capacity >= total]
        chunks = -(-n // self.P)
        if fit:
            return [fit[0]] * chunks
        out: list[ShapeGroup | None] = []
        for c in range(chunks):
            hist = self.precompute_len + c * self.P
            out.append(next((g for g in prefill if (hist == 0 and g.dummy_history)
                             or (not g.dummy_history and g.history_rows >= hist)), None))
        return out

    def prefill(self, tokens: list[int], positions: np.ndarray | None = None,
                hidden_out: np.ndarray | None = None) -> np.ndarray:
        """Prefill `tokens` after the cached ones in chunks of prefill_len; returns the last token's
        final hidden state. `positions`: their `indices` rows ([rows, n]; mRoPE: runtime/mrope.py's
        from next_position), else consecutive from next_position. `hidden_out` ([n, hidden], storage
        dtype): receives every token's final hidden state (the accuracy report's teacher forcing).

        board: each chunk runs the contract's group with its static shapes (history rows of the
        group, the chunk padded to prefill_len, new K/V rows copied into the cache).
        used: the same graphs with only the rows in use bound (history = the cached tokens, the chunk
        unpadded, K/V written straight into the cache); one prefill graph serves every chunk."""
        n = len(tokens)
        if n == 0:
            raise GeneratorError("nothing to prefill")
        if self.precompute_len + n > self.C:
            raise GeneratorError(f"Conversation too long: {self.precompute_len} cached + {n} new tokens exceed "
                                 f"--kv_cache_len {self.C}; reset the conversation.")
        if positions is None:
            positions = np.arange(self.next_position, self.next_position + n)
        positions = np.asarray(positions, np.int64).reshape(-1, n)
        if positions.shape[0] not in (1, self.rows):
            raise GeneratorError(f"positions of {positions.shape[0]} rows for a bundle whose layers take {self.rows}.")
        positions = np.broadcast_to(positions, (self.rows, n))
        following = np.maximum.accumulate(positions.max(axis=0)) + 1  # _next after each token
        P, in_place = self.P, self.history.in_place
        h = [np.zeros((1, P, self.H), self.dtype) for _ in range(2)]
        k_out = np.zeros((1, P, self.kv), self.dtype)
        v_out = np.zeros((1, P, self.kv), self.dtype)
        row = self.kv * self.k_cache.itemsize
        last = None
        for c, group in enumerate(self.history.plan(self, n)):
            start = self.precompute_len
            chunk = tokens[c * P:(c + 1) * P]
            if group is None:  # longer than every prefill group's history: one token at a time
                for j, tok in enumerate(chunk):
                    last = self.decode(tok, positions[:, c * P + j]).copy()
                    if hidden_out is not None:
                        hidden_out[c * P + j] = last
                continue
            m = len(chunk)
            rows, width, cached = self.history.chunk(self, group, start, m)
            mask = board_mask(self.hidden, width, rows, cached)
            idx = np.zeros((self.rows, width), np.uint32)  # [rows, width]: contiguous as bound
            idx[:, :m] = positions[:, c * P:c * P + m]
            h[0][:] = 0
            self._embed_into(h[0][0, :m], chunk)
            self._images_into(h[0][0, :m], start)
            tok_shape = (1, width)
            for i in range(self.L):
                io = self.binding(i, group.index)
                io.input("K_cache", self.k_cache[i], shape=(1, rows, self.kv))
                io.input("V_cache", self.v_cache[i], shape=(1, rows, self.kv))
                io.input("indices", idx, elem=TensorProto.UINT32)
                io.input("input", h[i % 2], shape=(*tok_shape, self.H))
                io.input("mask", mask)
                io.output("output", h[(i + 1) % 2], shape=(*tok_shape, self.H))
                if in_place:  # the new rows go straight to their place in the cache
                    io.output_at("K_cache_out", self.k_cache[i].ctypes.data + start * row, (1, m, self.kv))
                    io.output_at("V_cache_out", self.v_cache[i].ctypes.data + start * row, (1, m, self.kv))
                else:
                    io.output("K_cache_out", k_out)
                    io.output("V_cache_out", v_out)
                io.run()
                if not in_place:
                    self.k_cache[i, start:start + m] = k_out[0, :m]
                    self.v_cache[i, start:start + m] = v_out[0, :m]
            last = h[self.L % 2][0, m - 1].copy()
            if hidden_out is not None:
                hidden_out[c * P:c * P + m] = h[self.L % 2][0, :m]
            self.precompute_len = start + m
            self.cached_ids.extend(chunk)
            self._next.extend(following[c * P:c * P + m].tolist())
        return last

    def _images_into(self, dst: np.ndarray, start: int):
        """Overwrite the rows of cache positions [start, start + len(dst)) that image_rows covers."""
        for first, rows in self.image_rows.items():
            lo, hi = max(first, start), min(first + len(rows), start + len(dst))
            if lo < hi:
                dst[lo - start:hi - start] = rows[lo - first:hi - first]

    def _embed_into(self, dst: np.ndarray, ids: list[int]):
        rows = self.embed[np.asarray(ids, np.int64)]
        if self.hidden == "bf16":
            dst[:] = rows
        else:
            dst[:] = from_bf16_bits(rows).astype(self.dtype)

    # -- post ----------------------------------------------------------------------------------
    def _setup_post(self):
        self.post = open_session(self.b.post_file, threads=self.threads, quantized=self.quantized,
                                 shared_pool=self.shared_pool, numerics=self.numerics)
        self.post_in = np.zeros((1, 1, self.H), self.dtype)
        k = self.opts.post_topk
        self.post_out = np.zeros((1, 1, k or self.spec.vocab_size), self.dtype)
        self.post_idx = np.zeros((1, 1, k), np.int32) if k else None
        self._post_io = Binding(self.post, self.onnx_type)
        self._post_io.input("input", self.post_in)
        self._post_io.output("output", self.post_out)
        if k:
            self._post_io.output("indices", self.post_idx, elem=TensorProto.INT32)

    def logits(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Post graph on one hidden state: (fp32 logits or top-k values, top-k indices or None)."""
        self.post_in[0, 0] = hidden
        self._post_io.run()
        vals = from_storage(self.post_out[0, 0], self.hidden)
        return vals, (self.post_idx[0, 0].copy() if self.post_idx is not None else None)

    # -- cache state ---------------------------------------------------------------------------
    def rewind(self, length: int):
        """Forget cached tokens after `length` (their rows are overwritten later; the mask of each
        step is built from precompute_len, so nothing else changes)."""
        self.precompute_len = min(length, self.precompute_len)
        del self.cached_ids[self.precompute_len:]
        del self._next[self.precompute_len + 1:]

    def reset(self):
        self.rewind(0)

    def load_prefix(self, k: np.ndarray | None, v: np.ndarray | None, ids: list[int]):
        """Hold `ids` with these cache rows ([L, n, kv_dim] each), as if they had just been prefilled
        (a saved system-prompt cache, --kvcache_path)."""
        n = len(ids)
        if n > self.C:
            raise GeneratorError(f"A cached prefix of {n} tokens does not fit --kv_cache_len {self.C}.")
        self.rewind(0)
        if n:
            self.k_cache[:, :n] = k
            self.v_cache[:, :n] = v
        self.precompute_len = n
        self.cached_ids = list(ids)
        self._next = list(range(n + 1))  # a text prefix
