"""Board numerics: quantized graphs run on their int-grid weights with fp32 activations, never int8 ones.

The reference is built here, independently of the runtime: each DequantizeLinear of a layer or post
graph is replaced by an fp32 initializer computed with numpy from the bundle's own codes and scales
(code * scale of its block), and that plain fp32 graph runs in onnxruntime without any quantization
setting. Board numerics must equal it to fp32 round-off; fast numerics (MatMulNBits with int8
activations) must differ measurably, which shows the default does not quantize activations.
"""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from generator.cli.run import numerics_note
from generator.contract import Bundle, Sampling, board_mask
from generator.errors import GeneratorError
from generator.runtime import ort as rt
from generator.runtime.engine import Engine
from generator.runtime.generation import Generator, Sampler
from generator.verify.checks import conversation_check, layer_check, logits_check
from generator.progress import Progress
from models import SMALL_GROUPS, quiet_build, threads, token_ids

ROUND_OFF = 2e-6  # board vs the numpy-dequantized fp32 graph, relative to the output's largest value
FAST_DIFFERS = 1e-4  # int8 activations move the outputs by more than this (measured: ~1e-2)


@pytest.fixture(scope="module", params=["s8", "s4"])
def bundle(request, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"numerics_{request.param}") / "b"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type=request.param,
                hidden_state_type="fp32", post_weight_type="s8", **SMALL_GROUPS)
    return Bundle(out)


def numpy_dequantized(path) -> bytes:
    """The graph at `path` with every DequantizeLinear replaced by numpy's code * scale (fp32)."""
    model = onnx.load(str(path))  # with its external data
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    found = 0
    for node in list(g.node):
        if node.op_type != "DequantizeLinear":
            continue
        codes = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scales = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["axis"] == 0 and codes.shape[0] % attrs["block_size"] == 0
        w = codes * np.repeat(scales, attrs["block_size"], axis=0)
        g.initializer.append(numpy_helper.from_array(w, node.output[0]))
        g.node.remove(node)
        found += 1
    assert found, f"{path} has no quantized weights"
    return model.SerializeToString()


def run(sess, feeds: dict) -> dict:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def layer_feeds(bundle: Bundle, sess) -> dict:
    rng = np.random.default_rng(3)
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    rows, tokens = shapes["K_cache"][1], shapes["input"][1]
    cached = rows // 2
    return {"K_cache": rng.standard_normal(shapes["K_cache"]).astype(np.float32),
            "V_cache": rng.standard_normal(shapes["V_cache"]).astype(np.float32),
            "indices": np.broadcast_to(np.arange(cached, cached + tokens, dtype=np.uint32), shapes["indices"]).copy(),
            "input": rng.standard_normal(shapes["input"]).astype(np.float32),
            "mask": board_mask("fp32", tokens, rows, cached)}


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def plain(graph: bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads() if not rt.global_pool_size() else 0
    if rt.global_pool_size():
        so.use_per_session_threads = False
    return ort.InferenceSession(graph, so, providers=rt.PROVIDERS)


@pytest.mark.parametrize("graph", ["layer_decode", "layer_prefill", "post"])
def test_board_is_fp32_on_dequantized_weights_and_fast_is_not(bundle, graph):
    path = {"layer_decode": bundle.layer_file(1, 0), "layer_prefill": bundle.layer_file(0, 2),
            "post": bundle.post_file}[graph]
    ref_sess = plain(numpy_dequantized(path))
    if graph == "post":
        feeds = {"input": np.random.default_rng(4).standard_normal((1, 1, bundle.spec.hidden_size)).astype(np.float32)}
    else:
        feeds = layer_feeds(bundle, ref_sess)
    ref = run(ref_sess, feeds)
    for relaxed in (False, True) if graph != "post" else (False,):
        board = rt.open_session(path, threads=threads(), quantized=True, relaxed=relaxed)
        assert board.numerics == "board" and board.board_weights  # the default, on shared fp32 weights
        got = run(board, feeds)
        for name, r in ref.items():
            assert rel(got[name], r) <= ROUND_OFF, (graph, relaxed, name, rel(got[name], r))
    fast = run(rt.open_session(path, threads=threads(), quantized=True, numerics="fast"), feeds)
    worst = max(rel(fast[name], r) for name, r in ref.items() if r.dtype == np.float32)
    assert worst > FAST_DIFFERS, (graph, worst)


def test_layer_groups_share_one_fp32_copy(bundle):
    """A layer's shape-group sessions read the same fp32 weight arrays (no per-session copies)."""
    a = rt.open_session(bundle.layer_file(0, 0), threads=threads(), quantized=True, relaxed=True)
    b = rt.open_session(bundle.layer_file(0, 1), threads=threads(), quantized=True, relaxed=True)
    assert a.board_weights and {id(w) for w in a.board_weights.values()} == {id(w) for w in b.board_weights.values()}


@pytest.mark.parametrize("k", [64, 72])  # 72: a last block of 8 rows (576 = 4.5 blocks of 128 in SmolLM2)
def test_dequantize_matches_onnx_reference(k):
    """The runtime's dequantize() against onnx's own reference implementation of DequantizeLinear."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    codes = rng.integers(-128, 128, (k, 24)).astype(np.int8)
    scales = rng.random((-(-k // 16), 24)).astype(np.float32) * 0.01
    node = onnx.helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=16)
    info = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "dq", [info("q", TensorProto.INT8, codes.shape),
                                                  info("s", TensorProto.FLOAT, scales.shape)],
                                   [info("w", TensorProto.FLOAT, codes.shape)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    (want,) = ReferenceEvaluator(model).run(None, {"q": codes, "s": scales})
    got = rt.dequantize(codes, scales, 0, 16)
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_engine_and_checks_use_board_numerics(bundle, tiny_llama):
    from generator.inputs.checkpoint import open_input
    from generator.recipe import registry
    from generator.verify.reference import capture, load_reference

    engine = Engine(bundle, threads=threads())
    assert engine.numerics == "board" and engine.post.numerics == "board"
    assert {engine.session(i, 0).numerics for i in range(engine.L)} == {"board"}
    fast = Engine(bundle, threads=threads(), numerics="fast")
    assert fast.post.numerics == "fast"
    gen = Generator(fast, [], Sampler(Sampling()))
    gen.generate(token_ids(4, bundle.spec.vocab_size, 1), 2)
    assert gen.stats.numerics == "fast"  # what speed lines name (run: "avg ... token/s (numerics fast ...)")
    assert numerics_note("fast") and not numerics_note("board")
    reference = load_reference(open_input(tiny_llama), registry().recipes["llama"])
    n = SMALL_GROUPS["last_kv_cache_len"][-1] + SMALL_GROUPS["prefill_len"]
    cap = capture(reference, token_ids(n, bundle.spec.vocab_size, 0))
    before = dict(rt.OPENED)
    layer_check(bundle, cap, Progress(enabled=False), threads=threads())
    logits_check(bundle, cap)
    conversation_check(bundle, reference, system=5, turns=((8, 2),))
    assert rt.OPENED["fast"] == before.get("fast", 0)
    assert rt.OPENED["board"] > before.get("board", 0)


def test_bad_numerics_is_a_clear_error(bundle):
    with pytest.raises(GeneratorError, match="--numerics must be 'board'.*'fast'.*got 'int8'"):
        Engine(bundle, threads=threads(), numerics="int8")
    for cmd in ("run", "serve"):
        proc = subprocess.run([sys.executable, "-m", "generator", cmd, str(bundle.dir), "--numerics", "int8"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "--numerics" in proc.stderr and "'board', 'fast'" in proc.stderr, proc.stderr
