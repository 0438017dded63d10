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
