"""MiniCPM-V 2.0 whole (SigLIP tower + perceiver resampler + MiniCPM decoder) against references.

A tiny random MiniCPM-V (2 SigLIP layers, 56 px images of 14 px patches: a 4x4 grid; 16 resampler
queries over a 256-wide decoder in 2 heads; a 2-layer MiniCPM) saved in the remote-code `MiniCPMV`
layout the recipe reads (recipes/minicpmv.yaml). The references and their re-layout:

  tower: transformers SiglipVisionModel (no pooling head)
    vpm.patch_embed.proj.*           embeddings.patch_embedding.*
    vpm.pos_embed [1, n, C]          embeddings.position_embedding.weight [n, C]
    vpm.blocks.{i}.attn.qkv.*        concat(encoder.layers.{i}.self_attn.{q,k,v}_proj.*)
    vpm.blocks.{i}.attn.proj.*       ...self_attn.out_proj.*
    vpm.blocks.{i}.norm1 / norm2.*   ...layer_norm1 / layer_norm2.*
    vpm.blocks.{i}.mlp.fc1 / fc2.*   ...mlp.fc1 / fc2.*
    vpm.norm.*                       post_layernorm.*
  resampler: `Resampler` below, MiniCPM-V's forward written with torch.nn.MultiheadAttention, whose
    state dict names are the checkpoint's (resampler.query, pos_embed, kv_proj, ln_q, ln_kv,
    attn.in_proj_weight/bias, attn.out_proj, ln_post, proj); its 2D sin-cos table is written here
    again (numpy), not taken from the generator.
  decoder: transformers LlamaForCausalLM with MiniCPM's scales folded into its weights, as the
    minicpm family test (llm.* is MiniCPM's layout under a prefix).

Built at fp32 and s8 as two graphs (encoder + resampler, the vendor's --vpm_two_stage): each graph and
the pair against the references (also at an interpolated image size), and an image + prompt end to end
through the Chat against the reference pipeline (tower -> resampler -> the <unk> slots' embedding rows
-> the decoder): greedy tokens and first-step logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import vision_rows
from models import SMALL_GROUPS, quiet_build, randomize, threads
from tokenizer_fixtures import _train_tiny_bpe
from vision_models import check_recorded_end_to_end

from generator.contract import Bundle, from_storage
from generator.runtime.chat import Chat
from generator.runtime.engine import Engine
from generator.runtime.vision import VisionEncoder, image_rows
from generator.verify.checks import thresholds
from generator.verify.vision import check_picture

SIZE, PATCH, C, E, Q = 56, 14, 32, 256, 16
SCALES = dict(scale_emb=12, dim_model_base=16, scale_depth=1.4)
FAMILY = "minicpmv"  # conformance rows minicpmv/vision (tests/vision_rows.py)
REFERENCE = ("transformers SiglipVisionModel (re-layout of vpm.*) + MiniCPM-V's resampler over "
             "torch.nn.MultiheadAttention + LlamaForCausalLM with MiniCPM's scales folded")
QUIRKS = ["two graphs: SigLIP encoder + perceiver resampler (--vpm_two_stage)", "fused qkv with bias, post LayerNorm",
          "16 learned queries, 2D sin-cos keys over the 4x4 grid", "<image> <unk> x 16 </image> into a MiniCPM decoder",
          "56 px of 14 px patches"]
TEMPLATE = ("{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
            "{{- '<用户>' + message['content'] | trim + '<AI>' }}{%- elif message['role'] == 'system' %}"
            "{{- message['content'] | trim }}{%- else %}{{- message['content'] | trim + eos_token }}{%- endif %}"
            "{%- endfor %}")


def sincos(dim: int, h: int, w: int) -> np.ndarray:
    """MiniCPM-V's get_2d_sincos_pos_embed: np.meshgrid(w, h) puts the column first."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), 0)
    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)


class Resampler(torch.nn.Module):
    """MiniCPM-V 2.0's Resampler (adaptive), forward as the remote code writes it."""

    def __init__(self, embed_dim: int, kv_dim: int, heads: int, queries: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.query = torch.nn.Parameter(torch.randn(queries, embed_dim, generator=g))
        self.pos_embed = torch.nn.Parameter(torch.from_numpy(sincos(embed_dim, int(queries ** 0.5), int(queries ** 0.5))))
        self.kv_proj = torch.nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = torch.nn.MultiheadAttention(embed_dim, heads)
        self.ln_q, self.ln_kv, self.ln_post = (torch.nn.LayerNorm(embed_dim, eps=1e-6) for _ in range(3))
        self.proj = torch.nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim, generator=g))
        with torch.no_grad():
            for m in (self.ln_q, self.ln_kv, self.ln_post):
                m.weight.copy_(1 + 0.3 * torch.randn(embed_dim, generator=g))
                m.bias.copy_(0.1 * torch.randn(embed_dim, generator=g))
            self.attn.in_proj_bias.copy_(0.1 * torch.randn(3 * embed_dim, generator=g))
            self.attn.out_proj.bias.copy_(0.1 * torch.randn(embed_dim, generator=g))

    def forward(self, x, tgt_size):
        pos = torch.from_numpy(sincos(self.query.shape[1], *tgt_size))
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        n = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, n, 1) + self.pos_embed.unsqueeze(1), x + pos.unsqueeze(1), x)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


def make_tokenizer(target):
    from transformers import PreTrainedTokenizerFast

    backend = _train_tiny_bpe(["<unk>", "<s>", "</s>", "<image>", "</image>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  chat_template=TEMPLATE)
    tok.save_pretrained(target)
    return len(tok)


def checkpoint_layout(tower, resampler, llm) -> dict[str, np.ndarray]:
    sd = {k.removeprefix("vision_model."): v.detach().numpy() for k, v in tower.state_dict().items()}
    out = {"vpm.pos_embed": sd.pop("embeddings.position_embedding.weight")[None],
           "vpm.norm.weight": sd.pop("post_layernorm.weight"), "vpm.norm.bias": sd.pop("post_layernorm.bias")}
    sd.pop("embeddings.position_ids", None)
    for p in ("weight", "bias"):
        out[f"vpm.patch_embed.proj.{p}"] = sd.pop(f"embeddings.patch_embedding.{p}")
        for i in range(tower.config.num_hidden_layers):
            src, dst = f"encoder.layers.{i}.", f"vpm.blocks.{i}."
            out[dst + f"attn.qkv.{p}"] = np.concatenate([sd.pop(src + f"self_attn.{x}_proj.{p}") for x in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[dst + f"{b}.{p}"] = sd.pop(src + f"{a}.{p}")
    assert not sd, sorted(sd)
    out.update({f"resampler.{k}": v.detach().numpy() for k, v in resampler.state_dict().items()})
    out.update({f"llm.{k}": v.numpy() for k, v in llm.state_dict().items() if k != "lm_head.weight"})  # tied
    return out


def scaled_reference(llm, layers: int):
    """MiniCPM == Llama with the scales folded (embedding x scale_emb, rounded to the bundle's bf16 table;
    branch outputs x scale_depth/sqrt(L); lm_head = embedding x dim_model_base/hidden)."""
    import copy

    ref = copy.deepcopy(llm)
    r = SCALES["scale_depth"] / np.sqrt(layers)
    with torch.no_grad():
        emb = llm.model.embed_tokens.weight
        ref.lm_head.weight.copy_(emb * SCALES["dim_model_base"] / E)
        ref.model.embed_tokens.weight.copy_((emb * SCALES["scale_emb"]).to(torch.bfloat16).float())
        for layer in ref.model.layers:
            layer.self_attn.o_proj.weight.mul_(r)
            layer.mlp.down_proj.weight.mul_(r)
    return ref.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    target = tmp_path_factory.mktemp("tiny_minicpmv")
    vocab = make_tokenizer(target)
    vc = SiglipVisionConfig(hidden_size=C, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=SIZE, patch_size=PATCH, layer_norm_eps=1e-6, vision_use_head=False)
    torch.manual_seed(5)
    tower = SiglipVisionModel(vc).eval()
    randomize(tower, 5)
    resampler = Resampler(E, C, E // 128, Q).eval()
    with torch.no_grad():
        resampler.kv_proj.weight.copy_(torch.randn(E, C) / np.sqrt(C))
    L = 2
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=E, intermediate_size=256, num_hidden_layers=L, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False,
                                       max_position_embeddings=256))
    randomize(llm, 6)
    save_file({k: np.ascontiguousarray(v) for k, v in checkpoint_layout(tower, resampler, llm).items()},
              str(target / "model.safetensors"))
    config = {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "hidden_size": E, "intermediate_size": 256,
              "num_hidden_layers": L, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
              **SCALES, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
              "vision_encoder": "vit_so400m_patch14_siglip_384.webli", "query_num": Q, "patch_size": PATCH,
              "drop_vision_last_layer": False, "slice_mode": True, "scale_resolution": SIZE,
              "vision_image_size": SIZE, "vision_hidden_size": C, "vision_num_hidden_layers": 2,
              "vision_num_attention_heads": 4, "vision_intermediate_size": 64,
              "vision_hidden_act": "gelu_pytorch_tanh"}  # the recipe's default is timm's exact gelu
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return tower, resampler, scaled_reference(llm, L), target, tmp_path_factory


def build(tiny, wtype: str, image_size: int = SIZE):
    out = tiny[4].mktemp(f"mcv_{wtype}_{image_size}")
    quiet_build(input_path=str(tiny[3]), output_path=str(out), recipe_name="minicpmv", weight_type=wtype,
                post_weight_type=wtype, hidden_state_type="fp32", image_size=image_size, **SMALL_GROUPS)
    return Bundle(out)


@pytest.fixture(scope="module", params=["fp32", "s8"])
def bundle(request, tiny):
    return build(tiny, request.param)


def metrics(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    a, r = ours.reshape(-1).astype(np.float64), ref.reshape(-1).astype(np.float64)
    return float(a @ r / (np.linalg.norm(a) * np.linalg.norm(r))), float(np.abs(a - r).max() / np.abs(r).max())


def reference_rows(tiny, pixels: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(tower features [g*g, C], resampled rows [Q, E]) of the uint8 [1, H, W, 3] picture."""
    tower, resampler = tiny[0], tiny[1]
    x = torch.from_numpy((pixels[0].astype(np.float32) / 255.0 - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        feats = tower(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        return feats[0].numpy(), resampler(feats, (grid, grid))[0].numpy()


def check_graphs(tiny, b: Bundle, image: np.ndarray, record: bool = False):
    v = b.manifest.vision
    enc = VisionEncoder(b, threads=threads())
    pixels = enc.pixels(image)
    grid = v.image_size // PATCH
    ref_feats, ref_rows = reference_rows(tiny, pixels, grid)
    feats = run_encoder(enc, pixels)
    ours = from_storage(enc.encode(image), b.opts.hidden_state_type)
    assert feats.shape == ref_feats.shape == (grid * grid, C) and ours.shape == ref_rows.shape == (Q, E)
    lim = thresholds(b.opts.weight_type, b.opts.hidden_state_type)["layer"]
    worst = []  # (worst row cosine, max rel err) of the encoder and of the pair
    for name, a, r in (("encoder", feats, ref_feats), ("resampler", ours, ref_rows)):
        worst.append((min(metrics(a[t], r[t])[0] for t in range(a.shape[0])), metrics(a, r)[1]))  # cosine per row
    cos, rel = min(w[0] for w in worst), max(w[1] for w in worst)
    ok = cos >= lim["min_cosine"] and rel <= lim["max_rel_err"]
    grown = vision_rows.record(FAMILY, b.opts.weight_type, "vision", cos, rel, lim, ok, REFERENCE, QUIRKS) \
        if record else None
    assert ok, worst
    assert not grown, grown
    # the resampler graph alone, fed the reference tower's features
    from generator.runtime.ort import run_once

    alone = run_once(enc.resampler, {"input": (ref_feats[None].astype(np.float32), 1)},
                     {"output": ((1, Q, E), np.float32, 1)})["output"][0]
    assert metrics(alone, ref_rows)[0] >= lim["min_cosine"] and metrics(alone, ref_rows)[1] <= lim["max_rel_err"]


def run_encoder(enc: VisionEncoder, pixels: np.ndarray) -> np.ndarray:
    from generator.runtime.ort import run_once

    return run_once(enc.sess, {"image": (pixels, 2)}, {"output": (enc.features, np.float32, 1)})["output"][0]


def test_two_graphs_match_references(tiny, bundle):
    v = bundle.manifest.vision
    assert (v.graph, v.resampler_graph, v.tokens) == ("vision_part_56.onnx", "vpm_resampler_56.onnx", Q)
    assert (bundle.dir / v.resampler_data).is_file()
    ax = json.loads((bundle.dir / bundle.manifest.tokenizer.dir / "ax_tokenizer.json").read_text())
    assert (ax["img_start_token"], ax["img_context_token"], ax["img_end_token"], ax["img_token_num"]) == \
        ("<image>", "<unk>", "</image>", Q)
    check_graphs(tiny, bundle, check_picture(70, 80, seed=1), record=True)


def test_interpolated_image_size(tiny):
    b = build(tiny, "fp32", image_size=84)  # 6x6 patches: the 4x4 position table interpolated (bicubic)
    assert (b.manifest.vision.image_size, b.manifest.vision.tokens) == (84, Q)
    check_graphs(tiny, b, check_picture(70, 80, seed=2))


def test_image_prompt_end_to_end(tiny, bundle):
    chat = Chat(bundle, Engine(bundle, threads=threads()), system_prompt="You are a bot.")
    chat.reset()
    image = check_picture(70, 80, seed=3)
    "".join(chat.turn("What is in the picture?", max_new_tokens=5, images=[image]))
    e, n = chat.engine, chat.stats.prompt_tokens
    prompt, ours = e.cached_ids[:n], e.cached_ids[n:]
    v = bundle.manifest.vision
    first = prompt.index(v.img_context_token_id)
    assert prompt[first - 1] == v.img_start_token_id and prompt[first + Q] == v.img_end_token_id
    assert prompt[first:first + Q] == [v.img_context_token_id] * Q
    _, rows = reference_rows(tiny, chat.vision().pixels(image), SIZE // PATCH)
    model = tiny[2]
    ids, ref_tokens, ref_logits = list(prompt), [], None
    with torch.no_grad():
        for _ in range(5):
            emb = model.model.embed_tokens(torch.tensor([ids])).clone()
            emb[0, first:first + Q] = torch.from_numpy(rows)
            logits = model(inputs_embeds=emb).logits[0, -1].numpy()
            ref_logits = logits if ref_logits is None else ref_logits
            ref_tokens.append(int(logits.argmax()))
            ids.append(ref_tokens[-1])
    lim = thresholds(bundle.opts.weight_type, bundle.opts.hidden_state_type)
    k = min(len(ours), lim["generate"]["min_prefix"])
    e.rewind(0)  # teacher-forced first step
    e.image_rows = image_rows(prompt, [chat.vision().encode(image)], v.img_context_token_id)
    logits: list = []
    list(chat.gen.stream(prompt, 1, logits_out=logits))
    e.image_rows = {}
    cos, rel = metrics(np.asarray(logits[0], np.float32), ref_logits)
    check_recorded_end_to_end(FAMILY, bundle, cos, rel, lim["end_to_end"], ours[:k], ref_tokens[:k], REFERENCE, QUIRKS)


def test_run_script_and_cli_two_stage_flags(tiny, tmp_path):
    """The run script passes the vendor's two-stage flags (--filename_vpm_encoder_axmodedl,
    --filename_vpm_resampler_axmodedl, --vpm_two_stage 1, --vpm_width/--vpm_height), which the local
    runner checks against the bundle; AXGEN_LOCAL=1 -i answers about an image."""
    import os
    import subprocess
    import sys

    from PIL import Image

    import tokenizer_fixtures as tf

    b = build(tiny, "s8")
    photo = tmp_path / "photo.png"
    Image.fromarray(check_picture(70, 80, seed=4)).save(photo)
    script = next(b.dir.glob("run_*_ax650.sh"))
    text = script.read_text()
    assert "--filename_vpm_encoder_axmodedl" in text and "vision_part_56.axmodel" in text
    assert "vpm_resampler_56.axmodel" in text and "--vpm_two_stage 1 --vpm_width 56 --vpm_height 56" in text
    assert "--filename_image_encoder_axmodedl" not in text
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "AXGEN_LOCAL"}
    base = [sys.executable, "-m", "generator", "run", str(b.dir), "--image", str(photo), "--prompt", "What is it?",
            "--max_new_tokens", "3", "--threads", "1", "--system_prompt", "A bot."]
    run = lambda *extra: subprocess.run([*base, *extra], capture_output=True, text=True, env=env, timeout=120)  # noqa: E731
    assert run("--vpm_two_stage", "1", "--vpm_width", "56", "--filename_vpm_resampler_axmodedl",
               str(b.dir / "vpm_resampler_56.axmodel")).returncode == 0
    bad = run("--vpm_width", "448")
    assert bad.returncode != 0 and "built at 56 px" in bad.stderr
    bad = run("--filename_vpm_encoder_axmodedl", str(b.dir / "vpm_resampler_56.axmodel"))
    assert bad.returncode != 0 and "vision_part_56.axmodel" in bad.stderr
    assert "two graphs" in run("--vpm_two_stage", "0").stderr
    proc = subprocess.run([str(script), "-i", str(photo), "--prompt", "What is it?", "--max_new_tokens", "3",
                           "--system_prompt=A bot."],
                          capture_output=True, text=True, timeout=180, cwd=b.dir, start_new_session=True,
                          env={**env, "AXGEN_LOCAL": "1", "AXGEN_PYTHON": sys.executable, "KVCACHE_PATH": "",
                               "TOKENIZER_PORT": str(tf.free_port())})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("wtype", ["fp32", "s8"])
def test_check_levels_verify_the_vision_part(tiny, wtype):
    """-c 2: the layer/generate checks plus both vision graphs vs the reference (SiglipVisionModel re-laid
    out, the resampler over nn.MultiheadAttention: verify/resampler_ref.py) and the check picture + prompt
    end to end."""
    out = tiny[4].mktemp(f"mcv_checks_{wtype}")
    groups = dict(SMALL_GROUPS, kv_cache_len=255)
    m = quiet_build(input_path=str(tiny[3]), output_path=str(out), recipe_name="minicpmv", weight_type=wtype,
                    post_weight_type=wtype, hidden_state_type="fp32", image_size=SIZE, check_level=2, **groups)
    v = m["checks"]["vision"]
    assert m["checks"]["passed"], m["checks"]["failures"]
    assert v["passed"] and v["generate"]["passed"] and v["tokens"] == Q
    assert (out / "report" / "vision_check.json").is_file()
    png = out / "report" / "vision_check.png"  # the per-token plot, as the layer check's
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(v["token_rel_errs"]) == v["tokens"]


def test_real_variant_resolves_and_a_shrunk_one_builds_synthetic(tmp_path, monkeypatch):
    """minicpm-v-2's exact config resolves to SigLIP-400M (27 layers of 1152, 384 px native table) and 64
    queries in 18 heads over 2304; SYNTHETIC=1 of that config with small dimensions (decoder and tower)
    builds both graphs and passes -c 2 against the references (tensors on demand)."""
    import shutil

    import yaml

    from generator.paths import RECIPES_DIR
    from generator.recipe import registry
    from generator.recipe.vision import resolve_vision

    recipe = registry().recipes["minicpmv"]
    config = recipe.variants["minicpm-v-2"].config
    vs = resolve_vision(recipe.vision, config, 2304, 448, "minicpm-v-2")
    assert (vs.num_hidden_layers, vs.hidden_size, vs.native_image_size, vs.grid, vs.tokens, vs.resampler_heads) == \
        (27, 1152, 384, 32, 64, 18)
    assert vs.hidden_act == "gelu" and vs.two_stage and vs.mean == vs.std == [0.5, 0.5, 0.5]
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES_DIR, recipes)
    data = yaml.safe_load((recipes / "minicpmv.yaml").read_text(encoding="utf-8"))
    small = dict(config, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000, query_num=16, vision_hidden_size=32, vision_num_hidden_layers=2,
                 vision_num_attention_heads=4, vision_intermediate_size=64, vision_image_size=56)
    data["variants"]["minicpm-v-tiny"] = {"description": "test", "config": small}
    (recipes / "minicpmv.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    monkeypatch.setenv("AXGEN_RECIPES_DIR", str(recipes))
    monkeypatch.setenv("AXGEN_SYNTHETIC_CACHE", str(tmp_path / "cache"))
    m = quiet_build(model="minicpm-v-tiny", synthetic=True, output_path=str(tmp_path / "b"), check_level=2,
                    image_size=70, **dict(SMALL_GROUPS, kv_cache_len=256))
    assert m["checks"]["passed"], m["checks"]["failures"]
    assert m["vision"]["tokens"] == 16 and m["vision"]["resampler_graph"] == "vpm_resampler_70.onnx"
    assert m["checks"]["vision"]["generate"]["passed"]


def test_serve_answers_an_image_request(tiny):
    """An OpenAI vision request (a data: URL PNG) through serve on the two-stage bundle: the prompt holds
    MiniCPM-V's <image> + <unk> x Q + </image> + newline + text, the answer is the reference pipeline's
    greedy tokens."""
    import base64
    import io
    import threading
    import urllib.request

    from PIL import Image

    from generator.serve.http import ApiServer
    from generator.serve.service import ChatService

    b = build(tiny, "fp32")
    service = ChatService(b.dir, threads=threads(), system_prompt="You are a bot.")
    server = ApiServer(("127.0.0.1", 0), service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        image = check_picture(70, 80, seed=6)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                         {"type": "text", "text": "What is it?"}]}],
                "temperature": 0, "max_tokens": 4}
        request = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions",
                                         json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        server.shutdown()
        server.server_close()
    tokenizer = service.chat.tok.tokenizer
    n = answer["usage"]["prompt_tokens"]
    prompt = service.chat.engine.cached_ids[:n]
    assert "<image>" + "<unk>" * Q + "</image>\nWhat is it?" in tokenizer.decode(prompt)
    v = b.manifest.vision
    first = prompt.index(v.img_context_token_id)
    _, rows = reference_rows(tiny, service.chat.vision().pixels(image), SIZE // PATCH)
    ids, ref = list(prompt), []
    with torch.no_grad():
        for _ in range(answer["usage"]["completion_tokens"]):
            emb = tiny[2].model.embed_tokens(torch.tensor([ids])).clone()
            emb[0, first:first + Q] = torch.from_numpy(rows)
            ref.append(int(tiny[2](inputs_embeds=emb).logits[0, -1].argmax()))
            ids.append(ref[-1])
    eos = set(service.chat.gen.eos)
    assert answer["choices"][0]["message"]["content"] == tokenizer.decode([t for t in ref if t not in eos])


def test_committed_vision_rows():
    """docs/conformance.json (the baseline) has minicpmv/vision at fp32 and s8, all passing."""
    vision_rows.assert_committed(FAMILY)
