"""`make bench` (generator/bench/) on a tiny bundle, 2 tokens and 1 run: every backend asked for is a row
with its KLD vs the fp32 reference, its own peak RSS and its ratios to the default backend; a peer that
cannot run is a row with a note, not a failure. No speed is asserted (figures go in `make bench`)."""

import json

import pytest

from generator.cli import main
from generator.runtime import backends
from models import SMALL_GROUPS, quiet_build


@pytest.fixture(scope="module")
def tiny_s8(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny_s8"
    # the chat prompt is ~120 tokens with the tiny tokenizer
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="s8",
                **dict(SMALL_GROUPS, kv_cache_len=160, last_kv_cache_len=[16, 64, 128]))
    return out


def test_bench_table_on_a_tiny_bundle(tiny_s8, tmp_path, monkeypatch, capsys):
    from generator.bench import peers

    monkeypatch.setattr(peers, "PEERS_SITE", tmp_path / "no_peers")  # onnxruntime-genai is not in the venv
    names = ["onnxruntime", "transformers"] + [n for n in ("onnxruntime-fused",) if n in backends.available()]
    out = tmp_path / "out"
    assert main(["bench", "--bundles", str(tiny_s8), "--tokens", "2", "--runs", "1", "--accuracy_tokens", "8",
                 "--users", "2" if "onnxruntime-fused" in names else "0", "--backends", *names,
                 "--peers", "Q8_0", "int8", "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    rows = {r["label"]: r for r in res["contenders"]}
    expected = {"onnxruntime board s8", "onnxruntime fast s8", "transformers fp32"}
    if "onnxruntime-fused" in names:
        modes = backends.get("onnxruntime-fused").capabilities["numerics"]
        expected |= {f"onnxruntime-fused {m} s8" for m in modes}
    assert set(rows) == expected
    for r in rows.values():
        assert "error" not in r, r
        assert r["decode_tok_s"] > 0 and r["ttft_ms"] > 0 and r["rss_mib"] > 0
        assert r["kld_mean"] is not None and 0 <= r["top1_agreement"] <= 1
        assert r["decode_vs_default"] > 0 and r["ttft_vs_default"] > 0
    assert rows["onnxruntime board s8"]["decode_vs_default"] == 1.0
    assert rows["transformers fp32"]["kld_mean"] < 1e-4  # the reference itself
    assert "kld_vs_board" in rows["onnxruntime fast s8"]
    assert rows["onnxruntime board s8"]["rss_vs_bundle_kv"] > 0
    notes = {p["label"]: p.get("note", "") for p in res["peers"]}
    assert "re-quantizes the reference GGUF" in notes["llama.cpp Q8_0"]
    assert "onnxruntime-genai not installed: `make bench-peers`" in notes["onnxruntime-genai int8"]
    if "onnxruntime-fused" in names:
        assert {u["numerics"] for u in res["users"]} == set(modes)
        for u in res["users"]:
            assert "error" not in u, u
            assert u["sessions"] == 2 and u["generated"] == [2, 2] and all(u["identical"]) and not u["errors"]
    printed = capsys.readouterr().out
    assert "onnxruntime fast s8" in printed and "onnxruntime-genai int8" in printed
    assert not list(out.glob(".bench/*")), "children's spec/result/logits files are removed"


def test_bench_refuses_an_unknown_backend_and_a_non_bundle(tiny_s8, tmp_path, capsys):
    assert main(["bench", "--bundles", str(tiny_s8), "--backends", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "--backend 'nope' is not a known backend" in capsys.readouterr().err
    assert main(["bench", "--bundles", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a bundle folder" in capsys.readouterr().err
    assert main(["bench", "--bundles", str(tiny_s8), "--tokens", "100", "--out", str(tmp_path / "o")]) == 2
    assert "--tokens 100 exceed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
