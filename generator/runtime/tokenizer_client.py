"""HTTP client for a bundle's tokenizer server (``<model>_tokenizer_uid.py``, ``--tokenizer_type 2``).

Used by the local runner to talk to the server the way the board does: one session (uid) per
client, ``reset`` to start a conversation, ``encode`` for every user turn (with the previous
answer as ``last_reply``), ``decode`` for the generated ids. Standard library only (http.client).

Like the board's client it keeps one HTTP/1.1 connection (with TCP_NODELAY: a request is one
write, ~0.2 ms a call instead of ~0.7 ms for a connection each) and opens a new one, transparently,
when the server answers ``Connection: close`` or has closed an idle connection.

    tok = HttpTokenizer("http://127.0.0.1:12345")
    prefix = tok.reset("You are a helpful assistant.")       # prefill these, keep the KV cache
    ids, diff = tok.encode("Hello")                          # prefill `diff` on top of the cache
    text = tok.decode(generated_ids)                         # complete characters only
    ids, diff = tok.encode("And then?", last_reply=text)     # next turn
    img = tok.image_tokens()                                 # a vision-language model's image tokens
    ids, diff = tok.encode("What is this?", img_prompt=True) # the turn's image: img.count context tokens

See the server module's docstring for the protocol.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

from ..contract import TOKENIZER_URL
from ..errors import GeneratorError

INVALID_UID = "Invalid uid"
# A kept-alive connection the server closed meanwhile (idle timeout) fails like this before any
# answer arrives: the request was not processed, so it is sent again once on a new connection.
_STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class TokenizerServerError(GeneratorError):
    """The tokenizer server is not answering, or answered with an error (message names the URL).

    ``status`` is the HTTP status of an error answer (None when there was no answer).
    """

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None):
        self.status = status
        super().__init__(message, hint=hint)


class SessionLostError(TokenizerServerError):
    """The server no longer knows this client's uid (expired, evicted, or the server restarted).

    The conversation state on the server is gone: call ``HttpTokenizer.new_session()`` and
    ``reset()`` (and drop the KV cache) before encoding again.
    """


class ImageTokens(NamedTuple):
    """A vision-language model's image tokens (ids; None when the model has no such token) and how
    many context tokens one image takes (the rows its embeddings overwrite)."""

    start: int | None
    context: int
    end: int | None
    count: int


class HttpTokenizer:
    """A session on a tokenizer server. Not thread-safe: use one instance per conversation."""

    def __init__(self, url: str = TOKENIZER_URL, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TokenizerServerError(f"The tokenizer server URL {url!r} is not http://HOST:PORT.",
                                       hint=f"Pass --url_tokenizer_model like {TOKENIZER_URL}.")
        try:
            port = parts.port
        except ValueError:
            raise TokenizerServerError(f"The tokenizer server URL {url!r} has an invalid port.") from None
        # No proxy: the server is on loopback or the local network, and http_proxy must not reroute it.
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._connection = kind(parts.hostname, port, timeout=timeout)
        self._prefix = parts.path
        self._connected = False  # a connection is open (reused by the next request)
        self.uid: str = ""
        self.new_session()
        self.bos_id: int = self._get_int("/bos_id", "bos_id")
        answer = self._request("GET", f"/eos_id?uid={quote(self.uid)}")
        self.eos_id: int = self._expect(answer, "eos_id", int, "/eos_id")
        eos_ids = answer.get("eos_ids")
        self.eos_ids: list[int] = list(eos_ids) if isinstance(eos_ids, list) else (
            [self.eos_id] if self.eos_id >= 0 else [])
        self.last_prefix_mismatch = False

    # -- protocol ---------------------------------------------------------------------------------

    def new_session(self) -> str:
        """Ask for a new uid (a fresh history with the default system prompt)."""
        answer = self._request("GET", "/get_uid")
        self.uid = self._expect(answer, "uid", str, "/get_uid")
        return self.uid

    def reset(self, system_prompt: str | None = None) -> list[int]:
        """Start the conversation over; returns the tokens to prefill (no generation prompt).

        ``None`` uses the server's default system prompt, ``""`` means no system message.
        """
        body: dict[str, Any] = {"uid": self.uid}
        if system_prompt is not None:
            body["system_prompt"] = system_prompt
        return self._expect_ids(self._request("POST", "/reset", body), "token_ids", "/reset")

    def encode(self, text: str, last_reply: str | None = None, img_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Add a user turn (after ``last_reply`` as the assistant's answer, when given); with
        ``img_prompt`` the turn starts with one image's tokens (see ``image_tokens``).

        Returns ``(token_ids, diff)``: the whole conversation with generation prompt, and the part
        the client still has to prefill. When the server had to send everything again
        (``prefix_mismatch``), ``diff == token_ids`` and ``self.last_prefix_mismatch`` is True: drop
        the KV cache and prefill from position 0.
        """
        body: dict[str, Any] = {"uid": self.uid, "text": text}
        if last_reply is not None:
            body["last_reply"] = last_reply
        if img_prompt:
            body["img_prompt"] = True
        answer = self._request("POST", "/encode", body)
        self.last_prefix_mismatch = bool(answer.get("prefix_mismatch", False))
        return self._expect_ids(answer, "token_ids", "/encode"), self._expect_ids(answer, "diff", "/encode")

    def image_tokens(self) -> ImageTokens | None:
        """The server's image tokens (``GET /img_context_token`` and friends); None for a text-only
        model (the server answers 404, or declares ``img_token_num`` 0). An ``encode(..., img_prompt=True)`` turn holds ``count``
        consecutive ``context`` ids, the rows the image's embeddings overwrite."""
        ids: dict[str, int | None] = {}
        count = 0
        for name in ("img_start_token", "img_context_token", "img_end_token"):
            try:
                answer = self._request("GET", f"/{name}?uid={quote(self.uid)}")
            except TokenizerServerError as exc:
                if exc.status != 404:
                    raise
                ids[name] = None
                continue
            ids[name] = self._expect(answer, name, int, f"/{name}")
            count = answer.get("img_token_num", count)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise TokenizerServerError(f"The tokenizer server at {self.url} answered /img_context_token with an "
                                       f"invalid \"img_token_num\": {count!r}.")
        if ids["img_context_token"] is None or count == 0:  # tokens in the vocabulary, but no image input
            return None
        return ImageTokens(ids["img_start_token"], ids["img_context_token"], ids["img_end_token"], count)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` up to the last complete character (a cut UTF-8 sequence is held back)."""
        body = {"uid": self.uid, "token_ids": list(ids), "skip_special_tokens": skip_special_tokens}
        return self._expect(self._request("POST", "/decode", body), "text", str, "/decode")

    # -- plumbing -----------------------------------------------------------------------------------

    def _get_int(self, path: str, key: str) -> int:
        return self._expect(self._request("GET", f"{path}?uid={quote(self.uid)}"), key, int, path)

    def _expect(self, answer: dict, key: str, kind: type, path: str) -> Any:
        value = answer.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TokenizerServerError(
                f"The tokenizer server at {self.url} answered {path} without a valid \"{key}\": {answer!r}"
            )
        return value

    def _expect_ids(self, answer: dict, key: str, path: str) -> list[int]:
        ids = self._expect(answer, key, list, path)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TokenizerServerError(f"The tokenizer server at {self.url} answered {path} with a non-integer "
                                       f"in \"{key}\".")
        return ids

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        self._connection.close()
        self._connected = False

    def _exchange(self, method: str, path: str, data: bytes | None) -> tuple[int, bytes]:
        """One request on the kept-alive connection; sent again on a new one if that one had gone stale."""
        reused = self._connected
        try:
            return self._send(method, path, data)
        except _STALE_CONNECTION:
            if not reused:
                raise
        return self._send(method, path, data)

    def _send(self, method: str, path: str, data: bytes | None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            if not self._connected:
                self._connection.connect()
                self._connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._connected = True
            self._connection.request(method, self._prefix + path, body=data, headers=headers)
            response = self._connection.getresponse()
            raw = response.read()
        except BaseException:  # a failed or interrupted (Ctrl+C) exchange leaves the connection unusable
            self.close()
            raise
        if response.will_close:  # Connection: close, or HTTP/1.0: the next request reconnects
            self.close()
        return response.status, raw

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            status, raw = self._exchange(method, path, data)
        except (http.client.HTTPException, OSError) as exc:  # refused, reset, timed out, not HTTP
            raise TokenizerServerError(
                f"The tokenizer server at {self.url} is not answering ({method} {path}: "
                f"{type(exc).__name__}: {exc}).",
                hint="Start it with `python3 <model>_tokenizer_uid.py --port PORT` in the bundle, "
                     "or pass the right --url_tokenizer_model.",
            ) from None
        if status >= 400:
            try:
                message = json.loads(raw.decode("utf-8")).get("error", "")
            except (ValueError, UnicodeDecodeError, AttributeError):
                message = raw[:200].decode("utf-8", "replace")
            error = SessionLostError if status == 400 and INVALID_UID in message else TokenizerServerError
            raise error(f"The tokenizer server at {self.url} refused {method} {path} "
                        f"(HTTP {status}): {message}", status=status)
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise TokenizerServerError(f"The tokenizer server at {self.url} answered {method} {path} with "
                                       f"something that is not JSON: {raw[:200]!r}") from None
        if not isinstance(answer, dict):
            raise TokenizerServerError(f"The tokenizer server at {self.url} answered {method} {path} with "
                                       f"{answer!r}, not a JSON object.")
        return answer
