"""The build's calibrated input: `--quant_method` / `--calib_data` turn an fp32 source into a cached
GPTQ checkpoint (calibrate.cached_quantize) that the build then reads through the ordinary GPTQ
input path (inputs/gptq.py), keeping its codes bit-exact (export/graphs.py store_linear).

Default method (data: generator/data/quantize.yaml default_method): gptq for s4, rtn otherwise, and
rtn wherever calibration does not apply: a vision-language recipe, a synthetic (random) checkpoint,
an input that is already GPTQ. Linears an override gives another type than the build's weight type
stay float in the GPTQ checkpoint, so the build quantizes them from the fp32 weights.

`--weight_type auto` (quantize/auto.py) with a calibrated method (gptq: the s4 default; --quant_method rtn
keeps RTN): `auto_checkpoint` makes (or reuses) the all-s4 GPTQ checkpoint, whose dequantized weights are
each layer's s4 candidate in the sensitivity pass (`calibrated_weights`), and `auto_input` builds from that
checkpoint with every linear the chosen mix (and --override) gives another type put back as the fp32
source's weights (calibrate.with_float_modules): one calibration serves every budget, the s4 layers keep the
checkpoint's codes bit-exact, the s8/bf16 ones are quantized from fp32 as in any build. AWQ methods are
refused with auto: they fold scales into the norms, so one layer cannot change type alone.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import GeneratorError
from ..export.graphs import weight_type_for
from ..resolve.resolved import Resolved
from .calibrate import (BITS, cached_quantize, canonical_keys, check_method, default_method, methods, read_calibration,
                        with_float_modules)


def check_request(method: str | None, calib_data: str | None):
    """The flags alone, before the checkpoint is opened: a known method, a readable calibration text."""
    if method is not None and method not in methods():
        raise GeneratorError(f"--quant_method '{method}' is unknown; choose one of {', '.join(methods())}.")
    if calib_data is not None:
        read_calibration(calib_data)


def calibrated_input(r: Resolved, method: str | None, calib_data: str | None, console,
                     reresolve: Callable[[str], Resolved]) -> tuple[Resolved, dict[str, Any]]:
    """(the Resolved to build, a manifest note) after calibrating when asked or by default."""
    wt = r.opts.weight_type
    calibratable = r.ckpt.kind in ("hf", "gguf") and r.recipe.vision is None
    if method is None:
        method = default_method(wt) if calibratable and wt in BITS else "rtn"
    else:
        check_method(method, wt)
    if method == "rtn":
        if calib_data is not None:
            read_calibration(calib_data)  # a bad file is an error even when nothing calibrates
        return r, {}
    if not calibratable:
        _not_calibratable(r, method)
    keep_float = lambda key: weight_type_for(r.opts, key, wt) != wt  # noqa: E731
    started = time.time()
    console.print(f"calibrated quantization: {method}, {wt}, group size {r.opts.group_size} "
                  f"(cached under .cache/quantized)", highlight=False)
    path = cached_quantize(r.ckpt.source, method, wt, r.opts.group_size, calib_data, keep_float=keep_float,
                           log=lambda s: None)
    seconds = round(time.time() - started, 1)
    console.print(f"calibrated checkpoint {path} ({seconds} s)", highlight=False)
    return _as_input(r, path, reresolve), {}


def _calibratable(r: Resolved) -> bool:
    return r.ckpt.kind in ("hf", "gguf") and r.recipe.vision is None


def _not_calibratable(r: Resolved, method: str):
    what = ("a vision-language model" if r.recipe.vision is not None else
            f"a {r.ckpt.kind} checkpoint" if r.ckpt.kind != "synthetic" else "synthetic random weights")
    raise GeneratorError(f"--quant_method {method} calibrates an fp16/bf16/fp32 text model; '{r.ckpt.source}' is "
                         f"{what}. Use --quant_method rtn.")


def _as_input(r: Resolved, path: Path, reresolve: Callable[[str], Resolved], **keep: Any) -> Resolved:
    """r built from the GPTQ checkpoint at path: its name, spec name and folder stay the fp32 source's."""
    r2 = reresolve(str(path))  # the bundle keeps the name and folder the fp32 source gave it
    # the cache is keyed by content: the checkpoint may have been made from a copy of these files at another
    # path (since removed), so the reference the manifest and the checks name is this build's own source
    r2.ckpt.config["quantization_config"]["meta"]["source"] = os.path.abspath(r.ckpt.source)
    spec = r2.spec.model_copy(update={"model_name": r.spec.model_name})
    return dataclasses.replace(r2, model=r.model, spec=spec, out_dir=r.out_dir, **keep)


def auto_method(r: Resolved, method: str | None, small: str) -> str:
    """How an auto mix's `small` layers are quantized: --quant_method, else the default for `small` where
    calibration applies (gptq for s4), else rtn."""
    if method is None:
        return default_method(small) if _calibratable(r) and small in BITS else "rtn"
    check_method(method, small)
    if method == "rtn":
        return method
    if not _calibratable(r):
        _not_calibratable(r, method)
    if method != "gptq":
        raise GeneratorError(f"--weight_type auto takes --quant_method rtn or gptq; {method} folds AWQ scales into the "
                             f"norms, so a layer cannot change weight type alone. Use -w {small} --quant_method "
                             f"{method} (with --override for wider layers) instead.")
    return method


def auto_checkpoint(r: Resolved, method: str, small: str, calib_data: str | None, console) -> Path:
    """The all-`small` calibrated checkpoint (cached; the one a plain -w s4 build without overrides uses)."""
    started = time.time()
    console.print(f"weight type auto: calibrated {small} candidates ({method}, group size {r.opts.group_size}, "
                  f"cached under .cache/quantized)", highlight=False)
    path = cached_quantize(r.ckpt.source, method, small, r.opts.group_size, calib_data, log=lambda s: None)
    console.print(f"calibrated checkpoint {path} ({round(time.time() - started, 1)} s)", highlight=False)
    return path


def calibrated_weights(path: Path) -> Callable[[str], np.ndarray]:
    """HF module name -> its dequantized weight [out, in] (float32, exact) in the GPTQ checkpoint at path."""
    from ..inputs.checkpoint import open_input

    view = open_input(path).gptq

    def weight(name: str) -> np.ndarray:
        if view is None or not view.is_packed(f"{name}.weight"):
            raise GeneratorError(f"The calibrated checkpoint {path} has no GPTQ-packed '{name}'; --weight_type auto "
                                 f"needs every decoder linear quantized there (delete that cache folder to redo it).")
        return view.weight(f"{name}.weight").numpy()

    return weight


def auto_input(r: Resolved, path: Path, small: str, reresolve: Callable[[str], Resolved]) -> Resolved:
    """The build of an auto mix (r.opts) from the all-`small` checkpoint at path: every linear the options
    give another type than `small` back as fp32 weights; the options (the mix) stay r's. r unchanged when no
    linear is at `small`."""
    absent = ".up_proj" if r.spec.mlp_gated else ".gate_up_proj"  # the fused name this model does not have
    types = {k: weight_type_for(r.opts, k, r.opts.weight_type) for k in canonical_keys(r.ckpt.config)
             if not k.endswith(absent)}
    if small not in types.values():
        return r
    floats = {k for k, t in types.items() if t != small}
    return _as_input(r, with_float_modules(path, r.ckpt.source, floats), reresolve, opts=r.opts)
