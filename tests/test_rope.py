"""Every RoPE kind of generator/resolve/rope.py against transformers' own initialisation functions."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from generator.errors import GeneratorError
from generator.resolve.rope import resolve_rope

HEAD_DIM = 64
CASES = [
    ("default", {}, 1.0),
    ("linear", {"factor": 4.0}, 1.0),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, 1.0),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64}, 1.0),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2, "mscale": 1.0,
              "mscale_all_dim": 0.5}, 1.0),
    ("longrope", {"short_factor": list(np.linspace(1, 2, 16)), "long_factor": list(np.linspace(1, 8, 16)),
                  "original_max_position_embeddings": 64}, 0.5),
]


@pytest.mark.parametrize("kind,params,partial", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_rope_matches_transformers(kind, params, partial):
    theta = 50000.0
    rope_parameters = {"rope_type": kind, "rope_theta": theta, "partial_rotary_factor": partial, **params}
    cfg = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=256,
                      rope_parameters=rope_parameters)
    cfg.partial_rotary_factor = partial
    fn = ROPE_INIT_FUNCTIONS[kind] if kind != "default" else None
    if fn is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        ref_inv, ref_attn = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg, device=torch.device("cpu"))
    else:
        ref_inv, ref_attn = fn(cfg, torch.device("cpu"))
    ours = resolve_rope({"rope_type": kind, **params}, theta=theta, head_dim=HEAD_DIM, partial_rotary_factor=partial,
                        interleaved=False, max_position_embeddings=256, max_positions_used=128)
    assert ours.rotary_dim == int(HEAD_DIM * partial)
    np.testing.assert_allclose(ours.inv_freq, ref_inv.numpy(), rtol=2e-6)
    assert ours.attention_factor == pytest.approx(ref_attn, rel=1e-6)
    if kind == "longrope":
        # the graph uses the long table when a forward's largest position reaches long_from, i.e. for a
        # sequence of long_from + 1 tokens; transformers switches on the sequence length: the same place
        for positions, table in ((ours.long_from, ours.inv_freq), (ours.long_from + 1, ours.long_inv_freq)):
            ref_inv, _ = fn(cfg, torch.device("cpu"), seq_len=positions)
            np.testing.assert_allclose(table, ref_inv.numpy(), rtol=2e-6, err_msg=f"{positions} positions")
        assert not np.allclose(ours.inv_freq, ours.long_inv_freq)


def test_dynamic_refused_beyond_original_context():
    with pytest.raises(GeneratorError, match="dynamic NTK"):
        resolve_rope({"rope_type": "dynamic", "factor": 2.0}, theta=1e4, head_dim=64, partial_rotary_factor=1.0,
                     interleaved=False, max_position_embeddings=128, max_positions_used=1023)
    ok = resolve_rope({"rope_type": "dynamic", "factor": 2.0}, theta=1e4, head_dim=64, partial_rotary_factor=1.0,
                      interleaved=False, max_position_embeddings=2048, max_positions_used=1023)
    assert ok.kind == "dynamic"


def test_unknown_rope_type_names_supported_ones():
    with pytest.raises(GeneratorError, match="Supported: default, linear"):
        resolve_rope({"rope_type": "weird"}, theta=1e4, head_dim=64, partial_rotary_factor=1.0, interleaved=False,
                     max_position_embeddings=128, max_positions_used=64)
