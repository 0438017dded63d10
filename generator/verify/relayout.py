"""References by re-layout: a transformers architecture that computes the same function as a family
transformers does not implement (remote code), with the checkpoint's tensors re-laid out onto it.

The recipe's `reference` section is data: the architecture, its config (values or expressions over
the recipe's canonical config) and, per reference tensor, the checkpoint tensor it comes from plus a
short pipeline of re-layout steps:

    "model.layers.{i}.self_attn.k_proj.weight": "transformer.encoder.layers.{i}.self_attention.query_key_value.weight | rows(q, q + kv)"

Steps (arguments are expressions over the canonical config, see generator/recipe/expr.py):
    rows(start, stop)                      rows [start, stop) of the tensor (output dim of a linear)
    grouped(groups, per_group, start, stop) view rows as [groups, per_group, rest] and keep
                                           [:, start:stop] (per-KV-head packed q/k/v, InternLM2's wqkv)
    scale(x)                               multiply by x (scales a family folds elsewhere, MiniCPM)
    offset(x)                              add x (norm weight offsets)
A key "*" maps every reference tensor not listed to a name template ("language_model.*"); in the
config, `"*": true` starts from the checkpoint's own config (its section) instead of nothing.

This code never uses the generator's own weight conversion (generator/export/weights.py), so a re-layout
reference stays an independent check of it. Each equivalence is written down in
tests/test_families.py. The same loader builds transformers references for SYNTHETIC=1 checkpoints,
whose tensors exist only on demand.
"""

from __future__ import annotations

import ast
from typing import Any, Callable

from ..errors import GeneratorError
from ..recipe import Recipe
from ..recipe.expr import ExprError, evaluate
from ..resolve.spec import read_config

OPS = {"rows": 2, "grouped": 4, "scale": 1, "offset": 1}


def _is_expr(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"expr"} and isinstance(v["expr"], str)


def _eval(text: str, env: dict, where: str):
    try:
        return evaluate(text, env)
    except ExprError as exc:
        raise GeneratorError(f"{where}: {exc}.") from None


def reference_config(recipe: Recipe, raw: dict[str, Any], cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reference architecture's config kwargs, evaluated over the recipe's canonical config (`cfg`:
    read_config(recipe, raw), when the caller has it)."""
    cfg = read_config(recipe, raw) if cfg is None else cfg
    out = {}
    if recipe.reference.config.get("*") is True:  # start from the checkpoint's own (section) config
        section = raw.get(recipe.config.section) if recipe.config.section else raw
        out = {k: v for k, v in section.items() if k not in ("auto_map", "architectures")}
    for key, value in recipe.reference.config.items():
        if key == "*":
            continue
        out[key] = _eval(value["expr"], cfg, f"Recipe '{recipe.name}' reference.config.{key}") if _is_expr(value) else value
    return out


def parse_source(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """'name | op(a, b) | op(c)' -> ('name', [('op', ['a', 'b']), ('op', ['c'])])."""
    parts = [p.strip() for p in text.split("|")]
    name, steps = parts[0], []
    for part in parts[1:]:
        try:
            call = ast.parse(part, mode="eval").body
        except SyntaxError:
            raise GeneratorError(f"reference tensor step '{part}' is not op(args)") from None
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in OPS
                and not call.keywords and len(call.args) == OPS[call.func.id]):
            raise GeneratorError(f"reference tensor step '{part}': expected one of "
                                 f"{', '.join(f'{k}({OPS[k]} args)' for k in OPS)}")
        steps.append((call.func.id, [ast.unparse(a) for a in call.args]))
    return name, steps


def source_tensor(get: Callable[[str], Any], text: str, env: dict, where: str):
    """Read and re-lay out one tensor (a torch tensor, float32)."""
    name, steps = parse_source(text)
    t = get(name).float()
    for op, args in steps:
        vals = [_eval(a, env, where) for a in args]
        if op == "rows":
            start, stop = (int(v) for v in vals)
            if not 0 <= start <= stop <= t.shape[0]:
                raise GeneratorError(f"{where}: rows({start}, {stop}) outside '{name}' with {t.shape[0]} rows")
            t = t[start:stop]
        elif op == "grouped":
            groups, per, start, stop = (int(v) for v in vals)
            if t.shape[0] % (groups * per):
                raise GeneratorError(f"{where}: '{name}' has {t.shape[0]} rows, not a multiple of {groups} x {per}")
            rest = tuple(t.shape[1:])
            t = t.reshape(groups, per, -1, *rest)[:, start:stop].reshape(-1, *rest)
        elif op == "scale":
            t = t * float(vals[0])
        elif op == "offset":
            t = t + float(vals[0])
    return t.contiguous()


def fill_model(model, get: Callable[[str], Any], mapping: Callable[[str], str | None], env: dict, where: str,
               has: Callable[[str], bool]):
    """Load every tensor of `model`'s state dict through `mapping` (None = unmapped). Tied weights
    (the head of a tied model) may stay unmapped; anything else missing is an error."""
    import torch

    state = model.state_dict()
    tied = set()
    tied_keys = getattr(model, "_tied_weights_keys", None) or {}
    if getattr(model.config, "tie_word_embeddings", False):
        tied = set(tied_keys)  # a dict (names -> their source) or a list of names
    missing = []
    for key, param in state.items():
        src = mapping(key)
        if src is None or not has(parse_source(src)[0]):
            if key in tied:
                continue
            missing.append(f"{key} <- {src}" if src else key)
            continue
        t = source_tensor(get, src, env, f"{where}, tensor {key}")
        if tuple(t.shape) != tuple(param.shape):
            raise GeneratorError(f"{where}: {src} gives shape {tuple(t.shape)} for {key}, which needs {tuple(param.shape)}.")
        with torch.no_grad():  # into the model's own storage as read: never a second copy of the weights
            param.copy_(t)
        del t
    if missing:
        raise GeneratorError(f"{where}: no checkpoint tensor for {len(missing)} reference tensor(s): "
                             f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}.")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _build(cls, config):
    """An fp32 eager model of `config`: of class `cls`, or the auto class for its model type when None."""
    import torch
    import transformers

    from transformers.initialization import no_init_weights

    config._attn_implementation = "eager"  # softcaps and windows exactly as written
    with no_init_weights():  # every weight is loaded next; random init would only cost time
        model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
    return model.to(torch.float32)


def relayout_reference(ckpt, recipe: Recipe, env: dict[str, Any] | None = None):
    """The recipe's reference architecture with the checkpoint's tensors re-laid out onto it (`env`: the
    checkpoint's config as the recipe reads it, read here when None)."""
    import transformers

    ref = recipe.reference
    cls = getattr(transformers, ref.architecture, None)
    if cls is None:
        raise GeneratorError(f"Recipe '{recipe.name}': transformers {transformers.__version__} has no "
                             f"'{ref.architecture}' (reference.architecture).")
    env = read_config(recipe, ckpt.config, ckpt.config_where) if env is None else env
    kwargs = reference_config(recipe, ckpt.config, env)
    try:
        config = cls.config_class.from_dict(kwargs)
    except Exception as exc:
        raise GeneratorError(f"Recipe '{recipe.name}': reference.config does not make a {cls.config_class.__name__} ({exc}).") from exc
    n_layers = int(env["num_hidden_layers"])
    table: dict[str, str] = {}
    for key, src in ref.tensors.items():
        if key == "*":
            continue
        if "{i}" in key:
            for i in range(n_layers):
                table[key.format(i=i)] = src.replace("{i}", str(i))
        else:
            table[key] = src
    star = ref.tensors.get("*")
    mapping = lambda k: table.get(k) or (star.replace("*", k) if star else None)  # noqa: E731
    model = _build(cls, config)
    return fill_model(model, ckpt.torch_tensor, mapping, env, f"Recipe '{recipe.name}' reference ({ref.architecture})",
                      ckpt.has)


def reference_from_tensors(ckpt):
    """transformers' own architecture fed tensor by tensor through the TensorSource interface
    (generator/inputs/source.py): for checkpoints whose float tensors transformers cannot load itself,
    those produced on demand (SYNTHETIC=1) and GPTQ-packed ones (exactly dequantized by
    generator/inputs/gptq.py; the quantization_config is dropped, transformers would need
    optimum/gptqmodel kernels for it)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ckpt.dir)
    except Exception as exc:
        raise GeneratorError(f"transformers cannot read '{ckpt.dir}/config.json' as a reference ({exc}).") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = _build(None, config)
    where = f"reference for '{ckpt.source}'"
    model = fill_model(model, ckpt.torch_tensor, lambda k: k, {}, where, ckpt.has)
    unused = sorted(set(ckpt.names()) - set(model.state_dict()))
    if unused:  # the recipe's tensor map names tensors transformers' architecture does not have
        raise GeneratorError(f"{where}: transformers' {type(model).__name__} has no tensor {', '.join(unused[:6])}; "
                             f"the recipe's tensors map does not match the architecture.")
    return model
