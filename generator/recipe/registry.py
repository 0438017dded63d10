"""Recipe loading: bounded YAML, `extends` inheritance, and the registry of a recipes directory.

A recipe file may start from another (`extends: <recipe>`): the parent's mapping is merged under
the child's before validation (generator/recipe/schema.py), so a family states only its difference.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import GeneratorError
from ..limits import limits, read_yaml, shown
from ..names import SAFE_NAME_RULE, is_safe_name
from ..paths import RECIPES_DIR
from .schema import Recipe, _format_validation


def _mapping(path: Path) -> dict:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise GeneratorError(f"Recipe {path}: expected a mapping at the top level, got {type(data).__name__}.")
    return data


def merge(parent: Any, child: Any) -> Any:
    """Deep merge: mappings merge key by key (recursively); a list or scalar of the child replaces."""
    if isinstance(parent, dict) and isinstance(child, dict):
        out = dict(parent)
        for key, value in child.items():
            out[key] = merge(parent[key], value) if key in parent else value
        return out
    return child


def _parent_path(path: Path, parent: Any) -> Path:
    if not isinstance(parent, str) or not is_safe_name(parent):
        raise GeneratorError(f"Recipe {path}: field 'extends' must name a recipe ({SAFE_NAME_RULE}), "
                             f"got {shown(parent)}.")
    candidates = [path.parent / f"{parent}.yaml", RECIPES_DIR / f"{parent}.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise GeneratorError(f"Recipe {path}: extends '{parent}', but there is no recipe of that name "
                             f"({' nor '.join(str(c) for c in dict.fromkeys(candidates))}).")
    return found


def flatten(path: str | Path) -> dict:
    """A recipe file's mapping with its `extends` chain merged in, parents first (as transformers'
    modular files state only the difference from a parent). Names resolve in the file's own
    directory, then among the project's recipes. Variants are make targets and are not inherited.
    Each file is read under the YAML limits."""
    path = Path(path)
    chain = [(path, _mapping(path))]
    while "extends" in chain[-1][1]:
        at, data = chain[-1]
        parent = _parent_path(at, data["extends"])
        if any(parent.resolve() == p.resolve() for p, _ in chain):
            names = " -> ".join([p.stem for p, _ in chain] + [parent.stem])
            raise GeneratorError(f"Recipe {path}: 'extends' makes a cycle ({names}).")
        chain.append((parent, _mapping(parent)))
    merged: dict = {}
    for at, data in reversed(chain):
        own = {k: v for k, v in data.items() if k != "extends" and (at == path or k != "variants")}
        merged = merge(merged, own)
    return merged


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    data = flatten(path)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise GeneratorError(_format_validation(path, exc)) from None
    if recipe.name != path.stem:
        raise GeneratorError(f"Recipe {path}: field 'name' is '{recipe.name}' but must equal the file name '{path.stem}'.")
    recipe._path = path
    return recipe


def show(recipe: Recipe) -> str:
    """The flattened recipe as YAML (`python -m generator show-recipe`): parents merged in, every tensor
    path whole (defaults filled, prefix applied); other fields as the files write them."""
    data = flatten(recipe._path) if recipe._path else recipe.model_dump(mode="json", exclude_defaults=True)
    data["tensors"] = recipe.tensors.model_dump(mode="json", exclude={"prefix"})
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
    return f"# recipe {recipe.name} ({recipe.source}), flattened\n" + text


class Registry:
    """All recipes of a directory, their variants (make targets) and architectures."""

    def __init__(self, recipes_dir: str | Path = RECIPES_DIR):
        self.dir = Path(recipes_dir)
        self.recipes: dict[str, Recipe] = {}
        self.paths: dict[str, Path] = {}
        for path in sorted(self.dir.glob("*.yaml")):
            recipe = load_recipe(path)
            self.recipes[recipe.name] = recipe
            self.paths[recipe.name] = path
        self.variants: dict[str, str] = {}
        for recipe in self.recipes.values():
            for v in recipe.variants:
                if v in self.variants:
                    raise GeneratorError(f"Variant '{v}' is defined by both recipes '{self.variants[v]}' and '{recipe.name}'; "
                                         f"variant names are make targets and must be unique.")
                self.variants[v] = recipe.name

    def variant(self, name: str) -> tuple[Recipe, str]:
        if name not in self.variants:
            known = ", ".join(sorted(self.variants))
            raise GeneratorError(f"Unknown model '{name}'. Known models: {known}. (`make list` shows them with their recipes.)")
        return self.recipes[self.variants[name]], name

    def by_architecture(self, architectures: list[str], model_type: str | None = None,
                        config: dict | None = None) -> Recipe:
        """The recipe for a checkpoint. A recipe that reads a config section (InternVL: llm_config)
        matches on the architectures inside that section, and wins over one matching at the top."""
        for recipe in self.recipes.values():
            section = (config or {}).get(recipe.config.section) if recipe.config.section else None
            if isinstance(section, dict) and any(a in recipe.architectures for a in section.get("architectures") or []):
                return recipe
        for recipe in self.recipes.values():
            if not recipe.config.section and any(a in recipe.architectures for a in architectures):
                return recipe
        supported = sorted({a for r in self.recipes.values() for a in r.architectures})
        raise GeneratorError(f"Unsupported architecture {architectures or [model_type]}: no recipe in {self.dir} "
                             f"declares it. Supported architectures: {', '.join(supported)}. "
                             f"To add one, run `make new-recipe` (see ADDING_A_MODEL.md).")


def registry(recipes_dir: str | None = None) -> Registry:
    """The registry of `recipes_dir`, else $AXGEN_RECIPES_DIR, else the project's recipes/ (cached)."""
    return _registry(str(recipes_dir or os.environ.get("AXGEN_RECIPES_DIR") or RECIPES_DIR))


@lru_cache(maxsize=8)
def _registry(recipes_dir: str) -> Registry:
    return Registry(recipes_dir)
