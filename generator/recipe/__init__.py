"""Recipes: the YAML schema (schema.py), loading with inheritance and the registry (registry.py),
the canonical tensor table (tensors.py), the expression language (expr.py) and the new-recipe
scaffold (scaffold.py)."""

from .registry import Registry, flatten, load_recipe, registry, show
from .schema import BuildDefaults, ChatTemplate, Expr, HiddenType, Norm, PostWeightType, Recipe, Sampling, WeightType
from .tensors import LAYER_TENSORS, LINEAR_TENSORS

__all__ = ["LAYER_TENSORS", "LINEAR_TENSORS", "BuildDefaults", "ChatTemplate", "Expr", "HiddenType", "Norm",
           "PostWeightType", "Recipe", "Registry", "Sampling", "WeightType", "flatten", "load_recipe", "registry",
           "show"]
