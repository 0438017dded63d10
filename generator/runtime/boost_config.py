"""`--config boost.yaml`: the seed's LlmBoostConfig keys for run and serve, checked (pydantic,
extra=forbid; read by limits.read_yaml, the recipes' bounded YAML reader) and refused where the chosen
backend lacks the feature.

Keys: llm_backend, boost_model_name (checked against the bundle's model or recipe), batch_size,
seq_length, block_size, num_blocks, extend_method, scaling_factor, top_k, top_p, do_sample,
repetition_penalty, max_decode_length, compute_dtype. Command-line flags override the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import GeneratorError
from ..limits import read_yaml

MAX_CONFIG_BYTES = 64 * 1024  # a handful of keys; anything bigger is not a boost config


class BoostConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    llm_backend: str | None = None
    boost_model_name: str | None = None
    batch_size: int = Field(1, ge=1)
    seq_length: int | None = Field(None, ge=1)
    block_size: int | None = Field(None, ge=1)
    num_blocks: int | None = Field(None, ge=1)
    extend_method: Literal["None", "none", "PI", "NTK"] | None = None
    scaling_factor: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    do_sample: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    max_decode_length: int | None = Field(None, ge=1)
    compute_dtype: Literal["float32", "fp32", "float16", "bfloat16"] | None = None


def load_config(path: str | Path) -> BoostConfig:
    """Read and check a boost config file; errors name the file and the key."""
    path = Path(path)
    data = read_yaml(path, "--config", MAX_CONFIG_BYTES) or {}
    if not isinstance(data, dict):
        raise GeneratorError(f"--config {path}: must be a mapping of keys (llm_backend, top_k, ...).")
    try:
        return BoostConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "?"
            what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {what}")
        raise GeneratorError(f"--config {path}: " + "; ".join(problems) + ".") from None


def check_against(cfg: BoostConfig, path, bundle, backend_cls) -> None:
    """Refuse keys the bundle or the backend cannot honour, naming the key, the file and the backend."""
    name, caps = backend_cls.name, backend_cls.capabilities
    if cfg.boost_model_name is not None:
        names = {bundle.model, bundle.manifest.recipe.name, bundle.dir.name}
        if cfg.boost_model_name not in names and cfg.boost_model_name.lower() not in {n.lower() for n in names}:
            raise GeneratorError(f"--config {path}: boost_model_name {cfg.boost_model_name!r} is not this bundle's "
                                 f"model ({bundle.model}, recipe {bundle.manifest.recipe.name}).")
    if cfg.batch_size > 1 and not caps.get("batching"):
        raise GeneratorError(f"--config {path}: batch_size {cfg.batch_size}: backend {name!r} lacks batching "
                             f"(batch_size 1 only).")
    for key in ("block_size", "num_blocks"):
        if getattr(cfg, key) is not None and not caps.get("paged_kv"):
            raise GeneratorError(f"--config {path}: {key}: backend {name!r} lacks a paged KV cache.")
    built = getattr(bundle.opts, "extend_method", "none")
    if cfg.extend_method is not None and cfg.extend_method.lower() != built.lower():
        raise GeneratorError(f"--config {path}: extend_method {cfg.extend_method}: the bundle was built with "
                             f"{built}; backend {name!r} runs the bundle's extension (rebuild with "
                             f"--extend_method to change it).")
    if cfg.scaling_factor is not None and cfg.scaling_factor != getattr(bundle.opts, "scaling_factor", None):
        raise GeneratorError(f"--config {path}: scaling_factor {cfg.scaling_factor} differs from the bundle's "
                             f"({getattr(bundle.opts, 'scaling_factor', None)}); rebuild to change it.")
    if cfg.seq_length is not None and cfg.seq_length > bundle.opts.kv_cache_len:
        raise GeneratorError(f"--config {path}: seq_length {cfg.seq_length} is over the bundle's kv_cache_len "
                             f"{bundle.opts.kv_cache_len}.")
    if cfg.compute_dtype is not None and cfg.compute_dtype not in ("float32", "fp32"):
        raise GeneratorError(f"--config {path}: compute_dtype {cfg.compute_dtype}: backend {name!r} computes "
                             f"activations in float32 only.")
    if (cfg.top_k or cfg.top_p or cfg.do_sample) and not caps.get("sampling"):
        raise GeneratorError(f"--config {path}: top_k/top_p/do_sample: backend {name!r} is greedy only.")


def sampling_settings(cfg: BoostConfig) -> dict:
    """The config's sampling keys as contract.Sampling fields (post_config.json names)."""
    out: dict = {}
    if cfg.do_sample is False:
        out.update(enable_top_k_sampling=False, enable_top_p_sampling=False)
    if cfg.top_k is not None:
        out.update(top_k=cfg.top_k, enable_top_k_sampling=cfg.do_sample is not False and cfg.top_k > 1)
    if cfg.top_p is not None:
        out.update(top_p=cfg.top_p, enable_top_p_sampling=cfg.do_sample is not False)
    if cfg.repetition_penalty is not None:
        out.update(repetition_penalty=cfg.repetition_penalty, enable_repetition_penalty=cfg.repetition_penalty != 1)
    return out
