"""`python -m generator serve`: the OpenAI-compatible chat service (service.py) and its HTTP layer
(http.py, imported only when a server starts); its arguments are generator/cli/serve.py."""

from .service import serve

__all__ = ["serve"]
