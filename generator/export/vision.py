"""The vision graph: one generic ViT + pixel shuffle + MLP projector for every vision-language recipe.

It reads only the resolved `VisionSpec` (generator/recipe/vision.py). Input: uint8 NHWC `[1, H, W, 3]`
RGB at the build's --image_size (the board resizes and feeds uint8; contract section 9), the
processor's mean/std normalisation inside the graph. Output `[1, n_img_tokens, llm_hidden]` in the
hidden-state type, one row per image-context token. Standard ONNX ops only (opset 21).

Weight algebra happens at conversion time, as for the decoder block: the attention scale is folded
into the q part of qkv (into q_norm when there is one), the layer scales (InternViT's ls1/ls2) into
o_proj and fc2, and the position table is interpolated (bicubic, align_corners=False, as the
reference) to the chosen image size once, here. Linears take the build's weight type; the patch
embedding, the tables and the norms stay fp32.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..errors import GeneratorError
from ..recipe.vision import VisionRecipe, VisionSpec, vision_tensor_names
from .graphs import activation, from_f32, linear, norm, store_linear, store_vector
from .onnx_graph import DTYPES, Graph, WeightsFile
from . import vision_blocks as vb


class _Norm:  # what graphs.norm reads from a NormSpec
    def __init__(self, kind: str, eps: float):
        self.kind, self.eps = kind, eps


def read_vision_weights(ckpt, vrecipe: VisionRecipe, vspec: VisionSpec) -> dict[str, np.ndarray]:
    """Canonical vision tensors (fp32 numpy) from the checkpoint, by the recipe's map; qkv cut
    into q/k/v when the checkpoint stores one tensor."""
    out = {}
    for key, name in vision_tensor_names(vrecipe, vspec).items():
        if not ckpt.has(name):
            raise GeneratorError(f"Checkpoint '{ckpt.source}' lacks tensor '{name}' (vision {key}), which the "
                                 f"recipe's vision.tensors maps there; the checkpoint does not match the recipe.")
        t = ckpt.torch_tensor(name)
        if not t.is_floating_point():
            raise GeneratorError(f"Checkpoint '{ckpt.source}': vision tensor '{name}' is not floating point.")
        arr = t.float().numpy()
        if arr.size and not np.isfinite(arr).all():
            raise GeneratorError(f"Checkpoint '{ckpt.source}': vision tensor '{name}' holds NaN or infinite values.")
        out[key] = arr
    c = vspec.hidden_size
    for i in range(vspec.num_hidden_layers):
        for p in ("weight", "bias"):
            fused = out.pop(f"layers.{i}.qkv.{p}", None)
            if fused is not None:
                if fused.shape[0] != 3 * c:
                    raise GeneratorError(f"vision layer {i} qkv.{p} has {fused.shape[0]} rows; expected 3 x {c}.")
                for part, piece in zip(("q_proj", "k_proj", "v_proj"), np.split(fused, 3, axis=0)):
                    out[f"layers.{i}.{part}.{p}"] = piece
    out["patch_embed.weight"] = vb.fold_frames(out["patch_embed.weight"], vspec)
    shape = out["patch_embed.weight"].shape
    if shape != (c, 3, vspec.patch_size, vspec.patch_size):
        raise GeneratorError(f"vision patch embedding has shape {list(shape)}; the config says "
                             f"[{c}, 3, {vspec.patch_size}, {vspec.patch_size}].")
    return out


def interpolate_positions(pos: np.ndarray, vspec: VisionSpec) -> np.ndarray:
    """[1, cls + n*n, C] -> [1, cls + g*g, C] for the build's grid g (bicubic, as the reference)."""
    import torch

    cls = 1 if vspec.cls_token else 0
    table = pos.reshape(-1, pos.shape[-1])
    n = int(round((table.shape[0] - cls) ** 0.5))
    if n * n + cls != table.shape[0]:
        raise GeneratorError(f"vision position table has {table.shape[0]} rows: not a square grid (+ class row).")
    g = vspec.grid
    if g == n:
        return table[None]
    grid = torch.from_numpy(np.ascontiguousarray(table[cls:])).reshape(1, n, n, -1).permute(0, 3, 1, 2)
    new = torch.nn.functional.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    new = new.permute(0, 2, 3, 1).reshape(g * g, -1).numpy()
    return np.concatenate([table[:cls], new], axis=0)[None].astype(np.float32)


def store_vision(wf: WeightsFile, vspec: VisionSpec, w: dict[str, np.ndarray], wtype: str, group: int,
                 resampler_wf: WeightsFile | None = None):
    """Write the vision weights (with the conversion-time rewrites); returns (initializers, refs). A
    resampler's weights go to `resampler_wf` when it is a graph of its own (refs["resampler_inits"])."""
    inits: list[TensorProto] = []
    refs: dict[str, object] = {}
    f32 = lambda name, a: inits.append(wf.tensor(name, np.ascontiguousarray(a, np.float32).tobytes(),  # noqa: E731
                                                 TensorProto.FLOAT, list(np.shape(a)))) or name
    refs["patch_w"] = f32("patch_embed.weight", w["patch_embed.weight"])
    refs["patch_b"] = f32("patch_embed.bias", w["patch_embed.bias"]) if vspec.patch_bias else ""
    if "pos_embed" in w:
        pos = interpolate_positions(w["pos_embed"], vspec)
        if vspec.cls_token:  # the class token with its position row: one constant row in front
            refs["cls"] = f32("cls_token", w["cls_token"].reshape(1, 1, -1) + pos[:, :1])
            pos = pos[:, 1:]
        refs["pos"] = f32("pos_embed", pos)
    if vspec.position_kind == "rope_2d":
        refs["rope"] = tuple(f32(n, t) for n, t in zip(("rope.cos", "rope.sin"), vb.rope_2d_tables(vspec)))
    mask = vb.window_mask(vspec)
    if mask is not None:
        refs["window_mask"] = f32("window_mask", mask)
    vec = lambda name, key: store_vector(wf, inits, name, w[key]) if key in w else None  # noqa: E731
    d = vspec.hidden_size // vspec.num_attention_heads
    scale = np.float32(d ** -0.5)
    for i in range(vspec.num_hidden_layers):
        L = f"layers.{i}."
        q_w, q_b = w[L + "q_proj.weight"], w.get(L + "q_proj.bias")
        if vspec.qk_norm:
            w[L + "q_norm.weight"] = w[L + "q_norm.weight"] * scale
            if L + "q_norm.bias" in w:
                w[L + "q_norm.bias"] = w[L + "q_norm.bias"] * scale
        else:
            q_w, q_b = q_w * scale, (q_b * scale if q_b is not None else None)
        qkv_w = np.concatenate([q_w, w[L + "k_proj.weight"], w[L + "v_proj.weight"]], axis=0)
        qkv_b = np.concatenate([q_b, w[L + "k_proj.bias"], w[L + "v_proj.bias"]]) if vspec.qkv_bias else None
        o_w, o_b, f2_w, f2_b = w[L + "o_proj.weight"], w.get(L + "o_proj.bias"), w[L + "fc2.weight"], w.get(L + "fc2.bias")
        if vspec.layer_scale:  # ls * (W x + b) = (ls[:, None] W) x + ls b
            ls1, ls2 = w[L + "ls1"].reshape(-1, 1), w[L + "ls2"].reshape(-1, 1)
            o_w, f2_w = o_w * ls1, f2_w * ls2
            o_b = o_b * ls1[:, 0] if o_b is not None else None
            f2_b = f2_b * ls2[:, 0] if f2_b is not None else None
        refs[i] = {
            "qkv": store_linear(wf, inits, L + "qkv", qkv_w, qkv_b, wtype, group),
            "o_proj": store_linear(wf, inits, L + "o_proj", o_w, o_b, wtype, group),
            **({"fc1": store_linear(wf, inits, L + "fc1", w[L + "fc1.weight"], w.get(L + "fc1.bias"), wtype, group)}
               if vspec.mlp_kind == "plain" else
               {k: store_linear(wf, inits, L + k, w[L + f"{k}.weight"], w.get(L + f"{k}.bias"), wtype, group)
                for k in ("gate_proj", "up_proj")}),
            "fc2": store_linear(wf, inits, L + "fc2", f2_w, f2_b, wtype, group),
            "norm1": (vec(L + "norm1.weight", L + "norm1.weight"), vec(L + "norm1.bias", L + "norm1.bias")),
            "norm2": (vec(L + "norm2.weight", L + "norm2.weight"), vec(L + "norm2.bias", L + "norm2.bias")),
        }
        if vspec.qk_norm:
            for k in ("q_norm", "k_norm"):
                refs[i][k] = (vec(L + f"{k}.weight", L + f"{k}.weight"), vec(L + f"{k}.bias", L + f"{k}.bias"))
    if vspec.final_norm:
        refs["post_norm"] = (vec("post_norm.weight", "post_norm.weight"), vec("post_norm.bias", "post_norm.bias"))
    if vspec.projector_norm:
        refs["proj_norm"] = (vec("projector.norm.weight", "projector.norm.weight"),
                             vec("projector.norm.bias", "projector.norm.bias"))
    if vspec.resampler_queries:  # generator/export/resampler.py
        from .resampler import store_resampler

        r_inits = inits if resampler_wf is None else []
        refs["resampler"] = store_resampler(resampler_wf or wf, r_inits, vspec, w, wtype, group)
        refs["resampler_inits"] = r_inits
        return inits, refs
    for k in ("fc1", "fc2"):
        refs[f"proj_{k}"] = store_linear(wf, inits, f"projector.{k}", w[f"projector.{k}.weight"],
                                         w[f"projector.{k}.bias"], wtype, group)
    if refs["proj_fc2"].n != vspec.llm_hidden_size:
        raise GeneratorError(f"the vision projector outputs {refs['proj_fc2'].n} features; the language model's "
                             f"hidden size is {vspec.llm_hidden_size}.")
    return inits, refs


def _act(g: Graph, x: str, kind: str) -> str:
    if kind == "quick_gelu":
        return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, g.const(1.702))))
    return activation(g, x, kind)


def vision_graph(vspec: VisionSpec, hidden_type: str, refs: dict, inits: list, name: str = "vision",
                 stage: str = "whole"):
    """stage "whole": image -> image embeddings; "encoder": image -> the tower's features [1, g*g, C]
    (the first of two graphs; resampler_graph is the second)."""
    dt = DTYPES[hidden_type]
    size, p, c = vspec.image_size, vspec.patch_size, vspec.hidden_size
    heads, grid = vspec.num_attention_heads, vspec.grid
    d = c // heads
    g = Graph(name)
    img = g.input("image", TensorProto.UINT8, [1, size, size, 3])
    x = g.op("Cast", img, to=TensorProto.FLOAT)
    mean = np.asarray(vspec.mean, np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(vspec.std, np.float32) * 255.0)
    x = g.op("Mul", g.op("Sub", x, g.const(mean)), g.const(inv_std))  # (x / 255 - mean) / std
    x = g.op("Transpose", x, perm=[0, 3, 1, 2])
    x = g.op("Conv", *([x, refs["patch_w"], refs["patch_b"]] if refs["patch_b"] else [x, refs["patch_w"]]),
             kernel_shape=[p, p], strides=[p, p])
    x = vb.tokens_of(g, x, vspec)  # [1, g*g, C]
    if "pos" in refs:
        x = g.op("Add", x, refs["pos"])
    if vspec.cls_token:
        x = g.op("Concat", refs["cls"], x, axis=1)
    vnorm = _Norm(vspec.norm_kind, vspec.norm_eps)
    for i in range(vspec.num_hidden_layers):
        r = refs[i]
        h = norm(g, x, vnorm, r["norm1"])
        q, k, v = g.op("Split", linear(g, h, r["qkv"]), g.ints(c, c, c), axis=-1, n_out=3)
        if vspec.qk_norm:
            q, k = norm(g, q, vnorm, r["q_norm"]), norm(g, k, vnorm, r["k_norm"])
        if "rope" in refs:
            q, k = (vb.apply_rope(g, t, heads, d, *refs["rope"]) for t in (q, k))
        heads_of = lambda t, perm: g.op("Transpose", g.op("Reshape", t, g.ints(-1, heads, d)), perm=perm)  # noqa: E731
        scores = g.op("MatMul", heads_of(q, [1, 0, 2]), heads_of(k, [1, 2, 0]))  # [heads, T, T]
        if "window_mask" in refs and vb.uses_window(vspec, i):
            scores = g.op("Add", scores, refs["window_mask"])
        ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), heads_of(v, [1, 0, 2]))  # [heads, T, d]
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[1, 0, 2]), g.ints(1, -1, c))
        x = g.op("Add", x, linear(g, ctx, r["o_proj"]))  # the layer scales are folded into o_proj / fc2
        h = norm(g, x, vnorm, r["norm2"])
        if vspec.mlp_kind == "gated":  # act(gate) * up
            h = g.op("Mul", _act(g, linear(g, h, r["gate_proj"]), vspec.hidden_act), linear(g, h, r["up_proj"]))
        else:
            h = _act(g, linear(g, h, r["fc1"]), vspec.hidden_act)
        m = linear(g, h, r["fc2"])
        x = g.op("Add", x, m)
    if vspec.final_norm:
        x = norm(g, x, vnorm, refs["post_norm"])
    if vspec.cls_token and vspec.drop_cls:
        x = g.op("Slice", x, g.ints(1), g.ints(1 + grid * grid), g.ints(1))
    if stage == "encoder":
        g.output(from_f32(g, x, dt), "output", dt, [1, grid * grid, c])
        return g.model(inits, f"vision encoder at {size}x{size}: {vspec.num_hidden_layers} ViT layers, "
                              f"{grid * grid} features of {c}")
    if vspec.resampler_queries:
        from .resampler import resampler_block

        return _image_rows(g, resampler_block(g, x, vspec, refs["resampler"]), vspec, dt, inits)
    s = int(round(1 / vspec.downsample))
    pnorm = _Norm(vspec.projector_norm_kind, vspec.projector_norm_eps)
    if vspec.projector_norm and vspec.projector_norm_first:
        x = norm(g, x, pnorm, refs["proj_norm"])
    if vspec.merge_kind == "blocks":
        x = vb.merge_blocks(g, x, vspec)
    elif s > 1:  # pixel shuffle (InternVL's, ps_version v2): [g, g, C] -> [g/s, g/s, C s^2]
        x = g.op("Reshape", x, g.ints(1, grid, grid // s, c * s))
        x = g.op("Transpose", x, perm=[0, 2, 1, 3])
        x = g.op("Reshape", x, g.ints(1, grid // s, grid // s, c * s * s))
        x = g.op("Transpose", x, perm=[0, 2, 1, 3])
        x = g.op("Reshape", x, g.ints(1, -1, c * s * s))
    if vspec.projector_norm and not vspec.projector_norm_first:
        x = norm(g, x, pnorm, refs["proj_norm"])
    x = linear(g, _act(g, linear(g, x, refs["proj_fc1"]), vspec.projector_act), refs["proj_fc2"])
    return _image_rows(g, x, vspec, dt, inits)


def _image_rows(g: Graph, x: str, vspec: VisionSpec, dt: int, inits: list):
    g.output(from_f32(g, x, dt), "output", dt, [1, vspec.tokens, vspec.llm_hidden_size])
    doc = (f"vision part at {vspec.image_size}x{vspec.image_size}: {vspec.num_hidden_layers} ViT layers, "
           f"{vspec.tokens} image tokens of {vspec.llm_hidden_size}")
    return g.model(inits, doc)


def resampler_graph(vspec: VisionSpec, hidden_type: str, refs: dict, name: str = "resampler"):
    """The second stage of a two-stage vision part: the tower's features [1, g*g, C] -> image rows."""
    from .graphs import to_f32
    from .resampler import resampler_block

    dt = DTYPES[hidden_type]
    g = Graph(name)
    x = to_f32(g, g.input("input", dt, [1, vspec.grid ** 2, vspec.hidden_size]), dt)
    return _image_rows(g, resampler_block(g, x, vspec, refs["resampler"]), vspec, dt, refs["resampler_inits"])


# -- the bundle's vision part ---------------------------------------------------------------------

def write_vision(ctx, tmp, progress, image_size: int | None) -> dict | None:
    """Build the vision graph into `tmp` when the recipe has a vision part and the checkpoint its config
    section; returns the facts the manifest and the tokenizer record (None: a text-only bundle)."""
    import onnx

    from ..contract import resampler_stem, vision_stem
    from ..names import inside
    from ..recipe.vision import resolve_vision, vision_section

    v = ctx.recipe.vision
    if v is None or vision_section(v, ctx.ckpt.config) is None:
        if image_size:
            raise GeneratorError(f"--image_size {image_size}: this model has no vision part (recipe "
                                 f"'{ctx.recipe.name}', config.json without '{v.section if v else 'vision_config'}').")
        return None
    vspec = resolve_vision(v, ctx.ckpt.config, ctx.spec.hidden_size, image_size, ctx.recipe.source)
    stem = vision_stem(vspec.image_size)
    with progress.task(f"building vision part ({vspec.image_size}px, {vspec.tokens} image tokens)", 1) as step:
        w = read_vision_weights(ctx.ckpt, v, vspec)
        wf = WeightsFile(inside(tmp, tmp / f"{stem}.data", "bundle file"))
        rstem = resampler_stem(vspec.image_size)
        rwf = WeightsFile(inside(tmp, tmp / f"{rstem}.data", "bundle file")) if vspec.two_stage else None
        inits, refs = store_vision(wf, vspec, w, ctx.opts.vision_weight_type, ctx.opts.group_size, rwf)
        wf.close()
        stage = "encoder" if vspec.two_stage else "whole"
        onnx.save_model(vision_graph(vspec, ctx.opts.hidden_state_type, refs, inits, f"{ctx.spec.model_type}_vision",
                                     stage), inside(tmp, tmp / f"{stem}.onnx", "bundle file"))
        two = {}
        if rwf is not None:
            rwf.close()
            onnx.save_model(resampler_graph(vspec, ctx.opts.hidden_state_type, refs, f"{ctx.spec.model_type}_resampler"),
                            inside(tmp, tmp / f"{rstem}.onnx", "bundle file"))
            two = {"resampler_graph": f"{rstem}.onnx", "resampler_data": f"{rstem}.data"}
        step()
    from ..recipe.vision import image_token_texts

    texts = image_token_texts(v, ctx.ckpt.config, ctx.ckpt.dir, ctx.recipe.source)
    return {**two, "graph": f"{stem}.onnx", "data": f"{stem}.data", "image_size": vspec.image_size, "tokens": vspec.tokens,
            "weight_type": ctx.opts.vision_weight_type, **texts,
            "img_text_separator": v.img_text_separator,
            "resize": vspec.resize, "mean": vspec.mean, "std": vspec.std, "spec": vspec.model_dump()}


def token_id(tok_dir, text: str | None) -> int | None:
    if text is None:
        return None
    from tokenizers import Tokenizer

    path = tok_dir / "tokenizer.json"
    found = Tokenizer.from_file(str(path)).token_to_id(text) if path.is_file() else None
    if found is None:
        raise GeneratorError(f"the tokenizer ({tok_dir}) has no token '{text}', which the recipe's vision part "
                             f"names as an image token.")
    return int(found)


def vision_entry(vision: dict, tok_dir) -> dict:
    """The manifest's `vision` entry (generator/contract.py VisionEntry), image token ids resolved."""
    out = {k: vision[k] for k in ("graph", "data", "image_size", "tokens", "weight_type", "resize", "mean", "std", "spec")}
    out.update({k: vision[k] for k in ("resampler_graph", "resampler_data") if k in vision})  # two-stage only
    spec = vision["spec"]
    if spec.get("merge_kind") == "blocks":  # the image grid for mRoPE positions (Qwen2.5-VL)
        grid = spec["image_size"] // spec["patch_size"]
        out.update(patch_size=spec["patch_size"], spatial_merge_size=int(round(1 / spec["downsample"])),
                   temporal_patch_size=spec["temporal_patch_size"], image_grid=[1, grid, grid])
    for key in ("img_start_token", "img_context_token", "img_end_token"):
        out[f"{key}_id"] = token_id(tok_dir, vision[key])
    return out
