"""A tiny, safe expression language for recipe values that depend on config.json.

Recipes say things like `{expr: "scale_depth / sqrt(num_hidden_layers)"}`. Only arithmetic,
comparisons, boolean logic, `x if c else y`, a few math functions and names from the resolved
config are allowed; anything else (attributes, calls to other names, subscripts) is rejected.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Mapping

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
            raise ExprError(f"unsupported syntax in {text!r}: {type(node).__name__}")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords):
            raise ExprError(f"only {', '.join(sorted(_FUNCS))} may be called in {text!r}")
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in _FUNCS}


def _parse(text: str) -> ast.Expression:
    try:
        return ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"invalid expression {text!r}: {exc.msg}") from None


def evaluate(text: str, env: Mapping[str, Any]) -> Any:
    """Evaluate `text` with names looked up in `env`. Raises ExprError naming the problem."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
            return node.value
        if isinstance(node, ast.Name):  # True / False / None parse as ast.Constant
            if node.id not in env:
                raise ExprError(f"unknown name '{node.id}' in {text!r}")
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            return _BIN[type(node.op)](ev(node.left), ev(node.right))
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
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise ExprError(f"unsupported syntax in {text!r}: {ast.dump(node)[:60]}")

    try:
        return ev(_parse(text))
    except ExprError:
        raise
    except Exception as exc:  # arithmetic on None, division by zero, ...
        raise ExprError(f"cannot evaluate {text!r}: {exc}") from None
