"""Group-wise symmetric weight quantization (s8 / s4), fp8 weights and the float storage types.

A weight W [K, N] (input dim first, as MatMul takes it) is cut into blocks of `group` rows along K;
each block of each column gets one scale d = m / -(qmax + 1), where m is the block's value of largest
magnitude (sign kept), so m lands exactly on the most negative code and all 2^bits codes are used
(llama.cpp's Q4_0/Q8_0 rule). This is exactly what ONNX's blocked
DequantizeLinear (opset 21, axis 0, block_size = group) undoes, so graphs stay standard ONNX;
onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits.

fp8 (fp8_e4m3 = OCP E4M3FN, max 448; fp8_e5m2 = E5M2, max 57344): one fp32 scale per output channel
(column N of W [K, N]), s = max|W[:, n]| / fp8 max, so each column's largest weight lands on the
format's largest finite value; W / s is rounded to nearest even into the fp8 format (ml_dtypes, the
same rounding as ONNX's Cast / QuantizeLinear with saturate). DequantizeLinear (opset 21, axis 1)
undoes it: onnxruntime 1.32's CPU provider runs float8 DequantizeLinear and Cast, so no emulation is
needed. Per channel rather than per tensor: one outlier column then costs only its own precision.
"""

from __future__ import annotations

import numpy as np

import ml_dtypes

from ..contract import from_bf16_bits, to_bf16_bits  # noqa: F401  (the storage conversions live in the bundle contract)

QMAX = {"s8": 127, "s4": 7}


def quantize(w: np.ndarray, wtype: str, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (q int8 [K, N], scales float32 [ceil(K/group), N])."""
    k, n = w.shape
    blocks = -(-k // group)
    padded = np.zeros((blocks * group, n), np.float32)
    padded[:k] = w
    view = padded.reshape(blocks, group, n)
    qmax = QMAX[wtype]
    pick = np.abs(view).argmax(axis=1)[:, None, :]
    signed_max = np.take_along_axis(view, pick, axis=1)[:, 0, :]
    scale = (signed_max / -(qmax + 1)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    q = np.clip(np.rint(view / scale[:, None, :]), -qmax - 1, qmax).astype(np.int8).reshape(blocks * group, n)[:k]
    return np.ascontiguousarray(q), scale


def dequantize(q: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    return q.astype(np.float32) * np.repeat(scale, group, axis=0)[: q.shape[0]]


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 layout: consecutive elements of the flattened tensor share a byte, low nibble first."""
    flat = (q.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


FP8_DTYPE = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}


def fp8_scale(amax: np.ndarray, wtype: str) -> np.ndarray:
    """Per output channel scales float32 [N] from each column's largest magnitude."""
    scale = (amax / np.float32(float(ml_dtypes.finfo(FP8_DTYPE[wtype]).max))).astype(np.float32)
    return np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)


def fp8_codes(w: np.ndarray, scale: np.ndarray, wtype: str) -> np.ndarray:
    """W [K, N] (or a block of its rows) / scale, rounded into the fp8 type."""
    dtype = FP8_DTYPE[wtype]
    top = float(ml_dtypes.finfo(dtype).max)
    return np.ascontiguousarray(np.clip(w / scale, -top, top).astype(dtype))


def quantize_fp8(w: np.ndarray, wtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (q [K, N] in the ml_dtypes fp8 type, scales float32 [N]), one scale per output channel."""
    scale = fp8_scale(np.abs(np.asarray(w, np.float32)).max(axis=0), wtype)
    return fp8_codes(w, scale, wtype), scale


def dequantize_fp8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale


def fake_quantize_weight(w: np.ndarray, wtype: str, group: int) -> np.ndarray:
    """W [K, N] as the graphs of `wtype` compute with it (quantized and back, fp32): the one function
    that simulations use so they match the export exactly."""
    w = np.asarray(w, np.float32)
    if wtype in QMAX:
        return dequantize(*quantize(w, wtype, group), group)
    if wtype in FP8_DTYPE:
        return dequantize_fp8(*quantize_fp8(w, wtype))
    if wtype == "bf16":
        return from_bf16_bits(to_bf16_bits(w))
    if wtype == "fp16":
        return w.astype(np.float16).astype(np.float32)
    return w
