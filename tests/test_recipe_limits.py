"""Recipe resource limits and value ranges (data/limits.yaml): every absurd value is refused with an
error naming the file and the field, quickly; the same rules hold for post_config.json and serve."""

import copy
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from generator.errors import GeneratorError
from generator.limits import limits, rule
from generator.paths import RECIPES_DIR
from generator.recipe import Registry, Sampling
from generator.resolve.spec import resolve_spec

ROOT = Path(__file__).resolve().parent.parent
LLAMA = yaml.safe_load((RECIPES_DIR / "llama.yaml").read_text(encoding="utf-8"))
VARIANT = "smollm2-135m-instruct"
NAN, INF = float("nan"), float("inf")


def write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "llama.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def mutated(path: tuple, value) -> dict:
    data = copy.deepcopy(LLAMA)
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return data


def load_and_resolve(tmp_path: Path, data: dict, config: dict | None = None):
    """Load the recipe dir, then resolve the smollm2 variant's config (or `config`)."""
    path = write_recipe(tmp_path, data)
    recipe = Registry(tmp_path).recipes["llama"]
    cfg = dict(recipe.variants[VARIANT].config) if config is None else config
    return path, resolve_spec(recipe, cfg, model_name="x", max_positions=128, where=f"{tmp_path}/config.json")


def refused(tmp_path: Path, data: dict, config: dict | None = None) -> str:
    started = time.perf_counter()
    with pytest.raises(GeneratorError) as e:
        load_and_resolve(tmp_path, data, config)
    assert time.perf_counter() - started < 1.0
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg  # one paragraph, naming the file
    return msg


# (field path, absurd value): refused when the registry loads (literals) or the spec resolves (expressions)
RECIPE_CASES = [
    (("block", "norm", "eps"), v) for v in (0, -1e-6, NAN, INF, 1.5, "abc", True)
] + [
    (("block", "norm", "weight_offset"), v) for v in (5.0, -1.0, NAN)
] + [
    (("block", "rope", "theta"), v) for v in (0, -10000.0, 1, INF, None)
] + [
    (("block", "rope", "local_theta"), -5.0),
    (("block", "rope", "partial_rotary_factor"), 0),
    (("block", "rope", "partial_rotary_factor"), 1.5),
    (("block", "rope", "partial_rotary_factor"), -0.5),
    (("block", "attention", "scale"), 0),
    (("block", "attention", "scale"), -0.125),
    (("block", "attention", "scale"), INF),
    (("block", "attention", "logit_softcap"), 0),
    (("block", "attention", "logit_softcap"), -50.0),
    (("block", "attention", "sliding_window"), 0),
    (("block", "attention", "sliding_window"), 4.5),
    (("block", "attention", "qkv_bias"), 3),
    (("block", "attention", "o_bias"), "yes"),
    (("block", "mlp", "bias"), 1),
    (("block", "residual_scale"), 0),
    (("block", "residual_scale"), NAN),
    (("embedding", "scale"), -1.0),
    (("embedding", "scale"), INF),
    (("head", "logit_scale"), 0),
    (("head", "final_logit_softcap"), -30.0),
    (("head", "bias"), 2),
    (("head", "tie_word_embeddings"), 7),
    (("chat", "img_token_num"), -1),
    (("chat", "img_token_num"), 10**6),
    (("chat", "templates", "llama3", "special_tokens", "<|eot_id|>"), -5),
    (("build", "prefill_len"), 0),
    (("build", "kv_cache_len"), -1),
    (("build", "last_kv_cache_len"), [128, 0]),
    (("build", "post_topk"), -1),
    (("build", "group_size"), 8),
    (("build", "group_size"), 1 << 20),
    (("sampling", "temperature"), 0),
    (("sampling", "temperature"), NAN),
    (("sampling", "temperature"), 100.0),
    (("sampling", "top_p"), 0),
    (("sampling", "top_p"), 1.5),
    (("sampling", "top_k"), 0),
    (("sampling", "repetition_penalty"), -1.0),
    (("sampling", "penalty_window"), -1),
    (("variants", VARIANT, "build", "weigth_type"), "s8"),
    (("variants", VARIANT, "build", "weight_type"), "s9"),
    (("variants", VARIANT, "build", "prefill_len"), 0),
    # expressions: the value is checked when the spec is resolved
    (("block", "norm", "eps"), {"expr": "-rms_norm_eps"}),
    (("block", "norm", "eps"), {"expr": "'abc'"}),
    (("block", "attention", "scale"), {"expr": "head_dim ** 0 - 1"}),
    (("block", "attention", "qkv_bias"), {"expr": "hidden_size"}),
    (("block", "rope", "theta"), {"expr": "rope_theta * 0"}),
    (("block", "rope", "partial_rotary_factor"), {"expr": "2"}),
    (("block", "residual_scale"), {"expr": "None"}),
    (("embedding", "scale"), {"expr": "1e308 * 10"}),
    (("head", "logit_scale"), {"expr": "float('nan')"}),
    (("block", "attention", "layer_type_default"), {"expr": "i"}),
    (("block", "attention", "layer_type_default"), "global"),
]


@pytest.mark.parametrize("path, value", RECIPE_CASES, ids=lambda x: ".".join(x) if isinstance(x, tuple) else repr(x))
def test_absurd_recipe_values_are_refused_naming_the_field(tmp_path, path, value):
    msg = refused(tmp_path, mutated(path, value))
    assert ".".join(path[:3] if path[0] == "variants" else path) in msg


# names that become file names or make targets
@pytest.mark.parametrize("path, value, field", [
    (("name",), "../llama", "name"),
    (("model_type",), "../../etc/x", "model_type"),
    (("variants", "../evil"), {"description": "x"}, "variants"),
    (("chat", "templates", "a/b"), {"jinja": "x"}, "chat.templates"),
])
def test_unsafe_names_are_refused(tmp_path, path, value, field):
    assert field in refused(tmp_path, mutated(path, value))


# config.json values: the error names the config file and key
CONFIG_CASES = [
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"num_key_value_heads": -3}, "num_key_value_heads"),
    ({"hidden_size": "576"}, "hidden_size"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers"),
    ({"num_attention_heads": 8}, "num_key_value_heads"),  # 8 heads, 3 kv heads
    ({"head_dim": None, "num_attention_heads": 7, "num_key_value_heads": 7}, "hidden_size"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"num_hidden_layers": 2**70}, "num_hidden_layers"),  # would build a layer list without end
    ({"head_dim": 2**40}, "head_dim"),
    ({"vocab_size": 10**12}, "vocab_size"),
    ({"architectures": 3.5}, "architectures"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"eos_token_id": 10**9}, "eos_token_id"),
    ({"bos_token_id": "<s>"}, "bos_token_id"),
    ({"model_type": "../../x"}, "model_type"),
    ({"rms_norm_eps": -1.0}, "block.norm.eps"),
    ({"rope_theta": 0.0}, "block.rope.theta"),
    ({"rope_theta": 1e300}, "block.rope.theta"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": NAN}}, "factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "high_freq_factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": -1,
                       "original_max_position_embeddings": 2048}}, "beta_fast"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
]


@pytest.mark.parametrize("change, key", CONFIG_CASES, ids=[c[1] + "-" + repr(c[0])[:40] for c in CONFIG_CASES])
def test_absurd_config_values_are_refused_naming_the_key(tmp_path, change, key):
    cfg = dict(LLAMA["variants"][VARIANT]["config"], **change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    msg = refused(tmp_path, LLAMA, cfg)
    assert key in msg and "config.json" in msg


# the resource limits of the issue: each refused within a second, naming file and field
EXPRESSIONS = ["9**9**9**9", "'a'*10**10", "1+" * 20000 + "1", "-" * 50000 + "1", "(" * 100000 + "1" + ")" * 100000,
               "-" * 500 + "1", "1+" * 300 + "1", "'%0999999999d' % 1", "[1] * 10", "2.0 ** 100000"]


@pytest.mark.parametrize("text", EXPRESSIONS, ids=lambda t: t[:20])
def test_expression_resource_limits(tmp_path, text):
    msg = refused(tmp_path, mutated(("block", "attention", "scale"), {"expr": text}))
    assert "block.attention.scale" in msg


def test_expression_limits_leave_real_arithmetic_alone():
    from generator.recipe.expr import evaluate

    bits = limits()["expression"]["max_int_bits"]
    assert evaluate(f"2 ** {bits - 1}", {}) == 2 ** (bits - 1)  # the largest power of two allowed
    assert evaluate("'ab' * 3 + s", {"s": "c"}) == "abababc"
    assert evaluate("scale_depth / sqrt(n)", {"scale_depth": 1.4, "n": 4}) == pytest.approx(1.4 / math.sqrt(4))


def _yaml_cases(marker: Path) -> dict[str, bytes]:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
    lim = limits()["yaml"]
    return {
        "alias_bomb": laughs.encode(),
        "nested_brackets": ("a: " + "[" * 100000).encode(),
        "nested_mappings": ("a: " + "{a: " * (lim["max_depth"] + 10)).encode(),
        "many_aliases": ("a: &a 1\nb: [" + ", ".join(["*a"] * (lim["max_aliases"] + 1)) + "]\n").encode(),
        "huge": b"description: " + b"x" * (lim["max_bytes"] + 1),
        "latin1": "name: llama\ndescription: caf\xe9\n".encode("latin-1"),
        "utf16": "name: llama\n".encode("utf-16"),
        "python_tag": f"!!python/object/apply:os.system ['touch {marker}']\n".encode(),
        "python_name": f"name: !!python/name:os.system\nx: !!python/object/new:pathlib.Path ['{marker}']\n".encode(),
        "bad_date": b"name: llama\ndescription: 2024-13-45\n",
        "recursive_alias": b"name: llama\na: &a [1, *a]\n",
        "big_int": b"name: " + b"9" * 5000 + b"\n",
    }


@pytest.mark.parametrize("case", list(_yaml_cases(Path("m"))))
def test_yaml_limits_and_unsafe_tags(tmp_path, case):
    marker = tmp_path / "executed"
    (tmp_path / "llama.yaml").write_bytes(_yaml_cases(marker)[case])
    started = time.perf_counter()
    with pytest.raises(GeneratorError) as e:
        Registry(tmp_path)
    assert time.perf_counter() - started < 1.0
    assert str(tmp_path / "llama.yaml") in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_alias_expansion_is_counted_per_use():
    """The loader's expanded size equals the node count of the object pyyaml builds, for random
    documents of shared anchors (whatever order the shared nodes are reached in)."""
    import random

    from generator.limits import _LimitedLoader

    def count(x):  # the built object, every alias use expanded
        if isinstance(x, dict):
            return 1 + sum(count(k) + count(v) for k, v in x.items())
        return 1 + sum(count(v) for v in x) if isinstance(x, list) else 1

    rng = random.Random(1)
    for _ in range(50):
        lines = []
        for i in range(6):
            items = [str(rng.randrange(9)) for _ in range(rng.randint(0, 2))]
            items += [f"*n{rng.randrange(i)}" for _ in range(rng.randint(0, 3) if i else 0)]
            rng.shuffle(items)
            lines.append(f"k{i}: &n{i} [{', '.join(items)}]")
        text = "\n".join(lines + [f"top: [{', '.join(f'*n{rng.randrange(6)}' for _ in range(4))}]"])
        loader = _LimitedLoader(text)
        try:
            assert loader.expanded_size(loader.get_single_node()) == count(yaml.safe_load(text)), text
        finally:
            loader.dispose()


def test_post_config_and_serve_use_the_same_rules(tmp_path):
    from generator.serve.service import ApiError, _number

    post = tmp_path / "post_config.json"
    for key, bad in (("temperature", "NaN"), ("top_p", "0"), ("top_k", "0"), ("repetition_penalty", "-1"),
                     ("penalty_window", "-2"), ("temperature", "Infinity")):
        post.write_text(f'{{"{key}": {bad}}}')
        with pytest.raises(GeneratorError, match=rf"{post}.*{key}"):
            Sampling.read(post)
        value = float(bad)
        assert rule(key).problem(value) is not None
        with pytest.raises(ApiError) as e:
            _number({key: int(value) if value.is_integer() else value}, key)
        assert e.value.status == 400 and e.value.param == key
    post.write_text('{"temperature": 0.7, "top_p": 1, "top_k": 40}')
    assert Sampling.read(post).temperature == 0.7
    assert _number({"top_p": 1}, "top_p") == 1 and _number({}, "top_p") is None
    with pytest.raises(ApiError):
        _number({"top_k": True}, "top_k")  # a bool is not an integer


def test_list_command_reports_a_broken_recipe_in_one_paragraph(tmp_path):
    write_recipe(tmp_path, mutated(("variants", VARIANT, "build"), {"weigth_type": "s4"}))
    env = dict(os.environ, AXGEN_RECIPES_DIR=str(tmp_path), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "generator", "list"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())
    assert f"{tmp_path / 'llama.yaml'}" in text and f"variants.{VARIANT}.build" in text and "weigth_type" in text
