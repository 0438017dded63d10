"""Command line: `python -m generator {build,list,run,verify,serve,bench}`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from rich.console import Console

from .errors import GeneratorError
from .recipe import HiddenType, WeightType

WEIGHT_TYPES, HIDDEN_TYPES = get_args(WeightType), get_args(HiddenType)


def add_build_args(p: argparse.ArgumentParser):
    p.add_argument("model", nargs="?", help="model variant (a make target, see `list`); omit with --input_path to detect the recipe")
    p.add_argument("--input_path", help="HF model directory or .gguf file (default: the variant's embedded weights)")
    p.add_argument("--output_path", help="bundle directory (default: out/<model>_<chip>)")
    p.add_argument("--chip", default="AX650", help="AX650 (default) or AX620E / AX630C")
    p.add_argument("-w", "--weight_type", choices=WEIGHT_TYPES)
    p.add_argument("-t", "--hidden_state_type", choices=HIDDEN_TYPES)
    p.add_argument("--prefill_len", type=int)
    p.add_argument("--kv_cache_len", type=int)
    p.add_argument("--last_kv_cache_len", type=int, nargs="+", action="extend",
                   help="history lengths of the prefill groups (repeat the flag or list several)")
    p.add_argument("--post_topk", type=int)
    p.add_argument("--post_weight_type", choices=WEIGHT_TYPES)
    p.add_argument("--group_size", type=int, help="quantization group size along the input dim (default 128)")
    p.add_argument("-c", "--check_level", type=int, default=0, help="0: build only, 1: layer check, 2: + run the check prompt")
    p.add_argument("--prompt", help="prompt for check level 2 (default: the recipe's, 1+1=)")
    p.add_argument("--parallel", type=int, default=1, help="accepted for Pulsar2 compatibility")
    p.add_argument("--recipe", help="force a recipe (default: from the model name or the checkpoint's architectures)")
    p.add_argument("--synthetic", action="store_true", help="random weights with the variant's exact config")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", help="also write the build summary here")


def cmd_build(args) -> int:
    from .pipeline import build

    console = Console(stderr=True)
    flags = {k: getattr(args, k) for k in ("weight_type", "hidden_state_type", "prefill_len", "kv_cache_len",
                                            "last_kv_cache_len", "post_topk", "post_weight_type", "group_size")}
    m = build(model=args.model, input_path=args.input_path, output_path=args.output_path, chip=args.chip,
              synthetic=args.synthetic, recipe_name=args.recipe, check_level=args.check_level, prompt=args.prompt,
              console=console, progress=not args.no_progress, **flags)
    files = m["files"]
    size = sum(f["bytes"] for f in files.values())
    out = Console()
    out.print(f"[bold green]bundle[/] {m['out_dir']}: {len(files)} files, {size / 2**20:.1f} MiB, "
              f"built in {m['build_seconds']:.1f} s ({m['total_seconds']:.1f} s "
              f"{'with checks' if m.get('checks') else 'in total'})")
    if m.get("checks_skipped"):
        out.print(f"[bold yellow]checks skipped:[/] {m['checks_skipped']}")
    checks = m.get("checks")
    summary = {"out_dir": m["out_dir"], "files": len(files), "bytes": size, "build_seconds": m["build_seconds"],
               "total_seconds": m["total_seconds"], "checks": checks}
    if checks:
        if "layer" in checks:
            l = checks["layer"]
            out.print(f"layer check: worst cosine {l['worst_cosine']:.6f} (layer {l['worst_layer']}, group "
                      f"{l['worst_group']}, {l['worst_tensor']}), post cosine {l['post']['cosine']:.6f}")
        if "generate" in checks:
            g = checks["generate"]
            out.print(f"{g['prompt']} -> {g['ours_text']!r}  (transformers: {g['reference_text']!r})")
        out.print("[bold green]checks passed[/]" if checks["passed"] else "[bold red]checks FAILED[/]")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    if checks and not checks["passed"]:
        from .verify import require_passed

        require_passed(checks)
    return 0


def cmd_list(args) -> int:
    from rich.table import Table

    from .recipe import registry

    reg = registry()
    table = Table(title="recipes and model variants (make <variant> CHIP=AX650)")
    for col in ("variant", "recipe", "architectures", "weights", "description"):
        table.add_column(col)
    for name, recipe in sorted(reg.recipes.items()):
        for vname, v in recipe.variants.items():
            src = "embedded" if v.embedded else (v.hf_repo or "INPUT=")
            table.add_row(vname, name, ", ".join(recipe.architectures), src, v.description)
        if not recipe.variants:
            table.add_row("-", name, ", ".join(recipe.architectures), "INPUT=", recipe.description)
    Console().print(table)
    if args.verified:
        from .conformance import print_conformance

        print_conformance(Console())
    return 0


def cmd_run(args) -> int:
    from .cli_run import run

    return run(args)


def cmd_verify(args) -> int:
    from .checkpoint import open_input
    from .progress import Progress
    from .recipe import registry
    from .runner import Bundle
    from .verify import require_passed, run_checks

    bundle = Bundle(args.bundle)
    recipe = registry().recipes[bundle.manifest["recipe"]["name"]]
    if args.input_path:
        ckpt = open_input(args.input_path)
    elif bundle.manifest.get("synthetic"):  # the same deterministic weights, regenerated on demand
        from .synthetic import synthetic_checkpoint

        ckpt = synthetic_checkpoint(recipe, bundle.manifest["recipe"]["variant"])
    else:
        ckpt = open_input(bundle.manifest["input"]["source"])
    console = Console(stderr=True)
    summary = run_checks(bundle.dir, ckpt, recipe, args.check_level, args.prompt, Progress(console), console)
    Console().print("[bold green]checks passed[/]" if summary["passed"] else "[bold red]checks FAILED[/]")
    require_passed(summary)
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    return serve(args)


def cmd_new_recipe(args) -> int:
    from .scaffold import new_recipe

    return new_recipe(args)


def cmd_bench(args) -> int:
    from .bench import bench

    return bench(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m generator", description="axgen: HF LLM -> AX650/AX630C bundles")
    sub = parser.add_subparsers(dest="command", required=True)
    add_build_args(sub.add_parser("build", help="build (and verify) a bundle; Pulsar2 llm_build flag names"))
    p = sub.add_parser("list", help="recipes and their model variants")
    p.add_argument("--verified", action="store_true", help="also show the conformance table")
    from .cli_run import add_run_args

    add_run_args(sub.add_parser("run", help="run a bundle locally like the board runtime"))
    p = sub.add_parser("verify", help="re-run the checks of a bundle")
    p.add_argument("bundle")
    p.add_argument("-c", "--check_level", type=int, default=2)
    p.add_argument("--prompt")
    p.add_argument("--input_path", help="reference checkpoint (default: the one the bundle was built from)")
    from .serve import add_serve_args

    add_serve_args(sub.add_parser("serve", help="OpenAI-compatible chat endpoint on a bundle (loopback by default)"))
    from .scaffold import add_new_recipe_args

    add_new_recipe_args(sub.add_parser("new-recipe", help="scaffold a recipe and its conformance test"))
    from .bench import add_bench_args

    add_bench_args(sub.add_parser("bench", help="runner speed vs transformers on this machine"))
    args = parser.parse_args(argv)
    handler = {"build": cmd_build, "list": cmd_list, "run": cmd_run, "verify": cmd_verify, "serve": cmd_serve,
               "new-recipe": cmd_new_recipe, "bench": cmd_bench}[args.command]
    try:
        return handler(args)
    except GeneratorError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
