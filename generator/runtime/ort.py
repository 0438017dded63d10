"""The onnxruntime adapter: session options, the shared thread pool, relaxed graph loading, IO binding.

Every use of onnxruntime's private API (`InferenceSession._sess`, `IOBinding._iobinding`: binding
numpy buffers by address and running without per-call Python wrappers) is here and only here, so an
onnxruntime upgrade that changes them is one module's business.

Numerics of block-quantized graphs (DequantizeLinear of int8/int4 codes and fp32 scales, then MatMul):
- "board" (the default; checks and the accuracy report use nothing else): what the board's w8a16/w4a16
  computes, weights on their int grid and activations in fp32. Each DequantizeLinear of stored codes
  becomes an fp32 initializer holding code * scale, computed once in numpy (`dequantize`: the same single
  fp32 multiplication DequantizeLinear does, bit for bit) and handed to every session on that data with
  `SessionOptions.add_initializer`: onnxruntime reads the array in place, so a layer's shape-group
  sessions share one copy. Prepacking is off in these sessions (it would give each one a packed copy).
- "fast": onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits with accuracy level 4, which
  quantizes the activations to int8 per block: not what the board computes (about 3x the KL divergence of
  s8), but 2-3x faster here. Only when asked (`--numerics fast`); speed lines then say so.

Measured options for "board" (SmolLM2-135M-Instruct, 30 layers, decode + first prefill group open per
layer; this 2-core machine; `BOARD_WEIGHTS` switches the first two):
| option                                   | decode tok/s | 60-token prefill | RSS        |
|------------------------------------------|--------------|------------------|------------|
| shared fp32 weights (chosen)             | 45 (58-60)   | 107 ms (70 ms)   | 717 MiB    |
| fold: `session.disable_quant_qdq` (each  | 50-55 (63)   | 79 ms (54 ms)    | 1250 MiB   |
|   session folds its own fp32 copy)       |              |                  |            |
| DequantizeLinear run per call (no fold)  | 28           | 106 ms           | ~2000 MiB  |
| MatMulNBits accuracy level 0 (fp32 act.) | (5.7; s4 13.7)| -               | -          |
| fast (level 4, int8 activations)         | 133 (s4 160) | 53 ms            | 505 (s4 370)|
decode and prefill: 1 thread, CPU time, s8 (s4 the same in board numerics); in brackets 2 threads wall
time when the machine was otherwise idle; RSS after loading and generating, 2 threads (peak the same).
Sharing costs ~15% decode and ~35% prefill time here but halves the memory of the fp32 weights (one
copy instead of one per open shape group: 2 per layer with history "used", more with "board"), which is what decides whether a 1.5B-3B model runs in board numerics on a 16-24 GB machine.
"""

from __future__ import annotations

import collections
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from ..errors import GeneratorError

PROVIDERS = ["CPUExecutionProvider"]
# board numerics: "shared" (one fp32 array per weight, shared by a layer's sessions) or "fold" (onnxruntime
# constant-folds DequantizeLinear in each session); see the module docstring for the measurements
BOARD_WEIGHTS = "shared"
OPENED: collections.Counter = collections.Counter()  # sessions opened in this process, by numerics (a test hook)
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


def global_pool_size() -> int:
    """The process-wide pool's threads, 0 when this process has none (sessions then have their own)."""
    return _GLOBAL_POOL or 0


NUMERICS = ("board", "fast")


def check_numerics(numerics: str, flag: str = "--numerics") -> str:
    """`numerics` if it is a known mode, else a GeneratorError naming `flag`."""
    if numerics not in NUMERICS:
        raise GeneratorError(f"{flag} must be 'board' (weights on their int grid, fp32 activations: what the "
                             f"board computes) or 'fast' (int8 activations, faster on this CPU); got {numerics!r}.")
    return numerics


def session_options(threads: int, quantized: bool, shared_pool: bool = False,
                    numerics: str = "board") -> ort.SessionOptions:
    check_numerics(numerics)
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
    if quantized and numerics == "fast":
        # MatMulNBits with int8 activations (onnxruntime's fast CPU path for block-quantized weights)
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
    elif quantized:
        # board: DequantizeLinear constant-folded into fp32 weights (code * scale), fp32 MatMul
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.log_severity_level = 3
    return so


RELAXED_DIMS = {"K_cache": {1: "history"}, "V_cache": {1: "history"}, "indices": {1: "tokens"},
                "input": {1: "tokens"}, "mask": {1: "tokens", 2: "total"}, "K_cache_out": {1: "tokens"},
                "V_cache_out": {1: "tokens"}, "output": {1: "tokens"}}


def relax(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its history and token dimensions symbolic, in place (same nodes, same weights).

    The graphs take P and T from their inputs' shapes, so the only change is the declared shapes."""
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, name in RELAXED_DIMS.get(value.name, {}).items():
            dims[axis].ClearField("dim_value")
            dims[axis].dim_param = name
    return model


def relaxed_graph(path: Path) -> bytes:
    """relax() of the graph at `path`, serialized (its weights stay external)."""
    return relax(onnx.load(str(path), load_external_data=False)).SerializeToString()


class _Fp32:
    """One dequantized weight: the numpy array and the OrtValue over its memory (no copy)."""

    __slots__ = ("array", "value", "__weakref__")

    def __init__(self, array: np.ndarray):
        self.array, self.value = array, ort.OrtValue.ortvalue_from_numpy(array)


# (data file, its size and mtime, codes and scales names, axis, block) -> the weight, while a session holds it
_FP32: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def dequantize(codes: np.ndarray, scales: np.ndarray, axis: int, block: int) -> np.ndarray:
    """What DequantizeLinear computes without a zero point: fp32(code) * fp32 scale, one rounding, exact;
    `block` codes along `axis` share a scale (0: per-tensor or per-axis scales)."""
    w = codes.astype(np.float32)
    axis %= w.ndim
    if block:  # in place, block by block: no full-size temporary (a last partial block is allowed)
        rows, scale_rows = np.moveaxis(w, axis, 0), np.moveaxis(scales.astype(np.float32), axis, 0)
        for j in range(scale_rows.shape[0]):
            rows[j * block:(j + 1) * block] *= scale_rows[j]
        return w
    shape = [1] * w.ndim
    if scales.size > 1:
        shape[axis] = -1
    w *= scales.astype(np.float32).reshape(shape)
    return w


def _fp32_weight(folder: Path, inits: dict[str, TensorProto], node: onnx.NodeProto) -> _Fp32:
    from onnx import numpy_helper

    q, s = (inits[n] for n in node.input[:2])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    where = []
    for t in (q, s):
        loc = dict((e.key, e.value) for e in t.external_data)
        stat = (folder / loc["location"]).stat() if "location" in loc else None
        where.append((t.name, tuple(sorted(loc.items())), stat and (stat.st_size, stat.st_mtime_ns)))
    key = (str(folder.resolve()), *where, axis, block)
    found = _FP32.get(key)
    if found is None:
        codes = numpy_helper.to_array(q, base_dir=str(folder))
        scales = numpy_helper.to_array(s, base_dir=str(folder))
        found = _FP32[key] = _Fp32(np.ascontiguousarray(dequantize(codes, scales, axis, block)))
    return found


FLOAT8 = (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2)


def dequantized_graph(model: onnx.ModelProto, folder: Path,
                      only_float8: bool = False) -> tuple[onnx.ModelProto, dict[str, _Fp32]]:
    """In place: each DequantizeLinear of stored codes and scales (no zero point) becomes an fp32
    initializer of its output's name whose data the session takes from the returned weights (one array
    per weight, shared by every session on the same data: a layer's shape groups). `only_float8`: just the
    fp8 weights (fast numerics: onnxruntime has no int8-activation kernel for them and would otherwise
    run their DequantizeLinear on every call, 10x slower than board numerics)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    weights: dict[str, _Fp32] = {}
    for node in list(g.node):
        if (node.op_type != "DequantizeLinear" or len(node.input) > 2 or not all(n in inits for n in node.input)
                or not inits[node.input[0]].external_data
                or (only_float8 and inits[node.input[0]].data_type not in FLOAT8)):
            continue  # left to onnxruntime's constant folding (session_options: the same values)
        w = weights[node.output[0]] = _fp32_weight(folder, inits, node)
        # a declared initializer of the right type and shape whose data comes from SessionOptions.add_initializer
        # (onnxruntime never reads the external location it names: the codes' file, so that it exists)
        t = TensorProto(name=node.output[0], data_type=TensorProto.FLOAT, dims=w.array.shape,
                        data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value=dict((e.key, e.value) for e in inits[node.input[0]].external_data)
                            ["location"])
        g.initializer.append(t)
        g.node.remove(node)
    used = {n for node in g.node for n in node.input} | {o.name for o in g.output}
    for t in [t for t in g.initializer if t.name not in used and t.name not in weights]:
        g.initializer.remove(t)  # the codes and scales now unused
    return model, weights


def open_session(path: Path, *, threads: int, quantized: bool, shared_pool: bool = False,
                 relaxed: bool = False, numerics: str = "board") -> ort.InferenceSession:
    """A CPU session on a bundle graph; `relaxed`: with symbolic history/token dimensions (relaxed_graph);
    `numerics`: "board" (fp32 activations on dequantized weights) or "fast" (int8 activations): see the
    module docstring. The session holds its shared fp32 weights (`board_weights`): keep it while it runs."""
    so = session_options(threads, quantized, shared_pool, numerics)
    OPENED[numerics] += 1
    share = quantized and BOARD_WEIGHTS == "shared"  # fast: only fp8 weights (dequantized_graph)
    if not relaxed and not share:
        sess = ort.InferenceSession(str(path), so, providers=PROVIDERS)
        sess.numerics, sess.board_weights = numerics, {}
        return sess
    model = onnx.load(str(path), load_external_data=False)
    if relaxed:
        relax(model)
    weights: dict[str, _Fp32] = {}
    if share:
        model, weights = dequantized_graph(model, path.parent, only_float8=numerics == "fast")
        for name, w in weights.items():
            so.add_initializer(name, w.value)  # used in place: no per-session copy
        # prepacking would give each session its own packed copy of every weight (fast keeps it: its
        # MatMulNBits run on prepacked int weights)
        if weights and numerics == "board":
            so.add_session_config_entry("session.disable_prepacking", "1")
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=PROVIDERS)
    sess.numerics = numerics
    sess.board_weights = weights  # onnxruntime reads their memory: they live as long as the session
    return sess


def fixed_token_outputs(sess: ort.InferenceSession) -> list[str]:
    """Outputs whose token dimension is a number (a graph that bakes its token count into its nodes)."""
    return [o.name for o in sess.get_outputs() if not isinstance(o.shape[1], str)]


DEVICE = ort.OrtDevice.make("cpu", 0)._get_c_device()  # where every bound buffer lives


class Binding:
    """A session's inputs and outputs bound to numpy buffers by address (no copies; the caller keeps
    the buffers alive and in place while bound). `elem`: the ONNX element type unless given."""

    def __init__(self, sess: ort.InferenceSession, elem: int):
        self._run = sess._sess.run_with_iobinding
        self._io = sess.io_binding()._iobinding
        self.elem = elem

    def input(self, name: str, arr: np.ndarray, shape=None, elem: int | None = None):
        self.input_at(name, arr.ctypes.data, arr.shape if shape is None else shape, elem)

    def output(self, name: str, arr: np.ndarray, shape=None, elem: int | None = None):
        self.output_at(name, arr.ctypes.data, arr.shape if shape is None else shape, elem)

    def input_at(self, name: str, address: int, shape, elem: int | None = None):
        """Bind `name` to the memory at `address` (a row inside a larger buffer)."""
        self._io.bind_input(name, DEVICE, self.elem if elem is None else elem, list(shape), address)

    def output_at(self, name: str, address: int, shape, elem: int | None = None):
        self._io.bind_output(name, DEVICE, self.elem if elem is None else elem, list(shape), address)

    def run(self):
        self._run(self._io, None)

    def raw(self) -> tuple[Callable[[], None], Callable, Callable]:
        """(run, bind_input, bind_output) as onnxruntime's C-level calls, for a hot loop that rebinds
        by address: bind_*(name, DEVICE, elem, shape list, address)."""
        io, run = self._io, self._run
        return (lambda: run(io, None)), io.bind_input, io.bind_output



def run_once(sess: ort.InferenceSession, feeds: dict[str, tuple[np.ndarray, int]],
             outputs: dict[str, tuple[tuple[int, ...], np.dtype, int]]) -> dict[str, np.ndarray]:
    """One run with fresh buffers: feeds {name: (array, ONNX type)}, outputs {name: (shape, dtype, ONNX
    type)} (bf16 arrays are uint16 bits with their ONNX type). Returns the output arrays."""
    binding = Binding(sess, TensorProto.FLOAT)
    keep = []
    for name, (arr, onnx_type) in feeds.items():
        arr = np.ascontiguousarray(arr)
        keep.append(arr)
        binding.input(name, arr, elem=onnx_type)
    result = {}
    for name, (shape, dtype, onnx_type) in outputs.items():
        result[name] = np.zeros(shape, dtype)
        binding.output(name, result[name], elem=onnx_type)
    binding.run()
    return result
