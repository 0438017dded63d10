"""`python -m generator accuracy <bundle> [<bundle> ...]`: the accuracy report of bundles (issue 11)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from .report import print_table, write_reports
from .run import EVALUATION_TEXT, check_max_tokens, evaluate, read_text, settings


def add_accuracy_args(p: argparse.ArgumentParser):
    p.add_argument("bundles", nargs="+", metavar="bundle", help="bundle folder(s), e.g. out/smollm2-135m-instruct_ax650; "
                   "several are reported side by side")
    p.add_argument("--numerics", default="board", choices=["board", "fast"],
                   help="board: weights on their int grid, fp32 activations (what the board computes); fast: int8 "
                        "activations (this CPU's speed mode) (default: %(default)s)")
    p.add_argument("--text", help=f"UTF-8 text file to evaluate on (default: {EVALUATION_TEXT.relative_to(EVALUATION_TEXT.parents[3])})")
    p.add_argument("--max_tokens", type=int, default=None,
                   help=f"tokens evaluated, from the start of the text (default: {settings()['max_tokens']}; "
                        f"the committed text has a few thousand)")
    p.add_argument("--reference", help="fp32 checkpoint to compare with (default: the manifest's input.reference, "
                   "else the checkpoint the bundle was built from)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default: %(default)s)")


def accuracy(args) -> int:
    from ..errors import GeneratorError

    if args.threads < 1:
        raise GeneratorError(f"--threads must be at least 1, got {args.threads}.")
    max_tokens = check_max_tokens(args.max_tokens) or settings()["max_tokens"]
    text = read_text(args.text)
    err = Console(stderr=True)
    evaluation = evaluate(args.bundles, text=text, max_tokens=max_tokens, numerics=args.numerics,
                          reference=args.reference, threads=args.threads, shared_pool=True,
                          log=lambda s: err.print(s, highlight=False))
    name = Path(args.text).name if args.text else EVALUATION_TEXT.name
    written = write_reports(evaluation, name)
    out = Console()
    if not out.is_terminal:  # a pipe or a log: the whole table, not 80 columns of it
        out.width = 150
    print_table(out, evaluation["results"])
    err.print("report: " + ", ".join(str(p) for p in written[:2]) + (" (and in each bundle's report/)"
                                                                     if len(written) > 2 else ""), highlight=False)
    return 0
