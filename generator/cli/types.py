"""Bounded number types for command-line flags: argparse reports a bad value as
`argument --threads: expected an integer >= 1, got '0'` and exits 2, before any work."""

from __future__ import annotations

import argparse
import math


def int_at_least(lo: int, hi: int | None = None):
    """An argparse `type`: an integer in [lo, hi] (hi optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            want = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argparse `type`: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}")
    return value
