"""SIGTERM (a `timeout`, a CI cancel) unwinds a build like Ctrl+C, so its temporary folder is removed."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives while `sigterm_unwinds()` is active."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def sigterm_unwinds():
    """Within this block SIGTERM raises Terminated (a KeyboardInterrupt), so `finally` clauses run.
    Signal handlers belong to the main thread; elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block ends: a pair of renames that must not be split (the old
    bundle moved aside, the new one moved in) finishes first, then the signal is handled as it would
    have been. (Masking the signal would not do: any of torch's or onnxruntime's threads may take it.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)
