"""FusedEngine: the fused runtime graph (runtime/fused.py) in one onnxruntime session over a paged KV
block pool (runtime/paged.py); the backend `onnxruntime-fused`.

`step(seqs, tokens)` runs B sequences' new tokens in one call (the continuous batcher's unit): it
reserves their slots in the pool (PoolExhausted before anything runs), builds the additive masks once,
runs the graph with the pool bound in place (IO binding, no copies), stores the new K/V rows with one
fancy-index store per step, commits, and returns each sequence's last-token logits [B, vocab] fp32.
A lone sequence may bring any number of tokens (a prefill, run in chunks of `prefill_chunk`).

The single-stream Engine interface (prefill / decode / logits / rewind / reset / load_prefix,
cached_ids, precompute_len, next_position) drives one Sequence of the pool, so Chat, Generator and
`generator run` work unchanged; prefill/decode return the logits row itself (logits() passes it on).
A prefill on an empty sequence first shares the pool's cached blocks of the same prefix (attach_prefix).

Measured (SmolLM2-135M-Instruct, 42-token prompt, 128 greedy tokens, 2 threads, quiet machine; decode tok/s /
TTFT ms; KLD vs fp32 over 512 tokens; the per-layer Engine in brackets):
| bundle | board numerics                    | fast numerics                          |
|--------|-----------------------------------|----------------------------------------|
| s8     | 67.8 / 35 (54.0 / 61), KLD 0.0027 | 126.3 / 30 (133.4 / 28), KLD 0.0061 (0.0124) |
| s4     | 107.8 / 41 (53.2 / 57), KLD 0.144 | 174.4 / 29 (157.4 / 27), KLD 0.148 (0.149)   |
(s4 fast above: MatMulNBits block 32; now 128, figures at fused.NBITS_BLOCK.)
Batches (s8 fast, 1 thread): 8 sequences per step give 3.3x the tokens/s of one (B=1 91, B=8 302 tok/s).
RSS after loading, fast: s8 278 MiB, s4 230 MiB (75 of them the interpreter and onnxruntime; the bundles are
192 / 142 MB with a 56 MB embedding read through a memmap); the load peaks at ~2x the weights (ours and
onnxruntime's packed copy, ours freed: _drop_packed).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from ..contract import STORAGE, Bundle, from_bf16_bits
from ..errors import GeneratorError
from ..export.graphs import WINDOW_BLOCK
from . import fused
from .fused import FusedBuilder, declare_external, mask_value
from .ort import DEVICE, PROVIDERS, check_numerics, session_options, use_global_pool
from .paged import BlockPool, PoolExhausted, Sequence


class FusedEngine:
    """All layers in one session, B sequences per step, KV in a paged block pool."""

    def __init__(self, bundle: Bundle, *, threads: int = 2, numerics: str = "fast", block_size: int = 16,
                 num_blocks: int | None = None, batch_size: int = 1, shared_pool: bool = False,
                 prefill_chunk: int | None = None, optimized_model: str | None = None, **_ignored):
        self.numerics = check_numerics(numerics)
        self.b, self.opts = bundle, bundle.opts
        self.threads, self.batch_size = threads, int(batch_size)
        self.shared_pool = shared_pool and threads > 1 and use_global_pool(threads)
        self.hidden = self.opts.hidden_state_type
        self.dtype, self.onnx_type = STORAGE[self.hidden]
        builder = FusedBuilder(bundle, self.numerics)
        self.spec = s = builder.spec
        self.L, self.C, self.H, self.kv, self.V = (s.num_hidden_layers, self.opts.kv_cache_len, s.hidden_size,
                                                   s.kv_dim, s.vocab_size)
        self.P = int(prefill_chunk or self.opts.prefill_len)
        self.window = s.sliding_window if "sliding_attention" in s.layer_types else None
        self.longrope = any(t.long_inv_freq is not None for t in s.rope.values())
        self._check_memory(s)
        model, weights = builder.build()
        declare_external(model, weights, bundle.embed_file.name)
        so = session_options(threads, False, self.shared_pool)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle.dir))
        if optimized_model:
            so.optimized_model_filepath = optimized_model
        values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in weights.arrays.items()}
        for name, value in values.items():
            so.add_initializer(name, value)  # read in place: the arrays live as long as the engine
        self._values, self._weights = values, weights
        self.weight_bytes = weights.nbytes
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=PROVIDERS)
        del model
        if num_blocks is None:
            num_blocks = max(1, self.batch_size) * -(-self.C // int(block_size))
        self.pool = BlockPool(self.L, self.kv, self.dtype, block_size, num_blocks)
        self.embed = np.memmap(bundle.embed_file, dtype=np.uint16, mode="r", shape=(s.vocab_size, s.hidden_size))
        self._io = self.sess.io_binding()._iobinding
        self._run = self.sess._sess.run_with_iobinding
        self.grp = 1 if fused.ATTENTION_OP else s.num_attention_heads // s.num_key_value_heads  # mask rows per query
        self.kv_heads = (self.kv,) if fused.ATTENTION_OP else (s.num_key_value_heads, s.head_dim)  # pool / K-V layout
        self.bind_pool()
        self._shape = None  # (B, S) the outputs are bound for
        self.seq = self.pool.new_sequence()
        self.image_rows: dict[int, np.ndarray] = {}
        self._drop_packed()

    def _drop_packed(self):
        """MatMulNBits prepacks its codes and scales into onnxruntime's own buffers (accuracy level 4), so ours are
        a second copy of the weights. Checked, not assumed, per kind (codes, scales): a one-token run, the same
        run with our copies zeroed; equal logits mean onnxruntime never reads them and they are freed (the
        bundle's size in memory, not 2x), else they are restored (level 1 reads them)."""
        for suffix in (".nbits", ".nscales"):
            names = [n for n in self._weights.arrays if n.endswith(suffix)]
            if not names:
                continue
            probe = self.pool.new_sequence()
            try:
                before = self.step([probe], [[0]])
                self.pool.rewind(probe, 0)
                saved = {n: self._weights.arrays[n].copy() for n in names}
                for n in names:
                    self._weights.arrays[n].setflags(write=True)
                    self._weights.arrays[n][...] = 0
                after = self.step([probe], [[0]])
            finally:
                self.pool.free(probe)
            if np.array_equal(before, after):
                for n in names:
                    del self._values[n], self._weights.arrays[n]
            else:
                for n in names:
                    self._weights.arrays[n][...] = saved[n]
            del saved

    # peak bytes a weight takes while the session loads (our arrays + onnxruntime's packed copy), by numerics and
    # weight type; measured: SmolLM2 and a 7B s4 (fast ~9.8 GB peak, board ~14 GB)
    PEAK_BYTES = {"board": {"s4": 2.3}, "fast": {"s8": 2.6, "s4": 1.4}}

    def _check_memory(self, s):
        """Refuse up front a load this machine cannot hold (board numerics hold s8 / fp8 / 16-bit weights as fp32)."""
        per = lambda wtype: self.PEAK_BYTES[self.numerics].get(wtype, 4.0)  # noqa: E731
        need = (per(self.opts.weight_type) * s.num_hidden_layers * s.layer_params
                + per(self.opts.post_weight_type) * s.vocab_size * s.hidden_size)
        try:
            avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        except (OSError, StopIteration):
            return
        if need > 0.9 * avail:
            other = "--numerics fast (the bundle's codes, int8 activations) or " if self.numerics == "board" else ""
            raise GeneratorError(f"backend 'onnxruntime-fused' in {self.numerics} numerics needs ~{need / 2**30:.1f} GiB "
                                 f"while loading and {avail / 2**30:.1f} GiB are available; use {other}a machine with "
                                 f"more memory, or --backend onnxruntime.")

    def bind_pool(self):
        """Bind the pool's K/V arrays as the graph's k_pool / v_pool inputs (again after replacing the pool)."""
        rows, heads = self.pool.k.shape[1], self.kv_heads
        for i in range(self.L):
            self._bind_in(f"k_pool.{i}", self.pool.k[i], (rows, *heads))
            self._bind_in(f"v_pool.{i}", self.pool.v[i], (rows, *heads))

    # -- binding -----------------------------------------------------------------------------------
    def _bind_in(self, name: str, arr: np.ndarray, shape=None, elem: int | None = None):
        self._io.bind_input(name, DEVICE, self.onnx_type if elem is None else elem,
                            list(arr.shape if shape is None else shape), arr.ctypes.data)

    def _bind_out(self, name: str, arr: np.ndarray, elem: int | None = None, shape=None):
        self._io.bind_output(name, DEVICE, self.onnx_type if elem is None else elem,
                             list(arr.shape if shape is None else shape), arr.ctypes.data)

    def _outputs(self, B: int, S: int):
        if self._shape == (B, S):
            return
        self._k_new = np.zeros((self.L, B, S, self.kv), self.dtype)
        self._v_new = np.zeros((self.L, B, S, self.kv), self.dtype)
        self._logits = np.zeros((B, self.V), np.float32)
        heads = (B, S, *self.kv_heads)
        for i in range(self.L):
            self._bind_out(f"k_new.{i}", self._k_new[i], shape=heads)
            self._bind_out(f"v_new.{i}", self._v_new[i], shape=heads)
        self._bind_out("logits", self._logits, TensorProto.FLOAT)
        self._shape = (B, S)

    # -- one run -----------------------------------------------------------------------------------
    def masks(self, past: list[int], S: int, T: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The additive masks [B, grp*S, S + T] of one run: causal by position (key column = position); with sliding
        windows also the window mask (keys at q - k >= window blocked)."""
        B = len(past)
        lens = np.asarray(past)[:, None, None]
        col = np.arange(S + T)[None, None, :]
        row = np.arange(S)[None, :, None]
        open_ = col <= lens + row
        mask = np.where(open_, np.float32(0), np.float32(mask_value(self.hidden))).astype(np.float32)
        mask = np.broadcast_to(mask, (B, S, S + T))
        tile = (1, self.grp, 1)  # the graph's rows: g*S + s for the grp query heads of each KV head
        if self.window is None:
            return np.tile(mask, tile), None
        outside = (lens + row) - col >= self.window
        return np.tile(mask, tile), np.tile(mask + np.where(outside, np.float32(WINDOW_BLOCK), 0), tile)

    def _forward(self, tokens: np.ndarray, past: list[np.ndarray]) -> np.ndarray:
        """One graph run: tokens [B, S] after each sequence's past slots; returns logits [B, V] (its
        buffer) with the new K/V in self._k_new / _v_new."""
        B, S = tokens.shape
        lens = [len(p) for p in past]
        # keys by position: past_b pool rows, then the chunk's S (scattered in), then padding
        T = max(lens)
        slots = np.zeros((B, T + S), np.int64)
        scatter = np.stack(np.broadcast_arrays(np.arange(B)[:, None], np.asarray(lens)[:, None] + np.arange(S)), -1)
        self._scatter = np.ascontiguousarray(scatter, np.int64)  # [B, S, 2]
        self._bind_in("scatter", self._scatter, elem=TensorProto.INT64)
        for b, p in enumerate(past):
            slots[b, :len(p)] = p
        mask, window = self.masks(lens, S, T)
        positions = np.asarray(lens, np.int64)[:, None] + np.arange(S)  # [B, S]
        rows = self.embed[tokens.reshape(-1)]
        hidden = (rows if self.hidden == "bf16" else from_bf16_bits(rows).astype(self.dtype)).reshape(1, B * S, self.H)
        hidden = np.ascontiguousarray(hidden)
        self._bind_in("hidden", hidden)
        self._bind_in("positions", positions, elem=TensorProto.INT64)
        self._bind_in("mask", mask, elem=TensorProto.FLOAT)
        self._bind_in("slots", slots, elem=TensorProto.INT64)
        if window is not None:
            self._bind_in("mask_window", window, elem=TensorProto.FLOAT)
        self._outputs(B, S)
        self._run(self._io, None)
        return self._logits

    # -- the batch API -------------------------------------------------------------------------------
    def step(self, seqs: list[Sequence], tokens: list[list[int]]) -> np.ndarray:
        """Each sequence's new tokens (the same count for all, or one sequence with any count); returns
        the fp32 logits [B, vocab] of each one's last new token. PoolExhausted before running anything."""
        B = len(seqs)
        if B == 0 or len(tokens) != B:
            raise GeneratorError(f"step: {B} sequences and {len(tokens)} token lists")
        counts = {len(t) for t in tokens}
        if 0 in counts or (len(counts) > 1 and B > 1):
            raise GeneratorError(f"step: every sequence needs the same number (>= 1) of new tokens; got "
                                 f"{[len(t) for t in tokens]}")
        if B > 1 and self.longrope:
            raise GeneratorError("longrope bundles run one sequence per step (the long factors depend on the "
                                 "largest position of a run).")
        for seq, t in zip(seqs, tokens):
            if len(seq) + len(t) > self.C:
                raise GeneratorError(f"Conversation too long: {len(seq)} cached + {len(t)} new tokens exceed "
                                     f"--kv_cache_len {self.C}; reset the conversation.")
        reserved: list[np.ndarray] = []
        try:
            for seq, t in zip(seqs, tokens):
                reserved.append(self.pool.reserve(seq, len(t)))
        except PoolExhausted:
            for seq in seqs[:len(reserved)]:
                self.pool.rewind(seq, len(seq))
            raise
        try:
            past = [self.pool.slots(seq) for seq in seqs]
            if B > 1 or len(tokens[0]) <= self.P:
                out = self._chunk(np.asarray(tokens, np.int64), past, reserved)
            else:  # a long prefill: chunks of P, each after the ones before
                n, out = len(tokens[0]), None
                for c in range(0, n, self.P):
                    m = min(self.P, n - c)
                    out = self._chunk(np.asarray([tokens[0][c:c + m]], np.int64),
                                      [np.concatenate([past[0], reserved[0][:c]])], [reserved[0][c:c + m]])
        except BaseException:
            for seq in seqs:
                self.pool.rewind(seq, len(seq))
            raise
        for seq, t in zip(seqs, tokens):
            self.pool.commit(seq, list(t))
        return out.copy()

    def _chunk(self, ids: np.ndarray, past: list[np.ndarray], new_slots: list[np.ndarray]) -> np.ndarray:
        logits = self._forward(ids, past)
        flat = np.concatenate(new_slots)
        L, B, S, kv = self._k_new.shape
        self.pool.k[:, flat] = self._k_new.reshape(L, B * S, kv)
        self.pool.v[:, flat] = self._v_new.reshape(L, B * S, kv)
        return logits

    # -- the single-stream Engine interface ----------------------------------------------------------
    @property
    def cached_ids(self) -> list[int]:
        return self.seq.ids

    @property
    def precompute_len(self) -> int:
        return len(self.seq)

    @property
    def next_position(self) -> int:
        return len(self.seq)

    def prefill(self, tokens: list[int], positions=None, hidden_out=None) -> np.ndarray:
        """Prefill `tokens` after the cached ones; returns the last token's logits (what logits() takes)."""
        if self.image_rows:
            raise GeneratorError("backend 'onnxruntime-fused' lacks images; use --backend onnxruntime.")
        if hidden_out is not None:
            raise GeneratorError("backend 'onnxruntime-fused' gives logits, not hidden states (hidden_out).")
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise GeneratorError("nothing to prefill")
        start = len(self.seq)
        if positions is not None and not np.array_equal(np.asarray(positions).reshape(-1),
                                                        np.arange(start, start + len(tokens))):
            raise GeneratorError("backend 'onnxruntime-fused' takes text positions only (no mRoPE).")
        if start == 0:  # share the pool's cached blocks of this prefix (a system prompt computed once)
            reused = self.pool.attach_prefix(self.seq, tokens)
            tokens = tokens[reused:]
        return self.step([self.seq], [tokens])[0]

    def decode(self, token: int, position=None) -> np.ndarray:
        if len(self.seq) >= self.C:
            raise GeneratorError(f"KV cache full ({self.C} tokens, --kv_cache_len); reset the conversation.")
        return self.step([self.seq], [[int(token)]])[0]

    def logits(self, hidden: np.ndarray):
        return hidden, None

    def rewind(self, length: int):
        self.pool.rewind(self.seq, min(int(length), len(self.seq)))

    def reset(self):
        self.rewind(0)

    def load_prefix(self, k, v, ids: list[int]):
        if k is not None:
            raise GeneratorError("backend 'onnxruntime-fused' cannot load a saved KV cache (--kvcache_path).")
        self.reset()
        if ids:
            self.prefill(list(ids))
