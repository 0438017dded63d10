"""Limits on untrusted input and value ranges, as data (data/limits.yaml).

`rule(name)` is one range (a finite number > 0, an integer >= 1, ...): the recipe schema checks
literal values with it (`Ranged` metadata on a pydantic field), spec resolution checks the values of
expressions and config keys with the same rule, and serve checks request fields with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import core_schema

from .paths import DATA_DIR

LIMITS_FILE = DATA_DIR / "limits.yaml"


@lru_cache(maxsize=1)
def limits() -> dict[str, Any]:
    return yaml.safe_load(LIMITS_FILE.read_text(encoding="utf-8"))


def shown(value: Any, width: int = 60) -> str:
    """repr(value), cut to `width` characters (values in messages may be huge)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass(frozen=True)
class Rule:
    name: str
    type: str
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def describe(self) -> str:
        kind = {"number": "a finite number", "integer": "an integer", "bool": "true or false"}[self.type]
        bounds = [f"{op} {b:g}" if isinstance(b, float) else f"{op} {b}"
                  for op, b in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le)) if b is not None]
        return kind + (" " + " and ".join(bounds) if bounds else "")

    def ok(self, value: Any) -> bool:
        if self.type == "bool":
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, int if self.type == "integer" else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def problem(self, value: Any, optional: bool = False) -> str | None:
        """None if `value` is in range (or None for an optional value), else 'expected ..., got ...'."""
        if (value is None and optional) or self.ok(value):
            return None
        return f"expected {self.describe()}{' or null' if optional else ''}, got {shown(value)}"


@lru_cache(maxsize=None)
def rule(name: str) -> Rule:
    return Rule(name=name, **limits()["ranges"][name])


class Ranged:
    """Pydantic field metadata: literal values must satisfy `rule(name)`; expressions ({expr}) are
    checked by spec resolution with the same rule (see `rule_of`)."""

    def __init__(self, name: str, optional: bool = False):
        self.rule, self.optional = rule(name), optional

    def check(self, value: Any) -> Any:
        if isinstance(value, BaseModel):  # an expression: its value is checked when the spec is resolved
            return value
        problem = self.rule.problem(value, self.optional)
        if problem:
            raise ValueError(problem)
        return value

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_after_validator_function(self.check, handler(source))


def rule_of(model: type[BaseModel], field: str) -> Ranged | None:
    return next((m for m in model.model_fields[field].metadata if isinstance(m, Ranged)), None)


def validation_text(err: ValidationError, most: int = 6) -> str:
    """pydantic's errors as 'field.path: message (got value)', at most `most` of them."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-after", "union[")))
        got = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        got_s = "" if isinstance(got, dict) or "got " in msg else f" (got {shown(got)})"
        parts.append(f"{loc or '<top>'}: {msg}{got_s}")
    more = f"; and {len(parts) - most} more" if len(parts) > most else ""
    return "; ".join(parts[:most]) + more
