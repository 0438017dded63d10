"""`python -m generator accuracy <bundle> [<bundle> ...]` (or `--model VARIANT`: build the configurations of
data/accuracy.yaml first, `make accuracy`): the accuracy report of bundles (issue 11)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from ..errors import GeneratorError
from .report import print_table, write_reports
from .run import EVALUATION_TEXT, check_max_tokens, evaluate, read_text, settings

OUT_ROOT = Path("out") / "accuracy"


def add_accuracy_args(p: argparse.ArgumentParser):
    p.add_argument("bundles", nargs="*", metavar="bundle", help="bundle folder(s), e.g. out/smollm2-135m-instruct_ax650; "
                   "several are reported side by side")
    p.add_argument("--model", help="instead of bundles: build this model variant once per configuration of "
                   f"generator/data/accuracy.yaml into {OUT_ROOT}/<model>_<label>, then report them all (make accuracy)")
    p.add_argument("--chip", default="AX650", help="with --model: the chip to build for (default: %(default)s)")
    p.add_argument("--reuse", action="store_true", help="with --model: keep bundles already built there")
    p.add_argument("--numerics", default="board", choices=["board", "fast"],
                   help="board: weights on their int grid, fp32 activations (what the board computes); fast: int8 "
                        "activations (this CPU's speed mode) (default: %(default)s)")
    p.add_argument("--text", help="UTF-8 text file to evaluate on (default: generator/data/text/evaluation.txt)")
    p.add_argument("--max_tokens", type=int, default=None,
                   help=f"tokens evaluated, from the start of the text (default: {settings()['max_tokens']}; "
                        f"the committed text has a few thousand)")
    p.add_argument("--reference", help="fp32 checkpoint to compare with (default: the manifest's input.reference, "
                   "else the checkpoint the bundle was built from)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default: %(default)s)")
    p.add_argument("--peers", nargs="+", metavar="TYPE", help="also quantize the reference .gguf with llama.cpp to "
                   "these types (e.g. Q8_0 Q4_0 Q4_K_M) and report them side by side; needs the optional "
                   "llama-cpp-python (make bench-peers) (default: none)")


def accuracy(args) -> int:
    if args.threads < 1:
        raise GeneratorError(f"--threads must be at least 1, got {args.threads}.")
    if bool(args.bundles) == bool(args.model):
        raise GeneratorError("accuracy: give bundle folders, or --model VARIANT to build and report its configurations "
                             + ("(not both)." if args.model else "(none given)."))
    max_tokens = check_max_tokens(args.max_tokens) or settings()["max_tokens"]
    text = read_text(args.text)
    if args.peers:
        from .peers import check_types

        check_types(args.peers)  # before any build: llama-cpp-python is there and knows the types
    err = Console(stderr=True)
    if not err.is_terminal:
        err.width = 150
    log = lambda s: err.print(s, highlight=False)  # noqa: E731
    start = time.perf_counter()
    labels = None
    if args.model:
        from .suite import build_all

        built = build_all(args.model, args.chip, OUT_ROOT, args.reuse, log)
        labels, bundles = [b[0] for b in built], [b[1] for b in built]
        log(f"builds: {time.perf_counter() - start:.0f} s")
    else:
        bundles = args.bundles
    t = time.perf_counter()
    refs: dict = {}
    evaluation = evaluate(bundles, text=text, max_tokens=max_tokens, numerics=args.numerics, reference=args.reference,
                          threads=args.threads, shared_pool=True, labels=labels, log=log, ref_cache=refs)
    if args.peers:
        from .peers import evaluate_peers

        if args.reference:
            raise GeneratorError("--peers quantizes the bundle's own reference checkpoint; drop --reference.")
        evaluation["results"] += evaluate_peers(bundles[0], args.peers, text=text, max_tokens=max_tokens,
                                                threads=args.threads, refs=refs, log=log)
    name = Path(args.text).name if args.text else EVALUATION_TEXT.name
    written = write_reports(evaluation, name, args.model)
    out = Console()
    if not out.is_terminal:  # a pipe or a log: the whole table, not 80 columns of it
        out.width = 150
    print_table(out, evaluation["results"])
    log("report: " + ", ".join(str(p) for p in written[:2]) + (" (and in each bundle's report/)" if len(written) > 2
                                                                  else ""))
    log(f"report: {time.perf_counter() - t:.0f} s" + (f", total with builds {time.perf_counter() - start:.0f} s"
                                                        if args.model else ""))
    return 0
