"""The tensor-source protocol: what every checkpoint input offers the rest of the build.

One base class for the four kinds of input (`kind`): an HF model directory ("hf"), the same with
GPTQ-packed linear modules ("gptq", generator/inputs/gptq.py), a .gguf file imported once into an HF
directory ("gguf", generator/inputs/gguf_import.py) and random weights generated on demand
("synthetic", generator/inputs/synthetic.py). Callers ask `kind`, never the type or an attribute.

Every source has a directory `dir` holding config.json and the tokenizer files, the parsed `config`,
`source` (how messages name it) and tensors by their checkpoint name: names(), has(), shape(),
tensor() (float32 numpy), torch_tensor(), plus file_of() for messages and fingerprint() for the
manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import GeneratorError

Kind = Literal["hf", "gptq", "gguf", "synthetic"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")


def why(exc: BaseException) -> str:
    """An exception's text on one line without terminal escapes, for one-paragraph messages."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split()) or type(exc).__name__


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, an index), else a GeneratorError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GeneratorError(f"{path}: not valid JSON ({why(exc)}).") from None
    if not isinstance(data, dict):
        raise GeneratorError(f"{path}: expected a JSON object ({{...}}), got a JSON {type(data).__name__}.")
    return data


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TensorSource(ABC):
    """A checkpoint as the build reads it (see the module docstring)."""

    kind: Kind

    def __init__(self, directory: str | Path, config: dict[str, Any], source: str):
        self.dir = Path(directory)
        self.config = config
        self.source = source

    @property
    def config_where(self) -> str:
        """How messages name this checkpoint's config: its config.json, or the .gguf it was imported from."""
        return self.source if self.kind == "gguf" else f"{self.source}/config.json"

    @abstractmethod
    def names(self) -> set[str]: ...

    @abstractmethod
    def has(self, name: str) -> bool: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def torch_tensor(self, name: str): ...

    @abstractmethod
    def fingerprint(self) -> dict[str, str]:
        """What the manifest records of the input: file name -> sha256 (or a description)."""

    def tensor(self, name: str) -> np.ndarray:
        t = self.torch_tensor(name)
        return t.float().numpy() if t.is_floating_point() else t.numpy()

    def file_of(self, name: str) -> str:
        """The file tensor `name` is read from, for messages."""
        return self.source

    def missing(self, name: str) -> GeneratorError:
        return GeneratorError(f"Checkpoint '{self.source}' has no tensor '{name}'.")

    def tokenizer_files(self) -> list[Path]:
        return [self.dir / n for n in TOKENIZER_FILES if (self.dir / n).is_file()]

    def check_tokenizer(self):
        """tokenizer.json loaded with `tokenizers` (as the tokenizer server loads it), else a GeneratorError."""
        from tokenizers import Tokenizer

        path = self.dir / "tokenizer.json"
        if not path.is_file():
            raise GeneratorError(f"Input '{self.source}' has no tokenizer.json; the tokenizer server needs the fast "
                                 f"(tokenizers) file. Save it with transformers' AutoTokenizer.save_pretrained.")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions for bad JSON / unknown models
            raise GeneratorError(f"{path}: not a loadable tokenizers file ({why(exc)}). Re-download it or save it "
                                 f"again with transformers' AutoTokenizer.save_pretrained.") from None
