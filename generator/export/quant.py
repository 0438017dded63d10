"""Group-wise symmetric weight quantization (s8 / s4) and the float storage types.

A weight W [K, N] (input dim first, as MatMul takes it) is cut into blocks of `group` rows along K;
each block of each column gets one scale d = m / -(qmax + 1), where m is the block's value of largest
magnitude (sign kept), so m lands exactly on the most negative code and all 2^bits codes are used
(llama.cpp's Q4_0/Q8_0 rule). This is exactly what ONNX's blocked
DequantizeLinear (opset 21, axis 0, block_size = group) undoes, so graphs stay standard ONNX;
onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits.
"""

from __future__ import annotations

import numpy as np

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
