"""The accuracy report on tiny random bundles vs their transformers fp32 reference (generator/accuracy/)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from models import SMALL_GROUPS, quiet_build

from generator.accuracy.run import evaluate, read_text, windows
from generator.cli import main

TOKENS = 150  # two windows of the tiny bundles' 96-token cache


@pytest.fixture(scope="module")
def bundles(tiny_llama, tmp_path_factory):
    """fp32 weights with fp32 hidden states (the graphs compute the reference's function), s8 and s4 (round to
    nearest: a calibrated s4 is compared with its fp32 source, tested where calibration is)."""
    out = {}
    for wt, post in (("fp32", "fp32"), ("s8", "s8"), ("s4", "s8")):
        path = tmp_path_factory.mktemp(f"acc_{wt}") / wt
        quiet_build(input_path=str(tiny_llama), output_path=str(path), weight_type=wt, hidden_state_type="fp32",
                    post_weight_type=post, quant_method="rtn", **SMALL_GROUPS)
        out[wt] = path
    return out


@pytest.fixture(scope="module")
def evaluated(bundles):
    text = read_text(None)
    same = evaluate([bundles["fp32"]], text=text, max_tokens=TOKENS, threads=1, bf16_embedding=True, log=lambda s: None)
    all_ = evaluate([bundles[w] for w in ("fp32", "s8", "s4")], text=text, max_tokens=TOKENS, threads=1,
                    log=lambda s: None)
    return same["results"][0], {r.weight_type: r for r in all_["results"]}


def test_windows_cover_every_target_once():
    assert windows(11, 4) == [(0, 4), (4, 8), (8, 10)]  # positions 0..9 predict ids 1..10
    assert windows(2, 96) == [(0, 1)]


def test_fp32_bundle_matches_its_reference(evaluated):
    """With the reference's layer-0 input rounded to bf16 (the contract's embedding table), an fp32 bundle
    with fp32 hidden states computes the reference's function: KLD at float rounding, the same argmax."""
    same, _ = evaluated
    m = same.metrics
    assert m["n_tokens"] == TOKENS and same.info["windows"] == 2 and same.info["window"] == 96
    assert m["kld_mean"] < 1e-6 and m["kld_p99"] < 1e-5
    assert m["top1_agreement"] == 1.0
    assert m["ppl"] == pytest.approx(m["ppl_ref"], rel=1e-4)


def test_coarser_weights_cost_more(evaluated):
    _, r = evaluated
    kld = {w: r[w].metrics["kld_mean"] for w in r}
    assert kld["fp32"] < kld["s8"] < kld["s4"], kld
    assert r["s4"].metrics["top1_agreement"] <= r["s8"].metrics["top1_agreement"] <= 1.0
    assert len(r["s8"].kld) == TOKENS and np.all(r["s8"].kld >= 0)
    # one reference serves every bundle of the same checkpoint
    assert len({x.metrics["ppl_ref"] for x in r.values()}) == 1


def test_cli_writes_the_report(bundles, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    rc = main(["accuracy", str(bundles["s8"]), str(bundles["s4"]), "--text", str(text), "--max_tokens", "40",
               "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "KLD mean" in out and "s4" in out
    for b in ("s8", "s4"):
        report = json.loads((bundles[b] / "report" / "accuracy.json").read_text())
        assert report["text"] == "eval.txt" and report["numerics"] == "board"
        assert [x["weight_type"] for x in report["bundles"]] == ["s8", "s4"]
        assert all(x["n_tokens"] == 40 and 0 <= x["top1_agreement"] <= 1 for x in report["bundles"])
        assert (bundles[b] / "report" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # fast numerics: its own files, the board report stays
    assert main(["accuracy", str(bundles["s8"]), "--text", str(text), "--max_tokens", "20", "--threads", "1",
                 "--numerics", "fast"]) == 0
    fast = json.loads((bundles["s8"] / "report" / "accuracy_fast.json").read_text())
    assert fast["numerics"] == "fast" and fast["bundles"][0]["n_tokens"] == 20
    assert json.loads((bundles["s8"] / "report" / "accuracy.json").read_text())["numerics"] == "board"


@pytest.mark.parametrize("case, words", [
    ("missing bundle", "not a bundle folder"),
    ("empty text", "is empty"),
    ("binary text", "not a UTF-8 text file"),
    ("nul text", "NUL bytes"),
    ("max_tokens 0", "--max_tokens must be a positive"),
    ("missing text", "no such file"),
    ("bad numerics", "invalid choice"),
    ("no bundle", "none given"),
])
def test_bad_input(case, words, bundles, tmp_path, capsys):
    args = ["accuracy", str(bundles["s8"]), "--threads", "1"]
    if case == "missing bundle":
        args[1] = str(tmp_path / "nope")
    elif case == "empty text":
        (tmp_path / "e.txt").write_text("  \n")
        args += ["--text", str(tmp_path / "e.txt")]
    elif case == "binary text":
        (tmp_path / "b.bin").write_bytes(bytes(range(128, 256)))
        args += ["--text", str(tmp_path / "b.bin")]
    elif case == "nul text":
        (tmp_path / "n.txt").write_bytes(b"abc\x00def")
        args += ["--text", str(tmp_path / "n.txt")]
    elif case == "max_tokens 0":
        args += ["--max_tokens", "0"]
    elif case == "missing text":
        args += ["--text", str(tmp_path / "missing.txt")]
    elif case == "bad numerics":
        args += ["--numerics", "int4"]
    elif case == "no bundle":
        del args[1]
    if case == "bad numerics":
        with pytest.raises(SystemExit):
            main(args)
    else:
        assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_make_accuracy_configurations_are_valid_build_flags_and_a_failed_build_is_reported(monkeypatch, tmp_path):
    from generator.accuracy import suite
    from generator.cli import make_parser
    from generator.errors import GeneratorError

    confs = suite.configurations()
    labels = [c["label"] for c in confs]
    assert {"s8", "s4_rtn", "s4_gptq", "fp8_e4m3", "auto"} <= set(labels) and len(set(labels)) == len(labels)
    for c in confs:  # every configuration parses as `build` flags (argparse exits on an unknown one)
        make_parser().parse_args(["build", "smollm2-135m-instruct", *map(str, c["flags"])])
    monkeypatch.setattr(suite, "configurations", lambda: [{"label": "x", "flags": ["--nope"]}])
    notes = []
    with pytest.raises(GeneratorError, match="no configuration"):
        suite.build_all("smollm2-135m-instruct", "AX650", tmp_path, False, notes.append)
    assert "build of x failed" in notes[0] and "--nope" in notes[0]
    assert not list(tmp_path.iterdir())  # nothing built


def test_check_level_2_reports_accuracy(tiny_llama, tmp_path):
    """-c 2 adds the accuracy section (the evaluation text's first check_tokens tokens) to the summary and
    writes report/accuracy.json; it informs, it never fails the check."""
    from generator.accuracy.run import settings
    from generator.verify.report import accuracy_text

    out = tmp_path / "c2"
    m = quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="s8", check_level=2, **SMALL_GROUPS)
    acc = m["checks"]["accuracy"]
    assert acc["n_tokens"] == settings()["check_tokens"]
    assert 0 < acc["kld_mean"] < 0.05 and acc["top1_agreement"] > 0.8 and acc["ppl_ref"] > 1
    report = json.loads((out / "report" / "accuracy.json").read_text())
    assert report["bundles"][0]["kld_mean"] == pytest.approx(acc["kld_mean"])
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["accuracy"]["top1_agreement"] == acc["top1_agreement"]
    assert "KLD mean" in accuracy_text(acc)


def test_post_topk_bundle_reports_top1_only(tiny_llama, tmp_path):
    """post_topk > 0: no full logits, so KLD and perplexity are None with a note; top-1 still measured."""
    from generator.accuracy.report import write_reports

    out = tmp_path / "topk"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="fp32", hidden_state_type="fp32",
                post_weight_type="fp32", post_topk=8, **SMALL_GROUPS)
    ev = evaluate([out], text=read_text(None), max_tokens=40, threads=1, bf16_embedding=True, log=lambda s: None)
    r = ev["results"][0]
    assert r.metrics["kld_mean"] is None and r.metrics["ppl"] is None and "post_topk" in r.info["note"]
    assert r.metrics["top1_agreement"] == 1.0
    write_reports(ev, "evaluation.txt")
    assert json.loads((out / "report" / "accuracy.json").read_text())["bundles"][0]["kld_mean"] is None
    assert (out / "report" / "accuracy.png").is_file()


def test_weights_column_names_the_method_next_to_the_type_it_calibrated():
    from generator.accuracy.report import weights_text
    from generator.accuracy.run import Result

    def text(wt, info):
        return weights_text(Result("x", "b", wt, "board", {}, info=info))

    assert text("s4", {"quant_method": "gptq", "quant_type": "s4"}) == "s4 gptq"
    assert text("s8", {"quant_method": "rtn", "quant_type": None}) == "s8"
    # an auto mix: s8 layers (round to nearest) and calibrated s4 layers
    mix = {"quant_method": "gptq", "quant_type": "s4", "overrides": {"layers.1.*": "s4", "layers.2.*": "s4"}}
    assert text("s8", mix) == "s8 + s4 gptq x2"
