"""`python -m generator new-recipe` (`make new-recipe`): scaffold a recipe and its conformance test.

The cookiecutter template templates/new_recipe/ renders recipes/<name>.yaml (a commented skeleton:
Llama's values, every quirk field shown and explained) and tests/test_recipe_<name>.py (a tiny
random model of the architecture built at fp32 and s8 and checked against transformers). Flags
make it non-interactive (--name --architecture [--hf-config-class --description]); from a terminal
without them, cookiecutter asks. An existing recipe or test is never overwritten, and the rendered
recipe must load (generator.recipe.load_recipe) before anything is written into the project.
The template's test file is named `{{cookiecutter.__test}}_recipe_...py` so that a bare `pytest`
at the project root never collects the unrendered template.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from ..errors import GeneratorError
from ..paths import PROJECT_ROOT, TEMPLATES_DIR
from .registry import Registry, load_recipe

TEMPLATE = TEMPLATES_DIR / "new_recipe"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def add_new_recipe_args(p):
    p.add_argument("--name", help="recipe name: recipes/<name>.yaml, tests/test_recipe_<name>.py "
                                  "(lowercase letters, digits, _; e.g. qwen2)")
    p.add_argument("--architecture", help="the config.json `architectures` entry, e.g. Qwen2ForCausalLM")
    p.add_argument("--hf-config-class", dest="hf_config_class",
                   help="transformers config class of the tiny test model (default: the architecture with "
                        "ForCausalLM replaced by Config, e.g. Qwen2Config)")
    p.add_argument("--description", help="one line for `make list` (default: '<architecture> decoders ...')")
    p.add_argument("--root", default=str(PROJECT_ROOT),
                   help="project directory that receives recipes/ and tests/ (default: this checkout)")
    p.add_argument("--no-input", action="store_true", help="never prompt; fail if --name or --architecture is missing")


def targets(root: Path, name: str) -> tuple[Path, Path]:
    return root / "recipes" / f"{name}.yaml", root / "tests" / f"test_recipe_{name}.py"


def check_name(name: str, root: Path):
    if not NAME_RE.match(name or ""):
        raise GeneratorError(f"Recipe name {name!r} (--name) must be lowercase letters, digits and _, starting with a "
                             f"letter (it names recipes/<name>.yaml and the test module).")
    existing = [p for p in targets(root, name) if p.exists()]
    if existing:
        raise GeneratorError(f"Recipe '{name}' exists already ({', '.join(map(str, existing))}); new-recipe never "
                             f"overwrites. Edit it, or pick another --name.")


def check_architecture(arch: str, what: str = "--architecture"):
    if not IDENT_RE.match(arch or ""):
        raise GeneratorError(f"{what} {arch!r} must be a class name such as Qwen2ForCausalLM (the entry in "
                             f"config.json `architectures`).")


def render(context: dict[str, str], no_input: bool, staging: Path) -> Path:
    """Run the cookiecutter template into `staging`; returns the rendered project directory."""
    from cookiecutter.exceptions import CookiecutterException
    from cookiecutter.main import cookiecutter

    try:
        out = cookiecutter(str(TEMPLATE), no_input=no_input, extra_context=context or None, output_dir=str(staging),
                           accept_hooks=False,
                           # ignore ~/.cookiecutterrc and keep replay files out of the home directory
                           default_config={"replay_dir": str(staging / ".replay"),
                                           "cookiecutters_dir": str(staging / ".cookiecutters")})
    except CookiecutterException as exc:
        raise GeneratorError(f"Template {TEMPLATE} failed to render: {exc}.") from None
    return Path(out)


def warnings_for(root: Path, name: str, arch: str, config_class: str, console: Console):
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is pinned
        return
    for cls, what in ((arch, "architecture"), (config_class, "config class")):
        if not hasattr(transformers, cls):
            console.print(f"[yellow]note:[/] transformers {transformers.__version__} has no {what} {cls}: the "
                          f"generated test builds its tiny model with it, so edit HF_CONFIG_CLASS/ARCHITECTURE there, "
                          f"and set the recipe's `reference` for a remote-code family.", highlight=False)
    try:
        others = [r.name for r in Registry(root / "recipes").recipes.values() if arch in r.architectures and r.name != name]
    except GeneratorError:
        others = []
    if others:
        console.print(f"[yellow]note:[/] recipe(s) {', '.join(others)} already declare {arch}; a checkpoint is matched "
                      f"to the first of them, so build with --recipe {name} (or drop {arch} from one).", highlight=False)


def new_recipe(args) -> int:
    console = Console(stderr=True)
    root = Path(args.root).resolve()
    interactive = not args.no_input and args.name is None and sys.stdin.isatty()
    context = {k: v for k in ("name", "architecture", "hf_config_class", "description")
               if (v := getattr(args, k, None)) is not None}
    if not interactive:
        missing = [f"--{k.replace('_', '-')}" for k in ("name", "architecture") if k not in context]
        if missing:
            raise GeneratorError(f"new-recipe needs {' and '.join(missing)} when not run from a terminal, e.g. "
                                 f"`python -m generator new-recipe --name qwen2 --architecture Qwen2ForCausalLM`.")
    if "name" in context:
        check_name(context["name"], root)
    if "architecture" in context:
        check_architecture(context["architecture"])
    if "hf_config_class" in context:
        check_architecture(context["hf_config_class"], "--hf-config-class")
    if interactive:
        console.print("Scaffolding a recipe: answer or press Enter for the default (see ADDING_A_MODEL.md).")

    staging = Path(tempfile.mkdtemp(prefix=".new-recipe-"))
    try:
        project = render(context, no_input=not interactive, staging=staging)
        name = project.name
        recipe_src, test_src = targets(project, name)
        check_name(name, root)  # interactive answers are checked here
        recipe = load_recipe(recipe_src)  # the rendered skeleton must be a valid recipe
        arch = recipe.architectures[0]
        check_architecture(arch)
        config_class = re.search(r'^HF_CONFIG_CLASS = "(.*)"$', test_src.read_text(), re.M).group(1)
        check_architecture(config_class, "--hf-config-class")
        recipe_dst, test_dst = targets(root, name)
        recipe_dst.parent.mkdir(parents=True, exist_ok=True)
        test_dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recipe_src, recipe_dst)
        shutil.copyfile(test_src, test_dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    out = Console()
    out.print(f"[bold green]created[/] {recipe_dst}\n[bold green]created[/] {test_dst}", highlight=False)
    warnings_for(root, name, arch, config_class, console)
    out.print(f"next: edit {recipe_dst.relative_to(root)} to this family's quirks (its transformers modeling file is "
              f"the specification), put the config keys that switch them on in QUIRKS in "
              f"{test_dst.relative_to(root)}, then `.venv/bin/python -m pytest -q {test_dst.relative_to(root)}`. "
              f"ADDING_A_MODEL.md walks through it.", highlight=False)
    return 0
