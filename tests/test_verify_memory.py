"""Verification's memory is bounded by one phase at a time: every transformers reference (the text one,
then a vision-language model's whole-model one) is run and released before the bundle's onnxruntime
sessions open, so a real-size check needs the larger of one fp32 reference and the runner, not their
sum. Checked by watching the references with weak references while the runner's sessions open."""

import gc
import weakref

import pytest

import generator.verify.checks as checks
import generator.verify.reference as reference
import generator.verify.vision as vision
from generator.verify.relayout import fill_model
from models import SMALL_GROUPS, quiet_build
from test_vision_qwen25vl import SIZE, tiny  # noqa: F401  (the tiny Qwen2.5-VL fixture)


@pytest.fixture
def watched(monkeypatch):
    """Weak references to every reference model made, and a count of runner sessions opened while one lived."""
    refs, alive_at_open = [], []

    def watch(fn):
        def made(*args, **kw):
            model = fn(*args, **kw)
            refs.append(weakref.ref(model))
            return model
        return made

    def opening(cls):
        class Watched(cls):
            def __init__(self, *args, **kw):
                gc.collect()
                alive_at_open.extend(type(r()).__name__ for r in refs if r() is not None)
                super().__init__(*args, **kw)
        return Watched

    monkeypatch.setattr(reference, "load_reference", watch(reference.load_reference))
    monkeypatch.setattr(vision, "vision_reference", watch(vision.vision_reference))
    monkeypatch.setattr(checks, "Engine", opening(checks.Engine))
    monkeypatch.setattr(vision, "Engine", opening(vision.Engine))
    monkeypatch.setattr(vision, "VisionEncoder", opening(vision.VisionEncoder))
    return refs, alive_at_open


def test_text_reference_released_before_the_runner(tiny_llama, tmp_path, watched):
    refs, alive = watched
    m = quiet_build(input_path=str(tiny_llama), output_path=str(tmp_path / "b"), weight_type="fp32",
                    hidden_state_type="fp32", post_weight_type="fp32", check_level=2, **SMALL_GROUPS)
    assert m["checks"]["passed"], m["checks"]["failures"]
    assert len(refs) == 1 and alive == []


def test_vision_references_released_before_the_runner(tiny, tmp_path, watched):  # noqa: F811
    refs, alive = watched
    _model, ckpt, _ = tiny
    m = quiet_build(input_path=str(ckpt), output_path=str(tmp_path / "b"), weight_type="fp32", post_weight_type="fp32",
                    hidden_state_type="fp32", image_size=SIZE, check_level=2, **dict(SMALL_GROUPS, kv_cache_len=255))
    assert m["checks"]["passed"], m["checks"]["failures"]
    assert m["checks"]["vision"]["generate"]["passed"]
    assert len(refs) == 2 and alive == []  # the text reference and the whole-model one, neither alive


def test_fill_model_loads_in_place(tiny_llama):
    """The reference's weights are copied into the model's own storage as read: the loaded model equals
    transformers' from_pretrained, and no parameter's storage was replaced."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from generator.verify.relayout import _build

    model = _build(None, AutoConfig.from_pretrained(tiny_llama))
    before = {k: p.data_ptr() for k, p in model.named_parameters()}
    tensors = {}
    for f in sorted(tiny_llama.glob("*.safetensors")):
        tensors.update(load_file(f))
    fill_model(model, tensors.__getitem__, lambda k: k, {}, "test", tensors.__contains__)
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == before
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for k, p in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], p), k
