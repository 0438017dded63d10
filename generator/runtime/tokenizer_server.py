#!/usr/bin/env python3
"""Tokenizer HTTP server for ax-llm (``--tokenizer_type 2``), one per bundle.

The generator copies this file into every bundle as ``<model>_tokenizer_uid.py`` next to the
tokenizer folder ``<model>_tokenizer/``; run it with ``python3 <model>_tokenizer_uid.py`` and
point the board's ``--url_tokenizer_model`` at it. The board never applies a chat template: this
server owns the template, the conversation history and the special tokens.

Dependencies: the Python standard library, ``tokenizers`` and ``jinja2`` only (``pip3 install
tokenizers jinja2``; without them the script says so in one line and exits). transformers is
deliberately not imported (it takes seconds to import on a board); the chat template is rendered
the way ``transformers.utils.chat_template_utils`` renders it (sandboxed Jinja with
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a non-escaping ``tojson``,
the ``{% generation %}`` tag, the named special tokens as variables) and the result is encoded with
``add_special_tokens=False``, so the ids equal ``AutoTokenizer.apply_chat_template(...,
tokenize=True)`` of transformers 5.

Why one file of over 400 lines: a bundle ships this server as one self-contained script next to its
tokenizer folder (the board has no axgen package), so the template rendering, both protocols, the
session store and the shared HTTP handler cannot be split into modules of the package.

Command line::

    python3 <model>_tokenizer_uid.py [--host 127.0.0.1] [--port 12345] [--port_file FILE]
                                     [--tokenizer_dir DIR] [--max_sessions 256]
                                     [--session_idle_s 604800] [--max_history_tokens 16384]
                                     [--body_timeout_s 5] [--log_requests]

``--host`` defaults to loopback; pass ``--host 0.0.0.0`` (or the board-facing address) when the
board runs the model on another machine. The default ``--tokenizer_dir`` is
``<script dir>/<name>_tokenizer`` for a script named ``<name>_tokenizer_uid.py``, else
``<script dir>/tokenizer``. When ready the server prints ``Server running at http://HOST:PORT``
with the port it listens on (``--port 0`` takes any free one), and writes it to ``--port_file``.

Tokenizer folder
----------------
A Hugging Face tokenizer folder: ``tokenizer.json``, ``tokenizer_config.json`` (special tokens,
optionally ``chat_template``), optionally ``chat_template.jinja`` (takes priority, as in
transformers), plus ``ax_tokenizer.json`` written by the generator so that nothing is guessed::

    {"bos_id": int (-1: none), "eos_id": int, "eos_ids": [int, ...],
     "system_prompt": str (default system prompt; "" = no system message),
     "img_start_token": str | null, "img_context_token": str | null, "img_end_token": str | null,
     "img_token_num": int (0: no image), "img_text_separator": str (default "")}

Without ``ax_tokenizer.json`` (or for a key it leaves out) the fallbacks are: ``bos_id``/``eos_id``
= the ids of ``bos_token``/``eos_token`` in ``tokenizer_config.json`` (-1 when absent),
``eos_ids`` = ``[eos_id]``, ``system_prompt`` = "" (the template's own default, if any, applies),
no image tokens.

Image prompt: a user turn sent with ``img_prompt`` true has the content ``img_start_token +
img_context_token * img_token_num + img_end_token + img_text_separator + text``: the image first,
then the text, as the reference processors put it. InternVL (its remote code and transformers'
``InternVLProcessor``: ``<image>\\n`` + question, the ``<image>`` expanded) has ``img_text_separator``
``"\\n"``; Qwen2.5-VL (its chat template renders an image part as ``<|vision_start|><|image_pad|>
<|vision_end|>`` with nothing after it, the processor repeats the pad) has ``""``. The client
overwrites the embedding rows of the ``img_token_num`` context tokens with the image's embeddings.

Without any chat template a conversation is the message contents joined by "\\n", encoded with
the tokenizer's post-processor (``add_special_tokens=True``, like ``tokenizer(text)``); the BOS id is
prepended when ``tokenizer_config.json`` says ``"add_bos_token": true`` and it is not there yet.

Protocol (JSON in and out, UTF-8)
---------------------------------
Session ("uid") protocol, used by current ax-llm:

``GET /get_uid``
    -> ``{"uid": "<uuid4>"}``. A new session whose history is the default system message (if any).
``GET /bos_id?uid=U``, ``GET /eos_id?uid=U``
    -> ``{"bos_id": int}``, ``{"eos_id": int, "eos_ids": [int, ...]}`` (-1 when none).
``POST /reset {"uid", "system_prompt"?}``
    -> ``{"token_ids": [...]}``. The history becomes just the system message (the given one, else
    the default; ``""`` means no system message, and then ``token_ids`` is ``[]``). ``token_ids``
    is the rendered template of that history *without* generation prompt: what the board
    prefills and keeps in its KV cache. ``GET /reset?uid=U[&system_prompt=...]`` is accepted too
    (older boards reset with a GET).
``POST /encode {"uid", "text", "last_reply"?, "img_prompt"?}``
    -> ``{"token_ids": [...], "diff": [...], "prefix_mismatch": bool}``. ``last_reply`` (a string,
    the model's previous answer), when present, is first appended as an assistant message; then
    the user message ``text`` (with the image placeholder in front when ``img_prompt`` is true:
    see "Image prompt" above; every turn may carry one image).
    ``token_ids`` is the whole rendered conversation with generation prompt. ``diff`` is what the
    board still has to prefill: ``token_ids`` minus the prefix the board already holds. That
    prefix is the ``token_ids`` the session last returned (the reset tokens at first) or, when
    ``last_reply`` is given, the conversation up to and including that assistant message
    rendered without generation prompt, because the board keeps the tokens it generated in its
    KV cache (this is what the vendor's own server does). If ``token_ids`` does not start with
    that prefix (templates that rewrite earlier turns, e.g. strip reasoning), ``diff`` is the
    whole ``token_ids`` and ``prefix_mismatch`` is true: a client that reads the flag must drop
    its KV cache and prefill ``diff`` from position 0. The history only changes when the call
    succeeds.
``POST /decode {"uid", "token_ids", "skip_special_tokens"?}``
    -> ``{"text": str, "pending_ids": int}``. ``skip_special_tokens`` defaults to false (as in
    ``tokenizer.decode``). When the ids end inside a multi-byte UTF-8 character, ``text`` stops
    before that character and ``pending_ids`` says how many trailing ids were held back; the text
    never contains a U+FFFD produced by a cut sequence. A client streaming a growing list of ids
    re-sends the whole list and prints ``text[len(printed):]``: the text of a prefix is always a
    prefix of the text of a longer list (for tokenizers whose decoding is prefix-stable; see
    ``ChatTokenizer.decode_partial``).

Stateless protocol (older run scripts), the same server without ``uid``:
``GET /bos_id``, ``GET /eos_id``; ``POST /encode {"text", "img_prompt"?}`` -> ``{"token_ids"}``
(default system prompt + one user turn, with generation prompt); ``POST /decode {"token_ids"}``
-> ``{"text", "pending_ids"}``.

VLM extras: ``GET /img_start_token``, ``GET /img_context_token``, ``GET /img_end_token`` ->
``{"img_start_token": id, "token": "<img>", "img_token_num": N}`` etc. when ``ax_tokenizer.json``
declares them, else 404. ``img_prompt: true`` on a tokenizer without image tokens is a 400.

``GET /`` -> ``{"status": "ok", ...}`` (health check).

Errors: every failure is a JSON body ``{"error": "..."}`` with a 4xx status (400 bad JSON / field,
a lone surrogate escape like ``"\\ud800"``, a conversation over ``--max_history_tokens``; 404
unknown path, 405 wrong method, 408 a body that stalls ``--body_timeout_s`` short of its length, 411 no
Content-Length, 413 body over 1 MiB) or 500 for a server bug. An unknown, expired or evicted uid
gives 400 with ``"Invalid uid"`` in the message: ax-llm reacts to exactly that by asking for a new
uid, and then goes on *without* a reset. Such a session starts from the default system prompt
with no earlier turns, so it no longer matches what the board holds; the server logs it (an
``/encode`` on a session that never had a ``/reset``), and the board's ``reset`` command puts
both sides in step again.

Sessions are bounded: at most ``--max_sessions`` (only creating one more drops one: the least
recently used), a session unused for ``--session_idle_s`` seconds expires (default a week, 0:
never), each drop is logged with its uid, and a session holds at most ``--max_history_tokens``
tokens, so memory is bounded by their product. Each session has its own lock; the session table
has one lock.

Connections are HTTP/1.1 keep-alive. A client that writes a POST's headers and body in two
writes with Nagle's algorithm on (ax-llm's) would wait for our delayed ACK (~40 ms) before its
body leaves: the server ACKs the headers at once (``TCP_QUICKACK``, Linux) or, where that does
not exist, answers such requests with ``Connection: close``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qs, urlsplit

REQUIREMENTS = "pip3 install tokenizers jinja2"  # besides python3's standard library
try:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import AddedToken, Tokenizer
except ModuleNotFoundError as _missing:
    if __name__ != "__main__":
        raise
    sys.exit(f"error: {Path(sys.argv[0]).name} needs the Python package '{_missing.name}': {REQUIREMENTS}")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12345
DEFAULT_MAX_SESSIONS = 256
DEFAULT_SESSION_IDLE_S = 7 * 24 * 3600.0  # a week: a board left idle overnight or over a weekend keeps its session
DEFAULT_MAX_HISTORY_TOKENS = 16384  # per session: more than a board KV cache holds; bounds memory (x --max_sessions)
MAX_BODY_BYTES = 1 << 20  # 1 MiB
BODY_TIMEOUT_S = 5.0  # a request body that stalls this long (shorter than its Content-Length) gets a 408
# ACKing a request's headers at once lets a client with Nagle's algorithm on send its body
# (see JsonRequestHandler._read_exactly); Linux only, elsewhere such requests get Connection: close.
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
AX_TOKENIZER_FILE = "ax_tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
INVALID_UID = "Invalid uid"  # ax-llm looks for this text in a 400 answer to get a new uid

# The named special tokens transformers passes to the template (PreTrainedTokenizerBase).
SPECIAL_TOKEN_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_REPLACEMENT_CHAR = "\ufffd"
# A character cut inside its UTF-8 sequence has at most 3 of its bytes present; every token
# contributes at least one byte, except special tokens skipped at decode time.
_MAX_HELD_IDS = 4


class TokenizerLoadError(Exception):
    """The tokenizer folder is missing a file or holds an invalid value (message names which)."""


class RequestError(Exception):
    """A client error: becomes an HTTP answer ``status`` with body ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class TemplateRenderError(ValueError):
    """The chat template refused the conversation (``raise_exception``, undefined variable ...)."""


class HistoryTooLongError(ValueError):
    """A session's conversation would grow over its token limit (``--max_history_tokens``)."""


def log(message: str) -> None:
    """One line of the server's log (stderr), with the time."""
    print(f"{datetime.now():%Y-%m-%d %H:%M:%S} {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Chat template environment: the same as transformers.utils.chat_template_utils
# ----------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used for assistant masks) and render the
    body unchanged, as transformers does when it is not tracking assistant tokens."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` inside templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore attributes (sandbox hardening, as transformers)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}."
            )


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


# ----------------------------------------------------------------------------------------------
# ChatTokenizer: the tokenizer folder, the template, encode / decode
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"Cannot read '{path}': {exc}") from exc


def _token_content(value: Any) -> str | None:
    """A special token as saved by transformers: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(value: Any) -> AddedToken | None:
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
                 if k in value}
        flags.setdefault("special", True)
        return AddedToken(value["content"], **flags)
    return None


class ChatTokenizer:
    """The tokenizer folder of a bundle: chat template, special ids, encode and decode.

    Thread-safe after construction (it holds no mutable state).
    """

    def __init__(self, tokenizer_dir: str | os.PathLike):
        self.tokenizer_dir = Path(tokenizer_dir)
        tokenizer_file = self.tokenizer_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerLoadError(
                f"'{tokenizer_file}' does not exist: --tokenizer_dir must be a Hugging Face tokenizer "
                f"folder (tokenizer.json, tokenizer_config.json, ax_tokenizer.json)."
            )
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises its own exception type
            raise TokenizerLoadError(f"Cannot load '{tokenizer_file}': {exc}") from exc
        # transformers never truncates or pads unless asked to.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

        config_file = self.tokenizer_dir / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, dict):
            raise TokenizerLoadError(f"'{config_file}' must hold a JSON object.")
        self._config = config
        self.special_tokens = self._load_special_tokens(config)
        self._tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self._tokenizer.model).__name__ != "BPE"  # transformers skips the clean-up for BPE
        )

        self.chat_template_source, self.chat_template_origin = self._load_chat_template(config)
        self._template: jinja2.Template | None = None
        if self.chat_template_source is not None:
            try:
                self._template = compile_chat_template(self.chat_template_source)
            except jinja2.exceptions.TemplateError as exc:
                raise TokenizerLoadError(
                    f"The chat template from '{self.chat_template_origin}' does not compile: {exc}"
                ) from exc

        self._load_ax_facts()

    # -- loading ---------------------------------------------------------------------------------

    def _load_special_tokens(self, config: dict) -> dict[str, str]:
        """The named special tokens (template variables), added to the tokenizer like transformers
        does when it loads the folder (a named or extra special token that is not an added token
        yet becomes one)."""
        values = {k: config[k] for k in SPECIAL_TOKEN_ATTRIBUTES if config.get(k) is not None}
        extra: list[Any] = []
        for key in ("extra_special_tokens", "additional_special_tokens"):
            if isinstance(config.get(key), list):
                extra += config[key]
        legacy_map = self.tokenizer_dir / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and legacy_map.is_file():
            # transformers only reads the legacy special_tokens_map.json in this case
            legacy = _read_json(legacy_map)
            if isinstance(legacy, dict):
                values.update({k: v for k, v in legacy.items() if k in SPECIAL_TOKEN_ATTRIBUTES and v})
                for key in ("extra_special_tokens", "additional_special_tokens"):
                    if isinstance(legacy.get(key), list):
                        extra += legacy[key]

        declared: dict[str, Any] = {}  # content -> AddedToken dict, in id order
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            def index(item: tuple[str, Any]) -> int:
                return int(item[0]) if str(item[0]).isdigit() else 1 << 62

            for _, entry in sorted(decoder.items(), key=index):
                content = _token_content(entry)
                if content is not None:
                    declared[content] = entry

        existing = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        for entry in list(declared.values()) + list(values.values()) + extra:
            content = _token_content(entry)
            if content is None or content in existing:
                continue
            token = _added_token(declared.get(content, entry))
            if token is None:
                continue
            if token.special:
                self._tokenizer.add_special_tokens([token])
            else:
                self._tokenizer.add_tokens([token])
            existing.add(content)

        named = {}
        for key, value in values.items():
            content = _token_content(value)
            if content is not None:
                named[key] = content
        return named

    def _load_chat_template(self, config: dict) -> tuple[str | None, str | None]:
        jinja_file = self.tokenizer_dir / CHAT_TEMPLATE_FILE
        if jinja_file.is_file():  # the separate file wins, as in transformers
            return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        template = config.get("chat_template")
        origin = str(self.tokenizer_dir / "tokenizer_config.json")
        if isinstance(template, str):
            return template, origin
        if isinstance(template, list):  # [{"name": ..., "template": ...}]: use "default"
            for entry in template:
                if isinstance(entry, dict) and entry.get("name") == "default":
                    return entry.get("template"), origin + " (default)"
        return None, None

    def _id_of(self, token: str | None) -> int:
        if not token:
            return -1
        token_id = self._tokenizer.token_to_id(token)
        return -1 if token_id is None else token_id

    def _load_ax_facts(self) -> None:
        path = self.tokenizer_dir / AX_TOKENIZER_FILE
        facts = _read_json(path) if path.is_file() else {}
        if not isinstance(facts, dict):
            raise TokenizerLoadError(f"'{path}' must hold a JSON object.")
        self.ax_facts_file = str(path) if path.is_file() else None

        def get(key: str, kind: type, default: Any, nullable: bool = False) -> Any:
            if key not in facts:
                return default
            value = facts[key]
            if value is None and nullable:
                return None
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise TokenizerLoadError(f"'{path}': \"{key}\" must be {kind.__name__}"
                                         f"{' or null' if nullable else ''}, got {value!r}.")
            return value

        def check_id(key: str, value: int) -> int:
            if value != -1 and not 0 <= value < self.vocab_size:
                raise TokenizerLoadError(f"'{path}': \"{key}\" = {value} is not a token id "
                                         f"(vocabulary size {self.vocab_size}; -1 means none).")
            return value

        self.bos_id = check_id("bos_id", get("bos_id", int, self._id_of(self.special_tokens.get("bos_token"))))
        fallback_eos = self._id_of(self.special_tokens.get("eos_token"))
        eos_ids = get("eos_ids", list, None)
        eos_id = get("eos_id", int, eos_ids[0] if eos_ids else fallback_eos)
        self.eos_id = check_id("eos_id", eos_id)
        if eos_ids is None:
            eos_ids = [self.eos_id] if self.eos_id >= 0 else []
        for value in eos_ids:
            if not isinstance(value, int) or isinstance(value, bool):
                raise TokenizerLoadError(f"'{path}': \"eos_ids\" must be a list of ints, got {eos_ids!r}.")
            check_id("eos_ids", value)
        self.eos_ids = list(eos_ids)
        self.default_system_prompt = get("system_prompt", str, "")

        self.img_tokens: dict[str, tuple[str, int]] = {}  # name -> (text, id)
        for key in ("img_start_token", "img_context_token", "img_end_token"):
            text = get(key, str, None, nullable=True)
            if text:
                token_id = self._tokenizer.token_to_id(text)
                if token_id is None:
                    raise TokenizerLoadError(f"'{path}': \"{key}\" = {text!r} is not a single token of "
                                             f"the vocabulary.")
                self.img_tokens[key] = (text, token_id)
        self.img_token_num = get("img_token_num", int, 0)
        self.img_text_separator = get("img_text_separator", str, "")
        if self.img_token_num < 0:
            raise TokenizerLoadError(f"'{path}': \"img_token_num\" must be >= 0.")
        if self.img_token_num and "img_context_token" not in self.img_tokens:
            raise TokenizerLoadError(f"'{path}': \"img_token_num\" is {self.img_token_num} but "
                                     f"\"img_context_token\" is not set.")

    # -- public API ------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def supports_images(self) -> bool:
        return self.img_token_num > 0

    def system_messages(self, system_prompt: str | None = None) -> list[dict[str, str]]:
        """The history a session starts from: one system message, or none for an empty prompt."""
        prompt = self.default_system_prompt if system_prompt is None else system_prompt
        return [{"role": "system", "content": prompt}] if prompt else []

    def image_placeholder(self) -> str:
        """``img_start + img_context * img_token_num + img_end`` (the parts that are declared)."""
        if not self.supports_images:
            raise ValueError("this tokenizer declares no image tokens (ax_tokenizer.json img_token_num is 0)")
        start = self.img_tokens.get("img_start_token", ("", 0))[0]
        end = self.img_tokens.get("img_end_token", ("", 0))[0]
        return start + self.img_tokens["img_context_token"][0] * self.img_token_num + end

    def user_content(self, text: str, img_prompt: bool = False) -> str:
        """A user turn's content: ``text``, after the image placeholder and separator when ``img_prompt``."""
        return self.image_placeholder() + self.img_text_separator + text if img_prompt else text

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly like ``apply_chat_template(..., tokenize=False)``.

        Raises TemplateRenderError when the template refuses the conversation.
        """
        if self._template is None:
            return "\n".join(str(m.get("content", "")) for m in messages)
        if not messages:
            raise TemplateRenderError("cannot apply the chat template to an empty conversation")
        # transformers drops the keys whose value is None before rendering
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateRenderError(f"the chat template refused the conversation: {exc}") from exc

    def encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Plain ``tokenizers`` encoding of ``text``."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered conversation: ``apply_chat_template(messages,
        add_generation_prompt=..., tokenize=True)``."""
        text = self.render(messages, add_generation_prompt)
        if self._template is not None:
            return self.encode_text(text, add_special_tokens=False)
        ids = self.encode_text(text, add_special_tokens=True)
        if self._config.get("add_bos_token") is True and self.bos_id >= 0 and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def check_ids(self, ids: list[int]) -> None:
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is out of range [0, {self.vocab_size})")

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._clean_up_spaces:
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                                  (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                                  (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def decode_partial(self, ids: list[int], skip_special_tokens: bool = False) -> tuple[str, int]:
        """Decode ``ids`` without a character cut in its UTF-8 sequence at the end.

        Returns ``(text, pending)``: ``text`` decodes ``ids[:len(ids) - pending]``, where
        ``pending`` (0..4) trailing ids only hold part of a multi-byte character. Tokenizers
        decode such a cut sequence to U+FFFD, so: if the full text ends with U+FFFD, the longest
        prefix that dropped at most 4 ids and does not end with U+FFFD is returned instead. A
        U+FFFD that stays after dropping 4 ids is genuine (invalid bytes) and is kept.
        """
        self.check_ids(ids)
        text = self._decode_raw(ids, skip_special_tokens)
        if not text.endswith(_REPLACEMENT_CHAR):
            return text, 0
        for held in range(1, min(_MAX_HELD_IDS, len(ids)) + 1):
            shorter = self._decode_raw(ids[: len(ids) - held], skip_special_tokens)
            if not shorter.endswith(_REPLACEMENT_CHAR):
                return shorter, held
        return text, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``, up to the last complete character (see ``decode_partial``)."""
        return self.decode_partial(ids, skip_special_tokens)[0]

    def describe(self) -> dict[str, Any]:
        return {
            "tokenizer_dir": str(self.tokenizer_dir),
            "vocab_size": self.vocab_size,
            "chat_template": self.chat_template_origin,
            "ax_tokenizer": self.ax_facts_file,
            "bos_id": self.bos_id,
            "eos_ids": self.eos_ids,
            "images": self.supports_images,
            "img_token_num": self.img_token_num,
        }


# ----------------------------------------------------------------------------------------------
# ChatSession: one board conversation (uid)
# ----------------------------------------------------------------------------------------------


class EncodeResult(NamedTuple):
    token_ids: list[int]
    diff: list[int]
    prefix_mismatch: bool


class ChatSession:
    """The history of one conversation and the tokens its client already holds.

    Methods lock the session, so concurrent requests for the same uid are serialized. The
    conversation is bounded: a reset or encode whose tokens would exceed ``max_tokens`` raises
    ``HistoryTooLongError`` and leaves the history as it was. ``was_reset`` tells whether a client
    ever reset it (a new session starts from the default system prompt without one).
    """

    def __init__(self, tokenizer: ChatTokenizer, system_prompt: str | None = None,
                 max_tokens: int = DEFAULT_MAX_HISTORY_TOKENS):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.lock = threading.RLock()
        self.last_used = time.monotonic()
        self._messages: list[dict[str, str]] = []
        self._sent: list[int] = []
        self.turns = 0  # user turns since the last reset
        self.reset(system_prompt)
        self.was_reset = False

    def _check_length(self, ids: list[int]) -> None:
        if len(ids) > self.max_tokens:
            raise HistoryTooLongError(
                f"the conversation would be {len(ids)} tokens, over this server's limit of {self.max_tokens} "
                f"per session (--max_history_tokens): POST /reset to start a new conversation")

    def reset(self, system_prompt: str | None = None) -> list[int]:
        """Start over with just the system message; return its tokens without generation prompt."""
        with self.lock:
            messages = self.tokenizer.system_messages(system_prompt)
            ids = self.tokenizer.encode_messages(messages, add_generation_prompt=False) if messages else []
            self._check_length(ids)
            self._messages, self._sent, self.turns, self.was_reset = messages, ids, 0, True
            return list(ids)

    def encode(self, text: str, last_reply: str | None = None, img_prompt: bool = False) -> EncodeResult:
        """Append ``last_reply`` (assistant) when given, then the user ``text``; see the module doc."""
        with self.lock:
            history = list(self._messages)
            held = self._sent
            if last_reply is not None:
                history.append({"role": "assistant", "content": last_reply})
                # The client holds the tokens it generated: the reply is part of what it has.
                held = self.tokenizer.encode_messages(history, add_generation_prompt=False)
            history.append({"role": "user", "content": self.tokenizer.user_content(text, img_prompt)})
            ids = self.tokenizer.encode_messages(history, add_generation_prompt=True)
            self._check_length(ids)
            if ids[: len(held)] == held:
                diff, mismatch = ids[len(held):], False
            else:  # the template rewrote tokens the client holds: it must prefill everything
                diff, mismatch = list(ids), True
            self._messages, self._sent = history, ids
            self.turns += 1
            return EncodeResult(list(ids), diff, mismatch)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)


class SessionTable:
    """uid -> ChatSession, bounded in number and idle time. Thread-safe.

    A session is dropped only when creating one more would exceed ``max_sessions`` (the least
    recently used goes) or when it was not used for ``idle_s`` seconds (0: never); each drop is
    logged with its uid through ``log``.
    """

    def __init__(self, factory: Callable[[], ChatSession], max_sessions: int = DEFAULT_MAX_SESSIONS,
                 idle_s: float = DEFAULT_SESSION_IDLE_S, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = log):
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self._factory = factory
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self._clock = clock
        self._log = log
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()  # least recently used first
        self.evicted = 0
        self.expired = 0

    def _expire_locked(self, now: float) -> None:
        if self.idle_s <= 0:
            return
        while self._sessions:
            uid, session = next(iter(self._sessions.items()))
            if now - session.last_used <= self.idle_s:
                break
            del self._sessions[uid]
            self.expired += 1
            self._log(f"session {uid} expired: unused for {now - session.last_used:.0f} s "
                      f"(--session_idle_s {self.idle_s:g})")

    def create(self) -> tuple[str, ChatSession]:
        session = self._factory()  # outside the lock: it renders the template
        uid = str(uuid.uuid4())
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            while len(self._sessions) >= self.max_sessions:
                old_uid, old = self._sessions.popitem(last=False)
                self.evicted += 1
                self._log(f"session {old_uid} evicted: --max_sessions {self.max_sessions} reached and it was "
                          f"the least recently used (unused for {now - old.last_used:.0f} s)")
            session.last_used = now
            self._sessions[uid] = session
        return uid, session

    def get(self, uid: str) -> ChatSession | None:
        """The session, marked as just used; None when unknown, expired or evicted."""
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            session = self._sessions.get(uid)
            if session is not None:
                session.last_used = now
                self._sessions.move_to_end(uid)
            return session

    def __len__(self) -> int:
        with self._lock:
            self._expire_locked(self._clock())
            return len(self._sessions)


# ----------------------------------------------------------------------------------------------
# HTTP layer
# ----------------------------------------------------------------------------------------------
# JsonRequestHandler and JsonHTTPServer are generic (no tokenizer in them): generator/serve.py loads this
# file to build the OpenAI-compatible server on them. Keep them standard library only.


def _field(body: dict, key: str, kind: type, required: bool = False) -> Any:
    """``body[key]`` checked against ``kind``; a missing key and JSON null are the same."""
    value = body.get(key)
    if value is None:
        if required:
            raise RequestError(400, f"missing field \"{key}\"")
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = {str: "a string", bool: "a boolean", list: "a list", int: "an integer"}.get(kind, kind.__name__)
        raise RequestError(400, f"field \"{key}\" must be {expected}, got {type(value).__name__}")
    return value


def _token_ids_field(body: dict, tokenizer: ChatTokenizer) -> list[int]:
    ids = _field(body, "token_ids", list, required=True)
    for value in ids:
        if not isinstance(value, int) or isinstance(value, bool):
            raise RequestError(400, f"field \"token_ids\" must be a list of integers, found {value!r}")
    try:
        tokenizer.check_ids(ids)
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None
    return ids


class TokenizerApp:
    """The routes, independent of HTTP: ``handle(method, path, query, body) -> (status, payload)``."""

    def __init__(self, tokenizer: ChatTokenizer, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 session_idle_s: float = DEFAULT_SESSION_IDLE_S,
                 max_history_tokens: int = DEFAULT_MAX_HISTORY_TOKENS):
        self.tokenizer = tokenizer
        self.sessions = SessionTable(lambda: ChatSession(tokenizer, max_tokens=max_history_tokens),
                                     max_sessions, session_idle_s)
        self.routes: dict[str, dict[str, Callable[[dict, dict], dict]]] = {
            "/": {"GET": self.health},
            "/get_uid": {"GET": self.get_uid},
            "/bos_id": {"GET": self.bos_id},
            "/eos_id": {"GET": self.eos_id},
            "/img_start_token": {"GET": lambda q, b: self.img_token("img_start_token", q)},
            "/img_context_token": {"GET": lambda q, b: self.img_token("img_context_token", q)},
            "/img_end_token": {"GET": lambda q, b: self.img_token("img_end_token", q)},
            "/reset": {"POST": self.reset, "GET": self.reset},
            "/encode": {"POST": self.encode},
            "/decode": {"POST": self.decode},
        }

    def handle(self, method: str, path: str, query: dict, body: dict) -> dict:
        methods = self.routes.get(path)
        if methods is None:
            raise RequestError(404, f"unknown path {path!r}")
        handler = methods.get(method)
        if handler is None:
            raise RequestError(405, f"{method} is not allowed on {path} (use {', '.join(sorted(methods))})",
                               {"Allow": ", ".join(sorted(methods))})
        try:
            return handler(query, body)
        except (TemplateRenderError, HistoryTooLongError) as exc:
            raise RequestError(400, str(exc)) from None

    def _session(self, uid: Any) -> ChatSession:
        if uid is None:
            raise RequestError(400, "missing field \"uid\"")
        if not isinstance(uid, str):
            raise RequestError(400, f"{INVALID_UID}: field \"uid\" must be a string")
        session = self.sessions.get(uid)
        if session is None:
            raise RequestError(400, f"{INVALID_UID}: {uid!r} is unknown, expired or was evicted; "
                                    f"GET /get_uid for a new one")
        return session

    def _optional_session(self, uid: Any) -> ChatSession | None:
        return None if uid is None else self._session(uid)

    # GET ------------------------------------------------------------------------------------------

    def health(self, query: dict, body: dict) -> dict:
        return {"status": "ok", "sessions": len(self.sessions), **self.tokenizer.describe()}

    def get_uid(self, query: dict, body: dict) -> dict:
        uid, _ = self.sessions.create()
        return {"uid": uid}

    def bos_id(self, query: dict, body: dict) -> dict:
        self._optional_session(query.get("uid"))
        return {"bos_id": self.tokenizer.bos_id}

    def eos_id(self, query: dict, body: dict) -> dict:
        self._optional_session(query.get("uid"))
        return {"eos_id": self.tokenizer.eos_id, "eos_ids": self.tokenizer.eos_ids}

    def img_token(self, name: str, query: dict) -> dict:
        self._optional_session(query.get("uid"))
        if name not in self.tokenizer.img_tokens:
            raise RequestError(404, f"this model declares no {name} (ax_tokenizer.json)")
        text, token_id = self.tokenizer.img_tokens[name]
        return {name: token_id, "token": text, "img_token_num": self.tokenizer.img_token_num}

    # POST (GET /reset reads the query) --------------------------------------------------------------

    def reset(self, query: dict, body: dict) -> dict:
        source = body if body else query
        session = self._session(source.get("uid"))
        system_prompt = _field(source, "system_prompt", str)
        return {"token_ids": session.reset(system_prompt)}

    def encode(self, query: dict, body: dict) -> dict:
        text = _field(body, "text", str, required=True)
        img_prompt = bool(_field(body, "img_prompt", bool))
        if img_prompt and not self.tokenizer.supports_images:
            raise RequestError(400, "img_prompt is true but this model declares no image tokens")
        uid = body.get("uid")
        if uid is None:  # stateless protocol: one user turn after the default system prompt
            if body.get("last_reply") is not None:
                raise RequestError(400, "\"last_reply\" needs a session: send a \"uid\" from GET /get_uid")
            messages = self.tokenizer.system_messages() + [
                {"role": "user", "content": self.tokenizer.user_content(text, img_prompt)}]
            return {"token_ids": self.tokenizer.encode_messages(messages, add_generation_prompt=True)}
        session = self._session(uid)
        last_reply = _field(body, "last_reply", str)
        if not session.was_reset and session.turns == 0:
            # A board that got "Invalid uid" fetches a new uid and goes on without a reset: its KV cache
            # holds a system prompt and turns this session never saw (see the README of the bundle).
            log(f"session {uid}: /encode without a /reset first, the conversation starts from the default "
                f"system prompt {self.tokenizer.default_system_prompt!r}; a client that had another system "
                f"prompt or earlier turns is now out of step with this session")
        result = session.encode(text, last_reply, img_prompt)
        return {"token_ids": result.token_ids, "diff": result.diff, "prefix_mismatch": result.prefix_mismatch}

    def decode(self, query: dict, body: dict) -> dict:
        ids = _token_ids_field(body, self.tokenizer)
        skip = bool(_field(body, "skip_special_tokens", bool))
        self._optional_session(body.get("uid"))
        text, pending = self.tokenizer.decode_partial(ids, skip)
        return {"text": text, "pending_ids": pending}


class JsonRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 plumbing of a JSON API, shared by two servers: ``TokenizerRequestHandler`` below and
    the generator's OpenAI-compatible ``python -m generator serve`` (``generator/serve.py`` loads
    this file by path to subclass it). This file is a standalone script copied into every bundle,
    so this class uses the standard library only and knows nothing of tokenizers or models.

    What it does:

    * keep-alive connections with ``TCP_NODELAY`` (headers and body are two writes; without it
      Nagle + the client's delayed ACK add ~40 ms to every answer on a kept-alive connection);
    * ``send_json``; http.server's own errors (bad request line, HTTP version...) are JSON too
      (``send_error``), and a bug in a handler becomes a JSON 500 (``send_internal_error``);
    * request lines are logged only when ``server.log_requests`` is true (the server is a
      ``JsonHTTPServer``, below);
    * ``read_json`` / ``read_body``: the body of a POST as a JSON object, Content-Length checked
      against ``max_body_bytes`` before anything is read; no chunked bodies;
    * every method (``do_GET``, ``do_PUT``, ``do_HEAD``, made-up ones) reaches ``dispatch``, so an
      unknown method gets the subclass's JSON 404/405 instead of http.server's 501 HTML page;
    * a request body that is not read (refused, too large, sent with a GET) closes the connection
      after the answer, with a half close and a bounded drain (``finish``) so that the unread data
      does not make the kernel reset the connection and destroy the answer before the client reads it.

    What a subclass provides (the hooks):

    ``dispatch()``
        The route table: answer ``self.command`` on ``self.path``, taking the body from
        ``read_body()`` and answering with ``send_json``.
    ``error_body(status, message)``
        The JSON of an error answer. Default ``{"error": message}``.
    ``error_type``
        What ``read_json`` raises, called as ``error_type(status, message)``; ``dispatch`` catches
        it. Default ``RequestError``.
    ``max_body_bytes``
        The body size limit. Default ``server.max_body_bytes``.
    ``body_timeout``
        Seconds a request body may stall before the answer is a 408. Default None: ``timeout``.
    ``max_drain_bytes``, ``server_version``, ``timeout``
        At most this much of an unread body is discarded before closing; http.server's own settings.
    """

    protocol_version = "HTTP/1.1"  # keep-alive: clients (ax-llm, openai) reuse their connection
    error_type: Callable[[int, str], Exception] = RequestError
    body_timeout: float | None = None
    max_drain_bytes = 4 << 20
    server: Any  # a JsonHTTPServer (below): log_requests, max_body_bytes

    def setup(self) -> None:
        super().setup()
        self._body_unread = False  # the request carries a body that was not (or not yet) read
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def finish(self) -> None:
        if self._body_unread and self.close_connection:
            # We answered without reading the request body. Closing a socket with unread data
            # sends a TCP reset, which can destroy our answer before the client reads it: half
            # close, then discard what the client still sends (briefly, bounded).
            try:
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(1.0)
                for _ in range(self.max_drain_bytes // 65536):
                    if not self.connection.recv(65536):
                        break
            except OSError:
                pass
        super().finish()

    # -- responses -------------------------------------------------------------------------------

    def send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        if self._body_unread:  # its bytes would be read as the next request: this answer is the last
            self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def error_body(self, status: int, message: str) -> dict:
        """The JSON body of an error answer (hook)."""
        return {"error": message}

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised inside http.server (bad request line, unknown method...) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.send_json(code, self.error_body(code, message or phrase))

    def send_internal_error(self, exc: BaseException) -> None:
        """A bug in a handler: log the traceback, answer 500 JSON, close the connection, keep serving."""
        traceback.print_exc(file=sys.stderr)
        self.close_connection = True
        self.send_json(500, self.error_body(500, f"internal server error: {type(exc).__name__}: {exc}"))

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)

    # -- request body ------------------------------------------------------------------------------

    @property
    def max_body_bytes(self) -> int:
        return self.server.max_body_bytes

    def has_body(self) -> bool:
        return (self.headers.get("Content-Length") not in (None, "0")
                or "chunked" in self.headers.get("Transfer-Encoding", "").lower())

    def content_length(self) -> int | None:
        """The Content-Length header: None when absent, -1 when it is not a non-negative integer."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        try:
            length = int(raw)
        except ValueError:
            return -1
        return length if length >= 0 else -1

    def read_json(self) -> dict:
        """The request body as a JSON object (``{}`` when empty). Raises ``error_type``: 411 for a
        chunked body or no Content-Length, 400 for a bad Content-Length, a short body or anything but
        a JSON object, 413 over ``max_body_bytes`` (checked first: such a body is never read)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = self._body_unread = True
            raise self.error_type(411, "chunked bodies are not supported: send Content-Length")
        length = self.content_length()
        if length is None:
            self.close_connection = True
            raise self.error_type(411, "POST needs a Content-Length header")
        if length < 0:
            self.close_connection = self._body_unread = True
            raise self.error_type(400, f"invalid Content-Length {self.headers.get('Content-Length')!r}")
        if length > self.max_body_bytes:
            self.close_connection = self._body_unread = True
            raise self.error_type(413, f"request body of {length} bytes is over the limit of "
                                       f"{self.max_body_bytes} bytes")
        raw = self._read_exactly(length) if length else b""
        self._body_unread = False
        if len(raw) != length:
            self.close_connection = True
            raise self.error_type(400, "request body shorter than its Content-Length")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw.decode("utf-8"))
            if b"\\u" in raw:  # an escaped lone surrogate ("\ud800") decodes to a str that is not Unicode text
                json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise self.error_type(400, "request body is not valid JSON text: it escapes a lone UTF-16 "
                                       "surrogate (\\ud800-\\udfff), which is not a character") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self.error_type(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise self.error_type(400, "request body must be a JSON object")
        return body

    def _read_exactly(self, length: int) -> bytes:
        """``length`` bytes of body (fewer when the client closes first). ACKs the headers at once
        (TCP_QUICKACK): a client with Nagle's algorithm on holds its body back until then, which the
        delayed ACK would make ~40 ms. A body that stalls ``body_timeout`` seconds gets a 408."""
        if TCP_QUICKACK is not None:
            try:
                self.connection.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
            except OSError:
                pass
        if self.body_timeout is not None:
            self.connection.settimeout(self.body_timeout)
        try:
            return self.rfile.read(length)
        except socket.timeout:
            self.close_connection = self._body_unread = True
            raise self.error_type(408, f"request body incomplete: fewer than its Content-Length of {length} "
                                       f"bytes arrived, then nothing for {self.body_timeout:g} s") from None
        finally:
            self.connection.settimeout(self.timeout)

    def read_body(self) -> dict:
        """``read_json()`` for a POST; ``{}`` for other methods, whose body (if any) is not read, so
        the connection closes after the answer."""
        if self.command == "POST":
            return self.read_json()
        if self._body_unread:
            self.close_connection = True
        return {}

    # -- dispatch ----------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Answer the request (hook: the subclass's routes)."""
        raise NotImplementedError

    def _dispatch_any_method(self) -> None:
        self._body_unread = self.has_body()  # until read_json reads it
        self.dispatch()

    def __getattr__(self, name: str) -> Any:
        # http.server calls do_<METHOD>: every method (GET, POST, PUT, DELETE, HEAD, made-up ones)
        # reaches dispatch, which answers a JSON 405 (or 404) instead of http.server's 501 HTML page.
        if name.startswith("do_"):
            return self._dispatch_any_method
        raise AttributeError(name)


class TokenizerRequestHandler(JsonRequestHandler):
    server_version = "ax-tokenizer"
    timeout = 60  # seconds an idle keep-alive connection may hold a thread
    server: "TokenizerHTTPServer"

    @property
    def body_timeout(self) -> float:
        return self.server.body_timeout

    def handle_expect_100(self) -> bool:
        # A client that waits for "100 Continue" learns that its body is too large before sending it.
        length = self.content_length()
        if length is not None and length > self.max_body_bytes:
            self.close_connection = self._body_unread = True
            self.send_json(413, self.error_body(413, f"request body over {self.max_body_bytes} bytes"))
            return False
        return super().handle_expect_100()

    def dispatch(self) -> None:
        if TCP_QUICKACK is None and self.has_body():
            # No quick ACK on this system: answer a request with a body with Connection: close, so a
            # Nagle client's next body never waits for a delayed ACK (a new connection ACKs at once).
            self.close_connection = True
        try:
            parts = urlsplit(self.path)
            path = parts.path.rstrip("/") or "/"
            query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            body = self.read_body()  # read before routing: a bad body is a 400 whatever the path
            self.send_json(200, self.server.app.handle(self.command, path, query, body))
        except RequestError as exc:
            self.send_json(exc.status, self.error_body(exc.status, exc.message), exc.headers)
        except Exception as exc:  # a bug: answer 500 JSON, keep serving, log the traceback
            self.send_internal_error(exc)


class JsonHTTPServer(ThreadingHTTPServer):
    """The server half of ``JsonRequestHandler`` (shared the same way): a thread per connection, an
    IPv6 address when the host has a ":", and the settings the handler reads."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler_class: type[JsonRequestHandler],
                 log_requests: bool = False, max_body_bytes: int = MAX_BODY_BYTES):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.log_requests = log_requests
        self.max_body_bytes = max_body_bytes
        super().__init__(address, handler_class)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (reset, timed out) is not a server error: one log line when
        ``log_requests``, no traceback. Anything else: socketserver's report with the traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, socket.timeout)):
            if self.log_requests:
                log(f"{client_address[0]}: connection lost: {error!r}")
            return
        super().handle_error(request, client_address)

    def serve_until_interrupted(self) -> None:
        """Print ``Server running at http://HOST:PORT`` (what launch scripts wait for), serve until
        Ctrl-C, then close the socket."""
        host, port = self.server_address[:2]
        print(f"Server running at http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.server_close()


class TokenizerHTTPServer(JsonHTTPServer):
    request_queue_size = 128  # many boards/threads connecting at once

    def __init__(self, address: tuple[str, int], app: TokenizerApp, log_requests: bool = False,
                 max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT_S):
        self.app = app
        self.body_timeout = body_timeout
        super().__init__(address, TokenizerRequestHandler, log_requests, max_body_bytes)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def default_tokenizer_dir(script: str | os.PathLike = __file__) -> Path:
    """``<dir>/<name>_tokenizer`` for ``<dir>/<name>_tokenizer_uid.py``, else ``<dir>/tokenizer``."""
    script = Path(script).resolve()
    match = re.fullmatch(r"(.+)_tokenizer_uid\.py", script.name)
    if match:
        named = script.parent / f"{match.group(1)}_tokenizer"
        if named.is_dir() or not (script.parent / "tokenizer").is_dir():
            return named
    return script.parent / "tokenizer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Tokenizer HTTP server for ax-llm (--tokenizer_type 2).")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default %(default)s; 0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port (default %(default)s; 0: any free port, reported in the 'Server running at' "
                             "line on stdout and in --port_file)")
    parser.add_argument("--port_file", default=None,
                        help="write the port the server listens on to this file (one line) once it accepts "
                             "connections; removed when the server stops")
    parser.add_argument("--tokenizer_dir", default=None,
                        help="tokenizer folder (default: <name>_tokenizer next to <name>_tokenizer_uid.py)")
    parser.add_argument("--max_sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                        help="most sessions kept; only when a new one would exceed it is the least recently "
                             "used dropped, and logged (default %(default)s)")
    parser.add_argument("--session_idle_s", type=float, default=DEFAULT_SESSION_IDLE_S,
                        help=f"a session unused this long expires, and is logged; 0 = never (default "
                             f"%(default)g s = {DEFAULT_SESSION_IDLE_S / 86400:g} days, so a live board "
                             f"conversation never expires)")
    parser.add_argument("--max_history_tokens", type=int, default=DEFAULT_MAX_HISTORY_TOKENS,
                        help="most tokens of one session's conversation; a /reset or /encode that would "
                             "exceed it gets a 400 (default %(default)s). Memory is bounded by "
                             "--max_sessions x this")
    parser.add_argument("--body_timeout_s", type=float, default=BODY_TIMEOUT_S,
                        help="a request body that stalls this long short of its Content-Length gets a 408 "
                             "(default %(default)g)")
    parser.add_argument("--log_requests", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if args.max_sessions < 1:
        parser.error("--max_sessions must be >= 1")
    if args.max_history_tokens < 1:
        parser.error("--max_history_tokens must be >= 1")
    if not args.body_timeout_s > 0:
        parser.error("--body_timeout_s must be > 0")
    if args.session_idle_s < 0:
        parser.error("--session_idle_s must be >= 0 (0: never)")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be in 0..65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else default_tokenizer_dir()
    try:
        tokenizer = ChatTokenizer(tokenizer_dir)
    except TokenizerLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # fail now, not on every /get_uid, when the template refuses the default history
        ChatSession(tokenizer, max_tokens=args.max_history_tokens).encode("Hello")
    except (TemplateRenderError, HistoryTooLongError) as exc:
        print(f"error: {tokenizer_dir}: a first turn after the default system prompt "
              f"({tokenizer.default_system_prompt!r}) cannot be rendered: {exc}", file=sys.stderr)
        return 2
    app = TokenizerApp(tokenizer, args.max_sessions, args.session_idle_s, args.max_history_tokens)
    try:
        server = TokenizerHTTPServer((args.host, args.port), app, log_requests=args.log_requests,
                                     body_timeout=args.body_timeout_s)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    info = tokenizer.describe()
    print(f"tokenizer {info['tokenizer_dir']}: vocab {info['vocab_size']}, template "
          f"{info['chat_template'] or 'none'}, bos_id {info['bos_id']}, eos_ids {info['eos_ids']}",
          file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # stop through the finally blocks
    port_file = Path(args.port_file) if args.port_file else None
    if port_file is not None:
        partial = port_file.with_name(f".{port_file.name}.{os.getpid()}")
        try:  # written whole or not at all: a reader never sees half a number
            partial.write_text(f"{server.server_address[1]}\n")
            os.replace(partial, port_file)
        except OSError as exc:
            print(f"error: cannot write --port_file {port_file}: {exc}", file=sys.stderr)
            partial.unlink(missing_ok=True)
            server.server_close()
            return 2
    try:
        server.serve_until_interrupted()
    finally:
        if port_file is not None:
            port_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
