"""Build options (Pulsar2 llm_build flag names), their layering and the chip fit check.

Defaults come from Pulsar2 < recipe < variant < command line. `check_flags` (the options alone) and
`check_fit` (the options with the model's spec) refuse a build that a chip cannot take before any
work is done, and say why.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import get_args

from pydantic import Field

from ..contract import Options, ShapeGroup, WeightType, is_quantized
from ..errors import GeneratorError
from ..recipe import BuildDefaults
from .chips import Chip
from .spec import ArchSpec

BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "s8": 1.0, "s4": 0.5, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0}


class BuildOptions(Options):
    """The build's options: the fields the bundle's manifest records (contract.Options), and the shape
    groups they make. Group 0 decodes one token against a cache of kv_cache_len rows; groups >= 1
    prefill prefill_len rows after a history of last_kv_cache_len rows, the first after none (the
    board passes a dummy 1-row cache, masked). vision_weight_type: the vision part's, recorded in the
    manifest's vision entry (not among the manifest's options: text-only manifests stay as they were)."""

    vision_weight_type: WeightType = Field("s8", exclude=True)
    # the overrides given as --override (checked against the model's tensor names), merged into `overrides`
    flag_overrides: dict[str, WeightType] = Field({}, exclude=True)

    def groups(self) -> list[ShapeGroup]:
        def group(index: int, tokens: int, history: int, dummy: bool = False) -> ShapeGroup:
            rows = 1 if dummy else history  # K_cache/V_cache rows; the largest precompute_len + n (section 5)
            return ShapeGroup(index=index, kind="decode" if index == 0 else "prefill", tokens=tokens,
                              history=history, history_rows=rows, dummy_history=dummy, capacity=rows)

        return [group(0, 1, self.kv_cache_len), group(1, self.prefill_len, 0, dummy=True),
                *(group(i, self.prefill_len, h) for i, h in enumerate(self.last_kv_cache_len, start=2))]


def make_options(defaults: BuildDefaults, chip: Chip, **flags) -> BuildOptions:
    """The build's options: the recipe's (and variant's) defaults under the flags that were given."""
    data = defaults.model_dump()
    flag_overrides = flags.pop("flag_overrides", None) or {}
    for key, value in flags.items():
        if value is not None:
            data[key] = value
    if flag_overrides:  # --override over the recipe's: first matching pattern wins, so the flags' come first
        data["overrides"] = {**flag_overrides, **{k: v for k, v in data.get("overrides", {}).items()
                                                  if k not in flag_overrides}}
        data["flag_overrides"] = flag_overrides
    data["chip"] = chip.label  # as typed (AX630C stays AX630C): it names the bundle's files
    if data.get("vision_weight_type") is None:  # the layers' when the chip takes it for the vision part, else s8
        data["vision_weight_type"] = data["weight_type"] if data["weight_type"] in chip.vision_weight_types else "s8"
    return BuildOptions(**data)


def refuse(chip: Chip, problems: list[str]):
    if problems:
        raise GeneratorError(f"This build does not fit chip {chip.name}: " + "; ".join(problems) + ".")


def check_flags(opts: BuildOptions, chip: Chip):
    """Every reason the chip cannot take these options, whatever the model: checked before the checkpoint
    is opened where the recipe is known, so a bad flag fails before any work."""
    check_extension(opts)
    problems = []
    if opts.weight_type not in chip.weight_types:
        problems.append(f"weight type '{opts.weight_type}' (--weight_type / make WEIGHT_TYPE=) is not supported on {chip.name}; "
                        f"it supports {', '.join(chip.weight_types)}")
    if opts.post_weight_type not in chip.post_weight_types:
        problems.append(f"post weight type '{opts.post_weight_type}' (--post_weight_type) is not supported on {chip.name}; "
                        f"it supports {', '.join(chip.post_weight_types)}")
    if opts.vision_weight_type not in chip.vision_weight_types:
        problems.append(f"vision weight type '{opts.vision_weight_type}' (--vision_weight_type / make VISION_WEIGHT_TYPE=) "
                        f"is not supported on {chip.name}; its vision part takes {', '.join(chip.vision_weight_types)}")
    for pattern, wt in opts.overrides.items():
        if wt not in chip.weight_types:
            where = "--override / make OVERRIDE=" if pattern in opts.flag_overrides else "the recipe's overrides"
            problems.append(f"override {pattern}={wt} ({where}): weight type '{wt}' is not supported on {chip.name}; "
                            f"it supports {', '.join(chip.weight_types)}")
    if opts.hidden_state_type not in chip.hidden_state_types:
        problems.append(f"hidden state type '{opts.hidden_state_type}' (--hidden_state_type) is not supported on {chip.name}; "
                        f"it supports {', '.join(chip.hidden_state_types)}")
    if not 1 <= opts.kv_cache_len <= chip.max_kv_cache_len:
        problems.append(f"--kv_cache_len {opts.kv_cache_len} must be between 1 and {chip.max_kv_cache_len} on {chip.name}")
    if not 1 <= opts.prefill_len <= chip.max_prefill_len:
        problems.append(f"--prefill_len {opts.prefill_len} must be between 1 and {chip.max_prefill_len} on {chip.name}")
    h = opts.last_kv_cache_len
    if h != sorted(set(h)) or any(x < 1 for x in h):
        problems.append(f"--last_kv_cache_len values {h} must be positive, distinct and ascending")
    if h and h[-1] + opts.prefill_len > opts.kv_cache_len:
        problems.append(f"--last_kv_cache_len {h[-1]} + --prefill_len {opts.prefill_len} exceeds --kv_cache_len "
                        f"{opts.kv_cache_len} (a prefill chunk's positions must fit the cache)")
    gs = opts.group_size
    if gs < 16 or gs & (gs - 1):
        problems.append(f"group size {gs} must be a power of two >= 16")
    if opts.post_topk < 0:
        problems.append(f"--post_topk {opts.post_topk} must be between 0 and the vocabulary size")
    refuse(chip, problems)


def check_extension(opts: BuildOptions):
    """--extend_method and --scaling_factor go together, the factor above 1 (the extended context is
    max_position_embeddings x scaling_factor)."""
    method, factor = opts.extend_method, opts.scaling_factor
    if method == "none" and factor is not None:
        raise GeneratorError(f"--scaling_factor {factor:g} (make SCALING_FACTOR=) needs --extend_method PI or NTK "
                             f"(make EXTEND_METHOD=).")
    if method != "none" and factor is None:
        raise GeneratorError(f"--extend_method {method} (make EXTEND_METHOD=) needs --scaling_factor X > 1 "
                             f"(make SCALING_FACTOR=), e.g. 2 for twice the trained context.")
    if factor is not None and not factor > 1:
        raise GeneratorError(f"--scaling_factor {factor:g} (make SCALING_FACTOR=) must be greater than 1.")


def max_context(opts: Options, spec: ArchSpec) -> int:
    """The positions a build may use: max_position_embeddings, times scaling_factor when extended."""
    if opts.extend_method == "none" or not opts.scaling_factor:
        return spec.max_position_embeddings
    return int(spec.max_position_embeddings * opts.scaling_factor)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """--override PATTERN=TYPE values (make OVERRIDE="a=s8 b=s8") -> {pattern: type}, in the order given."""
    known = get_args(WeightType)
    out: dict[str, str] = {}
    for item in items or []:
        pattern, sep, wt = item.partition("=")
        pattern, wt = pattern.strip(), wt.strip()
        if not sep or not pattern or not wt:
            raise GeneratorError(f"--override {item!r} (make OVERRIDE=) must be PATTERN=TYPE, e.g. "
                                 f"'layers.0.*=s8' or 'layers.*.down_proj=s8'.")
        if wt not in known:
            raise GeneratorError(f"--override {item!r} (make OVERRIDE=): unknown weight type '{wt}'; "
                                 f"known: {', '.join(known)}.")
        out[pattern] = wt
    return out


def linear_keys(spec: ArchSpec) -> list[str]:
    """The names weight-type overrides match (export/graphs.py weight_type_for): each layer's stored
    linears (q/k/v fused as qkv_proj, gate/up as gate_up_proj) and the post graph's lm_head."""
    mlp = ("gate_up_proj",) if spec.mlp_gated else ("up_proj",)
    per_layer = ("qkv_proj", "o_proj", *mlp, "down_proj")
    return [f"layers.{i}.{k}" for i in range(spec.num_hidden_layers) for k in per_layer] + ["lm_head"]


def check_fit(opts: BuildOptions, chip: Chip, spec: ArchSpec):
    """What the model adds to check_flags (run first): the vocabulary, the positions and the NPU memory."""
    if opts.post_topk > spec.vocab_size:
        refuse(chip, [f"--post_topk {opts.post_topk} must be between 0 and the vocabulary size"])
    keys = linear_keys(spec)
    for pattern, wt in opts.flag_overrides.items():
        if not any(fnmatch(k, pattern) for k in keys):
            raise GeneratorError(f"--override {pattern}={wt} (make OVERRIDE=) matches no weight of {spec.model_name}; "
                                 f"the names are {keys[0]} .. {keys[-2]} (layers.<i>.qkv_proj, o_proj, "
                                 f"{'gate_up_proj' if spec.mlp_gated else 'up_proj'}, down_proj) and lm_head.")
    problems = []
    need = estimate_bytes(spec, opts) / 2**20
    if need > chip.memory_mb:
        problems.append(f"the model needs about {need:,.0f} MiB on the NPU at weight type {opts.weight_type} "
                        f"(weights + KV cache for {opts.kv_cache_len} tokens), more than the {chip.memory_mb:,} MiB "
                        f"of the largest {chip.name} board; try --weight_type s4 or a smaller --kv_cache_len")
    if spec.max_position_embeddings and opts.kv_cache_len > max_context(opts, spec):
        extended = (f" x --scaling_factor {opts.scaling_factor:g} = {max_context(opts, spec)}"
                    if opts.extend_method != "none" else " (--extend_method PI/NTK with --scaling_factor extends it)")
        problems.append(f"--kv_cache_len {opts.kv_cache_len} exceeds the model's max_position_embeddings "
                        f"{spec.max_position_embeddings}{extended}")
    refuse(chip, problems)


def estimate_bytes(spec: ArchSpec, opts: BuildOptions) -> float:
    wb = BYTES_PER_WEIGHT[opts.weight_type]
    if is_quantized(opts.weight_type):
        wb += 2.0 / opts.group_size  # one scale per group
    layers = spec.num_hidden_layers * spec.layer_params * wb
    post = spec.vocab_size * spec.hidden_size * BYTES_PER_WEIGHT[opts.post_weight_type]
    kv_cache = 2 * spec.num_hidden_layers * opts.kv_cache_len * spec.kv_dim * 2
    return layers + post + kv_cache
