"""AWQ's activation-aware scaling (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration"), written with torch on CPU (why not a library: see gptq.py).

Input channels that see large activations matter more; scaling such a channel's weights up by s
(and the activation down by 1/s) shrinks its relative rounding error. The division is folded into
the operation before the linear, so the float model computes exactly the same function:
    input_layernorm          -> q_proj, k_proj, v_proj
    v_proj (when its output width equals o_proj's input, i.e. no grouped KV heads) -> o_proj
    post_attention_layernorm -> gate_proj, up_proj
    up_proj                  -> down_proj
Per pair, s = mean|x|^alpha (normalized to geometric mean 1 of its extremes) with alpha from a grid
(data: generator/data/quantize.yaml), choosing the alpha minimizing the squared error of the linears'
outputs on the calibration inputs when their scaled weights go through our grid (RTN). The paper
measures the whole block's output; the linears' outputs are the cheaper proxy used here. The scaled
float weights then go to RTN (method awq) or to GPTQ (awq+gptq).
"""

from __future__ import annotations

from .gptq import rtn


def _fake(w, bits: int, group_size: int):
    import torch

    return torch.from_numpy(rtn(w.numpy(), bits, group_size).dequantize())


def search_scale(x, weights: list, bits: int, group_size: int, alphas: tuple[float, ...], max_rows: int = 4096):
    """The per-input-channel scale [in] for linears (weights [out_i, in]) whose common input is x [n, in];
    None when no alpha beats leaving the weights alone (alpha 0)."""
    import torch

    x = x.reshape(-1, x.shape[-1]).float()
    if x.shape[0] > max_rows:
        x = x[torch.linspace(0, x.shape[0] - 1, max_rows).long()]
    w = torch.cat([wi.detach().float() for wi in weights], dim=0)
    ref = x @ w.T
    mean = x.abs().mean(0).clamp(min=1e-5)
    best, best_err = None, None
    for alpha in alphas:
        s = mean ** alpha
        s = s / torch.sqrt(s.max() * s.min())
        err = float(((x @ (_fake(w * s[None, :], bits, group_size) / s[None, :]).T - ref) ** 2).mean())
        if best_err is None or err < best_err:
            best, best_err = (None if alpha == 0 else s), err
    return best


def apply_scale(prev, linears: list, s):
    """Fold s into the linears (columns times s) and into prev (a norm's weight, or a linear's output
    rows, divided by s)."""
    import torch

    with torch.no_grad():
        for lin in linears:
            lin.weight.mul_(s[None, :].to(lin.weight.dtype))
        if isinstance(prev, torch.nn.Linear):
            prev.weight.div_(s[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:
            prev.weight.div_(s.to(prev.weight.dtype))
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s.to(prev.bias.dtype))


def scale_layer(layer, inputs: dict, bits: int, group_size: int, alphas: tuple[float, ...]) -> list[str]:
    """AWQ-scale one Llama-style decoder layer in place; inputs: module name -> its calibration input
    [n, in] (captured before any scaling). Returns the pairs that were scaled."""
    attn, mlp = layer.self_attn, layer.mlp
    pairs = [("input_layernorm", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "q_proj")]
    if attn.v_proj.weight.shape[0] == attn.o_proj.weight.shape[1]:
        pairs.append(("v_proj", attn.v_proj, [attn.o_proj], "o_proj"))
    if hasattr(mlp, "gate_proj"):
        pairs.append(("post_attention_layernorm", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "gate_proj"))
    pairs.append(("up_proj", mlp.up_proj, [mlp.down_proj], "down_proj"))
    done = []
    for name, prev, linears, key in pairs:
        s = search_scale(inputs[key], [lin.weight for lin in linears], bits, group_size, alphas)
        if s is not None:
            apply_scale(prev, linears, s)
            done.append(name)
    return done

