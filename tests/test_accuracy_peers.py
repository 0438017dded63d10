"""llama.cpp as a peer in the accuracy report (generator/accuracy/peers.py): a clear error without the
optional llama-cpp-python; with it (never in CI), its Q8_0 re-quantization of the default model's GGUF is
scored against the same reference and is closer to it than Q4_0."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from generator.accuracy import peers
from generator.accuracy.run import read_text
from generator.cli import main
from generator.errors import GeneratorError


def test_peers_without_llama_cpp_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(GeneratorError, match="llama-cpp-python"):
        peers.llama_cpp()
    bundle = tmp_path / "b"
    bundle.mkdir()
    assert main(["accuracy", str(bundle), "--peers", "Q8_0"]) == 2
    err = capsys.readouterr().err
    assert "llama-cpp-python" in err and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is an optional extra")
def test_llama_cpp_q8_0_is_scored_against_the_same_reference_and_beats_q4_0(smollm2_bundle, tmp_path):
    refs: dict = {}
    q8, q4 = peers.evaluate_peers(smollm2_bundle[0], ["Q8_0", "q4_0"], text=read_text(None), max_tokens=128,
                                  threads=2, refs=refs, root=tmp_path, log=lambda s: None)
    assert (q8.weight_type, q4.weight_type) == ("Q8_0", "Q4_0") and len(refs) == 1
    assert q8.metrics["n_tokens"] == q4.metrics["n_tokens"] == 128
    assert q8.metrics["kld_mean"] < q4.metrics["kld_mean"]
    assert q8.metrics["top1_agreement"] > 0.8
    with pytest.raises(GeneratorError, match="not a llama.cpp quantization type"):
        peers.check_types(["Q9_9"])
