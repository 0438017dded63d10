"""Limits on untrusted input and value ranges, as data (data/limits.yaml).

`rule(name)` is one range (a finite number > 0, an integer >= 1, ...): the recipe schema checks
literal values with it (`Ranged` metadata on a pydantic field), spec resolution checks the values of
expressions and config keys with the same rule, and serve checks request fields with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import core_schema

from .errors import GeneratorError
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


# -- bounded YAML files (recipes, zoo files, boost configs) ------------------------------------------

class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents too deep or too large once aliases are expanded
    (data/limits.yaml `yaml`) before building any Python object from them."""

    def __init__(self, stream):
        super().__init__(stream)
        self.limits, self.depth, self.aliases = limits()["yaml"], 0, 0

    def _refuse(self, what: str, key: str | None = None):
        limit = f" (yaml.{key} in generator/data/limits.yaml)" if key else ""
        raise yaml.YAMLError(f"{what}{limit}")

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.limits["max_aliases"]:
                self._refuse(f"more than {self.limits['max_aliases']} aliases", "max_aliases")
        self.depth += 1
        if self.depth > self.limits["max_depth"]:
            self._refuse(f"nested deeper than {self.limits['max_depth']} levels", "max_depth")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def expanded_size(self, root: yaml.Node) -> int:
        """Nodes of the document with every alias expanded (each shared node counted per use);
        refuses a recursive alias (a node inside itself)."""
        size: dict[int, int | None] = {}  # None: being counted (an ancestor of the node at hand)
        todo = [(root, False)]
        while todo:  # iterative post-order: children are counted before their parent
            node, children_done = todo.pop()
            if children_done:
                sizes = [size[id(c)] for c in _children(node)]
                if None in sizes:
                    self._refuse("a recursive alias (a node that contains itself)")
                size[id(node)] = min(1 + sum(sizes), 1 << 62)
            elif id(node) not in size:
                size[id(node)] = None
                todo.append((node, True))
                todo.extend((c, False) for c in _children(node))
        return size[id(root)]

    def load(self):
        node = self.get_single_node()
        if node is None:
            return None
        if self.expanded_size(node) > self.limits["max_nodes"]:
            self._refuse(f"more than {self.limits['max_nodes']} nodes once aliases are expanded", "max_nodes")
        return self.construct_document(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_yaml(path: Path, what: str = "Recipe", max_bytes: int | None = None) -> Any:
    """A YAML file, bounded in size, nesting and alias expansion (data/limits.yaml `yaml`; `max_bytes` a
    smaller size cap for a small file); GeneratorError naming `what` and the file."""
    where_limit = " (yaml.max_bytes in generator/data/limits.yaml)" if max_bytes is None else ""
    max_bytes = limits()["yaml"]["max_bytes"] if max_bytes is None else max_bytes
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise GeneratorError(f"{what} {path}: cannot read: {exc.strerror or exc}.") from None
    if len(raw) > max_bytes:
        raise GeneratorError(f"{what} {path}: larger than {max_bytes} bytes{where_limit}.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GeneratorError(f"{what} {path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8.") from None
    loader = None
    try:
        loader = _LimitedLoader(text)  # the reader refuses control characters here
        return loader.load()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
        raise GeneratorError(f"{what} {path}: not valid YAML{where}: {problem}.") from None
    except (ValueError, TypeError, OverflowError, AttributeError) as exc:  # a scalar the constructor rejects
        # (a bad date; pyyaml's !!timestamp constructor fails with AttributeError on a malformed one)
        raise GeneratorError(f"{what} {path}: not valid YAML: {exc}.") from None
    finally:
        if loader is not None:
            loader.dispose()
