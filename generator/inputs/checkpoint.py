"""Checkpoint input: an HF model directory read lazily, or a .gguf file imported once.

safetensors (single or sharded) are opened lazily and tensors read one at a time;
`pytorch_model.bin` is read only with `weights_only=True` (no pickled code runs). Every problem
names the file and what was expected. A pre-quantized GPTQ checkpoint (generator/inputs/gptq.py) shows a
float `<prefix>.weight` per packed module and hides its qweight/qzeros/scales/g_idx.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GeneratorError
from ..names import is_safe_name
from .gguf_import import import_gguf
from .gptq import attach as attach_gptq
from .source import TOKENIZER_FILES, TensorSource, read_json_object, sha256_file, why

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = ["TOKENIZER_FILES", "Checkpoint", "TensorSource", "open_input", "read_json_object", "recipe_chat_template",
           "sha256_file", "why"]


class Checkpoint(TensorSource):
    """An HF model directory (kind "hf"), GPTQ-packed ("gptq") or imported from a .gguf file ("gguf").

    The stored_* methods read the tensors as the files hold them (a GPTQ module's qweight, qzeros, ...);
    the TensorSource methods show what the build reads (a GPTQ module's dequantized weight instead)."""

    def __init__(self, path: str | Path, *, source: str | None = None, gguf: bool = False):
        directory = Path(path)
        if not directory.is_dir():
            raise GeneratorError(f"Input '{directory}' is not a directory with config.json (nor a .gguf file).")
        cfg = directory / "config.json"
        if not cfg.is_file():
            raise GeneratorError(f"Input '{directory}' has no config.json; expected a Hugging Face model directory.")
        super().__init__(directory, read_json_object(cfg), source or str(directory))
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._bin: dict[str, Any] | None = None
        self._index()
        self.gptq = attach_gptq(self)  # None unless the checkpoint is GPTQ-packed
        self.kind = "gguf" if gguf else "gptq" if self.gptq else "hf"

    # -- discovery ---------------------------------------------------------------------------

    def _index(self):
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            self._where = self._read_index(index)
            for file in sorted(set(self._where.values())):
                keys = set(self._open(file).keys())
                lacking = sorted(n for n, f in self._where.items() if f == file and n not in keys)
                if lacking:
                    raise GeneratorError(f"{index} puts {', '.join(lacking[:4])}{', ...' if len(lacking) > 4 else ''} "
                                         f"in shard '{file.name}', which does not have it.")
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

    def _read_index(self, index: Path) -> dict[str, Path]:
        """An index's weight_map (tensor name -> shard file name in this directory), every shard present."""
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise GeneratorError(f"{index}: expected a non-empty 'weight_map' object (tensor name -> shard file name), "
                                 f"got {type(weight_map).__name__ if weight_map is not None else 'none'}.")
        where = {}
        for name, file in weight_map.items():
            if not is_safe_name(file):  # a plain file name: no separator, no '..', nothing outside the checkpoint
                raise GeneratorError(f"{index}: weight_map['{name}'] is {file!r}; expected the file name of a shard in "
                                     f"{self.dir} (no path separators or '..').")
            where[name] = self.dir / file
        for file in sorted(set(where.values())):
            if not file.is_file():
                raise GeneratorError(f"{index} lists shard '{file.name}', which is missing from {self.dir}.")
        return where

    def _open(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise GeneratorError(f"{file}: not a readable safetensors file ({why(exc)}). Re-download it or check "
                                     f"the path.") from None
        return self._handles[file]

    def _index_bin(self):
        import torch

        index = self.dir / "pytorch_model.bin.index.json"
        files = sorted(set(self._read_index(index).values())) if index.is_file() else [self.dir / "pytorch_model.bin"]
        self._bin = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch's text for a refused global is a page long: keep its reason
                reason = why(exc).split("WeightsUnpickler error: ")[-1].split(" Please use")[0]
                raise GeneratorError(f"{file}: cannot be read as a weights-only PyTorch checkpoint ({reason}). "
                                     f"Pickled code is never executed; convert it to safetensors.") from None
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items()):
                raise GeneratorError(f"{file}: expected a state dict (tensor name -> tensor), got "
                                     f"{type(state).__name__} with other contents. Save model.state_dict().")
            for name, tensor in state.items():
                self._bin[name] = tensor
                self._where[name] = file

    # -- the tensors as stored -----------------------------------------------------------------
    def stored_names(self) -> list[str]:
        """Every stored tensor's name, in the files' order."""
        return list(self._where)

    def stored_file(self, name: str) -> Path:
        return self._where[name]

    def stored_tensor(self, name: str):
        if self._bin is not None:
            return self._bin[name]
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as exc:
            raise GeneratorError(f"{self._where[name]}: cannot read tensor '{name}' ({why(exc)}); the file may be "
                                 f"truncated.") from None

    def stored_shape(self, name: str) -> tuple[int, ...]:
        if self._bin is not None:
            return tuple(self._bin[name].shape)
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    # -- the TensorSource interface --------------------------------------------------------------
    def names(self) -> set[str]:
        return self.gptq.names() if self.gptq else set(self._where)

    def has(self, name: str) -> bool:
        return self.gptq.has(name) if self.gptq else name in self._where

    def torch_tensor(self, name: str):
        if not self.has(name):
            raise self.missing(name)
        if self.gptq and self.gptq.is_packed(name):
            return self.gptq.weight(name)
        return self.stored_tensor(name)

    def file_of(self, name: str) -> str:
        """The file tensor `name` is read from (a GPTQ module's qweight file), for messages."""
        if self.gptq and self.gptq.is_packed(name):
            return str(self.gptq.file_of(name))
        return str(self._where.get(name, self.source))

    def shape(self, name: str) -> tuple[int, ...]:
        if self.gptq and self.gptq.is_packed(name):
            return self.gptq.shape(name)
        return self.stored_shape(name)

    def fingerprint(self) -> dict[str, str]:
        files = [self.dir / "config.json", *self.weight_files]
        if (self.dir / "quantize_config.json").is_file():
            files.append(self.dir / "quantize_config.json")
        return {f.name: sha256_file(f) for f in files}


def has_chat_template(tok_dir: Path) -> bool:
    """Whether a saved tokenizer carries a chat template (where the tokenizer server looks for one)."""
    if (tok_dir / "chat_template.jinja").is_file():
        return True
    config = tok_dir / "tokenizer_config.json"
    return config.is_file() and bool(read_json_object(config).get("chat_template"))


def recipe_chat_template(tok_dir: Path, recipe: Recipe, variant: str | None) -> dict[str, Any] | None:
    """A tokenizer without a chat template (a base model's GGUF carries none) gets the recipe's, written to
    tok_dir/chat_template.jinja, so chat mode formats turns and stops at the template's end-of-turn token.
    Returns what the build records ({"source", "eos_token", "eos_ids", "note"}), None when the tokenizer
    has its own template or the recipe has none. A recipe template whose special tokens the vocabulary
    lacks is not used (it would tokenize them as text): the note says so."""
    from tokenizers import Tokenizer

    name = (recipe.variants[variant].chat_template if variant else None) or recipe.chat.template
    template = recipe.chat_template(variant)
    if template is None or has_chat_template(tok_dir):
        return None
    source = f"recipe '{recipe.name}' template '{name}'"
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tokens = dict.fromkeys(t for t in (template.bos_token, template.eos_token, *template.special_tokens) if t)
    missing = [t for t in tokens if vocab.token_to_id(t) is None]
    if missing:
        return {"source": None, "eos_token": None, "eos_ids": [],
                "note": f"the checkpoint's tokenizer has no chat template, and {source} uses tokens its vocabulary "
                        f"lacks ({', '.join(missing[:4])}): the bundle has none (plain completion)."}
    eos_ids = [vocab.token_to_id(template.eos_token)] if template.eos_token else []
    (tok_dir / "chat_template.jinja").write_text(template.jinja, encoding="utf-8")
    return {"source": source, "eos_token": template.eos_token, "eos_ids": eos_ids,
            "note": f"the checkpoint's tokenizer has no chat template (a base model's GGUF carries none): using "
                    f"{source}, which ends a turn with {template.eos_token!r} (id {eos_ids[0] if eos_ids else 'none'}, "
                    f"an end-of-sequence token of this bundle)."}


def open_input(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.suffix == ".gguf":
        return Checkpoint(import_gguf(path), source=str(path), gguf=True)
    if not path.exists():
        raise GeneratorError(f"Input '{path}' (--input_path / make INPUT=) does not exist.")
    return Checkpoint(path)
