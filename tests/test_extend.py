"""--extend_method PI / NTK with --scaling_factor (the seed's context extension).

A tiny llama trained for 64 positions is built with a 96-row KV cache: refused plain, accepted with
either extension, and each extended bundle passes the layer check (-c 1) against transformers'
model given the same extension (PI: rope_scaling linear; NTK: rope_theta x factor). Conflicts and bad
values are refused before any work, naming the flag.
"""

import numpy as np
import pytest

from generator.contract import Bundle
from generator.errors import GeneratorError
from generator.pipeline import resolve
from models import SMALL_GROUPS, quiet_build, save_tiny, tiny_llama_config

FP32 = dict(weight_type="fp32", hidden_state_type="fp32", post_weight_type="fp32")


@pytest.fixture(scope="module")
def short_llama(tmp_path_factory, tiny_tok):
    """The tiny llama with a 64-position context (SMALL_GROUPS' kv_cache_len is 96)."""
    tok_dir, vocab = tiny_tok
    return save_tiny(tiny_llama_config(vocab, max_position_embeddings=64), tmp_path_factory.mktemp("short"), tok_dir)


@pytest.fixture(scope="module")
def extended(short_llama, tmp_path_factory):
    out = {}
    for method in ("PI", "NTK"):
        path = tmp_path_factory.mktemp(f"ext_{method}") / "b"
        m = quiet_build(input_path=str(short_llama), output_path=str(path), check_level=1, extend_method=method,
                        scaling_factor=2.0, **FP32, **SMALL_GROUPS)
        out[method] = (m, Bundle(path))
    return out


def test_extended_bundles_pass_the_layer_check_against_the_extended_reference(extended):
    for method, (m, bundle) in extended.items():
        assert m["checks"]["passed"], (method, m["checks"]["failures"])
        assert m["options"]["extend_method"] == method and m["options"]["scaling_factor"] == 2.0
        assert bundle.opts.extend_method == method and bundle.opts.kv_cache_len == 96


def test_the_plain_reference_does_not_match_them(extended, short_llama):
    """The check is meaningful: without the extension the reference disagrees with each bundle."""
    from generator.inputs.checkpoint import open_input
    from generator.progress import Progress
    from generator.recipe import registry
    from generator.verify.checks import failing_rows, layer_check, thresholds
    from generator.verify.reference import capture, load_reference
    from models import token_ids

    plain = load_reference(open_input(short_llama), registry().recipes["llama"])
    for method, (_, bundle) in extended.items():
        cap = capture(plain, token_ids(80, bundle.spec.vocab_size, 0))
        assert failing_rows(layer_check(bundle, cap, Progress(enabled=False)), thresholds("fp32", "fp32")["layer"]), method


def test_pi_and_ntk_change_the_rope(extended, short_llama):
    plain = resolve(input_path=str(short_llama), **FP32, **{**SMALL_GROUPS, "kv_cache_len": 64, "last_kv_cache_len": [16, 32]}).spec.rope["full_attention"]
    pi = extended["PI"][1].spec.rope["full_attention"]
    ntk = extended["NTK"][1].spec.rope["full_attention"]
    assert pi["kind"] == "linear" and pi["theta"] == plain.theta
    assert np.allclose(pi["inv_freq"], np.asarray(plain.inv_freq) / 2)
    assert ntk["kind"] == "default" and ntk["theta"] == plain.theta * 2
    assert not np.allclose(ntk["inv_freq"][1:], plain.inv_freq[1:])
    layer = [b.layer_file(0, 0) for _, b in extended.values()]
    assert layer[0].read_bytes() != layer[1].read_bytes()  # the rope is in the graphs


def test_kv_cache_beyond_the_trained_context_needs_the_extension(short_llama):
    with pytest.raises(GeneratorError, match=r"--kv_cache_len 96 exceeds the model's max_position_embeddings 64 "
                                             r"\(--extend_method"):
        resolve(input_path=str(short_llama), **FP32, **SMALL_GROUPS)
    r = resolve(input_path=str(short_llama), extend_method="NTK", scaling_factor=1.5, **FP32, **SMALL_GROUPS)
    assert r.opts.kv_cache_len == 96
    with pytest.raises(GeneratorError, match=r"64 x --scaling_factor 1.25 = 80"):
        resolve(input_path=str(short_llama), extend_method="PI", scaling_factor=1.25, **FP32, **SMALL_GROUPS)


@pytest.mark.parametrize("flags, message", [
    (dict(extend_method="PI"), r"--extend_method PI .*needs --scaling_factor"),
    (dict(scaling_factor=2.0), r"--scaling_factor 2 .*needs --extend_method"),
    (dict(extend_method="NTK", scaling_factor=1.0), r"--scaling_factor 1 .*must be greater than 1"),
    (dict(extend_method="NTK", scaling_factor=0.5), r"--scaling_factor 0.5 .*must be greater than 1"),
])
def test_bad_extension_flags_are_refused(short_llama, flags, message):
    with pytest.raises(GeneratorError, match=message):
        resolve(input_path=str(short_llama), **FP32, **SMALL_GROUPS, **flags)


def test_config_rope_scaling_keeps_precedence(tiny_tok, tmp_path):
    tok_dir, vocab = tiny_tok
    ckpt = save_tiny(tiny_llama_config(vocab, rope_scaling={"rope_type": "linear", "factor": 2.0}), tmp_path / "c", tok_dir)
    with pytest.raises(GeneratorError, match=r"--extend_method NTK conflicts with .*rope_scaling \(rope_type 'linear'\)"):
        resolve(input_path=str(ckpt), extend_method="NTK", scaling_factor=2.0, **FP32, **SMALL_GROUPS)


def test_mrope_is_refused():
    from generator.resolve.rope import extend_rope

    with pytest.raises(GeneratorError, match=r"--extend_method PI: .*multimodal RoPE"):
        extend_rope({"rope_type": "default", "mrope_section": [16, 24, 24]}, 1e6, "PI", 2.0, "config.json rope_scaling")
    assert extend_rope(None, 1e4, "none", None, "x") == (None, 1e4)


def test_the_accuracy_report_compares_with_the_extended_reference(extended, tmp_path):
    """An fp32 extended bundle is the extended model: the report's reference gets the extension too, so its
    KL divergence is round-off (the bf16 embedding table given to the reference too; against the plain model it
    would be the extension's whole effect)."""
    from generator.accuracy.run import evaluate

    text = " ".join(f"word{i} and more text" for i in range(60))
    for method, (_, bundle) in extended.items():
        r = evaluate([bundle.dir], text=text, max_tokens=90, bf16_embedding=True, log=lambda s: None)["results"][0]
        assert r.metrics["kld_mean"] < 1e-6 and r.metrics["top1_agreement"] == 1.0, (method, r.metrics)
