"""The fused runtime graph (runtime/fused.py) and FusedEngine (runtime/fused_engine.py, backend
onnxruntime-fused) against the per-layer bundle graphs (runtime/engine.py, board numerics both, same
weights): decode and prefill chunks of every prefill group, greedy tokens, batches of sequences of
different lengths against each alone, the paged layout against contiguous slots, a shared prefix,
pool exhaustion, fast numerics, and transformers' greedy tokens. Tolerances: generator/data/
tolerances.yaml `fused_runtime`."""

from __future__ import annotations

import random

import numpy as np
import pytest
import yaml

from generator.contract import Bundle
from generator.errors import GeneratorError
from generator.paths import DATA_DIR
from generator.runtime import backends
from generator.runtime.engine import Engine
from generator.runtime.fused_engine import FusedEngine
from generator.runtime.paged import PoolExhausted
from models import SMALL_GROUPS, quiet_build, save_tiny, threads, tiny_llama_config, token_ids

TOL = yaml.safe_load((DATA_DIR / "tolerances.yaml").read_text())["fused_runtime"]
# keys in position order as stored: the chunk's own K/V seen rounded (one rounding point the per-layer graphs lack)
BOARD_VS_LAYERS = "board_vs_layers_stored_kv"


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def qwen2_config(vocab):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def gemma2_config(vocab):
    from transformers import Gemma2Config

    return Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=24, vocab_size=vocab, max_position_embeddings=256,
                        query_pre_attn_scalar=20, attn_logit_softcapping=2.0, final_logit_softcapping=1.5,
                        sliding_window=5, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


FAMILIES = {"llama": None, "qwen2": qwen2_config, "gemma2": gemma2_config}


@pytest.fixture(scope="module")
def bundles(tiny_llama, tiny_tok, tmp_path_factory):
    """s8 weights, bf16 hidden states, the small shape groups: one bundle per family."""
    tok_dir, vocab = tiny_tok
    out = {}
    for name, config in FAMILIES.items():
        src = tiny_llama if config is None else save_tiny(config(vocab), tmp_path_factory.mktemp(f"src_{name}"), tok_dir)
        dst = tmp_path_factory.mktemp("fused") / name
        quiet_build(input_path=str(src), output_path=str(dst), weight_type="s8", hidden_state_type="bf16", **SMALL_GROUPS)
        out[name] = Bundle(dst)
    dst = tmp_path_factory.mktemp("fused") / "llama_s4"  # board numerics run s4 as MatMulNBits, fp32 activations
    quiet_build(input_path=str(tiny_llama), output_path=str(dst), weight_type="s4", hidden_state_type="bf16",
                **SMALL_GROUPS)
    out["llama_s4"] = Bundle(dst)
    dst = tmp_path_factory.mktemp("fused") / "llama_s4_g64"  # fast: MatMulNBits block 64 (> 32: rows in pairs)
    quiet_build(input_path=str(tiny_llama), output_path=str(dst), weight_type="s4", hidden_state_type="bf16",
                **{**SMALL_GROUPS, "group_size": 64})
    out["llama_s4_g64"] = Bundle(dst)
    return out


@pytest.fixture(scope="module")
def engines(bundles):
    """(per-layer Engine in the board's static shapes, FusedEngine) per family, board numerics both."""
    return {name: (Engine(b, threads=threads(), history="board"),
                   FusedEngine(b, threads=threads(), numerics="board", num_blocks=48))
            for name, b in bundles.items() if name != "llama_s4_g64"}


@pytest.mark.parametrize("family", [*FAMILIES, "llama_s4"])
def test_fused_matches_the_per_layer_graphs_for_every_prefill_group_and_decode(engines, bundles, family):
    ref, fused = engines[family]
    vocab = bundles[family].spec.vocab_size
    worst, groups = 0.0, set()
    for n in (16, 40, 80):  # history "board": 80 tokens run every prefill group (the first 16 the dummy-history one)
        ids = token_ids(n, vocab, n)
        ref.reset(), fused.reset()
        groups |= {g.index for g in ref.pick_group(n)}
        worst = max(worst, rel_err(fused.prefill(ids), ref.logits(ref.prefill(ids))[0]))
        for tok in token_ids(6, vocab, n + 1):
            worst = max(worst, rel_err(fused.decode(tok), ref.logits(ref.decode(tok))[0]))
        assert len(fused.cached_ids) == n + 6 and fused.cached_ids == ref.cached_ids
    assert groups == {g.index for g in bundles[family].groups if g.index > 0}
    # s4: MatMulNBits with fp32 activations (its scales stay ours: level 1 reads them); s8: fp32 weights
    assert any(n.endswith(".nscales") for n in fused._weights.arrays) == family.endswith("_s4")
    print(f"{family}: fused vs per-layer worst rel err {worst:.2e}")
    assert worst <= TOL[BOARD_VS_LAYERS]["max_rel_err"], (family, worst)


def greedy(engine, ids, n):
    from generator.contract import Sampling
    from generator.runtime.generation import Generator, Sampler

    off = Sampling(enable_top_k_sampling=False, enable_top_p_sampling=False, enable_repetition_penalty=False)
    engine.reset()
    return Generator(engine, [], Sampler(off)).generate(ids, n)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_tokens_equal_the_per_layer_graphs(engines, bundles, family):
    ref, fused = engines[family]
    ids = token_ids(20, bundles[family].spec.vocab_size, 7)
    want = greedy(ref, ids, 24)
    assert len(want) == 24 and greedy(fused, ids, 24) == want


@pytest.mark.parametrize("family", ["llama", "gemma2", "llama_s4", "llama fast", "llama_s4 fast", "llama_s4_g64 fast"])
def test_a_batch_of_three_sequences_equals_each_alone(engines, bundles, family):
    """llama_s4_g64 fast: MatMulNBits blocks of 64 take rows in pairs, an odd last row alone: padded to even rows
    (fused.EVEN_ROWS), batched rows equal single ones."""
    family, _, numerics = family.partition(" ")
    fused = engines[family][1] if not numerics else FusedEngine(bundles[family], threads=threads(), numerics="fast",
                                                                 num_blocks=48)
    vocab, pool = bundles[family].spec.vocab_size, fused.pool
    prompts = [token_ids(n, vocab, n) for n in (5, 40, 70)]
    batch, alone = [pool.new_sequence() for _ in prompts], [pool.new_sequence() for _ in prompts]
    try:
        for seqs in (batch, alone):
            for seq, ids in zip(seqs, prompts):
                fused.step([seq], [ids])
        for new in ([[3], [4], [5]], [[6, 7, 8], [9, 10, 11], [12, 13, 14]], [[15], [16], [17]]):
            together = fused.step(batch, new)
            each = np.stack([fused.step([seq], [toks])[0] for seq, toks in zip(alone, new)])
            assert together.shape == (3, vocab)
            print(f"{family}: batch vs alone rel err {rel_err(together, each):.2e}")
            assert rel_err(together, each) <= TOL["batch_vs_alone"]["max_rel_err"][numerics or "board"]
            assert (together.argmax(-1) == each.argmax(-1)).all()
        assert [len(s) for s in batch] == [len(p) + 5 for p in prompts]
    finally:
        for seq in batch + alone:
            pool.free(seq)


def test_paged_blocks_in_shuffled_order_give_the_contiguous_layout_bit_for_bit(bundles):
    b = bundles["llama"]
    contiguous = FusedEngine(b, threads=threads(), numerics="board", block_size=b.opts.kv_cache_len, num_blocks=1)
    paged = FusedEngine(b, threads=threads(), numerics="board", block_size=4)
    random.Random(0).shuffle(paged.pool._free)
    ids = token_ids(37, b.spec.vocab_size, 11)
    np.testing.assert_array_equal(paged.prefill(ids), contiguous.prefill(ids))
    for tok in token_ids(9, b.spec.vocab_size, 12):
        np.testing.assert_array_equal(paged.decode(tok), contiguous.decode(tok))
    blocks = paged.seq.blocks
    assert len(blocks) == 12 and blocks != sorted(blocks)  # really scattered


def test_a_shared_system_prompt_prefix_gives_the_logits_of_computing_it(engines, bundles):
    _, fused = engines["llama"]
    b, pool = bundles["llama"], fused.pool
    system = token_ids(40, b.spec.vocab_size, 121)  # 2 full blocks of 16, computed once
    users = [token_ids(7, b.spec.vocab_size, 22), token_ids(9, b.spec.vocab_size, 23)]
    first = pool.new_sequence()
    fused.step([first], [system + users[0]])
    second = pool.new_sequence()
    reused = pool.attach_prefix(second, system + users[1])
    assert reused == 32 and second.blocks[:2] == first.blocks[:2]
    got = fused.step([second], [(system + users[1])[reused:]])[0]
    fresh = FusedEngine(b, threads=threads(), numerics="board")
    want = fresh.prefill(system + users[1])
    print(f"shared prefix vs computed: rel err {rel_err(got, want):.2e}")
    assert rel_err(got, want) == 0.0
    assert got.argmax() == want.argmax()
    assert fresh.pool.stats()["hits"] == 0
    pool.free(first), pool.free(second)


@pytest.mark.parametrize("numerics", ["board", "fast"])
def test_logits_do_not_depend_on_chunking_or_the_prefix_cache(bundles, numerics):
    """Keys in position order as stored: one chunk, chunks of 16 (the bundle's prefill_len),
    chunks of 7, and a prefix-cache hit (two 16-token blocks shared, the rest computed) give the same logits and
    greedy tokens bit for bit."""
    b = bundles["llama"]
    vocab = b.spec.vocab_size
    system, user = token_ids(32, vocab, 61), token_ids(13, vocab, 62)
    runs = {}
    for name, chunk in (("one chunk", 96), ("chunks of 16", None), ("chunks of 7", 7)):
        engine = FusedEngine(b, threads=threads(), numerics=numerics, prefill_chunk=chunk)
        assert engine.P == (chunk or 16)
        runs[name] = (engine.prefill(system + user).copy(), greedy(engine, system + user, 12))
    engine = FusedEngine(b, threads=threads(), numerics=numerics)
    engine.prefill(system + token_ids(5, vocab, 63))  # caches the system prompt's two full blocks
    engine.reset()
    logits = engine.prefill(system + user).copy()
    assert engine.pool.hits == 2
    engine.reset()
    runs["prefix cache hit"] = (logits, greedy(engine, system + user, 12))  # greedy's prefill hits the cache too
    want_logits, want_tokens = runs["one chunk"]
    for name, (got_logits, got_tokens) in runs.items():
        np.testing.assert_array_equal(got_logits, want_logits, err_msg=name)
        assert got_tokens == want_tokens, name


def test_pool_exhaustion_is_a_clear_error_that_leaves_the_engine_usable(bundles):
    b = bundles["llama"]
    engine = FusedEngine(b, threads=threads(), numerics="board", block_size=4, num_blocks=6)  # 24 token rows
    other = engine.pool.new_sequence()
    engine.step([other], [token_ids(10, b.spec.vocab_size, 31)])  # 3 blocks
    ids = token_ids(12, b.spec.vocab_size, 32)
    with pytest.raises(PoolExhausted, match="block_size 4.*num_blocks 6"):
        engine.prefill(ids + ids[:2])  # 14 tokens: 4 blocks, 3 free
    assert len(engine.seq) == 0 and engine.pool.free_blocks == 3
    with pytest.raises(PoolExhausted):  # `other` gets its 2 blocks, the new sequence's 3 do not fit: both undone
        engine.step([other, engine.pool.new_sequence()], [ids[:9], ids[:9]])
    assert len(other) == 10 and len(other.blocks) == 3 and engine.pool.free_blocks == 3
    engine.pool.free(other)
    fresh = FusedEngine(b, threads=threads(), numerics="board")
    np.testing.assert_array_equal(engine.prefill(ids), fresh.prefill(ids))


def test_a_sequence_past_kv_cache_len_and_images_are_refused(engines, bundles):
    _, fused = engines["llama"]
    fused.reset()
    with pytest.raises(GeneratorError, match="exceed --kv_cache_len 96"):
        fused.prefill(token_ids(97, bundles["llama"].spec.vocab_size, 1))
    assert len(fused.seq) == 0
    fused.image_rows = {0: np.zeros((1, 64), np.uint16)}
    with pytest.raises(GeneratorError, match="lacks images"):
        fused.prefill([1, 2])
    fused.image_rows = {}
    with pytest.raises(GeneratorError, match="text positions only"):
        fused.prefill([1, 2], positions=np.zeros((3, 2)))


def test_a_load_over_the_available_memory_is_refused_before_it_starts(bundles, monkeypatch, capsys):
    """The memory guard: a weight costing more than the machine has (PEAK_BYTES made huge) is a clear error naming
    the backend, the numerics and the way out, from the API and from `run` (exit 2, no traceback)."""
    from generator.cli import main

    monkeypatch.setattr(FusedEngine, "PEAK_BYTES", {"board": {"s8": 1e12}, "fast": {"s8": 1e12}})
    with pytest.raises(GeneratorError, match=r"onnxruntime-fused' in board numerics needs ~.* GiB while loading.*"
                                             r"--numerics fast"):
        FusedEngine(bundles["llama"], threads=threads(), numerics="board")
    code = main(["run", str(bundles["llama"].dir), "--backend", "onnxruntime-fused", "--numerics", "fast",
                 "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "in fast numerics needs ~" in err and "--backend onnxruntime" in err
    assert "Traceback" not in err


def test_fast_numerics_stay_close_to_board(bundles, engines):
    b = bundles["llama"]
    _, board = engines["llama"]
    fast = FusedEngine(b, threads=threads(), numerics="fast")
    ids = token_ids(40, b.spec.vocab_size, 41)
    board.reset()
    rows = [(fast.prefill(ids[:8]), board.prefill(ids[:8]))]
    rows += [(fast.decode(t), board.decode(t)) for t in ids[8:]]
    agree = np.mean([f.argmax() == r.argmax() for f, r in rows])
    worst = max(rel_err(f, r) for f, r in rows)
    print(f"fast vs board: agreement {agree:.3f}, worst rel err {worst:.2e}")
    assert agree >= TOL["fast_vs_board"]["min_agreement"], agree
    assert worst <= TOL["fast_vs_board"]["max_rel_err"], worst


def test_backend_registered_and_the_transformers_reference_agrees_greedily(tiny_fp32_bundle):
    from generator.runtime.chat import Chat

    cls = backends.get("onnxruntime-fused")
    assert cls.capabilities["batching"] and cls.capabilities["paged_kv"] and not cls.capabilities["images"]
    bundle = tiny_fp32_bundle
    ids = token_ids(24, bundle.spec.vocab_size, 3)
    answers = {}
    for name in ("onnxruntime-fused", "transformers"):
        engine, _ = backends.open_engine(bundle, name, threads=threads())
        chat = Chat(bundle, engine, sampling={"enable_top_k_sampling": False, "enable_top_p_sampling": False})
        answers[name] = list(chat.gen.stream(ids, 12))
    assert len(answers["transformers"]) == 12  # no early EOS: twelve tokens compared
    assert answers["onnxruntime-fused"] == answers["transformers"]


def test_the_config_sizes_the_pool_and_other_backends_are_unchanged(bundles, tmp_path):
    from generator.runtime.boost_config import load_config

    path = tmp_path / "boost.yaml"
    path.write_text("llm_backend: onnxruntime-fused\nbatch_size: 3\nblock_size: 8\nnum_blocks: 20\n", encoding="utf-8")
    cfg = load_config(path)
    engine, cls = backends.open_engine(bundles["llama"], None, cfg, path, threads=threads())
    assert cls.name == "onnxruntime-fused" and engine.numerics == "board"  # the CLI's default numerics
    assert (engine.batch_size, engine.pool.block_size, engine.pool.num_blocks) == (3, 8, 20)
    assert engine.pool.k.shape == (2, 160, bundles["llama"].spec.kv_dim) and engine.pool.k.dtype == np.uint16
    path.write_text("llm_backend: onnxruntime-fused\nbatch_size: 2\n", encoding="utf-8")
    engine, _ = backends.open_engine(bundles["llama"], None, load_config(path), path, threads=threads())
    assert engine.pool.num_blocks == 2 * 96 // 16  # default: batch_size sequences of kv_cache_len tokens
    path.write_text("llm_backend: onnxruntime\n", encoding="utf-8")
    engine, cls = backends.open_engine(bundles["llama"], None, load_config(path), path, threads=threads())
    assert cls.name == "onnxruntime" and not hasattr(engine, "pool")


def test_the_attention_op_form_matches_the_per_layer_graphs(engines, bundles, monkeypatch):
    """fused.ATTENTION_OP (ONNX Attention, opset 23; off by default): softcap before the mask, GQA, windows."""
    from generator.runtime import fused

    monkeypatch.setattr(fused, "ATTENTION_OP", True)
    ref, _ = engines["gemma2"]
    engine = FusedEngine(bundles["gemma2"], threads=threads(), numerics="board")
    ids = token_ids(40, bundles["gemma2"].spec.vocab_size, 51)
    ref.reset()
    worst = rel_err(engine.prefill(ids), ref.logits(ref.prefill(ids))[0])
    for tok in token_ids(8, bundles["gemma2"].spec.vocab_size, 52):
        worst = max(worst, rel_err(engine.decode(tok), ref.logits(ref.decode(tok))[0]))
    assert worst <= TOL[BOARD_VS_LAYERS]["max_rel_err"], worst
