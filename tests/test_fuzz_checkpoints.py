"""Bounded fuzz of broken checkpoints: each mutation of a tiny valid checkpoint (fixed seed) either
builds or fails with a one-paragraph GeneratorError, quickly, writing nothing outside the output
folder, leaving no temporary folder next to it and running no pickled code.

A mutation returns the text its error must contain, BUILT where the build must succeed, or None
where either outcome is acceptable (a changed dimension the weights happen to fit)."""

from __future__ import annotations

import json
import random
import shutil
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from generator.errors import GeneratorError
from generator.pipeline import OUT_DIR
from models import SMALL_GROUPS, quiet_build

SEED = 20260
BUILT = "built"
ROUNDS = 3  # random draws per mutation
SECONDS_PER_CASE = 10  # a tiny build takes about a second; a hang or a huge allocation takes far longer
DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size")
OPTS = dict(weight_type="fp32", hidden_state_type="fp32", post_weight_type="fp32", check_level=0, **SMALL_GROUPS)

Mutation = Callable[[Path, random.Random], "str | None"]
MUTATIONS: dict[str, Mutation] = {}


def mutation(fn: Mutation) -> Mutation:
    MUTATIONS[fn.__name__] = fn
    return fn


def _config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def _set_config(ckpt: Path, key: str, value) -> None:
    cfg = _config(ckpt)
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _tensors(ckpt: Path) -> dict[str, np.ndarray]:
    return load_file(ckpt / "model.safetensors")


def _save(ckpt: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def _pick(tensors: dict, rng: random.Random) -> str:
    return rng.choice(sorted(tensors))


# -- config.json --------------------------------------------------------------------------------------

@mutation
def config_not_an_object(ckpt, rng):
    (ckpt / "config.json").write_text(rng.choice([json.dumps([_config(ckpt)]), '"llama"', "3", "null", "true"]))
    return "expected a JSON object"


@mutation
def config_truncated(ckpt, rng):
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text[: rng.randrange(1, len(text) - 1)])
    return "not valid JSON"


@mutation
def config_not_utf8(ckpt, rng):
    data = (ckpt / "config.json").read_bytes()
    at = rng.randrange(len(data))
    (ckpt / "config.json").write_bytes(data[:at] + b"\xff\xfe" + data[at:])
    return "not valid JSON"


@mutation
def config_missing_dim(ckpt, rng):
    cfg = _config(ckpt)
    cfg.pop(rng.choice(DIMS))
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return None


@mutation
def config_bad_dim(ckpt, rng):
    _set_config(ckpt, rng.choice(DIMS), rng.choice([0, -1, -64, 2 ** 40, 2 ** 63, "64", 64.5, True, None, [64]]))
    return None


@mutation
def config_zero_kv_heads(ckpt, rng):
    _set_config(ckpt, "num_key_value_heads", 0)
    return "num_key_value_heads"


# -- weights --------------------------------------------------------------------------------------------

@mutation
def safetensors_truncated(ckpt, rng):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: rng.randrange(1, len(data) - 1)])
    return "model.safetensors"


@mutation
def safetensors_header_garbage(ckpt, rng):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    for _ in range(8):
        data[rng.randrange(8, 64)] = rng.randrange(256)
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    return None  # bytes inside a JSON string may still parse


@mutation
def integer_tensor(ckpt, rng):
    t = _tensors(ckpt)
    name = _pick(t, rng)
    t[name] = t[name].astype(rng.choice([np.int32, np.int8, np.uint8, np.bool_]))
    _save(ckpt, t)
    return f"tensor '{name}'"


@mutation
def nan_or_inf(ckpt, rng):
    t = _tensors(ckpt)
    name = _pick(t, rng)
    t[name] = t[name].copy()
    t[name].reshape(-1)[rng.randrange(t[name].size)] = rng.choice([np.nan, np.inf, -np.inf])
    _save(ckpt, t)
    return f"tensor '{name}' "


@mutation
def missing_tensor(ckpt, rng):
    t = _tensors(ckpt)
    name = _pick(t, rng)
    del t[name]
    _save(ckpt, t)
    return name


@mutation
def extra_tensor(ckpt, rng):
    t = _tensors(ckpt)
    d = _config(ckpt)["hidden_size"] // _config(ckpt)["num_attention_heads"]
    name = rng.choice(["model.layers.0.self_attn.q_norm.weight", "model.layers.2.self_attn.q_proj.weight",
                       "model.extra_head.weight"])
    t[name] = np.ones((d,), np.float32)
    _save(ckpt, t)
    return name


@mutation
def ignored_tensor(ckpt, rng):
    t = _tensors(ckpt)
    t[f"model.layers.{rng.randrange(2)}.self_attn.rotary_emb.inv_freq"] = np.ones((4,), np.float32)
    _save(ckpt, t)
    return BUILT  # the llama recipe declares rotary buffers ignored


def _shard(ckpt: Path, rng: random.Random, weight_map_value) -> None:
    """Two shards and an index whose weight_map value for one tensor is `weight_map_value(name)`."""
    t = _tensors(ckpt)
    names = sorted(t)
    (ckpt / "model.safetensors").unlink()
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, part in files.items():
        save_file({n: t[n] for n in part}, str(ckpt / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    victim = rng.choice(names)
    weight_map[victim] = weight_map_value(weight_map[victim])
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@mutation
def shard_path_escapes(ckpt, rng):
    outside = ckpt.parent / "outside.safetensors"
    shutil.copy(ckpt / "model.safetensors", outside)
    _shard(ckpt, rng, lambda f: rng.choice(["../outside.safetensors", str(outside), "sub/../../outside.safetensors"]))
    return "expected the file name of a shard"


@mutation
def shard_value_not_a_string(ckpt, rng):
    _shard(ckpt, rng, lambda f: rng.choice([1, None, [f], {"file": f}, True]))
    return "expected the file name of a shard"


@mutation
def shard_in_the_wrong_file(ckpt, rng):
    _shard(ckpt, rng, lambda f: "model-00002-of-00002.safetensors" if "00001" in f else "model-00001-of-00002.safetensors")
    return "which does not have it"


@mutation
def index_malformed(ckpt, rng):
    _shard(ckpt, rng, lambda f: f)
    index = ckpt / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(rng.choice([text[: len(text) // 2], "[]", '{"weight_map": []}', '{"metadata": {}}',
                                 '{"weight_map": {}}']))
    return "model.safetensors.index.json"


def _to_bin(ckpt: Path) -> dict[str, torch.Tensor]:
    state = {k: torch.from_numpy(v) for k, v in _tensors(ckpt).items()}
    (ckpt / "model.safetensors").unlink()
    return state


@mutation
def bin_index_malformed(ckpt, rng):
    torch.save(_to_bin(ckpt), ckpt / "pytorch_model-00001-of-00001.bin")
    (ckpt / "pytorch_model.bin.index.json").write_text(rng.choice(
        ['{"weight_map": ', "[1, 2]", '{"weight_map": {"x": "../pytorch_model-00001-of-00001.bin"}}',
         '{"weight_map": {"x": 7}}', '{"weight_map": {"x": "pytorch_model-00002-of-00002.bin"}}']))
    return "pytorch_model.bin.index.json"


@mutation
def bin_not_a_state_dict(ckpt, rng):
    state = _to_bin(ckpt)
    torch.save(rng.choice([list(state.values()), next(iter(state.values())), {"model": state}, {1: torch.ones(2)}]),
               ckpt / "pytorch_model.bin")
    return "pytorch_model.bin"


@mutation
def bin_pickle_runs_code(ckpt, rng):
    marker = ckpt.parent / "pickle_ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = _to_bin(ckpt)
    state[_pick(state, rng)] = Evil()
    torch.save(state, ckpt / "pytorch_model.bin")
    return "weights-only"


# -- tokenizer ------------------------------------------------------------------------------------------

@mutation
def tokenizer_corrupt(ckpt, rng):
    path = ckpt / "tokenizer.json"
    text = path.read_text()
    path.write_text(rng.choice([text[: rng.randrange(1, len(text) - 1)], '{"model": 3}', "[]",
                                text.replace('"type": "BPE"', '"type": "NoSuchModel"')]))
    return "tokenizer.json"


@mutation
def tokenizer_missing(ckpt, rng):
    (ckpt / "tokenizer.json").unlink()
    return "tokenizer.json"


# -- the harness ------------------------------------------------------------------------------------------

def tree(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file under root (except under skip): size and mtime."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and not (skip and (p == skip or skip in p.parents))}


@pytest.mark.parametrize("round", range(ROUNDS))
@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_broken_checkpoint_fails_cleanly(name, round, tiny_llama, tmp_path):
    ckpt = Path(shutil.copytree(tiny_llama, tmp_path / "ckpt"))
    expect = MUTATIONS[name](ckpt, random.Random(f"{SEED}:{name}:{round}"))
    out = tmp_path / "out" / "x"
    before, repo_out = tree(tmp_path), tree(OUT_DIR)
    started = time.monotonic()
    try:
        quiet_build(input_path=str(ckpt), output_path=str(out), **OPTS)
        outcome = BUILT
    except GeneratorError as exc:
        outcome = str(exc)
    except BaseException:  # noqa: BLE001 - any other exception is the defect under test
        pytest.fail(f"{name}: not a GeneratorError:\n{traceback.format_exc()}")
    seconds = time.monotonic() - started
    assert seconds < SECONDS_PER_CASE, f"{name}: {seconds:.1f} s"
    assert not (tmp_path / "pickle_ran").exists(), "pickled code ran"
    if outcome != "built":
        assert "\n\n" not in outcome and outcome.strip() == outcome, outcome  # one paragraph
        assert not out.exists(), "a failed build left a bundle"
    if expect == BUILT:
        assert outcome == BUILT, outcome
    elif expect is not None:
        assert expect in outcome, outcome
    leftovers = [p.name for p in out.parent.iterdir() if p != out] if out.parent.exists() else []
    assert leftovers == [], leftovers
    assert tree(tmp_path, skip=out) == before, "files changed outside the output folder"
    assert tree(OUT_DIR) == repo_out, "the repository's out/ changed"
