"""Checkpoint input: an HF model directory read lazily, or a .gguf file imported once.

safetensors (single or sharded) are opened lazily and tensors read one at a time;
`pytorch_model.bin` is read only with `weights_only=True` (no pickled code runs). Every problem
names the file and what was expected. A pre-quantized GPTQ checkpoint (generator/gptq.py) shows a
float `<prefix>.weight` per packed module and hides its qweight/qzeros/scales/g_idx.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GeneratorError
from .gguf_import import import_gguf
from .gptq import attach as attach_gptq

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Checkpoint:
    def __init__(self, path: str | Path, *, source: str | None = None):
        self.dir = Path(path)
        self.source = source or str(self.dir)
        if not self.dir.is_dir():
            raise GeneratorError(f"Input '{self.dir}' is not a directory with config.json (nor a .gguf file).")
        cfg = self.dir / "config.json"
        if not cfg.is_file():
            raise GeneratorError(f"Input '{self.dir}' has no config.json; expected a Hugging Face model directory.")
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GeneratorError(f"{cfg}: not valid JSON ({exc}).") from None
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._bin: dict[str, Any] | None = None
        self._index()
        self.gptq = attach_gptq(self)  # None unless the checkpoint is GPTQ-packed

    @property
    def config_where(self) -> str:
        """How messages name this checkpoint's config: its config.json, or the .gguf it was imported from."""
        return self.source if self.source.endswith(".gguf") else f"{self.source}/config.json"

    # -- discovery ---------------------------------------------------------------------------

    def _index(self):
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise GeneratorError(f"{index}: not a valid safetensors index ({exc}).") from None
            for name, file in weight_map.items():
                self._where[name] = self.dir / file
            for file in sorted(set(self._where.values())):
                if not file.is_file():
                    raise GeneratorError(f"{index} lists shard '{file.name}', which is missing from {self.dir}.")
                self._open(file)
        elif single.is_file():
            handle = self._open(single)
            for name in handle.keys():
                self._where[name] = single
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if shards:
                for file in shards:
                    for name in self._open(file).keys():
                        self._where[name] = file
            elif (self.dir / "pytorch_model.bin").is_file() or (self.dir / "pytorch_model.bin.index.json").is_file():
                self._index_bin()
            else:
                raise GeneratorError(f"Input '{self.dir}' has no weights: expected model.safetensors, "
                                     f"model.safetensors.index.json with shards, or pytorch_model.bin.")
        self.weight_files = sorted(set(self._where.values()))

    def _open(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise GeneratorError(f"{file}: not a readable safetensors file ({exc}). Re-download it or check the path.") from None
        return self._handles[file]

    def _index_bin(self):
        import torch

        index = self.dir / "pytorch_model.bin.index.json"
        files = ([self.dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
                 if index.is_file() else [self.dir / "pytorch_model.bin"])
        self._bin = {}
        for file in files:
            if not file.is_file():
                raise GeneratorError(f"{index} lists '{file.name}', which is missing from {self.dir}.")
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise GeneratorError(f"{file}: cannot be read as a weights-only PyTorch checkpoint ({exc}). "
                                     f"Pickled code is never executed; convert it to safetensors.") from None
            for name, tensor in state.items():
                self._bin[name] = tensor
                self._where[name] = file

    # -- access ------------------------------------------------------------------------------
    def names(self) -> set[str]:
        return self.gptq.names() if self.gptq else set(self._where)

    def has(self, name: str) -> bool:
        return self.gptq.has(name) if self.gptq else name in self._where

    def torch_tensor(self, name: str):
        if not self.has(name):
            raise GeneratorError(f"Checkpoint '{self.source}' has no tensor '{name}'.")
        if self.gptq and self.gptq.is_packed(name):
            return self.gptq.weight(name)
        return self._raw_tensor(name)

    def _raw_tensor(self, name: str):
        if self._bin is not None:
            return self._bin[name]
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as exc:
            raise GeneratorError(f"{self._where[name]}: cannot read tensor '{name}' ({exc}); the file may be truncated.") from None

    def tensor(self, name: str) -> np.ndarray:
        t = self.torch_tensor(name)
        return t.float().numpy() if t.is_floating_point() else t.numpy()

    def shape(self, name: str) -> tuple[int, ...]:
        if self.gptq and self.gptq.is_packed(name):
            return self.gptq.shape(name)
        return self._raw_shape(name)

    def _raw_shape(self, name: str) -> tuple[int, ...]:
        if self._bin is not None:
            return tuple(self._bin[name].shape)
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def fingerprint(self) -> dict[str, str]:
        files = [self.dir / "config.json", *self.weight_files]
        if (self.dir / "quantize_config.json").is_file():
            files.append(self.dir / "quantize_config.json")
        return {f.name: sha256_file(f) for f in files}

    def tokenizer_files(self) -> list[Path]:
        return [self.dir / n for n in TOKENIZER_FILES if (self.dir / n).is_file()]


def open_input(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.suffix == ".gguf":
        return Checkpoint(import_gguf(path), source=str(path))
    if not path.exists():
        raise GeneratorError(f"Input '{path}' (--input_path / make INPUT=) does not exist.")
    return Checkpoint(path)
