"""The package layout's dependency rule (issue 9), read from every module's imports with `ast`.

Stages, and what each may import besides itself, the top-level utilities (errors, names, limits,
progress, interrupt, paths, the package's __init__) and contract.py (the bundle format: written by
export, read by every stage; it imports only the utilities itself):

    recipe    nothing else
    resolve   recipe
    inputs    recipe, resolve
    export    recipe, resolve, inputs                 (never runtime, verify, serve)
    runtime   export, resolve                         (the fused runtime graph, runtime/fused.py, reuses
                                                      export/graphs.py; the tokenizer server module is inside it)
    serve     runtime
    verify    anything but cli
    quantize  recipe, resolve, inputs, export
    accuracy  anything but cli                        (the accuracy report: runs bundles and references)
    zoo       anything but cli                        (the model zoo: builds as Ray tasks, their index)
    cli, pipeline, bench, predict, __main__: anything

Every import counts, those inside functions too; only `if TYPE_CHECKING:` blocks (annotations, never
run) are left out. The tokenizer server is copied verbatim into every bundle, so it imports nothing
from the package. No module is over 400 lines unless its docstring says why (names "400 lines").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "generator"
UTILITIES = {"errors", "names", "limits", "progress", "interrupt", "paths"}
STAGES = {"recipe", "resolve", "inputs", "export", "runtime", "serve", "verify", "accuracy", "quantize", "cli", "zoo"}
TOP = {"pipeline", "bench", "__main__", "predict"}
ANY = STAGES | {"contract", "top"}
ALLOWED = {
    "utility": set(),
    "recipe": set(),
    "resolve": {"recipe"},
    "inputs": {"recipe", "resolve"},
    "export": {"recipe", "resolve", "inputs"},
    "contract": set(),
    "runtime": {"export", "resolve"},
    "serve": {"runtime"},
    "verify": ANY - {"cli"},
    "accuracy": ANY - {"cli"},
    "zoo": ANY - {"cli"},
    "quantize": {"recipe", "resolve", "inputs", "export"},
    "cli": ANY,
    "top": ANY,
}
TOKENIZER_SERVER = "generator.runtime.tokenizer_server"
MAX_LINES = 400
# A check that today's code fails in a part another engineer is reworking: (check, module) -> reason.
# strict: the test fails as soon as the module complies, so the entry is removed then.
PENDING: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in UTILITIES:
        return "utility"
    if parts[1] in STAGES:
        return parts[1]
    if parts[1] == "contract":
        return "contract"
    if parts[1] in TOP:
        return "top"
    raise AssertionError(f"{module}: not in any stage of the layout; add it to tests/test_layout.py")


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST):
    """ast.walk without the bodies of `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking(child):
            for other in child.orelse:
                yield from _walk_one(other)
            continue
        yield from _walk_one(child)


def _walk_one(node: ast.AST):
    yield node
    yield from _walk(node)


def package_imports(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, dotted module) of every import of the package in `module`'s source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "generator"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "generator":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found += [(node.lineno, t) for t in subs or [target]]
    return found


MODULES = modules()


def params(check: str):
    return [pytest.param(m, id=m, marks=[pytest.mark.xfail(strict=True, reason=PENDING[check, m])]
                         if (check, m) in PENDING else []) for m in MODULES]


@pytest.mark.parametrize("module", params("imports"))
def test_imports_follow_the_stage_rule(module):
    own = stage(module)
    allowed = ALLOWED[own] | {own, "utility"} | ({"contract"} if own != "utility" else set())
    bad = [f"line {line}: {target} ({stage(target)})"
           for line, target in package_imports(module, MODULES[module], set(MODULES))
           if stage(target) not in allowed]
    if module == TOKENIZER_SERVER:
        bad = [f"line {line}: {target}" for line, target in package_imports(module, MODULES[module], set(MODULES))]
    assert not bad, (f"{module} ({own}) may import only {', '.join(sorted(allowed))}; it imports "
                     + "; ".join(bad))


@pytest.mark.parametrize("module", params("lines"))
def test_modules_stay_short_or_say_why(module):
    path = MODULES[module]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert lines <= MAX_LINES or f"{MAX_LINES} lines" in doc, \
        f"{path.relative_to(PACKAGE.parent)} has {lines} lines; split it, or say in its docstring why it is over " \
        f"{MAX_LINES} lines"


# -- the checker itself ----------------------------------------------------------------------------

def test_the_checker_sees_relative_lazy_and_aliased_imports_but_not_type_checking_ones(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..recipe import Recipe\n"
        "from .. import names, __version__\n"
        "import generator.runtime.engine as eng\n"
        "def f():\n"
        "    from ..verify.checks import run_checks\n"
        "if TYPE_CHECKING:\n"
        "    from ..cli import main\n"
        "else:\n"
        "    from . import source\n")
    known = {"generator", "generator.names", "generator.inputs", "generator.inputs.source"}
    found = package_imports("generator.inputs.mod", source, known)
    assert found == [(2, "generator.recipe"), (3, "generator.names"), (4, "generator.runtime.engine"),
                     (6, "generator.verify.checks"), (10, "generator.inputs.source")]
    assert [stage(t) for _, t in found] == ["recipe", "utility", "runtime", "verify", "inputs"]
    assert {"runtime", "verify"} - ALLOWED["inputs"] == {"runtime", "verify"}  # what inputs may not import


def test_every_module_is_in_a_stage_and_the_stages_exist():
    assert {stage(m) for m in MODULES} == STAGES | {"utility", "contract", "top"}
    for name in STAGES:
        assert (PACKAGE / name / "__init__.py").is_file(), name
    assert not PENDING.keys() - {(c, m) for c in ("imports", "lines") for m in MODULES}  # no stale entries
