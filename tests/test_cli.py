"""The command line end to end, as a user runs it: `python -m generator <command>` in a subprocess,
flags parsed by argparse, exit codes asserted (0 ok, 2 bad input or a failed verification)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "hello there"


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "generator", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


HELP = {  # command: flags its help must show
    "build": ["--input_path", "--output_path", "--chip", "--weight_type", "--hidden_state_type", "--prefill_len",
              "--kv_cache_len", "--last_kv_cache_len", "--post_topk", "--post_weight_type", "--group_size",
              "--check_level", "--prompt", "--synthetic"],
    "verify": ["--check_level", "--prompt", "--input_path"],
    "run": ["--prompt", "--system_prompt", "--max_new_tokens", "--kvcache_path", "--tokenizer_type",
            "--url_tokenizer_model", "--template_filename_axmodel", "--live_print"],
    "bench": ["--model", "--tokens", "--runs", "--weight_types"],
    "serve": ["--port"],
    "list": ["--verified"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_help_of_every_command(command):
    proc = cli(command, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m generator {command}")
    missing = [f for f in HELP[command] if f not in proc.stdout]
    assert not missing, proc.stdout


@pytest.mark.parametrize("args,says", [
    (["build", "-w", "s9"], "invalid choice: 's9'"),
    (["build", "--prefill_len", "many"], "invalid int value: 'many'"),
    (["build"], "Nothing to build"),
    (["build", "no-such-model"], "Unknown model 'no-such-model'"),
    (["verify", "/nonexistent/bundle"], "no manifest.json"),
    (["run", "/nonexistent/bundle", "--prompt", "x"], "no manifest.json"),
    (["bench", "--tokens"], "expected one argument"),
    (["bench", "--runs", "0"], "argument --runs: expected an integer >= 1, got '0'"),
    (["build", "--parallel", "-2"], "argument --parallel: expected an integer >= 1, got '-2'"),
    (["run", "b", "--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (["run", "b", "--max_new_tokens", "-1"], "argument --max_new_tokens: expected an integer >= 1"),
    (["serve", "b", "--queue_timeout", "nan"], "argument --queue_timeout: expected a finite number of seconds > 0"),
    (["serve", "b", "--port", "70000"], "argument --port: expected an integer from 0 to 65535, got '70000'"),
    (["serve", "b", "--max_tokens", "0"], "argument --max_tokens: expected an integer >= 1, got '0'"),
])
def test_bad_command_lines_exit_2_with_one_clear_line(args, says):
    proc = cli(*args, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert says in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def cli_bundle(tiny_llama, tmp_path_factory):
    """The tiny llama built through the CLI with every build flag, check level 2."""
    base = tmp_path_factory.mktemp("cli")
    out, summary = base / "bundle", base / "summary.json"
    proc = cli("build", "--input_path", tiny_llama, "--output_path", out, "--chip", "AX650", "-w", "s8", "-t", "bf16",
               "--prefill_len", 16, "--kv_cache_len", 96, "--last_kv_cache_len", 16, "--last_kv_cache_len", 32, 64,
               "--post_topk", 4, "--post_weight_type", "s8", "--group_size", 32, "-c", 2, "--prompt", PROMPT,
               "--parallel", 2, "--recipe", "llama", "--no-progress", "--summary-json", summary)
    return out, proc, summary


@pytest.mark.xdist_group("cli-bundle")  # one worker builds the module's bundle
def test_build_with_every_flag(cli_bundle):
    out, proc, summary_path = cli_bundle
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checks passed" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    o = manifest["options"]
    assert (o["weight_type"], o["hidden_state_type"], o["post_weight_type"]) == ("s8", "bf16", "s8")
    assert (o["prefill_len"], o["kv_cache_len"], o["post_topk"], o["group_size"]) == (16, 96, 4, 32)
    assert o["last_kv_cache_len"] == [16, 32, 64]  # the flag repeated and listed: extended, in order
    assert manifest["chip"] == "AX650" and manifest["recipe"]["name"] == "llama"
    assert [g["history"] for g in manifest["graphs"]["groups"]][2:] == [16, 32, 64]
    post = onnx.load(str(out / manifest["graphs"]["post"]), load_external_data=False)
    assert [v.name for v in post.graph.output] == ["output", "indices"]
    assert post.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == 4
    summary = json.loads(summary_path.read_text())
    assert summary["checks"]["passed"] and summary["checks"]["generate"]["prompt"] == PROMPT
    assert summary["out_dir"] == str(out)


@pytest.mark.xdist_group("cli-bundle")
def test_verify_passes_the_built_bundle(cli_bundle):
    out, _, _ = cli_bundle
    proc = cli("verify", out, "-c", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checks passed" in proc.stdout and "Verification failed" not in proc.stderr


@pytest.mark.xdist_group("cli-bundle")
def test_run_answers_as_the_verified_check(cli_bundle):
    """`run --prompt` gives the answer level 2 checked against transformers (greedy, same system prompt)."""
    out, _, summary_path = cli_bundle
    generate = json.loads(summary_path.read_text())["checks"]["generate"]
    proc = cli("run", out, "--prompt", PROMPT, "--max_new_tokens", 16, "--live_print", 0, "--seed", 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip("\n") == generate["ours_text"]
    assert "ttft:" in proc.stderr and "token/s" in proc.stderr


def test_a_build_refused_by_the_chip_exits_2_before_any_work(tiny_llama, tmp_path):
    proc = cli("build", "--input_path", tiny_llama, "--output_path", tmp_path / "b", "--chip", "AX630C", "-w", "fp32")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--weight_type" in proc.stderr and "'fp32'" in proc.stderr and "s8" in proc.stderr
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())
