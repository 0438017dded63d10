"""Where the project's files are: every path the package derives from its own location is here."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
RECIPES_DIR = PROJECT_ROOT / "recipes"
TEMPLATES_DIR = PROJECT_ROOT / "templates"  # jinja templates of the bundle files, cookiecutter new_recipe/
DATA_DIR = PACKAGE_DIR / "data"  # chips, limits, tolerances, conformance growth
DOCS_DIR = PROJECT_ROOT / "docs"
CACHE_DIR = PROJECT_ROOT / ".cache"  # default of $AXGEN_CACHE; synthetic checkpoints in synthetic/
# the bundles' tokenizer server: a standalone script (no imports from this package), copied verbatim
# into every bundle as <model>_tokenizer_uid.py
TOKENIZER_SERVER = PACKAGE_DIR / "runtime" / "tokenizer_server.py"
