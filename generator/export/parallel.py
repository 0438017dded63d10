"""--parallel N: independent pieces of a build (the decoder layers) in N forked worker processes.

Each piece writes its own files into the build folder, so a parallel bundle is byte-identical to a
serial one; the workers are forked, so they inherit the build's state (the resolved request, the
open checkpoint) without pickling it, and the parent only collects which piece finished (one
progress step each). N = 1 runs everything in this process, with no pool.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ..errors import GeneratorError


def one_thread():
    """A worker's torch runs single-threaded: N workers are the parallelism, and a forked child must not
    enter the OpenMP pool its parent may have started."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


class Workers:
    """`parallel` forked worker processes (none for 1): submit(fn, i) queues fn(i), wait(handles, step) runs or
    collects them, step() per finished one. Serial (parallel 1) work runs in wait, in submission order."""

    def __init__(self, parallel: int, what: str):
        if parallel < 1:
            raise GeneratorError(f"--parallel (make PARALLEL=) must be at least 1, got {parallel}.")
        self.parallel, self.what = parallel, what
        self.pool = None if parallel == 1 else ProcessPoolExecutor(
            max_workers=parallel, mp_context=multiprocessing.get_context("fork"), initializer=one_thread)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable[[int], object], i: int):
        return (fn, i) if self.pool is None else self.pool.submit(fn, i)

    def wait(self, handles: list, step: Callable[[], object]):
        if self.pool is None:
            for fn, i in handles:
                fn(i)
                step()
            return
        pending = set(handles)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                exc = fut.exception()
                if isinstance(exc, GeneratorError):
                    raise GeneratorError(str(exc)) from None
                if isinstance(exc, BrokenProcessPool):
                    raise GeneratorError(f"A build worker (--parallel {self.parallel}) died while building "
                                         f"{self.what} (killed, or out of memory?); rerun with a smaller --parallel "
                                         f"(make PARALLEL=): 1 builds in this process.") from None
                if exc is not None:
                    raise exc
                step()


def run_parallel(fn: Callable[[int], object], items: Iterable[int], parallel: int, step: Callable[[], object],
                 what: str):
    """fn(i) for every item: in this process for parallel 1, else in `parallel` forked workers; `step()` per
    finished item. A worker's GeneratorError is raised here as the same error (no worker traceback), a
    worker that dies (killed, out of memory) as a GeneratorError naming --parallel."""
    with Workers(parallel, what) as workers:
        workers.wait([workers.submit(fn, i) for i in items], step)


def peak_rss_mib() -> float:
    """Peak resident memory so far, MiB: this process's peak plus its largest child's (the --parallel
    workers; they share the pages they were forked with, which this counts twice, and of N workers
    running at once it counts the largest only): the figure the summary and the manifest report."""
    import resource

    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit
    return round((own + children) / 2**20, 1)
