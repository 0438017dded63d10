"""Write a standard GPTQ checkpoint directory (what generator/inputs/gptq.py, transformers/optimum,
GPTQModel and Pulsar2 llm_build read).

Each quantized linear `<prefix>` becomes
    qweight int32 [in / (32 / bits), out]  code + zero (unsigned) of input row r in field r % (32 / bits)
                                           of word row r // (32 / bits), lowest bits first
    qzeros  int32 [groups, out / (32 / bits)]  zero - 1 (checkpoint_format "gptq", v1), packed along out
    scales  fp16  [groups, out]
    g_idx   int32 [in]                      r // group_size (no act-order)
with the symmetric zero 2^(bits-1), so W = scales * (stored code - zero) is our code times our scale.
Every other tensor (embeddings, norms with any AWQ scales folded in, an untied head) is written as
the model holds it. config.json is the source's plus quantization_config (quant_method gptq, bits,
group_size, sym true, desc_act false, checkpoint_format gptq, and `meta`: who quantized it, how, and
from which fp32 source); the tokenizer files are copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeneratorError
from ..inputs.gptq import QUANTIZER
from .gptq import QuantResult

SKIP = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [R, C] -> int32 [R / (32 / bits), C], packed along rows."""
    per = 32 // bits
    u = codes.astype(np.uint32).reshape(codes.shape[0] // per, per, codes.shape[1])
    words = np.zeros((u.shape[0], u.shape[2]), np.uint32)
    for k in range(per):
        words |= u[:, k, :] << np.uint32(k * bits)
    return words.view(np.int32)


def pack_module(r: QuantResult, bits: int) -> dict[str, np.ndarray]:
    out, k = r.codes.shape
    per = 32 // bits
    if k % per or out % per:
        raise GeneratorError(f"A linear of shape [{out}, {k}] cannot be packed at {bits} bits ({per} codes per int32 "
                             f"along both dims are needed).")
    zero = 2 ** (bits - 1)
    groups = r.scales.shape[0]
    qweight = pack_rows((r.codes.astype(np.int32) + zero).T, bits)  # [in / per, out]
    qzeros = pack_rows(np.full((out, groups), zero - 1, np.int32), bits).T  # packed along out
    return {"qweight": np.ascontiguousarray(qweight), "qzeros": np.ascontiguousarray(qzeros),
            "scales": np.ascontiguousarray(r.scales.astype(np.float16)),
            "g_idx": (np.arange(k) // r.group_size).astype(np.int32)}


def write_checkpoint(model, results: dict[str, QuantResult], bits: int, group_size: int, source_dir: Path,
                     out_dir: Path, meta: dict[str, Any]) -> Path:
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((source_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", getattr(model.config, "tie_word_embeddings", False)))
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix in results:
            continue
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = t.detach().contiguous().clone()
    for prefix, r in results.items():
        for part, arr in pack_module(r, bits).items():
            tensors[f"{prefix}.{part}"] = torch.from_numpy(arr)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": True, "desc_act": False,
        "checkpoint_format": "gptq", "true_sequential": False, "damp_percent": meta.get("damp", 0.01),
        "meta": {"quantizer": [QUANTIZER], **meta},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in source_dir.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(SKIP) and not f.name.endswith(".index.json"):
            shutil.copy2(f, out_dir / f.name)
    return out_dir
