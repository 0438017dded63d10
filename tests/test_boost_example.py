"""docs/boost.yaml, the example config of README's "Serving many users": it loads, it is accepted by a
backend with batching and a paged KV cache (and refused by the one-conversation onnxruntime backend),
and the README's key table covers every key load_config takes."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from generator.errors import GeneratorError
from generator.runtime import backends
from generator.runtime.boost_config import BoostConfig, check_against, load_config, sampling_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "boost.yaml"


def bundle():
    """What check_against reads of a bundle: a bf16 bundle with a 1023-token context, no extension."""
    return SimpleNamespace(model="SmolLM2-135M-Instruct", dir=Path("out/smollm2-135m-instruct_ax650"),
                           manifest=SimpleNamespace(recipe=SimpleNamespace(name="smollm2-135m-instruct")),
                           opts=SimpleNamespace(extend_method="none", scaling_factor=None, kv_cache_len=1023))


def test_the_example_config_loads_with_the_documented_values():
    cfg = load_config(EXAMPLE)
    assert (cfg.llm_backend, cfg.batch_size, cfg.block_size, cfg.num_blocks) == ("onnxruntime-fused", 8, 16, 256)
    assert cfg.max_decode_length == 512 and cfg.compute_dtype == "float32"
    assert sampling_settings(cfg) == {"top_k": 20, "enable_top_k_sampling": True, "repetition_penalty": 1.1,
                                      "enable_repetition_penalty": True}


def test_a_batching_paged_backend_accepts_it_and_the_single_stream_one_refuses_it():
    cfg = load_config(EXAMPLE)

    class Batching(backends.Backend):
        name = "batching"
        capabilities = {"numerics": ("fast",), "batching": True, "paged_kv": True, "sampling": True}

    check_against(cfg, EXAMPLE, bundle(), Batching)
    if "onnxruntime-fused" in backends.available():
        check_against(cfg, EXAMPLE, bundle(), backends.get("onnxruntime-fused"))
    with pytest.raises(GeneratorError, match="batch_size 8: backend 'onnxruntime' lacks batching"):
        check_against(cfg, EXAMPLE, bundle(), backends.get("onnxruntime"))


def test_the_readme_table_covers_every_config_key():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Serving many users")
    section = readme[start:readme.index("\n## ", start + 1)]
    missing = [key for key in BoostConfig.model_fields if f"| `{key}`" not in section]
    assert not missing, f"README 'Serving many users' lacks table rows for {missing}"
