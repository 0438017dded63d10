"""InternVL2 whole (vision part + Qwen2 language model) against transformers' InternVL.

A tiny random InternVL2 (2 ViT layers, 56 px images of 14 px patches: 4 image tokens after pixel
shuffle 0.5; a 2-layer Qwen2) is made by transformers (`InternVLForConditionalGeneration`) and saved
in the remote-code `InternVLChatModel` layout the recipe reads. The equivalence (re-layout) is:

  remote code (checkpoint)                           transformers InternVL
  vision_model.embeddings.class_embedding            model.vision_tower.embeddings.cls_token
  vision_model.embeddings.position_embedding         model.vision_tower.embeddings.position_embeddings
  vision_model.embeddings.patch_embedding.*          model.vision_tower.embeddings.patch_embeddings.projection.*
  vision_model.encoder.layers.{i}.attn.qkv.*         concat(...encoder.layer.{i}.attention.{q,k,v}_proj.*)
  vision_model.encoder.layers.{i}.attn.proj.*        ...attention.projection_layer.*
  vision_model.encoder.layers.{i}.ls1 / ls2          ...lambda_1 / lambda_2
  vision_model.encoder.layers.{i}.norm1 / norm2.*    ...layernorm_before / layernorm_after.*
  vision_model.encoder.layers.{i}.mlp.fc1 / fc2.*    ...mlp.fc1 / fc2.*
  mlp1.0 / mlp1.1 / mlp1.3                           model.multi_modal_projector.layer_norm / linear_1 / linear_2
  language_model.model.* / language_model.lm_head    model.language_model.* / lm_head

(select_layer -1 and ps_version v2 are transformers' vision_feature_layer -1 and its pixel_shuffle;
InternViT has no final norm: use_mean_pooling.) Built at fp32 and s8: the vision graph against
`get_image_features` (also at an interpolated image size), an image + prompt end to end through the
Chat against the reference's greedy tokens and logits, and an image in a later turn after a cached
system prompt.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import vision_rows
from models import SMALL_GROUPS, quiet_build, randomize, threads
from vision_models import check_recorded_end_to_end, first_step_logits, save_internvl_checkpoint, tiny_tokenizer

from generator.contract import Bundle, from_storage
from generator.runtime.chat import Chat
from generator.runtime.engine import Engine
from generator.runtime.vision import VisionEncoder, load_image
from generator.errors import GeneratorError
from generator.verify.checks import thresholds

SIZE = 56
FAMILY = "internvl2_qwen2"  # conformance rows internvl2_qwen2/vision (tests/vision_rows.py)
REFERENCE = "transformers InternVLForConditionalGeneration (re-layout of InternVLChatModel)"
QUIRKS = ["InternViT: class token, learned position table, qkv bias, layer scale ls1/ls2, no final norm",
          "pixel shuffle 0.5 (ps_version v2)", "MLP projector LayerNorm, Linear, GELU, Linear",
          "56 px of 14 px patches: 4 image tokens", "<img> <IMG_CONTEXT> x 4 </img> into a Qwen2 decoder"]


def test_image(size: int = 70, seed: int = 0) -> np.ndarray:
    """A small RGB test picture made by code: gradients, a disc and noise (not square: it is resized)."""
    h, w = size, size + 10
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2) * 200.0], -1)
    img += np.random.default_rng(seed).normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


test_image.__test__ = False  # a helper, not a test


def remote_layout(model) -> dict[str, np.ndarray]:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {}
    vt, n = "model.vision_tower.", model.config.vision_config.num_hidden_layers
    out["vision_model.embeddings.class_embedding"] = sd.pop(vt + "embeddings.cls_token")
    out["vision_model.embeddings.position_embedding"] = sd.pop(vt + "embeddings.position_embeddings")
    for p in ("weight", "bias"):
        out[f"vision_model.embeddings.patch_embedding.{p}"] = sd.pop(vt + f"embeddings.patch_embeddings.projection.{p}")
    for i in range(n):
        src, dst = f"{vt}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.qkv.{p}"] = np.concatenate([sd.pop(src + f"attention.{x}_proj.{p}") for x in "qkv"])
            for a, b in (("attention.projection_layer", "attn.proj"), ("layernorm_before", "norm1"),
                         ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[dst + f"{b}.{p}"] = sd.pop(src + f"{a}.{p}")
        out[dst + "ls1"], out[dst + "ls2"] = sd.pop(src + "lambda_1"), sd.pop(src + "lambda_2")
    for a, b in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
        for p in ("weight", "bias"):
            out[f"mlp1.{b}.{p}"] = sd.pop(f"model.multi_modal_projector.{a}.{p}")
    for k in list(sd):
        if k.startswith("model.language_model."):
            out["language_model.model." + k.removeprefix("model.language_model.")] = sd.pop(k)
    out["language_model.lm_head.weight"] = sd.pop("lm_head.weight")
    assert not sd, sorted(sd)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    tok_dir, ids, size = tiny_tokenizer(tmp_path_factory, "vl_tok")
    vc = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=SIZE, patch_size=14, attention_bias=True, layer_norm_eps=1e-6)
    tc = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=size, max_position_embeddings=256, tie_word_embeddings=False,
                     bos_token_id=None, eos_token_id=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    cfg = InternVLConfig(vision_config=vc, text_config=tc, image_token_id=ids["<IMG_CONTEXT>"], downsample_ratio=0.5,
                         tie_word_embeddings=False)
    torch.manual_seed(7)
    model = InternVLForConditionalGeneration(cfg).eval()
    randomize(model, 7)
    target = tmp_path_factory.mktemp("tiny_internvl2")
    llm = tc.to_dict()
    llm["architectures"] = ["Qwen2ForCausalLM"]
    save_internvl_checkpoint(target, remote_layout(model), tok_dir, llm, "Hermes-2", SIZE, qkv_bias=True,
                             qk_normalization=False, norm_type="layer_norm")
    return model, target, tmp_path_factory


def build(tiny, wtype: str, image_size: int = SIZE):
    model, ckpt, factory = tiny
    out = factory.mktemp(f"vl_{wtype}_{image_size}")
    quiet_build(input_path=str(ckpt), output_path=str(out), recipe_name="internvl2_qwen2", weight_type=wtype,
                post_weight_type=wtype, hidden_state_type="fp32", image_size=image_size, **SMALL_GROUPS)
    return Bundle(out)


@pytest.fixture(scope="module", params=["fp32", "s8"])
def bundle(request, tiny):
    return build(tiny, request.param)


def pixel_values(pixels: np.ndarray, b: Bundle) -> torch.Tensor:
    """The reference's input: the same resized uint8 picture, normalised as the processor does."""
    v = b.manifest.vision
    x = pixels[0].astype(np.float32) / 255.0
    x = (x - np.asarray(v.mean, np.float32)) / np.asarray(v.std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def metrics(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    a, r = ours.reshape(-1).astype(np.float64), ref.reshape(-1).astype(np.float64)
    cos = float(a @ r / (np.linalg.norm(a) * np.linalg.norm(r)))
    return cos, float(np.abs(a - r).max() / np.abs(r).max())


def limits(b: Bundle, kind: str) -> dict:
    return thresholds(b.opts.weight_type, b.opts.hidden_state_type)[kind]


def check_vision(model, b: Bundle, image: np.ndarray, record: bool = False):
    enc = VisionEncoder(b, threads=threads())
    pixels = enc.pixels(image)
    ours = from_storage(enc.encode(image), b.opts.hidden_state_type)
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=pixel_values(pixels, b), vision_feature_layer=-1,
                                             vision_feature_select_strategy="default").pooler_output[0].numpy()
    assert ours.shape == ref.shape == (b.manifest.vision.tokens, b.spec.hidden_size)
    lim = limits(b, "layer")
    per_token = [metrics(ours[t], ref[t])[0] for t in range(ours.shape[0])]  # cosine per image token
    rel = metrics(ours, ref)[1]
    ok = min(per_token) >= lim["min_cosine"] and rel <= lim["max_rel_err"]
    grown = vision_rows.record(FAMILY, b.opts.weight_type, "vision", min(per_token), rel, lim, ok, REFERENCE,
                               QUIRKS) if record else None
    assert ok, (per_token, rel)
    assert not grown, grown


def test_vision_graph_matches_reference(tiny, bundle):
    v = bundle.manifest.vision
    assert (v.image_size, v.tokens, v.weight_type) == (SIZE, 4, bundle.opts.weight_type)
    ax = json.loads((bundle.dir / bundle.manifest.tokenizer.dir / "ax_tokenizer.json").read_text())
    assert ax["img_token_num"] == 4 and ax["img_context_token"] == "<IMG_CONTEXT>"
    check_vision(tiny[0], bundle, test_image(), record=True)


def test_vision_graph_interpolated_size(tiny):
    b = build(tiny, "fp32", image_size=84)  # 6x6 patches: the 4x4 position table interpolated (bicubic)
    assert (b.manifest.vision.image_size, b.manifest.vision.tokens) == (84, 9)
    assert b.manifest.vision.graph == "vision_part_84.onnx"
    check_vision(tiny[0], b, test_image(seed=1))


def reference_greedy(model, ids: list[int], pv: torch.Tensor, steps: int):
    """transformers' greedy tokens and first logits for `ids` whose image-context run holds the image
    (the image features put at those rows as InternVLModel does; generated tokens stay text, even an
    <IMG_CONTEXT> a random model may pick)."""
    ctx = model.config.image_token_id
    where = [i for i, t in enumerate(ids) if t == ctx]
    ids, out, first_logits = list(ids), [], None
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pv, vision_feature_layer=-1,
                                               vision_feature_select_strategy="default").pooler_output[0]
        for _ in range(steps):
            emb = model.model.language_model.embed_tokens(torch.tensor([ids])).clone()
            emb[0, where] = feats
            logits = model(inputs_embeds=emb).logits[0, -1].numpy()
            first_logits = logits if first_logits is None else first_logits
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out, first_logits


def bf16_reference(model):
    """The reference with the contract's bf16 embedding table (what the board reads)."""
    import copy

    ref = copy.deepcopy(model)
    emb = ref.model.language_model.embed_tokens.weight
    with torch.no_grad():
        emb.copy_(emb.to(torch.bfloat16).to(torch.float32))
    return ref


def test_image_prompt_end_to_end(tiny, bundle):
    model = bf16_reference(tiny[0])
    chat = Chat(bundle, Engine(bundle, threads=threads()), system_prompt="You are a bot.")
    chat.reset()
    image = test_image(seed=2)
    text = "".join(chat.turn("What is in the picture?", max_new_tokens=6, images=[image]))
    assert isinstance(text, str)
    e, n = chat.engine, chat.stats.prompt_tokens
    prompt, ours = e.cached_ids[:n], e.cached_ids[n:]
    assert prompt.count(bundle.manifest.vision.img_context_token_id) == 4
    pv = pixel_values(chat.vision().pixels(image), bundle)
    ref_tokens, ref_logits = reference_greedy(model, prompt, pv, 6)
    lim = limits(bundle, "generate")
    k = min(len(ours), lim["min_prefix"])
    # the first step's logits (teacher-forced: the same prompt) against the reference's
    cos, rel = metrics(first_step_logits(chat, prompt, image), ref_logits)
    lim = limits(bundle, "end_to_end")
    check_recorded_end_to_end(FAMILY, bundle, cos, rel, lim, ours[:k], ref_tokens[:k], REFERENCE, QUIRKS)


def test_image_in_a_later_turn(tiny, bundle):
    model = bf16_reference(tiny[0])
    chat = Chat(bundle, Engine(bundle, threads=threads()), system_prompt="You are a bot.")
    system = chat.reset()
    assert system > 0 and chat.engine.precompute_len == system  # the system prompt is prefilled once
    "".join(chat.turn("Hello there.", max_new_tokens=3))
    image = test_image(seed=3)
    "".join(chat.turn("And this?", max_new_tokens=4, images=[image]))
    e, n = chat.engine, chat.stats.prompt_tokens
    assert chat.stats.prefilled < n  # the system prompt and the first turn came from the cache
    prompt, ours = e.cached_ids[:n], e.cached_ids[n:]
    ref_tokens, ref_logits = reference_greedy(model, prompt, pixel_values(chat.vision().pixels(image), bundle), 4)
    if bundle.opts.weight_type == "fp32":  # s8: a random tiny model's top two logits may be closer than s8's error
        assert ours == ref_tokens[:len(ours)]
    # teacher-forced: the cache kept up to the image (system prompt + first turn), the image turn again
    ctx = bundle.manifest.vision.img_context_token_id
    first = prompt.index(ctx)
    first_logits = first_step_logits(chat, prompt, image, keep=first)
    assert chat.stats.prefilled == n - first
    cos, rel = metrics(first_logits, ref_logits)
    lim = limits(bundle, "end_to_end")
    assert cos >= lim["min_cosine"] and rel <= lim["max_rel_err"], (cos, rel)


def test_bad_images(tiny, bundle, tmp_path):
    chat = Chat(bundle, Engine(bundle, threads=threads()), system_prompt="")
    chat.reset()
    with pytest.raises(GeneratorError, match="uint8 RGB"):
        list(chat.turn("hi", images=[np.zeros((8, 8), np.uint8)]))
    with pytest.raises(GeneratorError, match="one image per turn"):
        list(chat.turn("hi", images=[test_image(), test_image()]))
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"hello")
    with pytest.raises(GeneratorError, match="not a readable image"):
        load_image(bad)
    from PIL import Image

    good = tmp_path / "ok.png"
    Image.fromarray(test_image()).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(GeneratorError, match="not a readable image"):
        load_image(truncated)
    assert load_image(good).shape == (70, 80, 3)


def test_run_script_and_cli_take_an_image(tiny, tmp_path):
    """`python -m generator run --image` and the run script with AXGEN_LOCAL=1 -i: the image goes with the
    first turn; the script passes the board's vision flags (checked against the bundle)."""
    import os
    import subprocess
    import sys

    from PIL import Image

    import tokenizer_fixtures as tf

    b = build(tiny, "s8")
    photo = tmp_path / "photo.png"
    Image.fromarray(test_image(seed=4)).save(photo)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k not in ("AXGEN_LOCAL",)}
    cli = subprocess.run([sys.executable, "-m", "generator", "run", str(b.dir), "--image", str(photo), "--prompt",
                          "What is it?", "--max_new_tokens", "3", "--threads", "1", "--system_prompt", "A bot."], capture_output=True, text=True,
                         env=env, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert re.search(r"input token num : (\d+)", cli.stderr)
    script = next(b.dir.glob("run_*_ax650.sh"))
    text = script.read_text()
    assert "--filename_image_encoder_axmodedl" in text and "vision_part_56.axmodel" in text and "--img_width 56" in text
    proc = subprocess.run([str(script), "-i", str(photo), "--prompt", "What is it?", "--max_new_tokens", "3",
                           "--system_prompt=A bot."],
                          capture_output=True, text=True, timeout=180, cwd=b.dir, start_new_session=True,
                          env={**env, "AXGEN_LOCAL": "1", "AXGEN_PYTHON": sys.executable, "KVCACHE_PATH": "",
                               "TOKENIZER_PORT": str(tf.free_port())})
    assert proc.returncode == 0, proc.stderr
    missing = subprocess.run([sys.executable, "-m", "generator", "run", str(b.dir), "--image", str(tmp_path / "no.png"),
                              "--prompt", "x"], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


@pytest.mark.parametrize("wtype", ["fp32", "s8"])
def test_check_levels_verify_the_vision_part(tiny, wtype):
    """-c 2 on a vision-language bundle: the layer/generate checks plus the vision graph vs the recipe's
    vision.reference (transformers InternVL re-laid out) and the check picture + prompt end to end."""
    model, ckpt, factory = tiny
    out = factory.mktemp(f"vl_checks_{wtype}")
    groups = dict(SMALL_GROUPS, kv_cache_len=255)
    m = quiet_build(input_path=str(ckpt), output_path=str(out), recipe_name="internvl2_qwen2", weight_type=wtype,
                    post_weight_type=wtype, hidden_state_type="fp32", image_size=SIZE, check_level=2, **groups)
    v = m["checks"]["vision"]
    assert m["checks"]["passed"], m["checks"]["failures"]
    assert v["passed"] and v["generate"]["passed"] and v["tokens"] == 4
    assert (out / "report" / "vision_check.json").is_file()
    png = out / "report" / "vision_check.png"  # the per-token plot, as the layer check's
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(v["token_rel_errs"]) == v["tokens"]


def test_committed_vision_rows():
    """docs/conformance.json (the baseline) has internvl2_qwen2/vision at fp32 and s8, all passing."""
    vision_rows.assert_committed(FAMILY)
