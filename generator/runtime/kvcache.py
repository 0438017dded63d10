"""`--kvcache_path`: the system prompt's KV cache on disk, in the board runtime's layout.

The board (ax-llm ``main_*``) prefills the system prompt once at start; with ``--kvcache_path DIR`` it
first tries to load that prefix from DIR and otherwise prefills it and saves it there. The layout is
ax-llm's (``save_kvcache`` / ``load_kvcache``), so either side can read the files:

``DIR/k_cache_<i>.bin``, ``DIR/v_cache_<i>.bin`` for every layer ``i`` in ``0 .. L-1``
    The K (V) rows of the cached prefix for layer ``i``: ``precompute_len`` rows of ``kv_dim`` values
    (``kv_dim = num_key_value_heads * head_dim``), row ``p`` = position ``p``, row-major, no header,
    little-endian, in the hidden-state type (bf16 bit patterns as uint16 on the board; fp16/fp32
    for bundles built with that ``--hidden_state_type``). Size: ``precompute_len * kv_dim * 2`` bytes
    for bf16.
``DIR/config.json``
    ``{"system_prompt": str, "precompute_len": int, "axgen": {...}}``. The board reads only the first
    two keys (and then trusts the files). ``axgen`` is what the local runner checks before using a
    cache, so that a cache made for another system prompt or another bundle is rebuilt, never
    silently used:

    ``format`` (1), ``model``, ``bundle`` (sha256 over the sha256 of the bundle's layer graphs, weight
    data and embedding table, from manifest.json), ``dtype``, ``num_layers``, ``kv_dim``,
    ``kv_cache_len``, ``token_ids`` (the system prompt as the tokenizer rendered it: it must equal
    what the tokenizer renders now) and ``data_sha256`` (sha256 of all K files then all V files, in
    layer order: a truncated or altered file is caught).

A cache without the ``axgen`` section (made by the board) is not used by the local runner: its
numbers come from the NPU graphs and nothing says which bundle or tokenizer made it. It is rebuilt.

Writing removes ``config.json`` first and writes it last (atomically), so an interrupted save never
leaves a cache that looks valid. A failed save is logged and the run goes on, as on the board.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..contract import MANIFEST

FORMAT = 1
CONFIG = "config.json"
_LAYER_FILE = re.compile(r"[kv]_cache_(\d+)\.bin")
_IDENTITY_SUFFIXES = (".onnx", ".data", ".bin")


class StaleCache(Exception):
    """The cache at the path cannot be used (the message says why)."""


def layer_files(path: Path, i: int) -> tuple[Path, Path]:
    return path / f"k_cache_{i}.bin", path / f"v_cache_{i}.bin"


def bundle_fingerprint(bundle) -> str:
    """sha256 over the recorded sha256 of the files that determine K/V (graphs, weights, embedding)."""
    files = bundle.manifest.files or {}
    h = hashlib.sha256()
    picked = sorted((name, info.sha256) for name, info in files.items()
                    if "/" not in name and name.endswith(_IDENTITY_SUFFIXES))
    if not picked:  # a bundle being checked before its file list exists: the manifest itself
        h.update((bundle.dir / MANIFEST).read_bytes())
    for name, sha in picked:
        h.update(f"{name}\0{sha}\n".encode())
    return h.hexdigest()


def identity(bundle, engine) -> dict:
    return {"format": FORMAT, "model": bundle.model, "bundle": bundle_fingerprint(bundle),
            "dtype": bundle.opts.hidden_state_type, "num_layers": engine.L, "kv_dim": engine.kv,
            "kv_cache_len": engine.C}


def _data_sha(ks: list[bytes], vs: list[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in ks + vs:
        h.update(chunk)
    return h.hexdigest()


def save(path: Path, bundle, engine, system_prompt: str, token_ids: list[int]):
    """Write the engine's first len(token_ids) cache rows (the system prompt) to `path`."""
    n = len(token_ids)
    if engine.precompute_len < n or list(engine.cached_ids[:n]) != list(token_ids):
        raise ValueError("the engine does not hold the system prompt's rows")
    path.mkdir(parents=True, exist_ok=True)
    config = path / CONFIG
    config.unlink(missing_ok=True)  # no valid-looking cache while the files change
    dtype = np.dtype(engine.dtype).newbyteorder("<")
    ks = [np.ascontiguousarray(engine.k_cache[i, :n], dtype).tobytes() for i in range(engine.L)]
    vs = [np.ascontiguousarray(engine.v_cache[i, :n], dtype).tobytes() for i in range(engine.L)]
    for i in range(engine.L):
        k_file, v_file = layer_files(path, i)
        k_file.write_bytes(ks[i])
        v_file.write_bytes(vs[i])
    for stale in path.iterdir():  # layers of a deeper model saved here before
        m = _LAYER_FILE.fullmatch(stale.name)
        if m and int(m.group(1)) >= engine.L:
            stale.unlink()
    meta = {"system_prompt": system_prompt, "precompute_len": n,
            "axgen": {**identity(bundle, engine), "token_ids": list(token_ids), "data_sha256": _data_sha(ks, vs)}}
    tmp = path / f".{CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, config)


def load(path: Path, bundle, engine, system_prompt: str, token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The cached K and V rows ([L, n, kv_dim] each) if the cache at `path` was made for exactly this
    bundle, system prompt and tokenization; raises StaleCache naming the first difference otherwise."""
    config = path / CONFIG
    if not config.is_file():
        raise StaleCache(f"no {CONFIG} in {path}")
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StaleCache(f"{config} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise StaleCache(f"{config} does not hold a JSON object")
    if meta.get("system_prompt") != system_prompt:
        raise StaleCache(f"it was made for another system prompt ({meta.get('system_prompt')!r})")
    ours = meta.get("axgen")
    if not isinstance(ours, dict):
        raise StaleCache("it has no 'axgen' section (made by the board runtime or another tool): which bundle "
                         "and tokenizer made it cannot be checked")
    want = identity(bundle, engine)
    for key in ("format", "model", "bundle", "dtype", "num_layers", "kv_dim", "kv_cache_len"):
        if ours.get(key) != want[key]:
            what = "another bundle" if key in ("model", "bundle") else f"another {key}"
            raise StaleCache(f"it was made for {what} ({key} {ours.get(key)!r}, this bundle has {want[key]!r})")
    if ours.get("token_ids") != list(token_ids):
        raise StaleCache("the tokenizer renders the system prompt differently now (token ids differ)")
    n = meta.get("precompute_len")
    if n != len(token_ids):
        raise StaleCache(f"precompute_len {n!r} is not the {len(token_ids)} tokens of the system prompt")
    if n > engine.C:
        raise StaleCache(f"precompute_len {n} exceeds kv_cache_len {engine.C}")
    dtype = np.dtype(engine.dtype).newbyteorder("<")
    size = n * engine.kv * dtype.itemsize
    ks, vs = [], []
    for i in range(engine.L):
        for f, out in zip(layer_files(path, i), (ks, vs)):
            if not f.is_file():
                raise StaleCache(f"{f.name} is missing")
            data = f.read_bytes()
            if len(data) != size:
                raise StaleCache(f"{f.name} has {len(data)} bytes, expected {size} ({n} rows x {engine.kv} x "
                                 f"{dtype.itemsize})")
            out.append(data)
    if ours.get("data_sha256") != _data_sha(ks, vs):
        raise StaleCache("the cache files were changed after they were saved (data_sha256 differs)")
    k = np.stack([np.frombuffer(b, dtype).reshape(n, engine.kv) for b in ks]) if n else None
    v = np.stack([np.frombuffer(b, dtype).reshape(n, engine.kv) for b in vs]) if n else None
    return k, v


def start_over(chat, path: str | Path | None, log: Callable[[str], None]) -> int:
    """A new conversation: through the KV cache files at `path` (--kvcache_path) when given, else
    with the system prompt prefilled. Returns precompute_len."""
    return restore_or_prefill(chat, Path(path), log) if path else chat.reset()


def restore_or_prefill(chat, path: Path, log: Callable[[str], None]) -> int:
    """Start the conversation over with the system prompt, its KV rows loaded from `path` when a valid
    cache is there, else prefilled and saved to `path`. Returns precompute_len."""
    path = Path(path)
    token_ids = list(chat.tok.reset(chat.system_prompt))
    try:
        k, v = load(path, chat.b, chat.engine, chat.system_prompt, token_ids)
    except StaleCache as exc:
        if (path / CONFIG).exists() or any(path.glob("?_cache_*.bin")):
            log(f"kvcache at {path} not used: {exc}; generating it again")
        else:
            log(f"no kvcache at {path}, generating it")
    else:
        n = chat.start(token_ids, k, v)
        log(f"load kvcache from path: {path} success, precompute_len: {n}")
        return n
    n = chat.start(token_ids)  # the tokenizer session was reset above
    try:
        save(path, chat.b, chat.engine, chat.system_prompt, chat.system_ids)
        log(f"generate kvcache to path: {path}")
    except (OSError, ValueError) as exc:
        log(f"save kvcache to {path} failed: {exc}")
    return n
