"""A chat completion request's ``messages``: roles, text and image content parts, OpenAI style.

``content`` is a string or a list of parts: ``{"type": "text", "text"}`` and, in user messages,
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (see images.py for what
an image may be). A user message holds at most one image, as a turn of the board's VLM runtime: the
tokenizer server puts its placeholder (image tokens) before the message's text, whatever the order
of the parts. Every refusal is an ``ApiError`` 400 whose ``param`` names the message or the part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Message:
    role: str
    text: str
    images: list[tuple[str, str]] = field(default_factory=list)  # (where, url) of each image part


def _content(content: Any, where: str, role: str) -> Message:
    if content is None:
        return Message(role, "")
    if isinstance(content, str):
        return Message(role, content)
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of text and image_url parts",
                       f"{where}.content")
    message = Message(role, "")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            from .images import ImageRefused, image_url_of

            try:
                message.images.append((at, image_url_of(part, at)))
            except ImageRefused as exc:
                raise ApiError(400, exc.message, exc.param) from None
        elif kind == "image_url":
            raise ApiError(400, f"{at}: images are taken in user messages only (this is a {role} message)", at)
        else:
            raise ApiError(400, f"{at}: only text and image_url parts are supported (got {kind!r})",
                           f"{where}.content")
    message.text = "".join(texts)
    return message


def parse_messages(body: dict) -> list[Message]:
    """The request's messages, checked (roles, content shapes); images are still their URLs."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "missing field 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role {role!r} is not supported (use system, developer, user or assistant)",
                           f"{where}.role")
        message = _content(m.get("content"), where, ROLES[role])
        if len(message.images) > 1:
            raise ApiError(400, f"{where}: {len(message.images)} images in one message; this model takes one image "
                                f"per user message (send the others in later messages)", f"{where}.content")
        out.append(message)
    if out[-1].role != "user":
        raise ApiError(400, "the last message must be a user message", f"messages[{len(out) - 1}].role")
    return out
