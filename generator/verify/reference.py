"""The independent reference: transformers' own implementation of the checkpoint, in fp32.

Families that transformers implements load as they are (AutoModelForCausalLM, eager attention so
softcaps and windows are exact). Remote-code families name, in their recipe, a transformers
architecture that computes the same function plus the tensor re-layout that maps their checkpoint
onto it (recipe field `reference`); see tests/test_families.py for each equivalence.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..errors import GeneratorError
from ..inputs.source import TensorSource
from ..recipe import Recipe


def load_reference(ckpt: TensorSource, recipe: Recipe, config: dict | None = None):
    """transformers' model of the checkpoint in fp32. `config`: the checkpoint's config as the recipe reads
    it (spec.read_config), when the caller has it; a re-layout reference reads it otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    if recipe.reference.architecture:
        from .relayout import relayout_reference

        return relayout_reference(ckpt, recipe, config)
    if ckpt.kind in ("synthetic", "gptq"):
        # SYNTHETIC=1 tensors exist only on demand; GPTQ weights are dequantized by generator/inputs/gptq.py
        from .relayout import reference_from_tensors

        return reference_from_tensors(ckpt)
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt.dir, dtype=torch.float32, attn_implementation="eager")
    except Exception as exc:
        raise GeneratorError(f"transformers cannot load '{ckpt.source}' as a reference ({exc}).") from exc
    return model.eval()


def extend_reference(model, opts) -> None:
    """Give the reference the build's context extension (contract.Options extend_method / scaling_factor),
    as transformers writes it: PI = rope_parameters {rope_type: linear, factor}; NTK = rope_theta x factor."""
    if getattr(opts, "extend_method", "none") == "none":
        return
    import copy

    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    rp = dict(getattr(model.config, "rope_parameters", None) or {})
    if rotary is None or "rope_theta" not in rp:
        raise GeneratorError(f"--extend_method {opts.extend_method}: the reference {type(model).__name__} has no single "
                             f"rotary embedding with rope_parameters to extend; verify this build with -c 0.")
    if opts.extend_method == "PI":
        rp.update(rope_type="linear", factor=float(opts.scaling_factor))
    else:
        rp["rope_theta"] = rp["rope_theta"] * float(opts.scaling_factor)
    config = copy.deepcopy(model.config)
    config.rope_parameters = rp
    model.config = config
    model.model.rotary_emb = type(rotary)(config=config).to(next(model.parameters()).device)


def decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise GeneratorError(f"Reference model {type(model).__name__} has no model.layers; cannot capture per-layer values.")
    return layers


@contextmanager
def bf16_embedding_input(model):
    """Round what enters layer 0 to bf16, as the board contract's embedding table is bf16.

    The board looks token rows up in a bf16 table (`model.embed_tokens.weight.bfloat16.bin`, with
    any embedding scale applied before rounding); comparing end to end against a reference with
    fp32 embeddings would measure that fixed format, not the graphs."""
    import torch

    layer0 = decoder_layers(model)[0]

    def pre(_mod, args, kwargs):
        key = "hidden_states" if "hidden_states" in kwargs else None
        x = kwargs[key] if key else args[0]
        x = x.to(torch.bfloat16).to(x.dtype)
        if key:
            kwargs[key] = x
            return args, kwargs
        return (x, *args[1:]), kwargs

    hook = layer0.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield model
    finally:
        hook.remove()


def capture(model, ids: list[int]) -> dict[str, np.ndarray]:
    """One forward pass over `ids`: every layer's input/output hidden states, post-RoPE keys and
    values ([L, T, kv_dim]), the final hidden state before the final norm and the last position's logits."""
    import torch
    from transformers import DynamicCache

    layers = decoder_layers(model)
    ins, outs = [], []

    def pre(_mod, args, kwargs):
        ins.append((kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).detach())

    def post(_mod, _args, _kwargs, output):
        outs.append((output[0] if isinstance(output, tuple) else output).detach())

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in layers]
    hooks += [m.register_forward_hook(post, with_kwargs=True) for m in layers]
    try:
        cache = DynamicCache()  # no config: every layer keeps every key (no window truncation)
        with torch.no_grad():
            res = model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    keys, values = [], []
    for layer in res.past_key_values.layers:
        k, v = layer.keys[0], layer.values[0]  # [n_kv, T, d]
        keys.append(k.permute(1, 0, 2).reshape(k.shape[1], -1).float().numpy())
        values.append(v.permute(1, 0, 2).reshape(v.shape[1], -1).float().numpy())
    return {
        "inputs": torch.stack([t[0] for t in ins]).float().numpy(),
        "outputs": torch.stack([t[0] for t in outs]).float().numpy(),
        "keys": np.stack(keys),
        "values": np.stack(values),
        "logits": res.logits[0].float().numpy(),
    }


def greedy(model, ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    import torch

    with torch.no_grad(), bf16_embedding_input(model):
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_ids or None, pad_token_id=(eos_ids or [0])[0])
    return out[0, len(ids):].tolist()
