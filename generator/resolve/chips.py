"""Chip profiles (data in data/chips.yaml); a build is checked against its chip by options.py's
check_flags and check_fit before any work."""

from __future__ import annotations

from functools import lru_cache

import yaml
from pydantic import BaseModel, ConfigDict

from ..errors import GeneratorError
from ..paths import DATA_DIR

CHIPS_FILE = DATA_DIR / "chips.yaml"


class Chip(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str
    aliases: list[str] = []
    pulsar2_chip: str
    weight_types: list[str]
    post_weight_types: list[str]
    vision_weight_types: list[str]  # what the vision part of a vision-language model may take
    hidden_state_types: list[str]
    max_kv_cache_len: int
    max_prefill_len: int
    memory_mb: int
    run_scripts: list[str]  # keys of bundle.RUN_TARGETS; "board" is named after `label`
    label: str = ""  # the name the user typed (an alias or the name): file names use it, checks use `name`


@lru_cache(maxsize=1)
def chips() -> dict[str, Chip]:
    data = yaml.safe_load(CHIPS_FILE.read_text())
    return {name: Chip(name=name, label=name, **body) for name, body in data.items()}


def get_chip(name: str) -> Chip:
    key = name.strip().upper()
    for chip in chips().values():
        if key == chip.name or key in chip.aliases:
            return chip.model_copy(update={"label": key})
    names = ", ".join(f"{c.name} ({', '.join(c.aliases)})" if c.aliases else c.name for c in chips().values())
    raise GeneratorError(f"Unknown chip '{name}' (flag --chip / make CHIP=). Known chips: {names}.")
