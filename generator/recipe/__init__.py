"""Recipes: the YAML schema and registry (schema.py), the expression language (expr.py) and the
new-recipe scaffold (scaffold.py)."""

from .schema import (LAYER_TENSORS, LINEAR_TENSORS, BuildDefaults, ChatTemplate, Expr, HiddenType, Norm,
                     PostWeightType, Recipe, Registry, Sampling, WeightType, load_recipe, registry)

__all__ = ["LAYER_TENSORS", "LINEAR_TENSORS", "BuildDefaults", "ChatTemplate", "Expr", "HiddenType", "Norm",
           "PostWeightType", "Recipe", "Registry", "Sampling", "WeightType", "load_recipe", "registry"]
