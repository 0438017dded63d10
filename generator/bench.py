"""`make bench` (placeholder)."""


def add_bench_args(p):
    pass


def bench(args) -> int:
    raise NotImplementedError("bench is being written")
