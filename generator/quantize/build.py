"""The build's calibrated input: `--quant_method` / `--calib_data` turn an fp32 source into a cached
GPTQ checkpoint (calibrate.cached_quantize) that the build then reads through the ordinary GPTQ
input path (inputs/gptq.py), keeping its codes bit-exact (export/graphs.py store_linear).

Default method (data: generator/data/quantize.yaml default_method): gptq for s4, rtn otherwise, and
rtn wherever calibration does not apply: a vision-language recipe, a synthetic (random) checkpoint,
an input that is already GPTQ. Linears an override gives another type than the build's weight type
stay float in the GPTQ checkpoint, so the build quantizes them from the fp32 weights.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

from ..errors import GeneratorError
from ..export.graphs import weight_type_for
from ..resolve.resolved import Resolved
from .calibrate import BITS, cached_quantize, check_method, default_method, methods, read_calibration


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
        what = ("a vision-language model" if r.recipe.vision is not None else
                f"a {r.ckpt.kind} checkpoint" if r.ckpt.kind != "synthetic" else "synthetic random weights")
        raise GeneratorError(f"--quant_method {method} calibrates an fp16/bf16/fp32 text model; '{r.ckpt.source}' is "
                             f"{what}. Use --quant_method rtn.")
    keep_float = lambda key: weight_type_for(r.opts, key, wt) != wt  # noqa: E731
    started = time.time()
    console.print(f"calibrated quantization: {method}, {wt}, group size {r.opts.group_size} "
                  f"(cached under .cache/quantized)", highlight=False)
    path = cached_quantize(r.ckpt.source, method, wt, r.opts.group_size, calib_data, keep_float=keep_float,
                           log=lambda s: None)
    seconds = round(time.time() - started, 1)
    console.print(f"calibrated checkpoint {path} ({seconds} s)", highlight=False)
    r2 = reresolve(str(path))  # the bundle keeps the name and folder the fp32 source gave it
    # the cache is keyed by content: the checkpoint may have been made from a copy of these files at another
    # path (since removed), so the reference the manifest and the checks name is this build's own source
    r2.ckpt.config["quantization_config"]["meta"]["source"] = os.path.abspath(r.ckpt.source)
    spec = r2.spec.model_copy(update={"model_name": r.spec.model_name})
    return dataclasses.replace(r2, model=r.model, spec=spec, out_dir=r.out_dir), {}
