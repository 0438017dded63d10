"""Checks of a bundle's vision part against transformers (Pulsar2 check levels, extended).

-c 1: the vision graph on the check picture vs the reference's vision tower + projector
      (`get_image_features`): cosine per image token (the worst is reported) and max relative error.
-c 2: the check picture + the image check prompt end to end through the local runner (the image rows
      overwrite the image-context embeddings before prefill, as the board does) vs the reference's
      greedy tokens, and the teacher-forced agreement of every step.

The reference is the recipe's `vision.reference`: a transformers class for the whole model with the
checkpoint's tensors re-laid out (generator/verify/relayout.py), never the generator's own conversion.
The check picture is made by code (`check_picture`): gradients, a disc and noise.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..contract import Bundle, from_storage
from ..errors import GeneratorError
from ..export.bundle import dest, write_text
from ..runtime.chat import Chat, load_tokenizer_module
from ..runtime.engine import Engine
from ..runtime.mrope import prefill_with_images
from ..runtime.vision import VisionEncoder, image_rows, preprocess
from .relayout import _build, _eval, _is_expr, fill_model
from .report import vision_plot

CHECK_IMAGE_PROMPT = "Describe the image."
GENERATE_TOKENS = 16


def check_picture(height: int = 300, width: int = 400, seed: int = 0) -> np.ndarray:
    """The default check image, uint8 RGB [H, W, 3], made by code (no file, no licence)."""
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2) * 200.0
    img = np.stack([x * 255 / width, y * 255 / height, disc], -1)
    img += np.random.default_rng(seed).normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _config_value(value, env: dict, llm: dict, where: str):
    if _is_expr(value):
        return _eval(value["expr"], env, where)
    if value == "*":
        return llm
    if isinstance(value, dict):  # {"*": "*", key: value}: the language model's section with keys overridden
        base = dict(llm) if value.get("*") == "*" else {}
        return {**base, **{k: _config_value(v, env, llm, f"{where}.{k}") for k, v in value.items() if k != "*"}}
    return value


def vision_reference(ckpt, recipe, bundle: Bundle):
    """The recipe's vision.reference class with the checkpoint's tensors re-laid out, fp32 eager, with
    the contract's bf16 embedding table (what the board reads)."""
    import torch
    import transformers

    ref = recipe.vision.reference if recipe.vision else None
    if ref is None:
        raise GeneratorError(f"Recipe '{recipe.name}' has no vision.reference: the vision part cannot be verified.")
    cls = getattr(transformers, ref.architecture, None)
    if cls is None:
        raise GeneratorError(f"Recipe '{recipe.name}': transformers {transformers.__version__} has no "
                             f"'{ref.architecture}' (vision.reference.architecture).")
    vspec = bundle.manifest.vision.spec
    env = {k: v for k, v in ckpt.config.items() if not isinstance(v, (dict, list))}
    env.update(vspec)
    section = ckpt.config.get(recipe.config.section) if recipe.config.section else ckpt.config
    llm = {k: v for k, v in section.items() if k not in ("auto_map", "architectures")}
    env.update({f"llm_{k}": v for k, v in llm.items() if not isinstance(v, (dict, list))})  # llm_num_key_value_heads
    where = f"Recipe '{recipe.name}' vision.reference"
    kwargs = {k: _config_value(v, env, llm, f"{where}.config.{k}") for k, v in ref.config.items()}
    if ref.checkpoint_config:  # transformers' own layout: the checkpoint's config.json as is
        kwargs = {**{k: v for k, v in ckpt.config.items() if k not in ("auto_map", "architectures")}, **kwargs}
    try:
        config = cls.config_class(**kwargs)
    except Exception as exc:
        raise GeneratorError(f"{where}: the config does not make a {cls.config_class.__name__} ({exc}).") from exc
    table = {}
    for key, src in ref.tensors.items():
        for i in range(max(int(vspec["num_hidden_layers"]), int(llm.get("num_hidden_layers", 0))) if "{i}" in key else 1):
            table[key.format(i=i)] = src.replace("{i}", str(i))

    def mapping(key: str) -> str | None:
        if key in table:
            return table[key]
        for prefix, to in ref.prefixes.items():
            if key.startswith(prefix):
                return to + key[len(prefix):]
        return None

    if recipe.vision.resampler is not None:  # MiniCPM-V: tower + resampler + decoder (verify/resampler_ref.py)
        from .resampler_ref import resampler_reference

        return resampler_reference(_build(cls, config), ckpt, recipe, bundle, mapping, env, where)
    model = fill_model(_build(cls, config), ckpt.torch_tensor, mapping, env, where, ckpt.has)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(emb.to(torch.bfloat16).to(torch.float32))
    return model


def pixel_values(pixels: np.ndarray, bundle: Bundle):
    """The reference's input: the same resized uint8 picture, normalised as the processor does."""
    import torch

    v = bundle.manifest.vision
    x = (pixels[0].astype(np.float32) / 255.0 - np.asarray(v.mean, np.float32)) / np.asarray(v.std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def processor_inputs(pixels: np.ndarray, processor: str) -> dict:
    """The named transformers image processor's pixel_values and image_grid_thw for the picture."""
    import transformers

    cls = getattr(transformers, processor, None) or getattr(transformers, f"{processor}Pil", None)
    if cls is None:
        raise GeneratorError(f"transformers {transformers.__version__} has no image processor '{processor}' "
                             f"(vision.reference.image_processor).")
    out = cls()(images=[pixels[0]], return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def reference_features(model, pv) -> np.ndarray:
    import torch

    with torch.no_grad():
        if isinstance(pv, dict):  # the processor's patches and grid
            out = model.model.get_image_features(**pv)
        else:
            out = model.model.get_image_features(pixel_values=pv, vision_feature_layer=-1,
                                                 vision_feature_select_strategy="default")
    return out.pooler_output[0].float().numpy()


def reference_greedy(model, ids: list[int], feats: np.ndarray, context_id: int, steps: int, eos: set[int],
                     inputs: dict | None = None):
    """Greedy tokens of the reference with the image features at the prompt's image-context rows
    (`inputs`: the processor's pixel_values + image_grid_thw, the reference run on input_ids)."""
    import torch

    where = [i for i, t in enumerate(ids) if t == context_id][-len(feats):]
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            if inputs is not None:
                t = torch.tensor([ids])
                tok = int(model(input_ids=t, mm_token_type_ids=(t == context_id).int(), use_cache=False,
                                **inputs).logits[0, -1].argmax())
                out.append(tok)
                ids.append(tok)
                if tok in eos:
                    break
                continue
            emb = model.get_input_embeddings()(torch.tensor([ids])).clone()
            emb[0, where] = torch.from_numpy(feats)
            tok = int(model(inputs_embeds=emb).logits[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
            if tok in eos:
                break
    return out


def top_token(logits) -> int:
    """The argmax token of one step's logits (full logits, or the post graph's top-k values and ids)."""
    if isinstance(logits, tuple):
        values, ids = (np.asarray(x).reshape(-1) for x in logits)
        return int(ids[int(np.argmax(values))])
    return int(np.argmax(logits))


def vision_reference_outputs(bundle: Bundle, ckpt, recipe, level: int) -> dict[str, Any]:
    """Everything the vision checks compare with, from the reference alone, which is released on return
    (before the bundle's sessions open): the check picture's image features and, for -c 2, the image
    prompt's ids and the reference's greedy tokens."""
    v = bundle.manifest.vision
    model = vision_reference(ckpt, recipe, bundle)
    picture = check_picture()
    pixels = preprocess(picture, v.image_size, v.resize)  # what VisionEncoder.pixels feeds the graph
    proc = recipe.vision.reference.image_processor
    inputs = processor_inputs(pixels, proc) if proc else None
    out: dict[str, Any] = {"picture": picture,
                           "feats": reference_features(model, inputs if proc else pixel_values(pixels, bundle))}
    if level >= 2:
        mod = load_tokenizer_module(bundle)
        chat_tokenizer = mod.ChatTokenizer(bundle.tokenizer_dir)
        session = mod.ChatSession(chat_tokenizer)
        session.reset(bundle.system_prompt)  # as Chat.reset
        ids = list(session.encode(CHECK_IMAGE_PROMPT, img_prompt=True)[0])
        eos = set(list(chat_tokenizer.eos_ids) or bundle.spec.eos_token_ids)  # Chat's generator's EOS ids
        out["ids"] = ids
        out["ref_tokens"] = reference_greedy(model, ids, out["feats"], v.img_context_token_id, GENERATE_TOKENS, eos,
                                             inputs)
    return out


def vision_checks(bundle: Bundle, recipe, level: int, limits: dict, report_dir, console, ref: dict[str, Any],
                  threads: int = 2) -> tuple[dict[str, Any], list[str]]:
    """Levels 1 (and 2) for the vision part against `ref` (vision_reference_outputs'); returns (summary
    entry, failures)."""
    from .checks import compare, graph_weight_types, limits_for

    v = bundle.manifest.vision
    lim = limits_for(graph_weight_types(bundle.dir / v.graph), bundle.opts.hidden_state_type)["layer"]
    enc = VisionEncoder(bundle, threads=threads)
    feats = ref["feats"]
    emb = enc.encode(ref["picture"])
    ours = from_storage(emb, bundle.opts.hidden_state_type)
    per_token = [compare(ours[t], feats[t])["cosine"] for t in range(len(ours))]
    whole = compare(ours, feats)
    res: dict[str, Any] = {"image_size": v.image_size, "tokens": v.tokens, "min_token_cosine": min(per_token),
                           "cosine": whole["cosine"], "max_rel_err": whole["max_rel_err"], "limit": lim,
                           "token_cosines": per_token,
                           "token_rel_errs": [float(np.abs(ours[t] - feats[t]).max() / np.abs(feats).max())
                                              for t in range(len(ours))]}
    failures = []
    res["passed"] = min(per_token) >= lim["min_cosine"] and whole["max_rel_err"] <= lim["max_rel_err"]
    console.print(f"vision part ({v.image_size}px, {v.tokens} tokens): worst token cosine {min(per_token):.6f}, "
                  f"rel err {whole['max_rel_err']:.2e} (limits {lim['min_cosine']}, {lim['max_rel_err']})",
                  highlight=False)
    if not res["passed"]:
        failures.append(f"vision check: worst token cosine {min(per_token):.6f}, rel err {whole['max_rel_err']:.2e}")
    if level >= 2:
        chat = Chat(bundle, Engine(bundle, threads=threads))
        chat.reset()
        ids, ref_tokens = ref["ids"], ref["ref_tokens"]
        rows = image_rows(ids, [emb], v.img_context_token_id)
        chat.engine.image_rows = rows
        try:
            prefill_with_images(chat.engine, ids, v)  # mRoPE bundles: the image's positions
            mine = list(chat.gen.stream(ids, len(ref_tokens)))
            chat.engine.rewind(len(chat.system_ids))
            prefill_with_images(chat.engine, ids, v)
            logits: list = []
            list(chat.gen.stream(ids, len(ref_tokens), forced=ref_tokens, logits_out=logits))
        finally:
            chat.engine.image_rows = {}
        agree = float(np.mean([top_token(lg) == t for lg, t in zip(logits, ref_tokens)])) if ref_tokens else 1.0
        prefix = next((i for i, (a, b) in enumerate(zip(mine, ref_tokens)) if a != b), min(len(mine), len(ref_tokens)))
        lg = limits["generate"]
        need = min(int(lg["min_prefix"]), len(ref_tokens))
        gen = {"prompt": CHECK_IMAGE_PROMPT, "ours_text": chat.tok.decode(mine), "reference_text": chat.tok.decode(ref_tokens),
               "matching_prefix": prefix, "teacher_forced_agreement": agree,
               "passed": prefix >= need and agree >= lg["min_agreement"]}
        res["generate"] = gen
        console.print(f"[bold]<image> {CHECK_IMAGE_PROMPT}[/bold] -> ours: {gen['ours_text']!r}; transformers: "
                      f"{gen['reference_text']!r}; matching prefix {prefix}/{len(ref_tokens)}, agreement {agree:.2f}")
        if not gen["passed"]:
            failures.append(f"image generate check: {prefix} matching tokens (need {need}), agreement {agree:.2f}")
    write_text(dest(report_dir, "vision_check.json"), json.dumps(res, indent=1, ensure_ascii=False))
    vision_plot(res, dest(report_dir, "vision_check.png"), f"{bundle.model}: vision check, {v.image_size} px, {v.weight_type} "
                f"weights, {bundle.opts.hidden_state_type} hidden states, vs {recipe.vision.reference.architecture}")
    return res, failures
