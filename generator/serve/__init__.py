"""`python -m generator serve`: the OpenAI-compatible chat service (service.py) and its HTTP layer
(http.py, imported only when a server starts)."""

from .service import add_serve_args, serve

__all__ = ["add_serve_args", "serve"]
