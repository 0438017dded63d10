"""`python -m generator serve`: an OpenAI-compatible chat endpoint (placeholder, see issue 4)."""


def add_serve_args(p):
    p.add_argument("bundle")


def serve(args) -> int:
    raise NotImplementedError("serve is being written")
