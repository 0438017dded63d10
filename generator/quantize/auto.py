"""`--weight_type auto --kld_budget X`: per layer the smallest weight type that keeps the model within a KLD budget.

The measure is the mean KL divergence (fp32 reference || simulated bundle) per token over a slice of the
calibration text (its last `tokens`, which calibrated quantization holds out: calibrate.split_calibration),
teacher-forced (settings in generator/data/auto.yaml). The simulated bundle is the fp32
transformers model with our exact quantizer applied to its decoder linears (quantize/simulate.py), so it
computes what the bundle computes in board numerics (weights on their grid, fp32 activations).

The `small` (s4) candidate of each linear is our RTN quantizer's, or with a calibrated method (gptq, the s4
default: data/quantize.yaml default_method) the linear's weight in the cached all-s4 GPTQ checkpoint
(calibrate.cached_quantize, dequantized: our grid, exact), so the pass measures the weights the build
stores (quantize/build.py: that checkpoint, with the layers the mix keeps wider back as fp32 weights).
1. Sensitivity: for each layer, the KLD when only that layer is at `small` (s4) and the rest fp32.
2. Start from every layer at `base` (s8) and the head at --post_weight_type; measure.
3. Greedy: move layers to `small` from the least sensitive up, re-measuring the whole model each time; the
   first layer that takes the total over the budget goes back to `base` and the search stops. (Stopping
   there, rather than trying the rest, makes the choice monotone: a larger budget never picks fewer s4.)
4. If even step 2 is over the budget, the most sensitive layers move to `fallback` (bf16) instead, one at
   a time, until the total fits; without a fallback on the chip the budget is refused as too small.
The chosen mix is returned as (weight_type, overrides) with the measured KLD; the build records both.
Layers are granular units here (`layers.<i>.*`); finer per-tensor mixes stay with --override. --override
patterns win over the chosen mix in the bundle but are not part of the measurement (nor are the recipe's
overrides, which come after the mix). fp8 is not on the ladder: it takes s8's bytes and, measured on the
default model, about 9x s8's KLD (fp8_e4m3 layers, s8 head: 0.018 vs 0.002 on the evaluation text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from ..errors import GeneratorError
from ..export.quant import dequantize_fp8, quantize_fp8
from ..paths import DATA_DIR
from .simulate import decoder_linears, fake_weight

FP8_SIM = {t: (lambda w, t=t: dequantize_fp8(*quantize_fp8(w, t))) for t in ("fp8_e4m3", "fp8_e5m2")}


def settings() -> dict:
    with open(DATA_DIR / "auto.yaml") as f:
        return yaml.safe_load(f)


def check_request(weight_type: str | None, kld_budget: float | None):
    """The flags' own consistency, before any work."""
    if weight_type == "auto":
        if kld_budget is None:
            raise GeneratorError("--weight_type auto needs --kld_budget X: the largest mean KL divergence vs fp32 "
                                 "on the calibration text the mix may have, e.g. --kld_budget 0.05.")
        if not (isinstance(kld_budget, (int, float)) and math.isfinite(kld_budget) and kld_budget > 0):
            raise GeneratorError(f"--kld_budget {kld_budget} must be a number > 0 (a mean KL divergence in nats, "
                                 f"e.g. 0.05).")
    elif kld_budget is not None:
        raise GeneratorError(f"--kld_budget {kld_budget} applies only with --weight_type auto (make WEIGHT_TYPE=auto "
                             f"KLD_BUDGET=...); got --weight_type {weight_type or 'from the recipe'}.")


@dataclass
class Mix:
    budget: float
    tokens: int
    types: dict[int, str]  # layer -> weight type
    kld: float  # measured, the chosen mix
    base_kld: float  # every layer at base
    sensitivity: dict[int, float]  # layer -> KLD with only that layer at small
    steps: list[tuple[int, str, float]] = field(default_factory=list)  # (layer, type tried, total KLD)
    method: str = "rtn"  # how the `small` layers are quantized (rtn, gptq)

    def options(self) -> tuple[str, dict[str, str]]:
        """(weight_type, overrides): the commonest type as the weight type, the other layers as overrides."""
        counts = {t: list(self.types.values()).count(t) for t in dict.fromkeys(self.types.values())}
        main = max(counts, key=counts.get)
        return main, {f"layers.{i}.*": t for i, t in sorted(self.types.items()) if t != main}

    def note(self) -> dict:
        wt, overrides = self.options()
        return {"kld_budget": self.budget, "kld_mean": round(self.kld, 6), "kld_mean_all_base": round(self.base_kld, 6),
                "tokens": self.tokens, "method": self.method, "weight_type": wt, "overrides": overrides,
                "layers": {str(i): t for i, t in sorted(self.types.items())},
                "sensitivity": {str(i): round(v, 6) for i, v in sorted(self.sensitivity.items())}}

    def table(self) -> str:
        lines = [f"weight type auto: budget {self.budget:g} mean KLD on {self.tokens} calibration tokens; "
                 f"all layers {settings()['base']}: {self.base_kld:.5f}; chosen mix: {self.kld:.5f}",
                 f"{'layer':>5}  {'type':<6} {'KLD alone at ' + settings()['small'] + ' (' + self.method + ')':>25}"]
        lines += [f"{i:>5}  {self.types[i]:<6} {self.sensitivity[i]:>25.5f}" for i in sorted(self.types)]
        counts = ", ".join(f"{n} x {t}" for t, n in sorted({t: list(self.types.values()).count(t)
                                                             for t in self.types.values()}.items()))
        return "\n".join(lines + [f"layers: {counts}"])


class Simulator:
    """The fp32 model with per-layer weight types applied in place; every original weight is kept once (a
    second fp32 copy of the linears: the pass needs about twice the reference's memory) so a layer can be set
    to any type again, and only the layers that change are re-quantized. calibrated(HF module name): the
    weight [out, in] a `small` linear takes instead of our RTN quantizer's (a calibrated checkpoint's)."""

    def __init__(self, model, group_size: int, calibrated: Callable[[str], np.ndarray] | None = None,
                 small: str = "s4"):
        import torch

        self.model, self.group = model, group_size
        self.calibrated, self.small = calibrated, small
        self.layers: dict[int, list] = {}
        self.head = None
        self.original: dict[str, np.ndarray] = {}
        for name, canonical, module in decoder_linears(model):
            self.original[name] = module.weight.detach().float().numpy().copy()
            if canonical == "lm_head":
                self.head = (name, module)
            else:
                self.layers.setdefault(int(canonical.split(".")[1]), []).append((name, module))
        if not self.layers:
            raise GeneratorError(f"{type(model).__name__}: no decoder linears found for --weight_type auto.")
        self._torch = torch
        self.current: dict[int, str] = {i: "fp32" for i in self.layers}

    def _set(self, modules, wtype: str):
        with self._torch.no_grad():
            for name, module in modules:
                if wtype == "fp32":
                    w = self.original[name]
                elif wtype == self.small and self.calibrated is not None:
                    w = self.calibrated(name)
                    if w.shape != self.original[name].shape:
                        raise GeneratorError(f"The calibrated weight of '{name}' has shape {list(w.shape)}; the model's "
                                             f"is {list(self.original[name].shape)}.")
                else:
                    w = fake_weight(self.original[name], wtype, self.group, FP8_SIM)
                module.weight.copy_(self._torch.from_numpy(np.ascontiguousarray(w, np.float32)))

    def set(self, layer: int, wtype: str):
        if self.current[layer] != wtype:
            self._set(self.layers[layer], wtype)
            self.current[layer] = wtype

    def set_head(self, wtype: str):
        if self.head is not None:
            self._set([self.head], wtype)

    def restore(self):
        for i in self.layers:
            self.set(i, "fp32")
        if self.head is not None:
            self._set([self.head], "fp32")


class Forwards:
    """Teacher-forced logits in windows, re-running only the decoder layers from a given one on: the outputs of
    the layers before it are replayed from the last recorded run (their weights have not changed since), so a
    change to layer i costs the layers i..L-1. Checked once against a whole forward; where they differ (a
    family whose layers share state), every measurement runs the whole model. KL(ref || ours) per token as
    accuracy/metrics.py defines it (float64 from log_softmax), with the reference's side computed once."""

    def __init__(self, model, ids: list[int], window: int, layers: dict[int, object]):
        import torch

        self.torch, self.model = torch, model
        arr = np.asarray(ids, np.int64)
        self.chunks = [torch.from_numpy(arr[s:s + window])[None] for s in range(0, arr.size, window)]
        self.layers = dict(sorted(layers.items()))
        self.outs: dict[int, list] = {}
        self.pending: dict[int, list] = {}
        ref = self.logits(0)
        self.commit()
        self.ref_logp = torch.log_softmax(ref.double(), dim=-1)
        self.ref_p = self.ref_logp.exp()
        again = self.logits(max(self.layers))
        self.replay = bool(torch.allclose(again, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())))

    def commit(self):
        """Keep the last run's layer outputs: the change it measured stays."""
        self.outs.update(self.pending)

    def logits(self, start: int):
        """Logits [T, V] with the layers before `start` replayed; this run's outputs of the others pending."""
        torch = self.torch
        start = start if self.outs else 0
        hooks, stubs, new = [], [], {i: [] for i in self.layers if i >= start}
        w = {"index": 0}
        for i, layer in self.layers.items():
            if i < start:
                layer.forward = (lambda *a, i=i, **k: self.outs[i][w["index"]])  # replay
                stubs.append(layer)
            else:
                hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: new[i].append(out)))
        try:
            chunks = []
            with torch.no_grad():
                for k, x in enumerate(self.chunks):
                    w["index"] = k
                    chunks.append(self.model(input_ids=x, use_cache=False).logits[0].float())
        finally:
            for h in hooks:
                h.remove()
            for layer in stubs:
                del layer.forward
        self.pending = new
        return torch.cat(chunks, dim=0)

    def kld(self, start: int) -> float:
        """Mean KL(ref || ours) per token, running the decoder from layer `start` (0 for the whole model)."""
        torch = self.torch
        ours = torch.log_softmax(self.logits(start if self.replay else 0).double(), dim=-1)
        return float((self.ref_p * (self.ref_logp - ours)).sum(-1).mean())


def layer_modules(model, sim: "Simulator") -> dict[int, object]:
    """Decoder layer i's module, found from its linears' names (…layers.<i>.self_attn.q_proj -> …layers.<i>)."""
    out = {}
    for i, modules in sim.layers.items():
        name = modules[0][0]
        parts = name.split(".")
        at = max(k for k, p in enumerate(parts[:-1]) if p == "layers" and parts[k + 1] == str(i))
        out[i] = model.get_submodule(".".join(parts[:at + 2]))
    return out


def choose_mix(model, ids: list[int], *, budget: float, group_size: int, post_weight_type: str, allowed: list[str],
               step: Callable[[], None] = lambda: None, cfg: dict | None = None, layers: int | None = None,
               calibrated: Callable[[str], np.ndarray] | None = None, method: str = "rtn") -> Mix:
    """Run the sensitivity pass and the greedy choice on `model` (fp32 transformers, modified in place and
    restored at the end). `allowed`: the chip's layer weight types; `step`: called after each measurement
    (at most 2 L + 1 of them); `layers`: the decoder layer count the model must show; `calibrated`: the
    `small` weights by HF module name (Simulator) when `method` is not rtn."""
    cfg = cfg or settings()
    small, base, fallback = cfg["small"], cfg["base"], cfg.get("fallback")
    for t in (small, base):
        if t not in allowed:
            raise GeneratorError(f"--weight_type auto chooses between {small} and {base}; this chip takes "
                                 f"{', '.join(allowed)}.")
    sim = Simulator(model, group_size, calibrated, small)
    if layers is not None and sorted(sim.layers) != list(range(layers)):
        raise GeneratorError(f"--weight_type auto found decoder linears in layers {sorted(sim.layers)} of "
                             f"{type(model).__name__}, expected 0..{layers - 1}; it cannot map this model's layers.")
    fw = Forwards(model, list(ids), int(cfg["window"]), layer_modules(model, sim))
    try:
        sensitivity = {}
        for i in sorted(sim.layers):  # the rest fp32: the recorded fp32 outputs replay layers < i
            sim.set(i, small)
            sensitivity[i] = fw.kld(i)
            sim.set(i, "fp32")
            step()
        for i in sim.layers:
            sim.set(i, base)
        sim.set_head(post_weight_type)  # from here on the whole model as the bundle stores it
        total = base_kld = fw.kld(0)
        fw.commit()
        step()
        steps: list[tuple[int, str, float]] = []
        if base_kld > budget:
            if not fallback or fallback not in allowed:
                raise GeneratorError(f"--kld_budget {budget:g} is too small: every layer at {base} already measures "
                                     f"{base_kld:.5f} on the calibration text, and this chip has no {fallback or 'wider'} "
                                     f"layer weight type to fall back to. Raise the budget or use -w {base}.")
            for i in sorted(sim.layers, key=lambda j: -sensitivity[j]):
                sim.set(i, fallback)
                total = fw.kld(i)
                fw.commit()
                step()
                steps.append((i, fallback, total))
                if total <= budget:
                    break
            else:
                raise GeneratorError(f"--kld_budget {budget:g} is too small: even every layer at {fallback} measures "
                                     f"{total:.5f} on the calibration text (the head at {post_weight_type}).")
        else:
            for i in sorted(sim.layers, key=lambda j: sensitivity[j]):
                sim.set(i, small)
                trial = fw.kld(i)
                steps.append((i, small, trial))
                step()
                if trial > budget:
                    sim.set(i, base)
                    break
                total = trial
                fw.commit()
        return Mix(budget=budget, tokens=len(ids), types=dict(sim.current), kld=total, base_kld=base_kld,
                   sensitivity=sensitivity, steps=steps, method=method)
    finally:
        sim.restore()


def calibration_ids(tokenizer_dir: str | Path, text: str, tokens: int) -> list[int]:
    """The `tokens` token ids the pass measures on: the calibration text's tail that calibrated quantization
    holds out (calibrate.split_calibration), else, for a short text, its first `tokens`."""
    from transformers import AutoTokenizer

    from .calibrate import split_calibration

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = split_calibration(tok(text, add_special_tokens=False)["input_ids"], tokens)[1]
    if len(ids) < 8:
        raise GeneratorError(f"The calibration text has {len(ids)} tokens; --weight_type auto needs at least 8.")
    return ids
