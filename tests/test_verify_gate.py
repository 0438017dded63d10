"""The verification gate fails wrong bundles: a perturbed layer weight, a layer whose K and V
outputs are swapped, and a build whose graphs are wrong get "Verification failed" naming the layer
and a non-zero exit, from `verify -c 1`, from `build -c 1` and through make."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from generator.cli import main
from models import SMALL_GROUPS, quiet_build

pytestmark = pytest.mark.xdist_group("verify-gate")  # one worker builds the module's bundle
ROOT = Path(__file__).resolve().parent.parent
FP32 = dict(weight_type="fp32", hidden_state_type="fp32", post_weight_type="fp32")
# 2% more on one projection: far outside fp32's layer limits, the size of a plausible conversion slip
PERTURB = 1.02


@pytest.fixture(scope="module")
def good_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "good"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), **FP32, **SMALL_GROUPS)
    return out


def copy_of(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    return target


def perturb_weight(bundle: Path, layer: int, tensor: str, factor: float):
    """Scale one weight of `layer` in its shared .data file (all its shape groups read it)."""
    graph = onnx.load(str(next(bundle.glob(f"*_l{layer}_together.g0.onnx"))), load_external_data=False)
    init = next(t for t in graph.graph.initializer if tensor in t.name)
    info = {e.key: e.value for e in init.external_data}
    assert init.data_type == onnx.TensorProto.FLOAT
    data = bundle / info["location"]
    raw = bytearray(data.read_bytes())
    start, length = int(info.get("offset", 0)), int(info["length"])
    raw[start:start + length] = (np.frombuffer(bytes(raw[start:start + length]), np.float32) * np.float32(factor)).tobytes()
    data.write_bytes(bytes(raw))


def swap_kv_outputs(bundle: Path, layer: int):
    """Every shape group of `layer` returns V where K belongs and K where V belongs."""
    for path in bundle.glob(f"*_l{layer}_together.g*.onnx"):
        model = onnx.load(str(path), load_external_data=False)
        swap = {"K_cache_out": "V_cache_out", "V_cache_out": "K_cache_out"}
        for node in model.graph.node:
            for j, name in enumerate(node.output):
                if name in swap:
                    node.output[j] = swap[name]
        onnx.save(model, str(path))


def verify(bundle: Path, capsys) -> tuple[int, str]:
    code = main(["verify", str(bundle), "-c", "1"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_good_bundle_passes(good_bundle, capsys):
    code, text = verify(good_bundle, capsys)
    assert code == 0, text
    assert "Verification failed" not in text


def test_a_perturbed_layer_weight_fails_naming_the_layer(good_bundle, tmp_path, capsys):
    bad = copy_of(good_bundle, tmp_path / "bad")
    perturb_weight(bad, 1, "o_proj", PERTURB)
    code, text = verify(bad, capsys)
    assert code == 2  # the CLI's exit code for bad input and failed verification
    assert "Verification failed" in text and "layer 1" in text and "layer 0" not in text.split("Verification failed")[1]
    summary = json.loads((bad / "report" / "summary.json").read_text())
    assert not summary["passed"] and summary["layer"]["worst_layer"] == 1


def test_swapped_k_and_v_outputs_fail_naming_the_layer(good_bundle, tmp_path, capsys):
    bad = copy_of(good_bundle, tmp_path / "bad")
    swap_kv_outputs(bad, 0)
    code, text = verify(bad, capsys)
    assert code == 2  # the CLI's exit code for bad input and failed verification
    assert "Verification failed" in text and "layer 0" in text
    summary = json.loads((bad / "report" / "summary.json").read_text())
    assert summary["layer"]["worst_layer"] == 0 and summary["layer"]["worst_tensor"] in ("K_cache_out", "V_cache_out")


CORRUPTING_PYTHON = '''\
"""`python -m generator ...` with layer {layer}'s o_proj scaled by {factor} as the bundle is written."""
import runpy
import sys

sys.path.insert(0, {root!r})  # a script's folder is on sys.path, not make's working directory
from generator.export import weights  # noqa: E402

_layer = weights.WeightSource.layer


def layer(self, i):
    w = _layer(self, i)
    if i == {layer}:
        w["o_proj.weight"] = w["o_proj.weight"] * {factor}
    return w


weights.WeightSource.layer = layer
assert sys.argv[1:3] == ["-m", "generator"], sys.argv
sys.argv = ["generator", *sys.argv[3:]]
runpy.run_module("generator", run_name="__main__", alter_sys=True)
'''


def tiny_variant_recipes(target: Path, ckpt: Path) -> Path:
    """recipes/llama.yaml with a 'tiny-gate' variant: the tiny checkpoint's config (a make target)."""
    data = yaml.safe_load((ROOT / "recipes" / "llama.yaml").read_text(encoding="utf-8"))
    data["variants"] = {"tiny-gate": {"description": "test", "config": json.loads((ckpt / "config.json").read_text())}}
    target.mkdir()
    (target / "llama.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return target


def make_build(tmp_path: Path, ckpt: Path, python: str, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AXGEN_RECIPES_DIR": str(tiny_variant_recipes(tmp_path / f"recipes_{name}", ckpt))}
    flags = [f"INPUT={ckpt}", f"OUTPUT={tmp_path / name}", "CHECK_LEVEL=1", "WEIGHT_TYPE=fp32", "HIDDEN_STATE_TYPE=fp32",
             "POST_WEIGHT_TYPE=fp32", f"PREFILL_LEN={SMALL_GROUPS['prefill_len']}",
             f"KV_CACHE_LEN={SMALL_GROUPS['kv_cache_len']}", "LAST_KV_CACHE_LEN=16 32", f"GROUP_SIZE={SMALL_GROUPS['group_size']}"]
    # -o: never (re)install the virtualenv from a test
    return subprocess.run(["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed", "tiny-gate", f"PY={python}", *flags],
                          capture_output=True, text=True, timeout=600, env=env)


def test_make_exits_non_zero_when_verification_fails(tiny_llama, tmp_path):
    """make's model rule builds with -c 1 through the CLI: a build whose layer 1 is wrong must stop
    make with a non-zero exit and name the layer; the same command with the real python passes."""
    wrapper = tmp_path / "corrupting_python.py"
    wrapper.write_text(CORRUPTING_PYTHON.format(root=str(ROOT), layer=1, factor=PERTURB))
    bad = make_build(tmp_path, tiny_llama, f"{sys.executable} {wrapper}", "bad")
    assert bad.returncode != 0, bad.stdout + bad.stderr
    assert "Verification failed" in bad.stderr and "layer 1" in bad.stderr, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr
    good = make_build(tmp_path, tiny_llama, sys.executable, "good")
    assert good.returncode == 0, good.stderr[-3000:]
    manifest = json.loads((tmp_path / "good" / "manifest.json").read_text())
    assert manifest["checks"]["passed"] and manifest["options"]["last_kv_cache_len"] == [16, 32]
