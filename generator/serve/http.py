"""The HTTP layer of `python -m generator serve` (routes and errors: see generator/serve/service.py).

Its handler and server build on the plumbing the bundles' tokenizer server defines
(JsonRequestHandler, JsonHTTPServer: keep-alive, JSON answers and errors, body limits), loaded from
generator/runtime/tokenizer_server.py, a standalone script that must not import this package. It is
imported only when a server starts, so the rest of the command line does not pay for it.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import traceback
import uuid
from itertools import chain
from urllib.parse import unquote, urlsplit

from ..errors import GeneratorError
from ..paths import TOKENIZER_SERVER
from ..runtime.chat import load_script
from .service import ApiError, ChatService

MAX_BODY_BYTES = 4 << 20  # a text-only bundle's requests; a vision-language one's: images.max_request_bytes (limits.yaml)
_tokenizer_server = load_script(TOKENIZER_SERVER, "axgen_tokenizer_server")
JsonRequestHandler, JsonHTTPServer = _tokenizer_server.JsonRequestHandler, _tokenizer_server.JsonHTTPServer


class ApiHandler(JsonRequestHandler):
    """The OpenAI routes on the plumbing shared with the tokenizer server (keep-alive, TCP_NODELAY,
    JSON answers and errors, body limits, draining an unread body, any method reaching `dispatch`)."""

    server_version = "axgen-serve"
    timeout = 300
    error_type = ApiError  # what read_json raises
    max_drain_bytes = 8 << 20
    server: "ApiServer"

    def error_body(self, status: int, message: str) -> dict:
        """OpenAI style; a 500 is a bug of ours (server_error), anything else the request's fault."""
        return ApiError(status, message, kind="server_error" if status == 500 else "invalid_request_error").body()

    # -- streaming -------------------------------------------------------------------------------
    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, payload: dict | str):
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        self._chunk(f"data: {text}\n\n".encode("utf-8"))

    # -- routing ---------------------------------------------------------------------------------
    def dispatch(self):
        allowed = "GET"
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            if path.startswith("/v1/models/"):
                handler = lambda body: self.model_get(unquote(path[len("/v1/models/"):]))  # noqa: E731
            elif path in ROUTES:
                allowed, name = ROUTES[path]
                handler = getattr(self, name)
            else:
                raise ApiError(404, f"no route {path} (see /v1/models, /v1/chat/completions, /v1/reset, /v1/stop)",
                               code="not_found")
            if self.command not in allowed.split(", "):
                raise ApiError(405, f"{self.command} is not allowed on {path} (use {allowed})")
            handler(self.read_body())
        except ApiError as exc:
            self.send_json(exc.status, exc.body(), {"Allow": allowed} if exc.status == 405 else None)
        except GeneratorError as exc:
            self.send_json(400, self.error_body(400, str(exc)))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug: 500 JSON, keep serving
            self.send_internal_error(exc)

    # -- handlers --------------------------------------------------------------------------------
    def health(self, body: dict):
        self.send_json(200, self.server.service.health())

    def models(self, body: dict):
        self.send_json(200, {"object": "list", "data": [self.server.service.model_card()]})

    def model_get(self, model_id: str):
        svc = self.server.service
        if model_id not in svc.aliases:
            raise ApiError(404, f"model {model_id!r} does not exist here; this server has {svc.model_id!r}",
                           "model", "model_not_found")
        self.send_json(200, svc.model_card())

    def reset(self, body: dict):
        system_prompt = body.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ApiError(400, "'system_prompt' must be a string", "system_prompt")
        self.send_json(200, self.server.service.reset(system_prompt))

    def stop(self, body: dict):
        self.send_json(200, self.server.service.stop())

    def chat_completions(self, body: dict):
        svc = self.server.service
        req = svc.prepare(body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        base = {"id": rid, "created": created, "model": svc.model_id}
        pieces = svc.generate(req)
        if not req["stream"]:
            text = "".join(pieces)
            self.send_json(200, {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": req["finish_reason"]}], "usage": req["usage"], "axgen": req["timings"]})
            return
        try:
            first = next(pieces, None)  # errors before the first token still get a JSON status
        except BaseException:
            pieces.close()
            raise
        chunk = {**base, "object": "chat.completion.chunk"}

        def delta(d: dict, finish_reason: str | None = None):
            self._event({**chunk, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}]})

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            delta({"role": "assistant", "content": ""})
            if first is not None:
                for piece in chain([first], pieces):
                    delta({"content": piece})
            delta({}, req["finish_reason"])
            if req["include_usage"]:
                self._event({**chunk, "choices": [], "usage": req["usage"]})
            self._event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True  # the client went away: stop generating
        except Exception:  # headers are out: all we can do is log and end the stream
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
        finally:
            pieces.close()


ROUTES = {  # path: (allowed methods, handler)
    "/": ("GET", "health"), "/health": ("GET", "health"), "/v1/models": ("GET", "models"),
    "/v1/chat/completions": ("POST", "chat_completions"), "/v1/reset": ("POST", "reset"),
    "/v1/stop": ("GET, POST", "stop"),
}


class ApiServer(JsonHTTPServer):
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], service: ChatService, log_requests: bool = False):
        self.service = service
        from .images import image_limits

        limit = image_limits()["max_request_bytes"] if service.takes_images else MAX_BODY_BYTES
        super().__init__(address, ApiHandler, log_requests, limit)
