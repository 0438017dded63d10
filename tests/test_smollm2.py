"""The embedded default model end to end: build for AX650 at s8, level-2 check, run script answers."""

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.xdist_group("smollm2")


def test_build_verifies_and_lists_every_file(smollm2_bundle):
    out, manifest = smollm2_bundle
    checks = manifest["checks"]
    assert checks["passed"], checks["failures"]
    assert checks["layer"]["failing"] == 0
    assert checks["generate"]["matching_prefix"] >= checks["thresholds"]["generate"]["min_prefix"]
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    spec = manifest["spec"]
    # contract file names and sizes
    assert (out / "llama_p128_l0_together.g0.onnx").is_file() and (out / "llama_post.onnx").is_file()
    embed = out / "model.embed_tokens.weight.bfloat16.bin"
    assert embed.stat().st_size == spec["vocab_size"] * spec["hidden_size"] * 2
    assert json.loads((out / "post_config.json").read_text())["top_k"] == 1
    for name in ("layer_check.json", "layer_check.png", "generate_check.json", "summary.json"):
        assert (out / "report" / name).is_file()
    build = (out / "build_ax650.sh").read_text()
    assert "pulsar2 llm_build" in build and "--weight_type s8" in build and "--last_kv_cache_len 512" in build


def test_run_script_with_local_override_answers(smollm2_bundle, tmp_path):
    """The launcher (AXGEN_LOCAL=1) answers the check prompt with the answer the build verified against
    transformers (greedy: post_config top_k 1), and a factual question correctly."""
    from generator.verify.checks import GENERATE_TOKENS

    out, manifest = smollm2_bundle
    generate = manifest["checks"]["generate"]
    env = dict(os.environ, AXGEN_LOCAL="1", KVCACHE_PATH=str(tmp_path / "kvcache"))
    script = str(out / "run_smollm2-135m-instruct_ax650.sh")
    proc = subprocess.run([script, "--prompt", generate["prompt"], "--max_new_tokens", str(GENERATE_TOKENS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == generate["ours_text"].strip(), (proc.stdout, generate)
    assert "ttft:" in proc.stderr and "token/s" in proc.stderr
    proc = subprocess.run([script, "--prompt", "What is the capital of France?", "--max_new_tokens", "24"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout
