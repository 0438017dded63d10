"""Names that become file names, and the guard that keeps every write inside its output folder.

Any string from a checkpoint (config.json `model_type`), a recipe (recipe, variant and chat template
names) or the user (model names, --output_path leaf) that is used to build a file name goes through
`safe_name` first; writers that join such names under a root check the result with `inside`.
One pattern for all of them: a letter or digit first, then letters, digits, `.`, `_`, `+`, `-`,
at most 128 characters, never `..` (so no separator, no parent reference, no hidden file).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import GeneratorError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
SAFE_NAME_RULE = ("a letter or digit first, then only letters, digits, '.', '_', '+' or '-', "
                  "at most 128 characters, no '..'")


def is_safe_name(value: object) -> bool:
    return isinstance(value, str) and SAFE_NAME.fullmatch(value) is not None and ".." not in value


def safe_name(value: object, what: str) -> str:
    """`value` if it may be used as (part of) a file name, else a GeneratorError naming `what`
    (e.g. "checkpoint.../config.json field 'model_type'")."""
    if not is_safe_name(value):
        raise GeneratorError(f"{what} is {value!r}, which cannot be used in a file name: expected {SAFE_NAME_RULE}.")
    return value  # type: ignore[return-value]


def inside(root: Path, path: Path, what: str = "output file") -> Path:
    """`path` if it resolves inside `root` (symlinks followed), else a GeneratorError."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise GeneratorError(f"Refusing to write {what} '{path}': it resolves to '{path_r}', outside the output "
                             f"folder '{root_r}'.")
    return path
