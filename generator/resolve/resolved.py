"""The resolved build: everything the later stages need, decided once and passed along frozen.

`pipeline.resolve` makes it (recipe and variant, the opened checkpoint, its config as the recipe
reads it, the spec, the options and the chip); export writes the bundle from it and verification
checks against it. Nothing downstream reads the config or makes options again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..recipe import Recipe
from .chips import Chip
from .options import BuildOptions
from .spec import ArchSpec

if TYPE_CHECKING:  # annotation only: resolve/ does not import the input stage
    from ..inputs.source import TensorSource


@dataclass(frozen=True)
class Resolved:
    model: str  # the bundle's model name (file names)
    recipe: Recipe
    recipe_path: Path
    variant: str | None
    ckpt: TensorSource
    config: dict[str, Any]  # the checkpoint's config.json as the recipe reads it (spec.read_config)
    spec: ArchSpec
    opts: BuildOptions
    chip: Chip
    system_prompt: str
    out_dir: Path
