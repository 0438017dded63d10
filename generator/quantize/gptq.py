"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") on our symmetric grid, written with torch on CPU.

Why our own code and not a library (checked for issue 11 with `pip download --no-deps`, reading each
package's requirements): gptqmodel 7.7.0 needs torch >= 2.14.1 (we pin 2.13.0) and builds native
kernels (ninja, maturin) plus torchao, datasets and pyarrow; llmcompressor 0.14 pins transformers
<= 5.17 (we have 5.23) and pulls auto-round, compressed-tensors and nvidia-ml-py; autoawq 0.2.9 is
archived, CUDA-only (triton, autoawq-kernels). None installs into this environment without
replacing torch/transformers or pulling CUDA wheels. The algorithm itself is short.

The algorithm, per linear layer W [out, in] with calibration inputs X [n, in]:
  H = 2/n * X^T X (+ damp * mean(diag H) * I); columns whose input is always zero are dropped.
  U = upper Cholesky factor of H^-1.
  Columns are quantized left to right in blocks; the error of each column, divided by U[i, i], is
  spread over the not yet quantized columns through row i of U (inside the block at once, onto the
  later blocks in one matrix product per block: the "lazy batch" update).
  At the first column of each group, the group's scale is chosen from the *updated* weights.

The grid is exactly generator/export/quant.py's: symmetric, codes -(qmax+1)..qmax (-8..7, -128..127),
one scale per (group of input rows, output), scale = c * signed_max / -(qmax+1) where signed_max is
the group's value of largest magnitude and c a clip ratio (1 is quant.py's RTN rule). The clip ratio
is searched per output and group (`clip_grid`, data in generator/data/quantize.yaml) minimizing the
H-diagonal-weighted squared error. Scales are rounded to fp16 before use, since the GPTQ checkpoint
stores fp16 scales: the codes found are the codes stored, and the build keeps them bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QMAX_OF_BITS = {4: 7, 8: 127}


@dataclass
class QuantResult:
    codes: np.ndarray  # int8 [out, in], -(qmax+1)..qmax
    scales: np.ndarray  # float16 [groups, out]
    group_size: int

    def dequantize(self) -> np.ndarray:
        g = np.arange(self.codes.shape[1]) // self.group_size
        return self.codes.astype(np.float32) * self.scales.astype(np.float32)[g].T


def group_scales(w, bits: int, clip_grid: tuple[float, ...] = (1.0,), weight=None):
    """fp16-representable scales [out] for one group w [out, g] (torch float), searched over clip ratios;
    weight [g]: per-input importance (diag H), None for plain squared error."""
    import torch

    qmax = QMAX_OF_BITS[bits]
    pick = w.abs().argmax(dim=1, keepdim=True)
    signed_max = torch.gather(w, 1, pick)[:, 0]
    best_s, best_err = None, None
    for c in clip_grid:
        s = (signed_max * c / -(qmax + 1)).to(torch.float16).to(w.dtype)
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.clamp(torch.round(w / s[:, None]), -qmax - 1, qmax) * s[:, None]
        e = (q - w) ** 2
        err = (e * weight[None, :]).sum(1) if weight is not None else e.sum(1)
        if best_s is None:
            best_s, best_err = s, err
        else:
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return best_s


def rtn(weight: np.ndarray, bits: int, group_size: int, clip_grid: tuple[float, ...] = (1.0,)) -> QuantResult:
    """Round to nearest on the same grid (fp16 scales), optionally with the clip search."""
    import torch

    w = torch.from_numpy(np.asarray(weight, np.float32))
    out, k = w.shape
    qmax = QMAX_OF_BITS[bits]
    groups = -(-k // group_size)
    codes = torch.zeros((out, k), dtype=torch.int8)
    scales = torch.zeros((groups, out), dtype=torch.float16)
    for gi in range(groups):
        sl = slice(gi * group_size, min(k, (gi + 1) * group_size))
        s = group_scales(w[:, sl], bits, clip_grid)
        codes[:, sl] = torch.clamp(torch.round(w[:, sl] / s[:, None]), -qmax - 1, qmax).to(torch.int8)
        scales[gi] = s.to(torch.float16)
    return QuantResult(codes.numpy(), scales.numpy(), group_size)


def gptq(weight: np.ndarray, hessian, bits: int, group_size: int, *, damp: float = 0.01, block: int = 128,
         clip_grid: tuple[float, ...] = (1.0,), act_order: bool = False) -> QuantResult:
    """GPTQ of weight [out, in] (float32) with the Hessian [in, in] (torch float64) of its inputs.
    act_order: columns in order of decreasing diag(H) with static groups (each group's scale chosen
    from the unquantized weights first), so the stored groups stay row // group_size (no g_idx
    permutation, which the blocked DequantizeLinear could not take)."""
    import torch

    w = torch.from_numpy(np.array(weight, np.float32))
    out, k = w.shape
    qmax = QMAX_OF_BITS[bits]
    h = hessian.clone().to(torch.float64)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=torch.float64) * (damp * torch.mean(torch.diag(h)))
    if act_order:
        return _gptq_static_groups(w, h, bits, group_size, block, clip_grid)
    u = _inverse_cholesky(h).to(torch.float32)
    importance = torch.diag(h).to(torch.float32)
    # a block holds whole groups, so each group's scale is chosen from fully updated weights
    block = max(group_size, block // group_size * group_size) if group_size <= block else group_size
    groups = -(-k // group_size)
    codes = torch.zeros((out, k), dtype=torch.int8)
    scales = torch.zeros((groups, out), dtype=torch.float32)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        errs = torch.zeros_like(wb)
        s = None
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                g_end = min(b1 - b0, i + group_size)
                s = group_scales(wb[:, i:g_end], bits, clip_grid, importance[col:b0 + g_end])
                scales[col // group_size] = s
            c = torch.clamp(torch.round(wb[:, i] / s), -qmax - 1, qmax)
            codes[:, col] = c.to(torch.int8)
            err = (wb[:, i] - c * s) / ub[i, i]
            wb[:, i:] -= err[:, None] * ub[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    return QuantResult(codes.numpy(), scales.to(torch.float16).numpy(), group_size)


def _gptq_static_groups(w, h, bits: int, group_size: int, block: int, clip_grid: tuple[float, ...]) -> QuantResult:
    import torch

    out, k = w.shape
    qmax = QMAX_OF_BITS[bits]
    importance = torch.diag(h).to(torch.float32)
    groups = -(-k // group_size)
    scales = torch.stack([group_scales(w[:, g * group_size:(g + 1) * group_size], bits, clip_grid,
                                       importance[g * group_size:(g + 1) * group_size]) for g in range(groups)])
    perm = torch.argsort(importance, descending=True)
    u = _inverse_cholesky(h[perm][:, perm]).to(torch.float32)
    wp = w[:, perm].clone()
    col_scale = scales[perm // group_size]  # [k, out]
    codes_p = torch.zeros((out, k), dtype=torch.int8)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        wb, ub = wp[:, b0:b1].clone(), u[b0:b1, b0:b1]
        errs = torch.zeros_like(wb)
        for i in range(b1 - b0):
            s = col_scale[b0 + i]
            c = torch.clamp(torch.round(wb[:, i] / s), -qmax - 1, qmax)
            codes_p[:, b0 + i] = c.to(torch.int8)
            err = (wb[:, i] - c * s) / ub[i, i]
            wb[:, i:] -= err[:, None] * ub[i, i:][None, :]
            errs[:, i] = err
        wp[:, b1:] -= errs @ u[b0:b1, b1:]
    codes = torch.zeros_like(codes_p)
    codes[:, perm] = codes_p
    return QuantResult(codes.numpy(), scales.to(torch.float16).numpy(), group_size)


def _inverse_cholesky(h):
    """Upper Cholesky factor of h^-1, adding damping until h is positive definite."""
    import torch

    eye = torch.eye(h.shape[0], dtype=h.dtype)
    extra = 0.0
    for _ in range(8):
        try:
            lower = torch.linalg.cholesky(h + eye * extra)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses it
            extra = max(extra * 10, 1e-6 * float(torch.mean(torch.diag(h))))
    raise RuntimeError("GPTQ: the calibration Hessian stays singular after damping")


class HessianAccumulator:
    """H = 2/n sum x x^T over the rows seen by a linear module (a forward pre-hook)."""

    def __init__(self, in_features: int):
        import torch

        self.h = torch.zeros((in_features, in_features), dtype=torch.float64)
        self.n = 0

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        self.h += (x.T @ x).to(self.h.dtype) * (2.0 / self.n)

    def hook(self, module, args):
        self.add(args[0].detach())
