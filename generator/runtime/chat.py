"""A conversation as the board holds it (Chat): a tokenizer session, the engine's cache and a
generator; and loading the bundle's tokenizer server file, which tokenizes in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..contract import Bundle, Sampling
from ..errors import GeneratorError
from .engine import Engine
from .generation import Generator, Sampler, StreamDecoder, TurnStats, common_prefix
from .mrope import prefill_with_images
from .vision import VisionEncoder, image_rows


def load_script(path: Path, name: str):
    """Import a standalone script (the tokenizer server, which must not import this package) by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tokenizer_module(bundle: Bundle):
    """Import the bundle's tokenizer server file (the same code serves the board over HTTP)."""
    path = bundle.tokenizer_server
    return load_script(path, f"axgen_tokenizer_{abs(hash(str(path)))}")


class ConversationRefused(Exception):
    """The bundle's chat template refused to render a conversation (the message says why)."""


class Chat:
    """A conversation as the board holds it: a tokenizer session + the engine's cache."""

    def __init__(self, bundle: Bundle, engine: Engine, tokenizer=None, *, system_prompt: str | None = None,
                 seed: int | None = None, sampling: dict | None = None):
        """`tokenizer`: an HttpTokenizer (the board's tokenizer server); None tokenizes in-process with
        the bundle's tokenizer server module. `sampling`: post_config.json settings replacing the
        bundle's (a --config file's top_k, top_p, ...)."""
        self.b, self.engine = bundle, engine
        self.tok_module = None  # the bundle's tokenizer server module, when tokenizing in-process
        if tokenizer is None:
            self.tok_module = mod = load_tokenizer_module(bundle)
            chat_tokenizer = mod.ChatTokenizer(bundle.tokenizer_dir)
            tokenizer, eos = mod.ChatSession(chat_tokenizer), chat_tokenizer.eos_ids
        else:
            eos = tokenizer.eos_ids
        self.tok = tokenizer
        self.gen = Generator(engine, list(eos) or bundle.spec.eos_token_ids, Sampler(Sampling(**{**bundle.sampling.model_dump(), **(sampling or {})}) if sampling
                                                              else bundle.sampling, seed))
        self.system_prompt = bundle.system_prompt if system_prompt is None else system_prompt
        self.last_reply: str | None = None
        self.system_ids: list[int] = []
        self._vision = None  # VisionEncoder, opened by the first image

    @property
    def stats(self) -> TurnStats:
        return self.gen.stats

    def sampler(self, seed: int | None = None, **settings) -> Sampler:
        """A sampler with the bundle's post_config.json settings, `settings` replacing some of them."""
        return Sampler(Sampling(**{**self.b.sampling.model_dump(), **settings}), seed)

    def encode_conversation(self, messages: list[dict[str, str]]) -> list[int]:
        """A whole conversation ({role, content} messages) rendered by the bundle's chat template, with
        the generation prompt; ConversationRefused when the template refuses it. In-process only."""
        if self.tok_module is None:
            raise GeneratorError("rendering whole conversations needs the in-process tokenizer")
        try:
            return list(self.tok.tokenizer.encode_messages(messages, add_generation_prompt=True))
        except self.tok_module.TemplateRenderError as exc:
            raise ConversationRefused(str(exc)) from None

    def complete(self, ids: list[int], max_new_tokens: int | None = None,
                 sampler: Sampler | None = None, images: list[np.ndarray] | None = None) -> Iterator[str]:
        """Continue the cached sequence to `ids` and yield, for every generated token, the text it
        completes ("" when none). `sampler` applies to this answer only (default: the chat's).
        `images`: every image of the conversation `ids` (serve), in order, one per run of image-context
        tokens: the same ids may stand for another picture, so the cache is kept only up to the first
        image and each image's rows replace its run's embeddings."""
        default = self.gen.sampler
        self.gen.sampler = sampler or default
        ids = list(ids)
        try:
            if images:
                ctx = self.b.manifest.vision.img_context_token_id
                runs = int(np.count_nonzero(np.diff((np.asarray([-1, *ids]) == ctx).astype(np.int8)) == 1))
                if runs != len(images) and self.b.manifest.vision.image_grid:  # mRoPE counts every run an image
                    raise GeneratorError(f"the conversation holds {runs} run(s) of the image token "
                                         f"'{self.image_token_text()}' for {len(images)} image(s): its text may not "
                                         f"appear in a message (send the picture as an image part).")
                rows = image_rows(ids, [self.vision().encode(im) for im in images], ctx)
                self.engine.rewind(min(common_prefix(self.engine.cached_ids, ids), min(rows)))
                self.engine.image_rows = rows
                prefill_with_images(self.engine, ids, self.b.manifest.vision)  # mRoPE: the images' positions
            stream = StreamDecoder(self.tok.decode, self.gen.eos)
            for tok in self.gen.stream(ids, max_new_tokens):
                yield stream.push(tok)
        finally:
            self.gen.sampler = default
            self.engine.image_rows = {}

    def start(self, system_ids: list[int], k: np.ndarray | None = None, v: np.ndarray | None = None) -> int:
        """Start over from the system prompt's tokens (kept as the cached prefix): their cache rows
        `k`, `v` installed when given (a saved --kvcache_path), else prefilled once. Returns their count."""
        self.system_ids = list(system_ids)
        self.last_reply = None
        if k is not None or not self.system_ids:
            self.engine.load_prefix(k, v, self.system_ids)
        else:
            self.engine.reset()
            self.engine.prefill(self.system_ids)
        return len(self.system_ids)

    def reset(self) -> int:
        """Start over with a new tokenizer session and the system prompt prefilled once."""
        return self.start(self.tok.reset(self.system_prompt))

    def turn(self, text: str, max_new_tokens: int | None = None,
             images: list[np.ndarray] | None = None) -> Iterator[str]:
        """Send a user message; yields text pieces as they complete. `images`: uint8 RGB [H, W, 3] arrays
        (a vision-language bundle; one per turn, as the board's VLM runtime): the tokenizer expands the
        turn with the image tokens (img_prompt) and the vision graph's rows replace their embeddings."""
        images = list(images or [])
        if len(images) > 1:
            raise GeneratorError(f"{len(images)} images in one turn: the bundle's runtime takes one image per "
                                 f"turn (send the others in later turns).")
        self.refuse_image_token_text(text)
        embeds = [self.vision().encode(im) for im in images]
        ids = list(self.tok.encode(text, last_reply=self.last_reply, img_prompt=bool(images))[0])
        if images:
            rows = image_rows(ids, embeds, self.b.manifest.vision.img_context_token_id)
            first = min(rows)  # the cache must not keep rows of an earlier image at these positions
            self.engine.rewind(min(common_prefix(self.engine.cached_ids, ids), first))
            self.engine.image_rows = rows
        stream = StreamDecoder(self.tok.decode, self.gen.eos)
        try:
            if images:  # mRoPE: the turn's positions with the image's grid (runtime/mrope.py)
                prefill_with_images(self.engine, ids, self.b.manifest.vision)
            for tok in self.gen.stream(ids, max_new_tokens):
                piece = stream.push(tok)
                if piece:
                    yield piece
        finally:
            self.engine.image_rows = {}
        self.last_reply = self.tok.decode(stream.ids)

    def image_token_text(self) -> str:
        """The image-context token's text (the bundle's ax_tokenizer.json), e.g. <|image_pad|>."""
        import json

        path = self.b.dir / self.b.manifest.tokenizer.dir / "ax_tokenizer.json"
        return str(json.loads(path.read_text(encoding="utf-8")).get("img_context_token") or "")

    def refuse_image_token_text(self, text: str) -> None:
        """As transformers' processors do ("Found N <image token> tokens in the text ..."): a message may
        not hold the image-context token's text, which would read as an image's placeholder."""
        token = self.image_token_text() if self.b.manifest.vision is not None else ""
        if token and token in text:
            raise GeneratorError(f"The message contains the image token {token!r} as text ({text.count(token)} "
                                 f"time(s)); like the reference processor, the runner refuses it, since it would "
                                 f"stand for an image's place. Remove it, and send pictures as images.")

    def vision(self):
        """The bundle's vision encoder (opened on first use); a clear error for a text-only bundle."""
        if self._vision is None:
            self._vision = VisionEncoder(self.b, threads=self.engine.threads, numerics=self.engine.numerics)
        return self._vision
