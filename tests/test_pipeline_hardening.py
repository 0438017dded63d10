"""Issue 8: the output-folder guard, interrupted builds, per-graph thresholds and what a user sees.

Every build here is the tiny random llama (2 layers, SMALL_GROUPS shapes): a few seconds each."""

import fcntl
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from generator import pipeline
from generator.cli import main
from generator.export.bundle import dest
from generator.resolve.chips import get_chip
from generator.resolve.options import BuildOptions
from generator.resolve.spec import ArchSpec
from generator.errors import GeneratorError
from generator.recipe import registry
from generator.contract import Bundle
from generator.verify.checks import graph_weight_types, limits_for, thresholds
from models import SMALL_GROUPS, quiet_build

ROOT = Path(__file__).resolve().parent.parent
FP32 = dict(weight_type="fp32", hidden_state_type="fp32")


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root with what it is and its size and mtime (folders: only that they exist)."""
    out = {}
    for p in root.rglob("*"):
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = ("d",) if p.is_dir() else ("f", st.st_size, st.st_mtime_ns)
    return out


def ckpt_copy(tiny_llama: Path, target: Path, dirs_exist_ok: bool = False, **config) -> Path:
    path = Path(shutil.copytree(tiny_llama, target, dirs_exist_ok=dirs_exist_ok))
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(config)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def one_paragraph(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n\n" not in msg and msg.strip() == msg and "Traceback" not in msg
    return msg


# -- output paths from untrusted data ------------------------------------------------------------

@pytest.mark.parametrize("stage", ["config", "writer"])
def test_model_type_with_parent_references_writes_nothing_outside_the_output_folder(tiny_llama, tmp_path, monkeypatch,
                                                                                     stage):
    """config.json's model_type "../../ESCAPED" names every graph file. It is refused when the spec is read;
    stage "writer" lets it through that check to prove the bundle writer's own guard stops it too."""
    ckpt = ckpt_copy(tiny_llama, tmp_path / "ckpt", model_type="../../ESCAPED")
    if stage == "writer":
        resolve = pipeline.resolve_spec
        monkeypatch.setattr(pipeline, "resolve_spec", lambda *a, **k: resolve(*a, **k).model_copy(
            update={"model_type": "../../ESCAPED"}))
        ckpt_copy(tiny_llama, ckpt, dirs_exist_ok=True)  # a config the spec check accepts
    out = tmp_path / "a" / "b" / "out"  # ../../ from its temporary sibling is still under tmp_path
    before = tree(tmp_path)
    with pytest.raises(GeneratorError) as exc:
        quiet_build(input_path=str(ckpt), output_path=str(out), **FP32, **SMALL_GROUPS)
    msg = one_paragraph(exc)
    assert "ESCAPED" in msg and ("model_type" if stage == "config" else "outside the output folder") in msg, msg
    after = tree(tmp_path)
    ours = lambda t: {k: v for k, v in t.items() if k != "a" and not k.startswith("a/")}  # noqa: E731
    assert ours(after) == ours(before)
    assert set(after) - set(ours(after)) <= {"a", "a/b"}  # at most the empty parent folders: no bundle, no temp
    assert not [q for p in (tmp_path.parent, tmp_path.parent.parent) for q in p.glob("ESCAPED*")]


def test_the_bundle_writer_refuses_paths_that_leave_its_folder(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path)
    assert dest(root, "sub", "x.onnx") == root / "sub" / "x.onnx"
    for parts in (("..", "x.onnx"), ("sub/../../x.onnx",), ("link", "x.onnx"), ("/etc/passwd",)):
        with pytest.raises(GeneratorError, match="outside the output folder"):
            dest(root, *parts)


def test_an_input_folder_name_that_cannot_name_files_is_refused(tiny_llama, tmp_path):
    ckpt = ckpt_copy(tiny_llama, tmp_path / "...")
    with pytest.raises(GeneratorError) as exc:
        quiet_build(input_path=str(ckpt), output_path=str(tmp_path / "out"), **FP32, **SMALL_GROUPS)
    msg = one_paragraph(exc)
    assert "--input_path" in msg and "'...'" in msg, msg
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_not_a_bundle_is_never_replaced(tiny_llama, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    ckpt = ckpt_copy(tiny_llama, tmp_path / "ckpt")
    for output, expect in ((precious, "is not an axgen bundle"), (tmp_path, "contains the input checkpoint"),
                           (precious / "thesis.txt", "is an existing file")):
        before = tree(tmp_path)
        with pytest.raises(GeneratorError) as exc:
            quiet_build(input_path=str(ckpt), output_path=str(output), **FP32, **SMALL_GROUPS)
        assert expect in one_paragraph(exc)
        assert tree(tmp_path) == before
    assert (precious / "thesis.txt").read_text() == "years of work"


# -- interrupted builds --------------------------------------------------------------------------

SLOW_BUILD = """\
import sys, time
sys.path.insert(0, {root!r})
from generator.export import bundle
_write_tokenizer = bundle.write_tokenizer

def slow(ctx, tmp, *rest):  # graphs are written: say so, then take long enough to be terminated
    open({flag!r}, "w").close()
    time.sleep(120)
    return _write_tokenizer(ctx, tmp, *rest)

bundle.write_tokenizer = slow
from generator.cli import main
sys.exit(main(sys.argv[1:]))
"""


def small_flags() -> list[str]:
    g = SMALL_GROUPS
    return ["--prefill_len", str(g["prefill_len"]), "--kv_cache_len", str(g["kv_cache_len"]), "--last_kv_cache_len",
            *map(str, g["last_kv_cache_len"]), "--group_size", str(g["group_size"])]


def test_sigterm_mid_build_removes_the_unfinished_bundle(tiny_llama, tmp_path):
    flag, out = tmp_path / "graphs_written", tmp_path / "out" / "b"
    script = tmp_path / "slow_build.py"
    script.write_text(SLOW_BUILD.format(root=str(ROOT), flag=str(flag)))
    proc = subprocess.Popen([sys.executable, str(script), "build", "--input_path", str(tiny_llama), "--output_path",
                             str(out), "-w", "fp32", "-t", "fp32", "--no-progress", *small_flags()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert flag.exists(), proc.communicate(timeout=30)
        tmp_dirs = list(out.parent.glob(".b.tmp-*"))
        assert len(tmp_dirs) == 1 and any(tmp_dirs[0].glob("*.onnx"))  # mid-build: graphs on disk
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_sigterm_between_the_publishing_renames_waits_for_the_new_bundle(tiny_llama, tmp_path, monkeypatch):
    """The old bundle is moved aside, then the new one moved in: a SIGTERM in between is handled after both,
    so the target is never left without a bundle (and the old one deleted with the temp folders)."""
    import threading

    from generator.export import bundle
    from generator.interrupt import Terminated

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    out = tmp_path / "b"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), **FP32, **SMALL_GROUPS)
    replace = os.replace

    def replace_then_terminate(src, dst):
        replace(src, dst)
        if Path(dst).name.startswith(".b.old-"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(bundle.os, "replace", replace_then_terminate)
    with pytest.raises(Terminated):
        quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="s8", **SMALL_GROUPS)
    monkeypatch.undo()
    assert json.loads((out / "manifest.json").read_text())["options"]["weight_type"] == "s8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_new_build_removes_dead_builds_temporary_folders_but_not_live_ones(tiny_llama, tmp_path):
    out = tmp_path / "out"
    dead = [tmp_path / ".out.tmp-1-dead", tmp_path / ".out.old-1-dead"]
    live = tmp_path / ".out.tmp-2-live"
    other = tmp_path / ".other.tmp-3-dead"  # another target's: not this build's business
    for d in (*dead, live, other):
        d.mkdir()
        (d / "layer.data").write_bytes(b"x" * 1000)
    (tmp_path / ".out.tmp-4-a-file").write_text("not a folder")  # left alone, and no crash
    (tmp_path / ".out.tmp-5-a-link").symlink_to(other)
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)  # a build still running holds its folder's lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        quiet_build(input_path=str(tiny_llama), output_path=str(out), **FP32, **SMALL_GROUPS)
        assert (out / "manifest.json").is_file()
        assert not any(d.exists() for d in dead)
        assert (live / "layer.data").is_file() and (other / "layer.data").is_file()
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name, ".out.tmp-4-a-file",
                                                                 ".out.tmp-5-a-link"])
    # bundle folders get a new folder's permissions, not mkdtemp's 0700
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask


# -- thresholds per graph ------------------------------------------------------------------------

def test_fp32_build_checks_its_s8_post_graph_with_s8_limits(tiny_llama, tmp_path):
    """WEIGHT_TYPE=fp32 HIDDEN_STATE_TYPE=fp32 keeps post_weight_type s8: the post graph is held to s8
    limits, the layers to fp32's; the build passes its own check."""
    out = tmp_path / "b"
    m = quiet_build(input_path=str(tiny_llama), output_path=str(out), check_level=1, **FP32, **SMALL_GROUPS)
    assert m["options"]["post_weight_type"] == "s8"
    checks = m["checks"]
    assert checks["passed"], checks["failures"]
    post = checks["layer"]["post"]
    assert post["weight_types"] == ["s8"] and post["limit"] == thresholds("s8", "fp32")["logits"]
    assert post["limit"] != thresholds("fp32", "fp32")["logits"]
    rows = json.loads((out / "report" / "layer_check.json").read_text())["rows"]
    assert {tuple(r["weight_types"]) for r in rows} == {("fp32",)}
    assert all(r["limit"] == thresholds("fp32", "fp32")["layer"] for r in rows)


def test_overrides_get_the_limits_of_the_types_each_layer_was_built_with(tiny_llama, tmp_path):
    """An s4 build whose layer 0 is kept at s8 (recipe `overrides`): layer 0 is held to s8 limits, not s4's;
    layer 1 to s4's; a layer with both gets the looser; generate/end-to-end limits are the loosest."""
    out = tmp_path / "b"
    m = quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="s4", hidden_state_type="bf16",
                    overrides={"layers.0.*": "s8", "layers.1.down_proj": "bf16"}, check_level=1, **SMALL_GROUPS)
    b = Bundle(out)
    assert graph_weight_types(b.layer_file(0, 0)) == ["s8"]
    assert graph_weight_types(b.layer_file(1, 2)) == ["bf16", "s4"]
    assert graph_weight_types(b.post_file) == ["s8"]
    rows = json.loads((out / "report" / "layer_check.json").read_text())["rows"]
    by_layer = {i: {json.dumps(r["limit"], sort_keys=True) for r in rows if r["layer"] == i} for i in (0, 1)}
    assert by_layer[0] == {json.dumps(thresholds("s8", "bf16")["layer"], sort_keys=True)}
    assert by_layer[1] == {json.dumps(thresholds("s4", "bf16")["layer"], sort_keys=True)}
    assert limits_for(["bf16", "s4"], "bf16") == thresholds("s4", "bf16")  # the looser of the two
    assert m["checks"]["thresholds"] == thresholds("s4", "bf16")
    assert m["checks"]["passed"], m["checks"]["failures"]


def test_a_failed_check_prints_the_worst_rows_and_the_error_names_the_same_figures(tiny_llama, tmp_path, capsys,
                                                                                   monkeypatch):
    from generator.verify import checks

    table = checks.tolerance_table()
    tight = {"min_cosine": 0.9999999, "max_rel_err": 1e-7}  # an s8 build cannot meet these
    strict = {"weight_type": {**table["weight_type"], "s8": {**table["weight_type"]["s8"], "layer": tight}},
              "hidden_state_type": {**table["hidden_state_type"], "bf16": {**table["hidden_state_type"]["bf16"],
                                                                           "layer": tight}}}
    monkeypatch.setattr(checks, "tolerance_table", lambda: strict)
    out = tmp_path / "b"
    code = main(["build", "--input_path", str(tiny_llama), "--output_path", str(out), "-w", "s8", "-c", "1",
                 "--no-progress", *small_flags()])
    text = capsys.readouterr()
    assert code == 2
    err = text.err
    assert "failing layer outputs, worst first" in err and "Traceback" not in err
    failure = err[err.index("Verification failed"):]
    m = re.search(r"worst is layer (\d+) (decode|prefill p\d+ h\d+) (\w+): cosine ([\d.]+), rel err ([\d.e+-]+)",
                  " ".join(failure.split()))
    assert m, failure
    layer, group, tensor, cos, rel = m.groups()
    worst_row = re.compile(rf"^\s*{layer}\s+{group}\s+{tensor}\s+{re.escape(cos)}\s+{re.escape(rel)}\s", re.M)
    table_text = err[err.index("failing layer outputs"):err.index("Verification failed")]
    assert worst_row.search(table_text), table_text  # the same row with the same figures, first in the table
    assert max(map(len, err.splitlines()[:err[:err.index("Verification failed")].count("\n")])) <= 80
    assert "{" not in failure  # no dicts


def test_worst_is_the_largest_share_of_its_own_limit_and_nan_is_worst():
    from generator.verify.checks import excess, failing_rows

    s8, fp32 = thresholds("s8", "bf16")["layer"], thresholds("fp32", "fp32")["layer"]
    rows = [dict(cosine=0.9999, max_rel_err=0.05, limit=s8),  # well within s8
            dict(cosine=0.99999, max_rel_err=2e-4, limit=fp32),  # twice fp32's error: the worst finite row
            dict(cosine=float("nan"), max_rel_err=0.0, limit=s8),
            dict(cosine=1.0, max_rel_err=float("nan"), limit=s8)]
    assert [excess(r) for r in rows][2:] == [float("inf")] * 2
    assert excess(rows[0]) < 1 < excess(rows[1])
    assert failing_rows(rows) == rows[1:]
    assert failing_rows(rows, s8) == rows[2:]  # one limit for all: the old signature


def test_layer_check_plot_has_limits_groups_and_an_error_panel(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    from generator.verify.checks import plot

    limit = thresholds("s8", "bf16")["layer"]
    rows = [{"layer": i, "group": g, "label": label, "tensor": t, "cosine": 0.999 - 0.01 * (i == 1 and g == 0),
             "max_rel_err": 0.01, "limit": limit, "weight_types": ["s8"]}
            for i in range(3) for g, label in ((0, "decode"), (1, "prefill p16 h0")) for t in
            ("output", "K_cache_out", "V_cache_out")]
    captured = {}
    original = matplotlib.figure.Figure.savefig

    def keep(fig, path, **kwargs):
        captured["fig"] = fig
        return original(fig, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot(rows, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 10_000
    fig = captured["fig"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["decode", "prefill p16 h0", "limit", "fails"]
    axes = fig.get_axes()
    assert len(axes) == 6 and axes[3].get_ylabel() == "max relative error"
    limit_line = next(l for l in axes[3].get_lines() if l.get_label() == "limit")
    assert set(limit_line.get_ydata()) == {limit["max_rel_err"]}


# -- what a user sees ----------------------------------------------------------------------------

def test_chip_as_typed_names_folder_and_scripts_and_the_log_says_what_is_built(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "OUT_DIR", tmp_path / "out")
    log = io.StringIO()
    m = quiet_build(input_path=str(tiny_llama), chip="AX630C", console=Console(file=log, width=80), **SMALL_GROUPS)
    out = Path(m["out_dir"])
    assert out == tmp_path / "out" / f"{out.name.rsplit('_', 1)[0]}_ax630c"
    model = m["model"]
    assert sorted(m["scripts"]) == [f"build_ax630c.sh", f"run_{model}_ax630c.sh"]
    assert "--chip AX620E" in (out / "build_ax630c.sh").read_text()
    assert m["chip"] == "AX620E" and m["options"]["chip"] == "AX630C"
    flat = " ".join(log.getvalue().split())
    for fact in ("chip AX630C (Pulsar2 --chip AX620E)", "weight type s8 (post s8)", "hidden state type bf16",
                 "prefill_len 16, kv_cache_len 96", "groups: g0 decode, g1 prefill p16 h0, g2 prefill p16 h16, "
                 "g3 prefill p16 h32, g4 prefill p16 h64"):
        assert fact in flat, flat
    # 80 columns before any terminal wrapping: no line of the Config / Build dumps is longer
    wide = BuildOptions(**m["options"]).model_copy(update={"prefill_len": 128, "last_kv_cache_len": [128, 256, 384, 512]})
    lines = pipeline.build_summary(wide, get_chip("AX630C")).splitlines()
    assert max(map(len, lines)) <= 80
    for g in wide.groups():  # wrapped between groups, never inside a label
        assert any(f"g{g.index} {g.label}" in line for line in lines), lines
    spec = ArchSpec(**m["spec"])  # the build's own spec (the bundle's reader keeps only what runs it)
    mixed = spec.model_copy(update={"layer_types": ["sliding_attention"] * 5 + ["full_attention"]})
    for s in (spec, mixed):
        assert max(map(len, s.pretty().splitlines())) <= 80, s.pretty()
    assert "'full_attention': [5]" in mixed.pretty()


@pytest.mark.parametrize("command", ["build", "verify", "bench"])
def test_every_flag_says_what_it_does_and_its_default(command):
    import argparse

    from generator.cli import make_parser

    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in sub.choices[command]._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) >= 4
    for action in actions:
        assert action.help, action.dest
        if action.option_strings:  # a flag: its default, or where it comes from
            assert "(default: " in action.help, (action.option_strings, action.help)
    # and --help renders (the %(default)s templates included)
    assert "(default: " in sub.choices[command].format_help()


def test_version(capsys):
    from generator import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"axgen {__version__}"


def test_list_never_cuts_a_variant_name_at_80_columns():
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "generator", "list"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    first_words = {line.split()[0] for line in lines if line.strip()}
    variants = [v for r in registry().recipes.values() for v in r.variants]
    assert variants and all(v in first_words for v in variants), [v for v in variants if v not in first_words]


# -- one resolution per build --------------------------------------------------------------------

def count_calls(monkeypatch, function) -> list:
    """Replace `function` in every generator module that holds it; returns the list of calls' args."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    for module in [m for name, m in sys.modules.items() if name.startswith("generator")]:
        if getattr(module, function.__name__, None) is function:
            monkeypatch.setattr(module, function.__name__, counted)
    return calls


@pytest.mark.parametrize("family", ["llama", "chatglm"])
def test_a_verified_build_reads_the_config_makes_and_checks_options_once(family, tiny_tok, tmp_path, monkeypatch):
    """read_config, make_options, check_flags and check_fit run once per build (verification included:
    chatglm's re-layout reference used to read the config twice more), and the chip check still runs."""
    import test_families  # its tiny checkpoint makers
    from generator.resolve import options, spec

    tok_dir, vocab = tiny_tok
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    test_families.FAMILIES[family].make(ckpt, tok_dir, vocab)
    calls = {f.__name__: count_calls(monkeypatch, f)
             for f in (spec.read_config, options.make_options, options.check_flags, options.check_fit)}
    m = quiet_build(input_path=str(ckpt), output_path=str(tmp_path / "b"), check_level=1, **SMALL_GROUPS)
    assert m["checks"]["passed"], m["checks"]["failures"]
    assert {name: len(c) for name, c in calls.items()} == dict.fromkeys(calls, 1)


def test_a_synthetic_variant_resolves_its_config_once_and_its_weights_from_that_spec(tmp_path, monkeypatch):
    from generator.resolve import spec

    monkeypatch.setenv("AXGEN_SYNTHETIC_CACHE", str(tmp_path / "cache"))
    calls = count_calls(monkeypatch, spec.read_config)
    r = pipeline.resolve(model="smollm-135m", synthetic=True, output_path=str(tmp_path / "b"), **SMALL_GROUPS)
    assert len(calls) == 1 and calls[0][1] == registry().recipes["llama"].variants["smollm-135m"].config
    assert r.ckpt.kind == "synthetic" and r.config["num_hidden_layers"] == 30
    assert r.spec.num_hidden_layers == 30 and r.opts.kv_cache_len == SMALL_GROUPS["kv_cache_len"]
    assert r.ckpt.shape("model.layers.29.mlp.down_proj.weight") == (r.spec.hidden_size, r.spec.intermediate_size)
    with pytest.raises(Exception):  # frozen: later stages cannot change what was resolved
        r.opts = None
