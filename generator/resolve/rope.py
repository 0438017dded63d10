"""One RoPE resolver for every family: default, linear (PI), dynamic (NTK), yarn, longrope (su), llama3.

`resolve_rope` turns a rope-parameters dict (rope_type + its fields, as transformers names them) into
the data the graph needs: inverse frequencies for the rotated dims, the cos/sin multiplier, and for
longrope a second table used once positions pass the original context. Partial rotary and
interleaved pairs are properties of the block and travel along. Written from the papers' formulas;
tests/test_rope.py checks every kind against transformers' implementation.

Multimodal RoPE (Qwen2-VL / Qwen2.5-VL) is data in the same dict: `mrope_section` splits the rotated
pairs into (temporal, height, width) sections, each taking its angle from its own row of the
positions (the layers' `indices` input is then [3, P]); tests/test_mrope.py checks it.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, model_serializer

from ..errors import GeneratorError
from ..limits import limits, rule, shown


class RopeTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    theta: float
    rotary_dim: int
    interleaved: bool = False
    inv_freq: list[float]
    attention_factor: float = 1.0
    # longrope: `long_inv_freq` replaces `inv_freq` when the largest position of a forward is >= long_from
    long_inv_freq: list[float] | None = None
    long_from: int | None = None
    # mRoPE: rotated pairs per (temporal, height, width) position row, summing to rotary_dim / 2
    mrope_section: list[int] | None = None

    @model_serializer(mode="wrap")
    def _without_unset_mrope(self, handler):
        """Tables without mRoPE are recorded as before (manifests of text-only bundles unchanged)."""
        data = handler(self)
        if self.mrope_section is None:
            data.pop("mrope_section", None)
        return data

    def pair_rows(self) -> list[int] | None:
        """mRoPE: the position row (0 temporal, 1 height, 2 width) of each rotated pair, as
        transformers' Qwen2.5-VL takes it (section k from row k % 3); None without mRoPE."""
        if self.mrope_section is None:
            return None
        return [k % 3 for k, n in enumerate(self.mrope_section) for _ in range(n)]


def _base_freq(theta: float, dim: int) -> np.ndarray:
    """theta ** (2j / dim) for each rotated pair j (float32, as transformers computes it)."""
    return np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return (1.0 / _base_freq(theta, dim)).astype(np.float32)


def _get(params: dict, key: str, where: str):
    if params.get(key) is None:
        raise GeneratorError(f"rope scaling of type '{params.get('rope_type')}' needs '{key}' in {where}.")
    return params[key]


def _check_params(params: dict, where: str):
    """Every scaling parameter present is in its range (data/limits.yaml `rope_scaling`); lists
    (longrope factors) entry by entry."""
    for key, name in limits()["rope_scaling"].items():
        value = params.get(key)
        if value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            problem = rule(name).problem(v)
            if problem:
                raise GeneratorError(f"{where}: '{key}': {problem}"
                                     f"{f' (in {shown(value)})' if isinstance(value, list) else ''}.")


def resolve_rope(
    params: dict | None,
    *,
    theta: float,
    head_dim: int,
    partial_rotary_factor: float,
    interleaved: bool,
    max_position_embeddings: int,
    max_positions_used: int,
    where: str = "config.json rope_scaling",
) -> RopeTable:
    """`params`: the scaling dict (None or rope_type 'default' for plain RoPE)."""
    if params is not None and not isinstance(params, dict):
        raise GeneratorError(f"{where}: expected a mapping (rope_type and its parameters) or null, got {shown(params)}.")
    params = dict(params or {})
    _check_params(params, where)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "su":
        kind = "longrope"
    mrope = _mrope_section(params, kind, head_dim, partial_rotary_factor, interleaved, where)
    if kind == "mrope":  # older configs: {type: mrope, mrope_section}; the frequencies are plain RoPE's
        kind = "default"
    dim = int(head_dim * partial_rotary_factor)
    if dim % 2 or dim <= 0:
        raise GeneratorError(f"{where}: rotary dim {dim} (head_dim {head_dim} x partial_rotary_factor "
                             f"{partial_rotary_factor}) must be even and positive.")
    inv = _base_inv_freq(theta, dim)
    factor_attn = 1.0
    long_inv = None
    long_from = None

    if kind == "default":
        pass
    elif kind == "linear":
        inv = (inv / np.float32(_get(params, "factor", where))).astype(np.float32)
    elif kind == "dynamic":
        # NTK-aware dynamic scaling changes nothing until the sequence outgrows the original context;
        # a static graph cannot re-derive frequencies per length, so refuse builds that would need it.
        original = params.get("original_max_position_embeddings") or max_position_embeddings
        if max_positions_used > original:
            raise GeneratorError(f"{where}: dynamic NTK rope scaling only takes effect beyond {original} positions, but this "
                                 f"build uses {max_positions_used} (kv_cache_len); static graphs cannot follow it. "
                                 f"Use --kv_cache_len <= {original - 1}.")
    elif kind == "llama3":
        factor = float(_get(params, "factor", where))
        low = float(_get(params, "low_freq_factor", where))
        high = float(_get(params, "high_freq_factor", where))
        old = float(_get(params, "original_max_position_embeddings", where))
        if high <= low:
            raise GeneratorError(f"{where}: llama3 scaling needs high_freq_factor ({high:g}) > low_freq_factor ({low:g}).")
        wavelen = 2 * math.pi / inv.astype(np.float64)
        low_wl, high_wl = old / low, old / high
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        factor = params.get("factor")
        original = float(_get(params, "original_max_position_embeddings", where))
        if factor is None:
            factor = max_position_embeddings / original
        factor = float(factor)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = params.get("attention_factor")
        if attn is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        factor_attn = float(attn)
        beta_fast = params.get("beta_fast") or 32
        beta_slow = params.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(original / (rot * 2 * math.pi))) / (2 * math.log(theta))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if params.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
        extrap = 1 - ramp
        inv = ((inv / factor) * (1 - extrap) + inv * extrap).astype(np.float32)
    elif kind == "longrope":
        original = int(_get(params, "original_max_position_embeddings", where))
        short = np.asarray(_get(params, "short_factor", where), dtype=np.float32)
        long = np.asarray(_get(params, "long_factor", where), dtype=np.float32)
        for name, arr in (("short_factor", short), ("long_factor", long)):
            if arr.shape != (dim // 2,):
                raise GeneratorError(f"longrope {name} in {where} has {arr.size} entries; rotary dim {dim} needs {dim // 2}.")
        factor = params.get("factor") or max_position_embeddings / original
        attn = params.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        factor_attn = float(attn)
        base = _base_freq(theta, dim)
        inv = (1.0 / (short * base)).astype(np.float32)
        long_inv = (1.0 / (long * base)).astype(np.float32).tolist()
        long_from = original
    else:
        raise GeneratorError(f"Unsupported rope_type '{kind}' in {where}. Supported: default, linear, dynamic, yarn, "
                             f"longrope (su), llama3.")
    return RopeTable(kind=kind, theta=float(theta), rotary_dim=dim, interleaved=interleaved,
                     inv_freq=[float(x) for x in inv], attention_factor=factor_attn,
                     long_inv_freq=long_inv, long_from=long_from, mrope_section=mrope)


EXTEND_METHODS = ("none", "PI", "NTK")


def extend_rope(params: dict | None, theta: float, method: str, factor: float | None,
                where: str) -> tuple[dict | None, float]:
    """The seed's context extension (--extend_method / --scaling_factor) applied to the config's rope:
    PI (position interpolation) divides positions by `factor`, i.e. rope_scaling {rope_type: linear,
    factor}; NTK multiplies the base theta by `factor` once, the seed's static NTK (not transformers'
    dynamic NTK, which re-derives the base from the sequence length). Returns (params, theta).
    A config that already scales its rope keeps precedence: the extension is refused, as on mRoPE."""
    if method == "none":
        return params, theta
    kind = (params or {}).get("rope_type") or (params or {}).get("type") or "default"
    if isinstance(params, dict) and (params.get("mrope_section") is not None or kind == "mrope"):
        raise GeneratorError(f"--extend_method {method}: {where} uses multimodal RoPE (mrope_section), "
                             f"which the extension does not cover; build without --extend_method.")
    if kind != "default":
        raise GeneratorError(f"--extend_method {method} conflicts with {where} (rope_type '{kind}'): the "
                             f"config's rope scaling keeps precedence; build without --extend_method/--scaling_factor.")
    if method == "PI":
        return {"rope_type": "linear", "factor": float(factor)}, theta
    return None, theta * float(factor)


def _mrope_section(params: dict, kind: str, head_dim: int, partial_rotary_factor: float, interleaved: bool,
                   where: str) -> list[int] | None:
    """The checked mRoPE split (None without one): positive ints, one section per position row
    (at most 3: temporal, height, width), summing to the rotated pairs; plain frequencies only."""
    section = params.get("mrope_section")
    if section is None:
        if kind == "mrope":
            raise GeneratorError(f"{where}: rope type 'mrope' needs 'mrope_section' (rotated pairs per temporal, "
                                 f"height and width position row, e.g. [16, 24, 24]).")
        return None
    pairs = int(head_dim * partial_rotary_factor) // 2
    if (not isinstance(section, list) or not 1 <= len(section) <= 3
            or not all(type(n) is int and n > 0 for n in section) or sum(section) != pairs):
        raise GeneratorError(f"{where}: 'mrope_section' must list 1 to 3 positive integers (rotated pairs per "
                             f"temporal, height and width position row) summing to {pairs} (rotary dim / 2), "
                             f"got {shown(section)}.")
    if kind not in ("default", "mrope"):
        raise GeneratorError(f"{where}: mRoPE ('mrope_section') with rope_type '{kind}' is not supported; "
                             f"mRoPE takes plain RoPE frequencies.")
    if interleaved:
        raise GeneratorError(f"{where}: mRoPE ('mrope_section') with interleaved rotary pairs is not supported.")
    return list(section)
