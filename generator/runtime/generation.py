"""Token-level generation on an Engine: post_config.json sampling (Sampler), prefill-what-is-new then
sample-until-EOS (Generator, with TurnStats), and text streaming that never splits a character
(StreamDecoder)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..contract import Sampling
from .engine import Engine


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Sampler:
    """post_config.json sampling, in the board's order (contract section 4)."""

    def __init__(self, cfg: Sampling, seed: int | None = None):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, history: list[int], indices: np.ndarray | None = None) -> int:
        c = self.cfg
        x = logits.astype(np.float32)  # a copy: the caller's logits stay as they are
        ids = indices
        if c.enable_temperature and c.temperature > 0:
            x /= c.temperature
        if c.enable_repetition_penalty and history:
            recent = set(history[max(0, len(history) - c.penalty_window):])  # window 0: none (history[-0:] is all)
            if ids is None:
                sel = np.fromiter(recent, np.int64)
                sel = sel[(sel >= 0) & (sel < x.size)]
                x[sel] = np.where(x[sel] > 0, x[sel] / c.repetition_penalty, x[sel] * c.repetition_penalty)
            else:
                hit = np.isin(ids, list(recent))
                x[hit] = np.where(x[hit] > 0, x[hit] / c.repetition_penalty, x[hit] * c.repetition_penalty)
        pick = lambda j: int(ids[j]) if ids is not None else int(j)  # noqa: E731
        if c.enable_top_p_sampling:
            order = np.argsort(-x)
            p = np.exp(x[order] - x[order[0]])
            p /= p.sum()
            keep = np.searchsorted(np.cumsum(p), c.top_p) + 1
            p = p[:keep] / p[:keep].sum()
            return pick(order[self.rng.choice(keep, p=p)])
        if c.enable_top_k_sampling and c.top_k > 1:
            k = min(c.top_k, x.size)
            top = np.argpartition(-x, k - 1)[:k]
            p = np.exp(x[top] - x[top].max())
            return pick(top[self.rng.choice(k, p=p / p.sum())])
        return pick(int(np.argmax(x)))


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    prefilled: int = 0
    generated: int = 0
    ttft_ms: float = 0.0
    decode_tok_s: float = 0.0
    hit_eos: bool = False
    numerics: str = "board"  # the engine's (runtime/ort.py): speed in "fast" numerics is not the board's math


class Generator:
    """Token-level generation on an Engine: prefill what is new, then sample until EOS."""

    def __init__(self, engine: Engine, eos_ids: list[int], sampler: Sampler):
        self.engine, self.eos = engine, set(eos_ids)
        self.sampler = sampler
        self.stats = TurnStats(numerics=engine.numerics)

    def stream(self, ids: list[int], max_new_tokens: int | None = None, forced: list[int] | None = None,
               logits_out: list | None = None) -> Iterator[int]:
        """Continue the cached sequence to `ids` (reusing the longest cached prefix) and yield new tokens.

        With `forced`, those tokens are fed instead of sampled ones (teacher forcing); with
        `logits_out`, the logits of every step are appended to it. Stats land in self.stats."""
        e = self.engine
        common = min(common_prefix(e.cached_ids, ids), len(ids) - 1)  # the last prompt token always runs, for its logits
        e.rewind(common)
        t0 = time.perf_counter()
        hidden = e.prefill(ids[common:])
        stats = self.stats = TurnStats(prompt_tokens=len(ids), prefilled=len(ids) - common,
                                       numerics=self.engine.numerics)
        budget = e.C - e.precompute_len + 1
        if max_new_tokens is not None:
            budget = min(budget, max_new_tokens)
        if forced is not None:
            budget = min(budget, len(forced))
        out: list[int] = []
        t_first = None
        while len(out) < budget:
            logits, idx = e.logits(hidden)
            if logits_out is not None:
                logits_out.append(logits.copy() if idx is None else (logits.copy(), idx.copy()))
            tok = forced[len(out)] if forced is not None else self.sampler(logits, out, idx)
            if t_first is None:
                t_first = time.perf_counter()
                stats.ttft_ms = (t_first - t0) * 1000
            out.append(tok)
            stats.generated = len(out)
            if len(out) > 1:
                stats.decode_tok_s = (len(out) - 1) / max(time.perf_counter() - t_first, 1e-9)
            yield tok
            if tok in self.eos and forced is None:
                stats.hit_eos = True
                break
            if len(out) >= budget or e.precompute_len >= e.C:
                break
            hidden = e.decode(tok)

    def generate(self, ids: list[int], max_new_tokens: int | None = None, **kw) -> list[int]:
        return list(self.stream(ids, max_new_tokens, **kw))


class StreamDecoder:
    """Turns a growing token list into newly completed text (never splits a UTF-8 character)."""

    def __init__(self, decode: Callable[[list[int]], str], skip: set[int]):
        self.decode, self.skip = decode, skip
        self.ids: list[int] = []
        self.shown = ""

    def push(self, tok: int) -> str:
        if tok in self.skip:
            return ""
        self.ids.append(tok)
        text = self.decode(self.ids)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            new, self.shown = text[len(self.shown):], text
            return new
        return ""
