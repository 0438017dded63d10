"""--parallel N builds the decoder layers in worker processes: the bundle is byte-identical to a serial
build; a worker's error is the same clear GeneratorError; the peak RSS is reported; and the post
graph's row-block quantization stores the same bytes as whole-tensor quantization."""

import os
import subprocess
import sys

import numpy as np
import psutil
import pytest

from generator.errors import GeneratorError
from generator.export import graphs
from generator.export.onnx_graph import WeightsFile
from generator.export.parallel import peak_rss_mib, run_parallel
from generator.export.quant import pack_int4, quantize, quantize_fp8, to_bf16_bits
from generator.export.weights import WeightSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(tiny_llama, out, parallel, **flags):
    from models import quiet_build

    flags.setdefault("weight_type", "s8")
    return quiet_build(input_path=str(tiny_llama), output_path=str(out), chip="AX650", check_level=0,
                       parallel=parallel, prefill_len=16, kv_cache_len=64, last_kv_cache_len=[16],
                       quant_method="rtn", **flags)


def listing(folder):
    from generator.export.bundle import file_listing

    return file_listing(folder)


@pytest.mark.parametrize("wtype,post", [("s8", "s8"), ("s4", "bf16")])
def test_parallel_and_serial_bundles_are_byte_identical(tiny_llama, tmp_path, wtype, post):
    one = build(tiny_llama, tmp_path / "p1", 1, weight_type=wtype, post_weight_type=post)
    two = build(tiny_llama, tmp_path / "p2", 2, weight_type=wtype, post_weight_type=post)
    files = listing(tmp_path / "p1")
    assert sum(name.endswith(".onnx") for name in files) > 2  # layer graphs and the post graph
    assert files == listing(tmp_path / "p2") == one["files"] == two["files"]  # every file's sha256, same names


def test_peak_rss_is_in_the_manifest_and_the_summary(tiny_llama, tmp_path):
    out, summary = tmp_path / "b", tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "generator", "build", "--input_path", str(tiny_llama),
                           "--output_path", str(out), "-w", "s8", "-c", "0", "--prefill_len", "16", "--kv_cache_len",
                           "64", "--last_kv_cache_len", "16", "--parallel", "2", "--no-progress",
                           "--summary-json", str(summary)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    peak = manifest["peak_rss_mib"]
    assert 50 < peak < 64 * 1024  # python + torch + onnx alone is above 50 MiB
    assert json.loads(summary.read_text())["peak_rss_mib"] == peak
    assert f"peak RSS {peak:.0f} MiB" in " ".join(proc.stdout.split())
    here = psutil.Process().memory_info().rss / 2**20
    assert peak_rss_mib() >= here  # this process's own figure is at least its current RSS


def test_old_manifests_without_peak_rss_still_load(tiny_llama, tmp_path):
    import json

    from generator.contract import Bundle

    build(tiny_llama, tmp_path / "b", 1)
    path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["peak_rss_mib"]
    path.write_text(json.dumps(manifest))
    assert Bundle(tmp_path / "b").manifest.peak_rss_mib is None


def test_a_worker_error_is_the_same_clear_generator_error(tiny_llama, tmp_path, monkeypatch):
    real = WeightSource.layer

    def layer(self, i):
        if i == 1:
            raise GeneratorError(f"layer {i}: a damaged tensor (test)")
        return real(self, i)

    monkeypatch.setattr(WeightSource, "layer", layer)  # the forked workers inherit the patch
    with pytest.raises(GeneratorError, match=r"^layer 1: a damaged tensor \(test\)$") as info:
        build(tiny_llama, tmp_path / "b", 2)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no worker traceback attached
    assert not (tmp_path / "b").exists()  # nothing published


def _die(i):
    os._exit(3)


def test_a_worker_that_dies_is_a_clear_error():
    with pytest.raises(GeneratorError, match=r"worker \(--parallel 2\) died while building the test items"):
        run_parallel(_die, range(3), 2, lambda: None, "the test items")


def test_parallel_below_one_is_refused():
    with pytest.raises(GeneratorError, match=r"--parallel \(make PARALLEL=\) must be at least 1, got 0"):
        run_parallel(print, range(2), 0, lambda: None, "x")
    proc = subprocess.run([sys.executable, "-m", "generator", "build", "--parallel", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2 and "argument --parallel: expected an integer >= 1, got '0'" in proc.stderr


@pytest.mark.parametrize("wtype", ["s8", "s4", "fp8_e4m3", "bf16", "fp16", "fp32"])
def test_row_block_storage_is_whole_tensor_storage(tmp_path, monkeypatch, wtype):
    """A head cut into many row blocks (BLOCK_BYTES shrunk) stores what whole-tensor quantization does."""
    rng = np.random.default_rng(0)
    w_out_in = (rng.standard_normal((301, 200)) * rng.uniform(0.1, 3, (1, 200))).astype(np.float32)  # [N, K]
    w = np.ascontiguousarray(w_out_in.T)
    group = 32
    if wtype in ("s8", "s4"):
        q, scale = quantize(w, wtype, group)
        expected = (q.tobytes() if wtype == "s8" else pack_int4(q)) + scale.tobytes()
    elif wtype == "fp8_e4m3":
        q, scale = quantize_fp8(w, wtype)
        expected = q.view(np.uint8).tobytes() + scale.tobytes()
    else:
        expected = {"bf16": lambda: to_bf16_bits(w).tobytes(), "fp16": lambda: w.astype(np.float16).tobytes(),
                    "fp32": lambda: w.tobytes()}[wtype]()
    monkeypatch.setattr(graphs, "BLOCK_BYTES", 301 * 4 * 40)  # 40 rows -> blocks of 32 rows (a group multiple)
    assert len(list(graphs.row_blocks(w_out_in, group))) > 5
    wf = WeightsFile(tmp_path / "w.data")
    inits = []
    graphs.store_linear(wf, inits, "lm_head", w_out_in, None, wtype, group)
    wf.close()
    data = (tmp_path / "w.data").read_bytes()
    stored = b"".join(data[int(dict((e.key, e.value) for e in t.external_data)["offset"]):][
                      :int(dict((e.key, e.value) for e in t.external_data)["length"])] for t in inits)
    assert stored == expected


def test_a_bf16_checkpoint_after_torch_ran_threads_builds_in_workers(tiny_llama, tmp_path):
    """Workers forked after the parent ran multi-threaded torch read a bf16 checkpoint (torch converts)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "bf16"
    shutil.copytree(tiny_llama, src)
    for f in src.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, str(f), metadata={"format": "pt"})
    torch.set_num_threads(2)
    (torch.ones(512, 512) @ torch.ones(512, 512)).sum()  # the parent's intra-op pool is up
    build(src, tmp_path / "p1", 1)
    build(src, tmp_path / "p2", 2)
    assert listing(tmp_path / "p1") == listing(tmp_path / "p2")


@pytest.mark.parametrize("case,wtype", [("int4", "s4"), ("int8", "s8")])
def test_a_gptq_checkpoint_builds_the_same_bundle_in_workers(tiny_llama, tmp_path, case, wtype):
    """A GPTQ input (its codes kept bit-exact, read per module) through --parallel 2 and 1."""
    from test_gptq import make_gptq

    src = tmp_path / "gptq"
    make_gptq(tiny_llama, src, case)
    build(src, tmp_path / "p1", 1, weight_type=wtype, group_size=16)
    build(src, tmp_path / "p2", 2, weight_type=wtype, group_size=16)
    assert listing(tmp_path / "p1") == listing(tmp_path / "p2")
