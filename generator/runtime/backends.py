"""Backends that run a bundle (the seed's LlmBoostRegister): a registry by name, filled by the
`register(name)` decorator and by third-party packages through the entry-point group `axgen.backends`.

Each backend class declares `capabilities` (numerics modes, batching, paged KV, sampling, whether it
follows the bundle's context extension) and builds an engine with `open(bundle, **options)`: an object
with the Engine interface (prefill / decode / logits / rewind / reset / load_prefix, cached_ids,
precompute_len, C, numerics, threads) that runtime/chat.py drives.

Built in: `onnxruntime` (the bundle's graphs, runtime/engine.py; board numerics by default, fast allowed)
and `transformers` (the bundle's source checkpoint in fp32, for side-by-side answers; no cache: every
step recomputes the whole sequence, so it is a reference, not a fast path).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import GeneratorError

ENTRY_POINT_GROUP = "axgen.backends"
DEFAULT = "onnxruntime"
_REGISTRY: dict[str, type] = {}
_loaded_entry_points = False


def register(name: str):
    """Class decorator: make a backend class available as `name`."""
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def _load_entry_points():
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:
            raise GeneratorError(f"backend entry point {ep.name!r} ({ep.value}, group {ENTRY_POINT_GROUP}) "
                                 f"cannot be loaded: {exc}") from None
        if not isinstance(cls, type) or not hasattr(cls, "open"):
            raise GeneratorError(f"backend entry point {ep.name!r} ({ep.value}) is not a backend class "
                                 f"(a class with open(bundle, **options)).")
        _REGISTRY.setdefault(ep.name, cls)
        cls.name = getattr(cls, "name", None) or ep.name


def available() -> list[str]:
    """Names of the registered backends, built-in and from entry points, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get(name: str) -> type:
    """The backend class registered as `name`; a clear error listing the available ones."""
    names = available()
    if name not in _REGISTRY:
        raise GeneratorError(f"--backend {name!r} is not a known backend; available: {', '.join(names)}.")
    return _REGISTRY[name]


class Backend:
    """What a backend declares. `capabilities` keys: numerics (modes), batching, paged_kv, sampling
    (the post_config.json sampler applies), extend_method (follows the bundle's context extension),
    saved_kv_cache (--kvcache_path)."""
    name = ""
    capabilities: dict[str, Any] = {"numerics": ("board",), "batching": False, "paged_kv": False,
                                    "sampling": True, "extend_method": True}

    @classmethod
    def check_numerics(cls, numerics: str) -> str:
        """The mode to run in: `numerics` if declared; the default "board" means the backend's own (first)
        mode for a backend without board numerics; any other undeclared mode is refused."""
        modes = cls.capabilities.get("numerics", ())
        if numerics == "board" and numerics not in modes and modes:
            return modes[0]
        if numerics not in modes:
            raise GeneratorError(f"backend {cls.name!r} does not support --numerics {numerics}; it supports: "
                                 f"{', '.join(modes)}.")
        return numerics


def open_engine(bundle, backend: str | None = None, config=None, config_path=None, kvcache_path=None, **options):
    """(engine, backend class) for `bundle`: the backend named by `backend` (a flag), else the config's
    llm_backend, else onnxruntime; `config` (boost_config.BoostConfig) checked against it first."""
    from .boost_config import check_against

    from_file = not backend and config is not None and config.llm_backend
    try:
        cls = get(backend or (config.llm_backend if from_file else DEFAULT))
    except GeneratorError as exc:
        if not from_file:
            raise
        raise GeneratorError(f"--config {config_path}: llm_backend: {exc}") from None
    if config is not None:
        check_against(config, config_path, bundle, cls)
    if kvcache_path and not cls.capabilities.get("saved_kv_cache"):
        raise GeneratorError(f"backend {cls.name!r} lacks a saved KV cache (--kvcache_path); leave it out.")
    options["numerics"] = cls.check_numerics(options.get("numerics", "board"))
    if config is not None and (cls.capabilities.get("batching") or cls.capabilities.get("paged_kv")):
        for key in ("batch_size", "block_size", "num_blocks"):  # the paged / batching keys, where declared
            if getattr(config, key, None) is not None:
                options.setdefault(key, getattr(config, key))
    return cls.open(bundle, **options), cls


@register("onnxruntime")
class OnnxRuntimeBackend(Backend):
    """The bundle's graphs on onnxruntime (runtime/engine.py): today's local runner."""
    capabilities = {"numerics": ("board", "fast"), "batching": False, "paged_kv": False, "sampling": True,
                    "extend_method": True, "saved_kv_cache": True}

    @classmethod
    def open(cls, bundle, **options):
        from .engine import Engine

        return Engine(bundle, **options)


@register("onnxruntime-fused")
class OnnxRuntimeFusedBackend(Backend):
    """All layers in one onnxruntime session over a paged KV block pool, B sequences per step
    (runtime/fused.py, runtime/fused_engine.py). Board numerics by default (the board's numbers: s4 codes
    as MatMulNBits with fp32 activations, s8 as fp32 weights: 4x their memory); --numerics fast runs
    MatMulNBits on the bundle's own codes with int8 activations (the bundle's size in memory)."""
    capabilities = {"numerics": ("board", "fast"), "batching": True, "paged_kv": True, "sampling": True,
                    "extend_method": True, "saved_kv_cache": False, "images": False}

    @classmethod
    def open(cls, bundle, **options):
        from .fused_engine import FusedEngine

        return FusedEngine(bundle, **options)


@register("transformers")
class TransformersBackend(Backend):
    """The bundle's source checkpoint run by transformers in fp32 (a plain Hugging Face checkpoint
    directory), greedy or sampled by the same Sampler; no context extension, no images."""
    capabilities = {"numerics": ("fp32",), "batching": False, "paged_kv": False, "sampling": True,
                    "extend_method": False}

    @classmethod
    def open(cls, bundle, *, threads: int = 2, numerics: str = "fp32", **_ignored):
        return TransformersEngine(bundle, threads=threads)


class TransformersEngine:
    """The Engine interface over a transformers model; the "hidden state" handed to logits() is the
    logits row itself. Each step runs the whole cached sequence (no KV cache)."""

    def __init__(self, bundle, *, threads: int = 2):
        from pathlib import Path

        m = bundle.manifest
        if getattr(bundle.opts, "extend_method", "none") != "none":
            raise GeneratorError(f"backend 'transformers' lacks context extension: bundle {bundle.dir} was built "
                                 f"with --extend_method {bundle.opts.extend_method}; use --backend onnxruntime.")
        source = Path(m.input.reference or m.input.source)
        if not (source / "config.json").is_file():
            raise GeneratorError(f"backend 'transformers' needs the bundle's source checkpoint as a Hugging Face "
                                 f"directory; {source} (manifest input) has no config.json.")
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        except Exception as exc:
            raise GeneratorError(f"backend 'transformers' cannot load {source}: {exc}") from None
        self.b, self.threads, self.numerics = bundle, threads, "fp32"
        self.C = bundle.opts.kv_cache_len
        self.cached_ids: list[int] = []
        self.image_rows: dict = {}

    @property
    def precompute_len(self) -> int:
        return len(self.cached_ids)

    def _run(self) -> np.ndarray:
        import torch

        if self.image_rows:
            raise GeneratorError("backend 'transformers' lacks images; use --backend onnxruntime.")
        with torch.no_grad():
            out = self.model(torch.tensor([self.cached_ids], dtype=torch.long))
        return out.logits[0, -1].float().numpy()

    def prefill(self, tokens: list[int], positions=None, **_kw) -> np.ndarray:
        if self.precompute_len + len(tokens) > self.C:
            raise GeneratorError(f"KV cache full ({self.C} tokens, --kv_cache_len); reset the conversation.")
        self.cached_ids.extend(int(t) for t in tokens)
        return self._run()

    def decode(self, token: int, position=None) -> np.ndarray:
        return self.prefill([token])

    def logits(self, hidden: np.ndarray):
        return hidden, None

    def rewind(self, length: int):
        del self.cached_ids[length:]

    def reset(self):
        self.rewind(0)

    def load_prefix(self, k, v, ids: list[int]):
        if k is not None:
            raise GeneratorError("backend 'transformers' cannot load a saved KV cache (--kvcache_path).")
        self.cached_ids = list(ids)

    @property
    def next_position(self) -> int:
        return self.precompute_len
