"""A tiny, safe expression language for recipe values that depend on config.json.

Recipes say things like `{expr: "scale_depth / sqrt(num_hidden_layers)"}`. Only arithmetic,
comparisons, boolean logic, `x if c else y`, a few math functions and names from the resolved
config are allowed; anything else (attributes, calls to other names, subscripts) is rejected.
Sizes are bounded (data/limits.yaml `expression`): source length, AST size and depth, integer size
(checked before `**`), string and list length (checked before repetition), so no expression hangs,
recurses or allocates without bound.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Mapping

from ..limits import limits

_BIN = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_CMP = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "min": min, "max": max, "int": int, "float": float, "bool": bool}


class ExprError(ValueError):
    pass


_ALLOWED = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare,
            ast.IfExp, ast.Call, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or, *_BIN, *_CMP)


def names_in(text: str) -> set[str]:
    """Config names an expression uses; raises ExprError for anything outside the language."""
    tree = _parse(text)
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ExprError(f"unsupported syntax in {_short(text)}: {type(node).__name__}")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords):
            raise ExprError(f"only {', '.join(sorted(_FUNCS))} may be called in {_short(text)}")
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in _FUNCS}


def _limit(key: str) -> int:
    return limits()["expression"][key]


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "..."


def _parse(text: str) -> ast.Expression:
    if not isinstance(text, str):
        raise ExprError(f"an expression must be a string, got {type(text).__name__}")
    if len(text) > _limit("max_chars"):  # before the parser, which recurses on deep input
        raise ExprError(f"expression {_short(text)} is {len(text)} characters, more than the limit "
                        f"{_limit('max_chars')}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise ExprError(f"invalid expression {_short(text)}: {getattr(exc, 'msg', exc)}") from None
    nodes, depth, todo = 0, 0, [(tree, 1)]
    while todo:  # iterative: a deep tree must not recurse here either
        node, d = todo.pop()
        nodes, depth = nodes + 1, max(depth, d)
        todo.extend((child, d + 1) for child in ast.iter_child_nodes(node))
    if nodes > _limit("max_nodes") or depth > _limit("max_depth"):
        raise ExprError(f"expression {_short(text)} is too large ({nodes} nodes, depth {depth}; limits "
                        f"{_limit('max_nodes')} nodes, depth {_limit('max_depth')})")
    return tree


def _size(value: Any) -> tuple[str, int, int] | None:
    """(what, size, limit) of a value that could be huge: an int's bits, a string's or list's length."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "integer", value.bit_length(), _limit("max_int_bits")
    if isinstance(value, (str, list, tuple)):
        return "length", len(value), _limit("max_length")
    return None


def _bounded(value: Any, text: str) -> Any:
    size = _size(value)
    if size and size[1] > size[2]:
        what, n, lim = size
        raise ExprError(f"{_short(text)} makes a value too large ({what} {n}{' bits' if what == 'integer' else ''}, "
                        f"limit {lim})")
    return value


def _binop(op: type, left: Any, right: Any, text: str) -> Any:
    """One arithmetic step, refusing before the work the steps whose result would be too large."""
    if op is ast.Mod and isinstance(left, (str, bytes)):
        raise ExprError(f"string formatting with % is not supported in {_short(text)}")
    if op is ast.Pow and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and (abs(left).bit_length() - 1) * right + 1 > _limit("max_int_bits"):  # bits, at least
            raise ExprError(f"{_short(text)}: {left} ** {right} is too large (limit {_limit('max_int_bits')} bits)")
    if op is ast.Mult:
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * max(n, 0) > _limit("max_length"):
                raise ExprError(f"{_short(text)} repeats a {type(seq).__name__} to more than "
                                f"{_limit('max_length')} items")
    return _bounded(_BIN[op](left, right), text)


def evaluate(text: str, env: Mapping[str, Any]) -> Any:
    """Evaluate `text` with names looked up in `env`. Raises ExprError naming the problem."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
            return node.value
        if isinstance(node, ast.Name):  # True / False / None parse as ast.Constant
            if node.id not in env:
                raise ExprError(f"unknown name '{node.id}' in {_short(text)}")
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            return _binop(type(node.op), ev(node.left), ev(node.right), text)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else (+v if isinstance(node.op, ast.UAdd) else not v)
        if isinstance(node, ast.BoolOp):
            vals = [ev(v) for v in node.values]
            return all(vals) if isinstance(node.op, ast.And) else any(vals)
        if isinstance(node, ast.Compare) and all(type(o) in _CMP for o in node.ops):
            left = ev(node.left)
            for op, comp in zip(node.ops, node.comparators):
                right = ev(comp)
                if not _CMP[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
            return _bounded(_FUNCS[node.func.id](*[ev(a) for a in node.args]), text)
        raise ExprError(f"unsupported syntax in {_short(text)}: {ast.dump(node)[:60]}")

    try:
        return ev(_parse(text))
    except ExprError:
        raise
    except Exception as exc:  # arithmetic on None, division by zero, overflow ...
        raise ExprError(f"cannot evaluate {_short(text)}: {exc}") from None
