"""Predicted board speed and memory: a cost model with per-chip constants (data/board_cost.yaml),
calibrated on the vendor's published figures. Nothing here runs on a board; every number is labelled
"predicted".

decode, seconds per token = bytes streamed per token / bandwidth + layers x layer overhead, where the
bytes are every linear weight at its stored size (codes + group scales; overrides and -w auto mixes
per linear), the post graph's lm_head, and the KV cache the decode graph reads (its fixed
kv_cache_len rows, K and V, at the hidden state type). TTFT at a 128-token prompt = prefill FLOPs
(2 x linear params x tokens + attention 4 x layers x tokens^2 x q_dim, + lm_head for one token) /
effective TFLOPS of the weight type + the weights streamed once / bandwidth + layers x layer
overhead. CMM = linear weights + lm_head + KV cache + a fixed overhead per layer graph (command
buffers, prefill activations: assumed, not calibrated). The embedding table is not counted: the
board runtime reads it on the CPU side from DDR (the .bin next to the graphs), not from CMM.
"""

from __future__ import annotations

import math
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from .contract import is_quantized
from .errors import GeneratorError
from .paths import DATA_DIR

COST_FILE = DATA_DIR / "board_cost.yaml"
PROMPT_TOKENS = 128
HIDDEN_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "s8": 1.0, "s4": 0.5, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0}
BASIS = ("decode: (linear weights + lm_head + KV cache bytes) / bandwidth + layers x overhead; TTFT: prefill FLOPs "
         "/ TFLOPS + weights / bandwidth + layers x overhead; CMM: weights + KV cache + per-layer graph overhead "
         "(embedding in DDR)")


@lru_cache(maxsize=1)
def cost_data() -> dict[str, Any]:
    try:
        data = yaml.safe_load(COST_FILE.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise GeneratorError(f"{COST_FILE}: unreadable board cost model ({exc}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("chips"), dict):
        raise GeneratorError(f"{COST_FILE}: expected a mapping with a 'chips' section.")
    return data


def chip_cost(chip_name: str) -> tuple[Any, dict[str, Any]]:
    """The chip profile (chips.yaml; an unknown name is a GeneratorError naming --chip) and its cost constants."""
    from .resolve.chips import get_chip

    chip = get_chip(chip_name)
    cost = cost_data()["chips"].get(chip.name)
    if not isinstance(cost, dict):
        raise GeneratorError(f"{COST_FILE}: no cost constants for chip {chip.name} (chips: "
                             f"{', '.join(cost_data()['chips'])}); add them to predict on it.")
    for key in ("bandwidth_gbs", "layer_overhead_ms", "tflops", "error_pct"):
        if key not in cost:
            raise GeneratorError(f"{COST_FILE}: chips.{chip.name}.{key} is missing.")
    return chip, cost


def _get(spec: Any, key: str, default: Any = None) -> Any:
    value = getattr(spec, key, None)
    if value is None and hasattr(spec, "model_extra"):  # a bundle's ModelSpec keeps the other fields as extras
        value = (spec.model_extra or {}).get(key)
    if value is None:
        if default is None:
            raise GeneratorError(f"model spec field '{key}' is missing; the cost model needs it (rebuild the bundle).")
        return default
    return value


def linears(spec: Any) -> list[tuple[str, int]]:
    """Every layer linear (the names --override matches, export/graphs.py) with its parameter count."""
    h, inter = _get(spec, "hidden_size"), _get(spec, "intermediate_size")
    q = _get(spec, "num_attention_heads") * _get(spec, "head_dim")
    kv = _get(spec, "num_key_value_heads") * _get(spec, "head_dim")
    gated = _get(spec, "mlp_gated", True)
    per_layer = [("qkv_proj", h * (q + 2 * kv)), ("o_proj", q * h),
                 ("gate_up_proj" if gated else "up_proj", h * inter * (2 if gated else 1)), ("down_proj", inter * h)]
    return [(f"layers.{i}.{k}", n) for i in range(_get(spec, "num_hidden_layers")) for k, n in per_layer]


def weight_type_of(opts: Any, key: str, default: str) -> str:
    for pattern, wt in (getattr(opts, "overrides", None) or {}).items():
        if fnmatch(key, pattern):
            return wt
    return default


def stored_bytes(params: int, weight_type: str, group_size: int) -> float:
    if weight_type not in WEIGHT_BYTES:
        raise GeneratorError(f"weight type '{weight_type}' has no size in the cost model (known: {', '.join(WEIGHT_BYTES)}).")
    per = WEIGHT_BYTES[weight_type] + (2.0 / group_size if is_quantized(weight_type) else 0.0)  # a bf16 scale per group
    return params * per


def sizes(spec: Any, opts: Any) -> dict[str, float]:
    """Bytes and FLOPs the cost model reads: layer weights, lm_head, KV cache, prefill FLOPs."""
    gs = opts.group_size
    layer_params = linears(spec)
    layer_bytes = sum(stored_bytes(n, weight_type_of(opts, k, opts.weight_type), gs) for k, n in layer_params)
    head = _get(spec, "vocab_size") * _get(spec, "hidden_size")
    head_bytes = stored_bytes(head, weight_type_of(opts, "lm_head", opts.post_weight_type), gs)
    layers = _get(spec, "num_hidden_layers")
    kv_dim = _get(spec, "num_key_value_heads") * _get(spec, "head_dim")
    hb = HIDDEN_BYTES.get(opts.hidden_state_type, 2)
    kv_bytes = 2 * layers * opts.kv_cache_len * kv_dim * hb
    q_dim = _get(spec, "num_attention_heads") * _get(spec, "head_dim")
    t = PROMPT_TOKENS
    flops = 2 * sum(n for _, n in layer_params) * t + 4 * layers * t * t * q_dim + 2 * head
    return {"layers": layers, "layer_bytes": layer_bytes, "head_bytes": head_bytes, "kv_bytes": kv_bytes,
            "prefill_flops": flops}


def decode_seconds(s: dict[str, float], cost: dict[str, Any]) -> float:
    streamed = s["layer_bytes"] + s["head_bytes"] + s["kv_bytes"]
    return streamed / (cost["bandwidth_gbs"] * 1e9) + s["layers"] * cost["layer_overhead_ms"] / 1e3


def tflops_for(cost: dict[str, Any], weight_type: str, chip: str) -> float:
    table = cost["tflops"]
    if weight_type not in table:
        raise GeneratorError(f"{COST_FILE}: chips.{chip}.tflops has no entry for weight type {weight_type} "
                             f"(has: {', '.join(table)}).")
    return float(table[weight_type])


def ttft_seconds(s: dict[str, float], cost: dict[str, Any], weight_type: str, chip: str) -> float:
    return (s["prefill_flops"] / (tflops_for(cost, weight_type, chip) * 1e12)
            + (s["layer_bytes"] + s["head_bytes"]) / (cost["bandwidth_gbs"] * 1e9)
            + s["layers"] * cost["layer_overhead_ms"] / 1e3)


def cmm_mib(s: dict[str, float]) -> float:
    mem = cost_data().get("memory", {})
    return ((s["layer_bytes"] + s["head_bytes"] + s["kv_bytes"]) / 2**20
            + s["layers"] * float(mem.get("per_layer_mib", 0)) + float(mem.get("fixed_mib", 0)))


def predict(spec: Any, opts: Any, chip_name: str) -> dict[str, Any]:
    """Predicted board decode speed, TTFT at a 128-token prompt and CMM memory of `spec` built with `opts`
    (BuildOptions or a bundle's Options) on `chip_name`."""
    chip, cost = chip_cost(chip_name)
    s = sizes(spec, opts)
    need = cmm_mib(s)
    return {"chip": chip.label or chip.name, "decode_tok_s": round(1.0 / decode_seconds(s, cost), 1),
            "ttft_ms": round(1e3 * ttft_seconds(s, cost, opts.weight_type, chip.name)),
            "prompt_tokens": PROMPT_TOKENS, "cmm_mib": round(need), "chip_mib": chip.memory_mb,
            "fits": need <= chip.memory_mb, "error_pct": float(cost["error_pct"]),
            "weight_type": opts.weight_type, "kv_cache_len": opts.kv_cache_len,
            "basis": BASIS, "predicted": True}


def predict_bundle(bundle: Any) -> dict[str, Any]:
    """predict() for a built bundle (contract.Bundle, or its folder), on the chip it was built for."""
    if isinstance(bundle, (str, Path)):
        from .contract import Bundle

        bundle = Bundle(bundle)
    return predict(bundle.spec, bundle.opts, bundle.manifest.chip)


def summary_line(p: dict[str, Any]) -> str:
    return (f"predicted on {p['chip']} (board, ±{p['error_pct']:g}%): {p['decode_tok_s']:g} tok/s decode, "
            f"{p['ttft_ms']} ms TTFT at {p['prompt_tokens']} tokens, {p['cmm_mib']:,} MiB of CMM "
            f"({'fits' if p['fits'] else 'does not fit'} the {p['chip_mib']:,} MiB)")


def variant_spec(variant: str, chip_name: str, **flags: Any):
    """The spec and options a build of `variant` would resolve (its recipe config, as SYNTHETIC=1 builds
    read it), without weights: what the calibration and `python -m generator predict <variant>` use."""
    from .inputs.synthetic import variant_config
    from .recipe import registry
    from .resolve.chips import get_chip
    from .resolve.options import check_flags, make_options
    from .resolve.spec import read_config, resolve_spec

    recipe, variant = registry().variant(variant)
    chip = get_chip(chip_name)
    opts = make_options(recipe.build_defaults(variant), chip, **flags)
    check_flags(opts, chip)
    raw = variant_config(recipe, variant)
    where = f"recipe variant {variant}"
    spec = resolve_spec(recipe, raw, model_name=variant, max_positions=opts.kv_cache_len, where=where,
                        config=read_config(recipe, raw, where))
    return spec, opts


def calibration(chip_name: str) -> list[dict[str, Any]]:
    """Each published point of the chip with the model's prediction and its error in percent."""
    chip, cost = chip_cost(chip_name)
    rows = []
    for point in cost.get("calibration", []):
        spec, opts = variant_spec(point["variant"], chip.name, weight_type=point["weight_type"])
        s = sizes(spec, opts)
        for key, measured, predicted in (
                ("decode_tok_s", point.get("decode_tok_s"), 1.0 / decode_seconds(s, cost)),
                ("ttft_ms", point.get("ttft_ms"), 1e3 * ttft_seconds(s, cost, opts.weight_type, chip.name))):
            if measured is not None:
                rows.append({"chip": chip.name, "model": point["model"], "variant": point["variant"], "quantity": key,
                             "measured": measured, "predicted": round(predicted, 2),
                             "error_pct": round(100 * abs(predicted - measured) / measured, 2)})
    return rows


def fit(chip_name: str, layer_overhead_ms: float | None = None) -> dict[str, float]:
    """Least squares (relative error) of the chip's constants on its published points: decode time =
    bytes x (1 / bandwidth) + layers x overhead (both fitted when there are two or more decode points,
    else the overhead is given and the bandwidth solved); then TFLOPS from the TTFT points."""
    import numpy as np

    chip, cost = chip_cost(chip_name)
    rows, ttft = [], []
    for point in cost.get("calibration", []):
        spec, opts = variant_spec(point["variant"], chip.name, weight_type=point["weight_type"])
        s = sizes(spec, opts)
        if point.get("decode_tok_s"):
            rows.append((s["layer_bytes"] + s["head_bytes"] + s["kv_bytes"], s["layers"], 1.0 / point["decode_tok_s"]))
        if point.get("ttft_ms"):
            ttft.append((s, point["ttft_ms"] / 1e3))
    b, n, t = (np.array(c, dtype=float) for c in zip(*rows))
    if layer_overhead_ms is None:
        (inv_bw, over), *_ = np.linalg.lstsq(np.stack([b / t, n / t], 1), np.ones_like(t), rcond=None)
    else:
        over = layer_overhead_ms / 1e3
        inv_bw = float(np.sum((t - n * over) * b / t**2) / np.sum(b**2 / t**2))
    out = {"bandwidth_gbs": 1.0 / inv_bw / 1e9, "layer_overhead_ms": over * 1e3}
    if ttft:
        rest = [(s["prefill_flops"], tt - (s["layer_bytes"] + s["head_bytes"]) * inv_bw - s["layers"] * over)
                for s, tt in ttft]
        out["tflops"] = float(np.mean([f / r for f, r in rest])) / 1e12 if all(r > 0 for _, r in rest) else math.nan
    return out


def write_prediction(bundle_dir: Path, spec: Any, opts: Any, chip_name: str) -> dict[str, Any]:
    """report/predicted.json in the (unpublished) bundle folder; returns the prediction."""
    import json

    from .export.bundle import dest

    p = predict(spec, opts, chip_name)
    path = dest(bundle_dir, "report", "predicted.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(p, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p
