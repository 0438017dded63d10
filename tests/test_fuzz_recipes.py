"""Bounded fuzzing of the recipe loader and spec resolution (fixed seed, CI-sized).

The shipped recipes are mutated (value types, out-of-range values, expressions, renamed and deleted
keys, anchors and aliases, deep nesting, encodings, truncation, huge files, python tags), written
to a temporary recipes dir, loaded, and every variant's config resolved. Each case must either
load and resolve, or fail with a GeneratorError naming the recipe file, within a couple of seconds,
without executing anything (a python tag would create a marker file) or writing outside tmp.
"""

import copy
import os
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from generator.errors import GeneratorError
from generator.paths import RECIPES_DIR
from generator.recipe import Registry
from generator.resolve.spec import resolve_spec

SEED = 20260
CASES_PER_RECIPE = 30
SECONDS_PER_CASE = 2.0
MARKER = "MARKER_FILE"  # replaced by a path inside the case's tmp dir
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))

VALUES = [-1, 0, 1, 3, 2**70, -1e-9, 1e308, float("nan"), float("inf"), -float("inf"), "", "x" * 300, "../etc/x",
          "a/b", [], {}, [0, -1], {"a": 1}, None, True, False, 1.5, "silu", "{i}", [[[[]]]]]
EXPRESSIONS = ["9**9**9**9", "'a'*10**10", "1/0", "hidden_size ** hidden_size", "-" * 600 + "1", "x.y",
               "__import__('os').system('touch MARKER_FILE')", "max([])", "int('x')", "rope_scaling * 2",
               "(" * 90 + "1" + ")" * 90, "1 if None else 'a'", "log(0)", "sqrt(-1)", "hidden_size * 'ab'",
               "eos_token_id * 10**6", "2 ** -1075", "-hidden_size", "head_dim ** 0.5 * 1e308", "None", "'s' % 1",
               "num_hidden_layers // 0", "min(1)", "i"]


def leaves(node, path=()):
    """Every key path of a parsed recipe (mappings and list entries)."""
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, path + (i,))


def parent_of(data, path):
    node = data
    for key in path[:-1]:
        node = node[key]
    return node


def structured(rng: random.Random, data: dict) -> dict:
    data = copy.deepcopy(data)
    path = rng.choice([p for p in leaves(data) if p])
    parent, key = parent_of(data, path), path[-1]
    kind = rng.random()
    if kind < 0.45:
        parent[key] = rng.choice(VALUES)
    elif kind < 0.75:
        parent[key] = {"expr": rng.choice(EXPRESSIONS)}
    elif kind < 0.85 and isinstance(parent, dict):
        del parent[key]
    elif kind < 0.92 and isinstance(parent, dict):
        parent[rng.choice(["../x", "weigth_type", "colour", "a b", "..", "é"])] = parent.pop(key)
    else:
        deep = 1
        for _ in range(rng.choice([10, 70, 300])):
            deep = [deep]
        parent[key] = deep
    return data


def dumped(data) -> bytes:
    # deep nesting beyond the emitter's comfort still dumps as flow style
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=10**6).encode("utf-8")


def textual(rng: random.Random, raw: bytes) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:
        return raw[: rng.randrange(len(raw))]
    if kind == 1:
        at = rng.randrange(len(raw))
        return raw[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))) + raw[at:]
    if kind == 2:
        lines = raw.splitlines(keepends=True)
        i = rng.randrange(len(lines))
        return b"".join(lines[:i] + [b"\t" + lines[i]] + lines[i:])
    if kind == 3:  # billion laughs appended as an extra top-level key
        bomb = "lol0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9))
        return raw + b"\n" + bomb.encode()
    if kind == 4:
        return raw.decode("utf-8").encode(rng.choice(["utf-16", "utf-32", "latin-1", "cp1252"]), errors="replace")
    if kind == 5:
        return raw + b"\n# " + b"x" * (1 << 20) + b"\n"
    if kind == 6:  # a python tag in place of a value
        lines = raw.splitlines(keepends=True)
        i = rng.choice([j for j, line in enumerate(lines) if b": " in line and not line.lstrip().startswith(b"#")])
        key = lines[i].split(b": ", 1)[0]
        tag = rng.choice([b"!!python/object/apply:os.system ['touch MARKER_FILE']",
                          b"!!python/object/new:pathlib.Path ['MARKER_FILE']", b"!!python/name:os.system",
                          b"!!binary 'not base64 !'", b"!!timestamp 2024-13-45", b"!!int 0x"])
        return b"".join(lines[:i] + [key + b": " + tag + b"\n"] + lines[i + 1:])
    if kind == 7:
        return raw.replace(b"\n", b"\n" + b"  " * rng.randint(1, 3), 1)
    return b"\xef\xbb\xbf" + raw.replace(b": ", b":", rng.randint(1, 5))  # BOM, keys glued to values


def cases():
    rng = random.Random(SEED)
    out = []
    for path in RECIPES:
        raw = path.read_bytes()
        data = yaml.safe_load(raw)
        for n in range(CASES_PER_RECIPE):
            if n % 3 == 2:
                out.append(pytest.param(path.stem, textual(rng, raw), id=f"{path.stem}-text{n}"))
            else:
                out.append(pytest.param(path.stem, dumped(structured(rng, data)), id=f"{path.stem}-value{n}"))
    return out


@contextmanager
def deadline(seconds: float):
    """Stop a runaway case (a loop or an allocation without end) instead of letting it eat the machine."""
    def fire(signum, frame):
        raise TimeoutError(f"the case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_and_resolve(recipe_file: Path):
    reg = Registry(recipe_file.parent)
    for recipe in reg.recipes.values():
        for name, variant in recipe.variants.items():
            recipe.build_defaults(name)
            recipe.chat_template(name)
            if variant.config:
                resolve_spec(recipe, variant.config, model_name=name, max_positions=128,
                             where=f"{recipe_file}: variants.{name}.config")


@pytest.mark.parametrize("stem, content", cases())
def test_mutated_recipe_loads_or_fails_clearly(tmp_path, monkeypatch, stem, content):
    work = tmp_path / "recipes"
    work.mkdir()
    marker = tmp_path / "executed"
    recipe_file = work / f"{stem}.yaml"
    recipe_file.write_bytes(content.replace(MARKER.encode(), str(marker).encode()))
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(RECIPES_DIR)), sorted(os.listdir(RECIPES_DIR.parent))
    started = time.perf_counter()
    try:
        with deadline(SECONDS_PER_CASE):
            load_and_resolve(recipe_file)
    except GeneratorError as exc:
        assert str(recipe_file) in str(exc) and "\n" not in str(exc), str(exc)  # one paragraph naming the file
    assert time.perf_counter() - started < SECONDS_PER_CASE
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["recipes"] and os.listdir(work) == [recipe_file.name]
    assert (sorted(os.listdir(RECIPES_DIR)), sorted(os.listdir(RECIPES_DIR.parent))) == before
