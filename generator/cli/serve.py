"""`python -m generator serve`'s arguments (the service is generator/serve/)."""

from __future__ import annotations

import argparse

from ..serve.service import DEFAULT_PORT
from .run import add_backend_args, add_numerics_arg
from .types import int_at_least, positive_seconds


def add_serve_args(p: argparse.ArgumentParser):
    p.add_argument("bundle", help="bundle directory (out/<model>_<chip>)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s, loopback only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int_at_least(0, 65535), default=DEFAULT_PORT, help="port (default %(default)s; 0 picks a free one)")
    p.add_argument("--system_prompt", help="system prompt put first when a request has none (default: the bundle's)")
    p.add_argument("--kvcache_path", help="load/save the system prompt's KV cache here (as `run --kvcache_path`)")
    p.add_argument("--model_name", help="model id reported and accepted (default: the bundle's model name)")
    p.add_argument("--max_tokens", type=int_at_least(1), default=None,
                   help="default and upper limit of generated tokens per request (default: until EOS or the "
                        "cache is full)")
    p.add_argument("--queue_timeout", type=positive_seconds, default=600.0,
                   help="seconds a request waits for the engine before 503 (default %(default)s)")
    p.add_argument("--threads", type=int_at_least(1), default=2, help="intra-op threads (default 2)")
    p.add_argument("--history", choices=["used", "board"], default="used", help="as for `run`")
    add_numerics_arg(p)
    add_backend_args(p)
    p.add_argument("--batch_size", type=int_at_least(1), default=None,
                   help="conversations decoded together on a batching backend (onnxruntime-fused; default: the "
                        "config's batch_size, else 8); others wait in a queue")
    p.add_argument("--seed", type=int, default=None, help="sampling seed for requests without one")
    p.add_argument("--log_requests", action="store_true", help="log every request to stderr")
