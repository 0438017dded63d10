"""The local runner: executes a bundle's ONNX graphs with onnxruntime the way the board does.

Contract section 5: the runtime owns the KV cache; the system prompt is prefilled once and kept
(`precompute_len`); each turn prefills only new tokens in chunks of `prefill_len` with the smallest
shape group whose capacity holds `precompute_len + n`; then decodes one token at a time with the
decode group, runs the post graph and samples per post_config.json until EOS.

Speed without changing results: caches, hidden states, masks and positions live in preallocated
buffers bound once through IO binding; new K/V rows are written in place by binding the outputs to
their cache rows; all sessions share one intra-op thread pool. By default the decode group is given
only the cache rows in use (`history="used"`): the rows the board passes masked out contribute
exactly zero, so the result is the board's up to floating-point summation order, while attention
cost follows the position instead of kv_cache_len. `history="board"` binds the full static shapes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from ..errors import GeneratorError
from ..export.quant import from_bf16_bits, to_bf16_bits
from ..recipe import Sampling
from ..resolve.options import BuildOptions, Group
from ..resolve.spec import ArchSpec

STORAGE = {"bf16": (np.uint16, TensorProto.BFLOAT16), "fp16": (np.float16, TensorProto.FLOAT16),
           "fp32": (np.float32, TensorProto.FLOAT)}


def to_storage(x: np.ndarray, hidden: str) -> np.ndarray:
    """fp32 values as the graph boundary stores them (bf16 as uint16 bits)."""
    if hidden == "bf16":
        return to_bf16_bits(x)
    return np.ascontiguousarray(x.astype(STORAGE[hidden][0]))


def from_storage(x: np.ndarray, hidden: str) -> np.ndarray:
    return from_bf16_bits(x) if hidden == "bf16" else x.astype(np.float32)


# the mask's "blocked" value per hidden_state_type (fp16 cannot hold -65536), and its stored form
MASK_VALUE = {"bf16": -65536.0, "fp16": -65504.0, "fp32": -65536.0}
MASK_BITS = {hidden: to_storage(np.full(1, v, np.float32), hidden)[0] for hidden, v in MASK_VALUE.items()}


class Bundle:
    """A bundle directory: its manifest, resolved spec and file layout."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        mf = self.dir / "manifest.json"
        if not mf.is_file():
            raise GeneratorError(f"'{self.dir}' is not a bundle: it has no manifest.json (build one with `make` or "
                                 f"`python -m generator build`).")
        self.manifest = json.loads(mf.read_text())
        self.spec = ArchSpec(**self.manifest["spec"])
        self.opts = BuildOptions(**self.manifest["options"])
        self.groups = [Group(index=g["index"], tokens=g["tokens"], history=g["history"], dummy_history=g["dummy_history"])
                       for g in self.manifest["graphs"]["groups"]]
        self.model = self.manifest["model"]
        self.system_prompt = self.manifest.get("system_prompt", "")
        post_cfg = self.dir / "post_config.json"
        self.sampling = Sampling.read(post_cfg) if post_cfg.is_file() else Sampling()

    def layer_file(self, i: int, group: int) -> Path:
        return self.dir / (self.manifest["graphs"]["layer_template"].replace("%d", str(i)).format(group=group))

    @property
    def post_file(self) -> Path:
        return self.dir / self.manifest["graphs"]["post"]

    @property
    def embed_file(self) -> Path:
        return self.dir / self.manifest["graphs"]["embed"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / self.manifest["tokenizer"]["dir"]

    @property
    def tokenizer_server(self) -> Path:
        return self.dir / self.manifest["tokenizer"]["server"]


_GLOBAL_POOL: int | None = None


def use_global_pool(threads: int) -> bool:
    """One process-wide intra-op pool shared by every layer session (set once per process).

    Per-session pools would leave ~30 pools whose threads must spin (or be woken) around each run;
    one shared pool's worker stays warm from layer to layer, which keeps small per-layer runs fast.
    onnxruntime then refuses sessions with their own pools in this process, so this is for
    processes that exist to run a bundle (`generator run`, `serve`, `bench`), not for libraries."""
    global _GLOBAL_POOL
    if _GLOBAL_POOL is None:
        try:
            ort.set_global_thread_pool_sizes(threads, 1)
            _GLOBAL_POOL = threads
        except Exception:  # the environment already exists in this process
            _GLOBAL_POOL = 0
    return _GLOBAL_POOL == threads


def session_options(threads: int, quantized: bool, shared_pool: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if shared_pool or _GLOBAL_POOL:  # once a process has the global pool, every session must use it
        so.use_per_session_threads = False
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if quantized:
        # MatMulNBits with int8 activations (onnxruntime's fast CPU path for block-quantized weights)
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
    so.log_severity_level = 3
    return so


def _relaxed(path: Path) -> bytes:
    """The graph with its history and token dimensions symbolic (same nodes, same weights).

    The graphs take P and T from their inputs' shapes, so the only change is the declared shapes."""
    model = onnx.load(str(path), load_external_data=False)
    dims_of = {"K_cache": {1: "history"}, "V_cache": {1: "history"}, "indices": {1: "tokens"}, "input": {1: "tokens"},
               "mask": {1: "tokens", 2: "total"}, "K_cache_out": {1: "tokens"}, "V_cache_out": {1: "tokens"},
               "output": {1: "tokens"}}
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, name in dims_of.get(value.name, {}).items():
            dims[axis].ClearField("dim_value")
            dims[axis].dim_param = name
    return model.SerializeToString()


class Engine:
    """Owns the sessions, the KV cache and the buffers; prefill / decode / post as on the board."""

    def __init__(self, bundle: Bundle, *, threads: int = 2, history: str = "used", mmap_embed: bool = True,
                 shared_pool: bool = False):
        if history not in ("used", "board"):
            raise GeneratorError(f"history must be 'used' or 'board', got {history!r}")
        self.b, self.spec, self.opts = bundle, bundle.spec, bundle.opts
        self.history_mode = history
        self.threads = threads
        self.shared_pool = shared_pool and threads > 1 and use_global_pool(threads)
        self.dtype, self.onnx_type = STORAGE[self.opts.hidden_state_type]
        s, o = self.spec, self.opts
        self.L, self.C, self.P, self.H, self.kv = s.num_hidden_layers, o.kv_cache_len, o.prefill_len, s.hidden_size, s.kv_dim
        self.quantized = o.weight_type in ("s8", "s4") or o.post_weight_type in ("s8", "s4")
        embed = np.memmap(bundle.embed_file, dtype=np.uint16, mode="r", shape=(s.vocab_size, s.hidden_size))
        self.embed = embed if mmap_embed else np.array(embed)
        # one block for all caches: [L, C, kv]; row `pos` of layer i is K/V of position pos
        self.k_cache = np.zeros((self.L, self.C, self.kv), self.dtype)
        self.v_cache = np.zeros((self.L, self.C, self.kv), self.dtype)
        self.precompute_len = 0
        self.cached_ids: list[int] = []
        self._sessions: dict[tuple[int, int], ort.InferenceSession] = {}
        self._device = ort.OrtDevice.make("cpu", 0)._get_c_device()  # where every bound buffer lives
        self._setup_decode()
        self._setup_post()

    # -- sessions ------------------------------------------------------------------------------
    def session(self, i: int, group: int) -> ort.InferenceSession:
        key = (i, group)
        if key not in self._sessions:
            path = self.b.layer_file(i, group)
            if not path.is_file():
                raise GeneratorError(f"Bundle file {path} is missing; rebuild the bundle.")
            so = session_options(self.threads, self.quantized, self.shared_pool)
            if self.history_mode == "used":
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
                sess = ort.InferenceSession(_relaxed(path), so, providers=["CPUExecutionProvider"])
                fixed = [o.name for o in sess.get_outputs() if group > 0 and not isinstance(o.shape[1], str)]
                if fixed:  # a graph that bakes its token count into its nodes cannot run unpadded chunks
                    raise GeneratorError(f"{path}: outputs {fixed} have a fixed token dimension, so this graph "
                                         f"cannot run with only the rows in use (history 'used'). The bundle was "
                                         f"built by an older generator: rebuild it, or run with --history board.")
                self._sessions[key] = sess
            else:
                self._sessions[key] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def _bind(self, io, name: str, arr: np.ndarray, shape=None, elem=None, output=False):
        shape = list(arr.shape) if shape is None else list(shape)
        elem = self.onnx_type if elem is None else elem
        (io._iobinding.bind_output if output else io._iobinding.bind_input)(name, self._device, elem, shape, arr.ctypes.data)

    # -- decode --------------------------------------------------------------------------------
    def _setup_decode(self):
        self.h_dec = [np.zeros((1, 1, self.H), self.dtype) for _ in range(2)]
        self.idx_dec = np.zeros((1, 1), np.uint32)
        self.mask_dec = np.full((1, 1, self.C + 1), MASK_BITS[self.opts.hidden_state_type], self.dtype)
        self.mask_dec[0, 0, self.C] = 0
        self.zeros_mask = np.zeros((1, 1, self.C + 1), self.dtype)
        # history 'used' at position 0: one (masked) history row, then the token itself
        self.first_mask = self.mask_dec[0, 0, self.C - 1:]
        # per layer, the C-level calls decode() makes for each token (no per-token Python wrappers)
        self._dec_calls = []
        for i in range(self.L):
            sess = self.session(i, 0)
            io = sess.io_binding()
            self._bind(io, "indices", self.idx_dec, elem=TensorProto.UINT32)
            self._bind(io, "input", self.h_dec[i % 2])
            self._bind(io, "output", self.h_dec[(i + 1) % 2], output=True)
            if self.history_mode == "board":
                self._bind(io, "K_cache", self.k_cache[i], shape=(1, self.C, self.kv))
                self._bind(io, "V_cache", self.v_cache[i], shape=(1, self.C, self.kv))
                self._bind(io, "mask", self.mask_dec)
            self._dec_calls.append((sess._sess, io._iobinding.bind_input, io._iobinding.bind_output,
                                    self.k_cache[i].ctypes.data, self.v_cache[i].ctypes.data))
        self.h_final_dec = self.h_dec[self.L % 2]

    def decode(self, token: int) -> np.ndarray:
        """Run one token at position precompute_len through all layers; returns its final hidden state."""
        pos = self.precompute_len
        if pos >= self.C:
            raise GeneratorError(f"KV cache full ({self.C} tokens, --kv_cache_len); reset the conversation.")
        self._embed_into(self.h_dec[0][0], [token])
        self.idx_dec[0, 0] = pos
        used = self.history_mode == "used"
        if not used:
            self.mask_dec[0, 0, :pos] = 0  # columns [0, pos) attend (rewind re-blocks the rest)
        row = self.kv * self.k_cache.itemsize
        dev, ot, kv_shape = self._device, self.onnx_type, [1, 1, self.kv]
        n = max(pos, 1)  # a 0-row history is not allowed: row 0 is then masked
        hist_shape, mask_shape = [1, n, self.kv], [1, 1, n + 1]
        mask_ptr = (self.zeros_mask if pos else self.first_mask).ctypes.data
        for sess, bind_in, bind_out, k_base, v_base in self._dec_calls:
            if used:
                bind_in("K_cache", dev, ot, hist_shape, k_base)
                bind_in("V_cache", dev, ot, hist_shape, v_base)
                bind_in("mask", dev, ot, mask_shape, mask_ptr)
            bind_out("K_cache_out", dev, ot, kv_shape, k_base + pos * row)
            bind_out("V_cache_out", dev, ot, kv_shape, v_base + pos * row)
            sess.run_with_iobinding(bind_in.__self__, None)
        self.precompute_len = pos + 1
        self.cached_ids.append(token)
        return self.h_final_dec[0, 0]

    # -- prefill -------------------------------------------------------------------------------
    def pick_group(self, n: int) -> list[Group | None]:
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
        out: list[Group | None] = []
        for c in range(chunks):
            hist = self.precompute_len + c * self.P
            out.append(next((g for g in prefill if (hist == 0 and g.dummy_history)
                             or (not g.dummy_history and g.history_rows >= hist)), None))
        return out

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Prefill `tokens` after the cached ones in chunks of prefill_len; returns the last token's
        final hidden state.

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
        P, used = self.P, self.history_mode == "used"
        first_prefill = next(g for g in self.b.groups if g.index > 0)
        plan = [first_prefill] * -(-n // P) if used else self.pick_group(n)
        mask_fill = MASK_BITS[self.opts.hidden_state_type]
        h = [np.zeros((1, P, self.H), self.dtype) for _ in range(2)]
        k_out = np.zeros((1, P, self.kv), self.dtype)
        v_out = np.zeros((1, P, self.kv), self.dtype)
        idx = np.zeros((1, P), np.uint32)
        row = self.kv * self.k_cache.itemsize
        last = None
        for c, group in enumerate(plan):
            start = self.precompute_len
            chunk = tokens[c * P:(c + 1) * P]
            if group is None:  # longer than every prefill group's history: one token at a time
                for tok in chunk:
                    last = self.decode(tok).copy()
                continue
            m = len(chunk)
            if used:
                rows, width = max(start, 1), m
            else:
                rows, width = group.history_rows, P
            mask = np.full((1, width, rows + width), mask_fill, self.dtype)
            if start and (used or not group.dummy_history):
                mask[0, :, :start] = 0
            mask[0, :, rows:][np.tril(np.ones((width, width), bool))] = 0
            idx[:] = 0
            idx[0, :m] = np.arange(start, start + m, dtype=np.uint32)
            h[0][:] = 0
            self._embed_into(h[0][0, :m], chunk)
            tok_shape = (1, width)
            for i in range(self.L):
                sess = self.session(i, group.index)
                io = sess.io_binding()
                self._bind(io, "K_cache", self.k_cache[i], shape=(1, rows, self.kv))
                self._bind(io, "V_cache", self.v_cache[i], shape=(1, rows, self.kv))
                self._bind(io, "indices", idx, shape=tok_shape, elem=TensorProto.UINT32)
                self._bind(io, "input", h[i % 2], shape=(*tok_shape, self.H))
                self._bind(io, "mask", mask)
                self._bind(io, "output", h[(i + 1) % 2], shape=(*tok_shape, self.H), output=True)
                if used:  # the new rows go straight to their place in the cache
                    kv_shape = [1, m, self.kv]
                    io._iobinding.bind_output("K_cache_out", self._device, self.onnx_type, kv_shape,
                                              self.k_cache[i].ctypes.data + start * row)
                    io._iobinding.bind_output("V_cache_out", self._device, self.onnx_type, kv_shape,
                                              self.v_cache[i].ctypes.data + start * row)
                else:
                    self._bind(io, "K_cache_out", k_out, output=True)
                    self._bind(io, "V_cache_out", v_out, output=True)
                sess._sess.run_with_iobinding(io._iobinding, None)
                if not used:
                    self.k_cache[i, start:start + m] = k_out[0, :m]
                    self.v_cache[i, start:start + m] = v_out[0, :m]
            last = h[self.L % 2][0, m - 1].copy()
            self.precompute_len = start + m
            self.cached_ids.extend(chunk)
        return last

    def _embed_into(self, dst: np.ndarray, ids: list[int]):
        rows = self.embed[np.asarray(ids, np.int64)]
        if self.opts.hidden_state_type == "bf16":
            dst[:] = rows
        else:
            dst[:] = from_bf16_bits(rows).astype(self.dtype)

    # -- post ----------------------------------------------------------------------------------
    def _setup_post(self):
        so = session_options(self.threads, self.quantized, self.shared_pool)
        self.post = ort.InferenceSession(str(self.b.post_file), so, providers=["CPUExecutionProvider"])
        self.post_in = np.zeros((1, 1, self.H), self.dtype)
        k = self.opts.post_topk
        self.post_out = np.zeros((1, 1, k or self.spec.vocab_size), self.dtype)
        self.post_idx = np.zeros((1, 1, k), np.int32) if k else None
        self._post_io = self.post.io_binding()
        self._bind(self._post_io, "input", self.post_in)
        self._bind(self._post_io, "output", self.post_out, output=True)
        if k:
            self._bind(self._post_io, "indices", self.post_idx, elem=TensorProto.INT32, output=True)

    def logits(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Post graph on one hidden state: (fp32 logits or top-k values, top-k indices or None)."""
        self.post_in[0, 0] = hidden
        self.post._sess.run_with_iobinding(self._post_io._iobinding, None)
        vals = from_storage(self.post_out[0, 0], self.opts.hidden_state_type)
        return vals, (self.post_idx[0, 0].copy() if self.post_idx is not None else None)

    # -- cache state ---------------------------------------------------------------------------
    def rewind(self, length: int):
        """Forget cached tokens after `length` (their rows are overwritten later)."""
        self.precompute_len = min(length, self.precompute_len)
        del self.cached_ids[self.precompute_len:]
        if self.history_mode == "board":
            self.mask_dec[0, 0, :self.C] = MASK_BITS[self.opts.hidden_state_type]
            self.mask_dec[0, 0, :self.precompute_len] = 0

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


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Sampler:
    """post_config.json sampling, in the board's order (contract section 4)."""

    def __init__(self, cfg: Sampling, seed: int | None = None):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, history: list[int], indices: np.ndarray | None = None) -> int:
        c = self.cfg
        x = logits.astype(np.float32)  # a copy: the caller's logits stay as they are
        ids = indices
        if c.enable_temperature and c.temperature > 0:
            x /= c.temperature
        if c.enable_repetition_penalty and history:
            recent = set(history[max(0, len(history) - c.penalty_window):])  # window 0: none (history[-0:] is all)
            if ids is None:
                sel = np.fromiter(recent, np.int64)
                sel = sel[(sel >= 0) & (sel < x.size)]
                x[sel] = np.where(x[sel] > 0, x[sel] / c.repetition_penalty, x[sel] * c.repetition_penalty)
            else:
                hit = np.isin(ids, list(recent))
                x[hit] = np.where(x[hit] > 0, x[hit] / c.repetition_penalty, x[hit] * c.repetition_penalty)
        pick = lambda j: int(ids[j]) if ids is not None else int(j)  # noqa: E731
        if c.enable_top_p_sampling:
            order = np.argsort(-x)
            p = np.exp(x[order] - x[order[0]])
            p /= p.sum()
            keep = np.searchsorted(np.cumsum(p), c.top_p) + 1
            p = p[:keep] / p[:keep].sum()
            return pick(order[self.rng.choice(keep, p=p)])
        if c.enable_top_k_sampling and c.top_k > 1:
            k = min(c.top_k, x.size)
            top = np.argpartition(-x, k - 1)[:k]
            p = np.exp(x[top] - x[top].max())
            return pick(top[self.rng.choice(k, p=p / p.sum())])
        return pick(int(np.argmax(x)))


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    prefilled: int = 0
    generated: int = 0
    ttft_ms: float = 0.0
    decode_tok_s: float = 0.0
    hit_eos: bool = False


class Generator:
    """Token-level generation on an Engine: prefill what is new, then sample until EOS."""

    def __init__(self, engine: Engine, eos_ids: list[int], sampler: Sampler):
        self.engine, self.eos = engine, set(eos_ids)
        self.sampler = sampler
        self.stats = TurnStats()

    def stream(self, ids: list[int], max_new_tokens: int | None = None, forced: list[int] | None = None,
               logits_out: list | None = None) -> Iterator[int]:
        """Continue the cached sequence to `ids` (reusing the longest cached prefix) and yield new tokens.

        With `forced`, those tokens are fed instead of sampled ones (teacher forcing); with
        `logits_out`, the logits of every step are appended to it. Stats land in self.stats."""
        e = self.engine
        common = min(common_prefix(e.cached_ids, ids), len(ids) - 1)  # the last prompt token always runs, for its logits
        e.rewind(common)
        t0 = time.perf_counter()
        hidden = e.prefill(ids[common:])
        stats = self.stats = TurnStats(prompt_tokens=len(ids), prefilled=len(ids) - common)
        budget = e.C - e.precompute_len + 1
        if max_new_tokens is not None:
            budget = min(budget, max_new_tokens)
        if forced is not None:
            budget = min(budget, len(forced))
        out: list[int] = []
        t_first = None
        while len(out) < budget:
            logits, idx = e.logits(hidden)
            if logits_out is not None:
                logits_out.append(logits.copy() if idx is None else (logits.copy(), idx.copy()))
            tok = forced[len(out)] if forced is not None else self.sampler(logits, out, idx)
            if t_first is None:
                t_first = time.perf_counter()
                stats.ttft_ms = (t_first - t0) * 1000
            out.append(tok)
            stats.generated = len(out)
            if len(out) > 1:
                stats.decode_tok_s = (len(out) - 1) / max(time.perf_counter() - t_first, 1e-9)
            yield tok
            if tok in self.eos and forced is None:
                stats.hit_eos = True
                break
            if len(out) >= budget or e.precompute_len >= e.C:
                break
            hidden = e.decode(tok)

    def generate(self, ids: list[int], max_new_tokens: int | None = None, **kw) -> list[int]:
        return list(self.stream(ids, max_new_tokens, **kw))


def load_script(path: Path, name: str):
    """Import a standalone script (the tokenizer server, which must not import this package) by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tokenizer_module(bundle: Bundle):
    """Import the bundle's tokenizer server file (the same code serves the board over HTTP)."""
    path = bundle.tokenizer_server
    return load_script(path, f"axgen_tokenizer_{abs(hash(str(path)))}")


def eos_ids_of(tokenizer) -> list[int]:
    """EOS ids of an in-process ChatSession or an HttpTokenizer."""
    ids = getattr(tokenizer, "eos_ids", None)
    if ids is None and hasattr(tokenizer, "tokenizer"):
        ids = getattr(tokenizer.tokenizer, "eos_ids", None)
    return list(ids or [])


class StreamDecoder:
    """Turns a growing token list into newly completed text (never splits a UTF-8 character)."""

    def __init__(self, decode: Callable[[list[int]], str], skip: set[int]):
        self.decode, self.skip = decode, skip
        self.ids: list[int] = []
        self.shown = ""

    def push(self, tok: int) -> str:
        if tok in self.skip:
            return ""
        self.ids.append(tok)
        text = self.decode(self.ids)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            new, self.shown = text[len(self.shown):], text
            return new
        return ""


class Chat:
    """A conversation as the board holds it: a tokenizer session + the engine's cache."""

    def __init__(self, bundle: Bundle, engine: Engine, tokenizer=None, *, system_prompt: str | None = None,
                 seed: int | None = None):
        self.b, self.engine = bundle, engine
        self.tok_module = None  # the bundle's tokenizer server module, when tokenizing in-process
        if tokenizer is None:
            self.tok_module = mod = load_tokenizer_module(bundle)
            tokenizer = mod.ChatSession(mod.ChatTokenizer(bundle.tokenizer_dir))
        self.tok = tokenizer
        self.gen = Generator(engine, eos_ids_of(tokenizer) or bundle.spec.eos_token_ids, Sampler(bundle.sampling, seed))
        self.system_prompt = bundle.system_prompt if system_prompt is None else system_prompt
        self.last_reply: str | None = None
        self.system_ids: list[int] = []

    @property
    def stats(self) -> TurnStats:
        return self.gen.stats

    def start(self, system_ids: list[int], k: np.ndarray | None = None, v: np.ndarray | None = None) -> int:
        """Start over from the system prompt's tokens (kept as the cached prefix): their cache rows
        `k`, `v` installed when given (a saved --kvcache_path), else prefilled once. Returns their count."""
        self.system_ids = list(system_ids)
        self.last_reply = None
        if k is not None or not self.system_ids:
            self.engine.load_prefix(k, v, self.system_ids)
        else:
            self.engine.reset()
            self.engine.prefill(self.system_ids)
        return len(self.system_ids)

    def reset(self) -> int:
        """Start over with a new tokenizer session and the system prompt prefilled once."""
        return self.start(self.tok.reset(self.system_prompt))

    def turn(self, text: str, max_new_tokens: int | None = None) -> Iterator[str]:
        """Send a user message; yields text pieces as they complete."""
        ids = self.tok.encode(text, last_reply=self.last_reply)[0]
        stream = StreamDecoder(self.tok.decode, self.gen.eos)
        for tok in self.gen.stream(list(ids), max_new_tokens):
            piece = stream.push(tok)
            if piece:
                yield piece
        self.last_reply = self.tok.decode(stream.ids)
