"""The values a recipe field holds: a literal, or an expression over config.json keys
(`{expr: "..."}`, parsed when the recipe loads, evaluated when the spec is resolved). Shared by the
decoder schema (schema.py) and the vision schema (vision.py)."""

from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from .expr import ExprError, names_in


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expr(Strict):
    """A value computed from config.json keys (see generator/recipe/expr.py for the language)."""

    expr: str

    @model_validator(mode="after")
    def _parses(self):
        try:
            names_in(self.expr)
        except ExprError as exc:
            raise ValueError(str(exc)) from None
        return self


Value = Union[Expr, StrictBool, StrictInt, StrictFloat, StrictStr, None]


def E(text: str) -> Expr:
    return Expr(expr=text)
