"""Command line: `python -m generator {build,list,run,verify,serve,bench,accuracy,predict}`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from rich.console import Console

from ..errors import GeneratorError
from ..interrupt import Terminated
from ..recipe import BuildDefaults, HiddenType, WeightType
from .types import int_at_least

WEIGHT_TYPES, HIDDEN_TYPES = get_args(WeightType), get_args(HiddenType)


def add_build_args(p: argparse.ArgumentParser):
    d = BuildDefaults()
    recipe = lambda value: f"(default: from the recipe/variant; {value} where it sets none)"  # noqa: E731
    p.add_argument("model", nargs="?", help="model variant, a make target (see `list`) (default: none; with "
                   "--input_path the recipe is detected from the checkpoint)")
    p.add_argument("--input_path", help="HF model directory, GPTQ directory or .gguf file (default: the variant's "
                   "embedded weights, if it has any)")
    p.add_argument("--output_path", help="bundle folder, replaced as a whole (default: out/<model>_<chip>)")
    p.add_argument("--chip", default="AX650", help="AX650, or AX630C / AX620E; file names use the name as typed "
                   "(default: %(default)s)")
    p.add_argument("-w", "--weight_type", choices=(*WEIGHT_TYPES, "auto"), help=f"layer weight type; auto: per layer "
                   f"s4 or s8, the smallest within --kld_budget on the calibration text {recipe(d.weight_type)}")
    p.add_argument("--override", action="append", metavar="PATTERN=TYPE", help="weight type of the weights whose "
                   "names match PATTERN (fnmatch on layers.<i>.qkv_proj / o_proj / gate_up_proj / down_proj, lm_head), "
                   "e.g. 'layers.0.*=s8'; repeatable, first match wins, over the recipe's overrides (default: none)")
    p.add_argument("--kld_budget", type=float, help="with -w auto: the largest mean KL divergence vs fp32 on the "
                   "calibration text the chosen mix may have, e.g. 0.05 (default: none)")
    p.add_argument("-t", "--hidden_state_type", choices=HIDDEN_TYPES,
                   help=f"type at the graph boundaries {recipe(d.hidden_state_type)}")
    p.add_argument("--prefill_len", type=int, help=f"tokens per prefill chunk {recipe(d.prefill_len)}")
    p.add_argument("--kv_cache_len", type=int, help=f"KV cache rows {recipe(d.kv_cache_len)}")
    p.add_argument("--last_kv_cache_len", type=int, nargs="+", action="extend",
                   help="history lengths of the prefill groups, repeat the flag or list several "
                        f"{recipe(' '.join(map(str, d.last_kv_cache_len)))}")
    p.add_argument("--post_topk", type=int, help=f"top-k inside the post graph, 0: full logits {recipe(d.post_topk)}")
    p.add_argument("--post_weight_type", choices=WEIGHT_TYPES, help=f"lm_head weight type {recipe(d.post_weight_type)}")
    p.add_argument("--vision_weight_type", choices=WEIGHT_TYPES, help="vision part weight type, vision-language "
                   "models only (default: from the recipe/variant; else the layer weight type where the chip takes it "
                   "for the vision part, else s8)")
    p.add_argument("--group_size", type=int, help=f"quantization group size along the input dim {recipe(d.group_size)}")
    p.add_argument("--extend_method", choices=("none", "PI", "NTK"), help="context extension as in the seed: PI "
                   "divides positions by --scaling_factor, NTK multiplies the rope base by it; kv_cache_len may then "
                   "reach max_position_embeddings x scaling_factor (default: none)")
    p.add_argument("--scaling_factor", type=float, help="context extension factor (> 1) for --extend_method "
                   "(default: none)")
    p.add_argument("--quant_method", help="how s4/s8 weights are found: rtn (round to nearest), gptq, awq, awq+gptq "
                   "(calibrated on --calib_data, written as a cached GPTQ checkpoint the build reads) (default: "
                   "generator/data/quantize.yaml, gptq for s4 and rtn otherwise; rtn where calibration does not apply)")
    p.add_argument("--calib_data", help="calibration text file, UTF-8 (default: generator/data/text/calibration.txt)")
    p.add_argument("--image_size", type=int, help="vision part input size in pixels, vision-language models only, "
                   "Pulsar2's vlm input_size (default: the recipe's vision.default_image_size, 224)")
    p.add_argument("-c", "--check_level", type=int, default=0, choices=[0, 1, 2],
                   help="0: build only, 1: layer check, 2: + run the check prompt (default: %(default)s; make: 2)")
    p.add_argument("--prompt", help="prompt for check level 2 (default: the recipe's, 1+1=)")
    p.add_argument("--parallel", type=int_at_least(1), default=1, help="worker processes building the decoder "
                   "layers and the post graph; the bundle is byte-identical to a serial build (default: %(default)s)")
    p.add_argument("--recipe", help="force a recipe (default: from the model name or the checkpoint's architectures)")
    p.add_argument("--synthetic", action="store_true", help="random weights with the variant's exact config "
                   "(default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: off)")
    p.add_argument("--summary-json", help="also write the build summary here (default: none)")


def cmd_build(args) -> int:
    from ..pipeline import build

    console = Console(stderr=True)
    flags = {k: getattr(args, k) for k in ("weight_type", "hidden_state_type", "prefill_len", "kv_cache_len",
                                            "last_kv_cache_len", "post_topk", "post_weight_type", "group_size",
                                            "vision_weight_type", "kld_budget", "quant_method", "calib_data",
                                            "extend_method", "scaling_factor")}
    from ..resolve.options import parse_overrides

    flags["flag_overrides"] = parse_overrides(args.override)
    m = build(model=args.model, input_path=args.input_path, output_path=args.output_path, chip=args.chip,
              synthetic=args.synthetic, recipe_name=args.recipe, check_level=args.check_level, prompt=args.prompt,
              console=console, progress=not args.no_progress, image_size=args.image_size, parallel=args.parallel,
              **flags)
    files = m["files"]
    size = sum(f["bytes"] for f in files.values())
    out = Console()
    out.print(f"[bold green]bundle[/] {m['out_dir']}: {len(files)} files, {size / 2**20:.1f} MiB, "
              f"built in {m['build_seconds']:.1f} s ({m['total_seconds']:.1f} s "
              f"{'with checks' if m.get('checks') else 'in total'}), peak RSS {m['peak_rss_mib']:.0f} MiB")
    if m.get("checks_skipped"):
        out.print(f"[bold yellow]checks skipped:[/] {m['checks_skipped']}")
    checks = m.get("checks")
    summary = {"out_dir": m["out_dir"], "files": len(files), "bytes": size, "build_seconds": m["build_seconds"],
               "total_seconds": m["total_seconds"], "peak_rss_mib": m["peak_rss_mib"], "checks": checks}
    if checks:
        if "layer" in checks:
            l = checks["layer"]
            out.print(f"layer check: worst {l['worst']}; post cosine {l['post']['cosine']:.6f}", highlight=False)
        if "generate" in checks:
            g = checks["generate"]
            out.print(f"{g['prompt']} -> {g['ours_text']!r}  (transformers: {g['reference_text']!r})")
        if "accuracy" in checks:
            from ..verify.report import accuracy_text

            out.print(f"accuracy vs fp32 (evaluation text): {accuracy_text(checks['accuracy'])}", highlight=False)
        out.print("[bold green]checks passed[/]" if checks["passed"] else "[bold red]checks FAILED[/]")
    if m.get("predicted"):  # report/predicted.json (generator/predict.py)
        from ..predict import summary_line

        out.print(summary_line(m["predicted"]), highlight=False, soft_wrap=True)
        summary["predicted"] = m["predicted"]
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    if checks and not checks["passed"]:
        from ..verify.checks import require_passed

        require_passed(checks)
    return 0


def cmd_list(args) -> int:
    from rich import box
    from rich.table import Table

    from ..recipe import registry

    reg = registry()
    console = Console()
    rows = []
    for name, recipe in sorted(reg.recipes.items()):
        for vname, v in recipe.variants.items():
            rows.append((vname, name, ", ".join(recipe.architectures), v.hf_repo or "INPUT=", v.embedded, v.description))
        if not recipe.variants:
            rows.append(("-", name, ", ".join(recipe.architectures), "INPUT=", None, recipe.description))
    # variant and recipe are never cut (make targets); narrower than 140 columns the architectures and HF
    # repo names go (weights: embedded, or INPUT= for your checkpoint) and the description wraps
    wide = console.width >= 140
    table = Table(title="recipes and model variants (make <variant> CHIP=AX650)", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    table.add_column("variant", no_wrap=True)
    table.add_column("recipe", no_wrap=True)
    if wide:
        table.add_column("architectures", overflow="fold")
    table.add_column("weights", no_wrap=not wide, overflow="fold")
    table.add_column("description", ratio=1)
    for vname, name, archs, repo, embedded, description in rows:
        weights = "embedded" if embedded else (repo if wide else "INPUT=")
        table.add_row(vname, name, *([archs] if wide else []), weights, description)
    console.print(table)
    if args.verified:
        from ..verify.conformance import print_conformance

        print_conformance(console)
    return 0


def cmd_run(args) -> int:
    from .run import run

    return run(args)


def cmd_verify(args) -> int:
    from ..pipeline import verify_bundle
    from ..verify.checks import require_passed

    summary = verify_bundle(args.bundle, input_path=args.input_path, check_level=args.check_level,
                            prompt=args.prompt, console=Console(stderr=True))
    Console().print("[bold green]checks passed[/]" if summary["passed"] else "[bold red]checks FAILED[/]")
    require_passed(summary)
    return 0


def cmd_serve(args) -> int:
    from ..serve import serve

    return serve(args)


def cmd_new_recipe(args) -> int:
    from ..recipe.scaffold import new_recipe

    return new_recipe(args)


def cmd_show_recipe(args) -> int:
    from ..recipe import registry, show

    reg = registry()
    if args.recipe not in reg.recipes:
        raise GeneratorError(f"Unknown recipe '{args.recipe}'. Known recipes: {', '.join(sorted(reg.recipes))}.")
    sys.stdout.write(show(reg.recipes[args.recipe]))
    return 0


def cmd_quantize(args) -> int:
    from ..quantize.calibrate import quantize_checkpoint
    from ..quantize.simulate import model_source

    if bool(args.model) == bool(args.input_path):
        raise GeneratorError("quantize: name a model with embedded weights or pass --input_path (one of them).")
    source = args.input_path or model_source(args.model)
    out = quantize_checkpoint(source, args.quant_method, args.weight_type, args.group_size, args.output_path,
                              args.calib_data, log=lambda s: Console(stderr=True).print(s, highlight=False))
    Console().print(f"[bold green]GPTQ checkpoint[/] {out} ({args.quant_method}, {args.weight_type}, group "
                    f"{args.group_size}); build it with --input_path {out}", highlight=False)
    return 0


def cmd_accuracy(args) -> int:
    from ..accuracy.command import accuracy

    return accuracy(args)


def cmd_predict(args) -> int:
    from ..predict import predict, predict_bundle, summary_line, variant_spec

    if Path(args.target).is_dir():
        if any(getattr(args, k) is not None for k in ("weight_type", "kv_cache_len", "post_weight_type", "group_size")):
            raise GeneratorError("predict: -w/--kv_cache_len/--post_weight_type/--group_size apply to a model variant; "
                                 "a bundle is predicted with the options it was built with.")
        from ..contract import Bundle

        bundle = Bundle(args.target)
        p = predict(bundle.spec, bundle.opts, args.chip) if args.chip else predict_bundle(bundle)
    else:
        flags = {k: getattr(args, k) for k in ("weight_type", "kv_cache_len", "post_weight_type", "group_size")}
        chip = args.chip or "AX650"
        spec, opts = variant_spec(args.target, chip, **flags)
        p = predict(spec, opts, chip)
    print(json.dumps(p, indent=2) if args.json else summary_line(p))
    return 0


def cmd_zoo(args) -> int:
    from ..zoo import zoo

    return zoo(args)


def cmd_bench(args) -> int:
    from ..bench import bench

    return bench(args)


def make_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="python -m generator", description="axgen: HF LLM -> AX650/AX630C bundles")
    parser.add_argument("--version", action="version", version=f"axgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_build_args(sub.add_parser("build", help="build (and verify) a bundle; Pulsar2 llm_build flag names"))
    p = sub.add_parser("list", help="recipes and their model variants")
    p.add_argument("--verified", action="store_true", help="also show the conformance table")
    from .run import add_run_args

    add_run_args(sub.add_parser("run", help="run a bundle locally like the board runtime"))
    p = sub.add_parser("verify", help="re-run the checks of a bundle")
    p.add_argument("bundle", help="bundle folder, e.g. out/smollm2-135m-instruct_ax650 (required)")
    p.add_argument("-c", "--check_level", type=int, default=2, choices=[1, 2],
                   help="1: layer check, 2: + the check prompt end to end (default: %(default)s)")
    p.add_argument("--prompt", help="prompt for check level 2 (default: the recipe's, 1+1=)")
    p.add_argument("--input_path", help="reference checkpoint (default: the one the bundle was built from)")
    from .serve import add_serve_args

    add_serve_args(sub.add_parser("serve", help="OpenAI-compatible chat endpoint on a bundle (loopback by default)"))
    from ..recipe.scaffold import add_new_recipe_args

    add_new_recipe_args(sub.add_parser("new-recipe", help="scaffold a recipe and its conformance test"))
    p = sub.add_parser("show-recipe", help="a recipe flattened: its `extends` parents merged in, tensor paths whole")
    p.add_argument("recipe", help="recipe name, e.g. gemma3 (`list` shows them)")
    from ..bench import add_bench_args

    add_bench_args(sub.add_parser("bench", help="every backend x numerics side by side: speed, KLD, peak RSS, many users, peers"))
    from ..accuracy.command import add_accuracy_args

    p = sub.add_parser("quantize", help="calibrated quantization (GPTQ/AWQ) into a standard GPTQ checkpoint folder")
    p.add_argument("model", nargs="?", help="model variant with embedded weights (default: none; or --input_path)")
    p.add_argument("--input_path", help="fp16/bf16/fp32 HF model directory or .gguf file")
    p.add_argument("--output_path", required=True, help="checkpoint folder to write (required)")
    p.add_argument("--quant_method", default="gptq", help="rtn, gptq, awq or awq+gptq (default: %(default)s)")
    p.add_argument("-w", "--weight_type", default="s4", choices=("s4", "s8"), help="(default: %(default)s)")
    p.add_argument("--group_size", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--calib_data", help="calibration text file (default: generator/data/text/calibration.txt)")
    p = sub.add_parser("predict", help="predicted board decode speed, TTFT and CMM memory (a cost model, "
                       "calibrated on the vendor's published figures)")
    p.add_argument("target", help="bundle folder, or a model variant (see `list`) (required)")
    p.add_argument("--chip", help="AX650, AX630C / AX620E (default: the bundle's chip; AX650 for a variant)")
    p.add_argument("-w", "--weight_type", choices=WEIGHT_TYPES, help="layer weight type, a variant only "
                   "(default: the recipe's)")
    p.add_argument("--kv_cache_len", type=int, help="KV cache rows, a variant only (default: the recipe's)")
    p.add_argument("--post_weight_type", choices=WEIGHT_TYPES, help="lm_head weight type, a variant only "
                   "(default: the recipe's)")
    p.add_argument("--group_size", type=int, help="quantization group size, a variant only (default: the recipe's)")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON (default: one line)")
    add_accuracy_args(sub.add_parser("accuracy", help="KL divergence, top-1 agreement and perplexity vs the fp32 "
                                                      "reference over a fixed text"))
    from ..zoo import add_zoo_args

    add_zoo_args(sub.add_parser("zoo", help="build a matrix of variants x chips x weight types as Ray tasks "
                                            "(local Ray, or the cluster at $RAY_ADDRESS) and index it"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    handler = {"build": cmd_build, "list": cmd_list, "run": cmd_run, "verify": cmd_verify, "serve": cmd_serve,
               "zoo": cmd_zoo,
               "new-recipe": cmd_new_recipe, "bench": cmd_bench, "accuracy": cmd_accuracy, "quantize": cmd_quantize,
               "show-recipe": cmd_show_recipe, "predict": cmd_predict}[args.command]
    try:
        return handler(args)
    except GeneratorError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except Terminated:
        print("terminated (SIGTERM); the unfinished bundle was removed", file=sys.stderr)
        return Terminated.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

