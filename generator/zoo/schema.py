"""The zoo file (`python -m generator zoo ZOO.yaml`, `make zoo ZOO=zoo.yaml`), validated by pydantic.

    output_root: out/zoo          # default; every bundle is <output_root>/<model>_<chip>_<weight type>
    check_level: 0                # 0, 1 or 2, as `build -c` (default 0)
    chips: [AX650]                # defaults of the models' own lists
    weight_types: [s8]
    models:
      - variant: qwen2.5-0.5b     # a make target (`make list`) ...
        synthetic: true           # ... with random weights of its exact config
        weight_types: [s8, s4]
      - input: /data/my-llama     # ... or a checkpoint (HF folder, GPTQ folder, .gguf), with a name
        name: my-llama            #     (default: from the path) and optionally a variant it must match
        chips: [AX650, AX630C]
        options: {kv_cache_len: 2047, prefill_len: 128}   # build flags of this entry (Pulsar2 names)

The file is read with the recipes' bounded YAML reader (data/limits.yaml `yaml`: size, nesting,
aliases); the matrix is capped by `zoo.max_builds`. Names of variants and chips are checked against
the registry and data/chips.yaml before any engine starts, each error naming its entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from ..contract import HiddenType, WeightType
from ..errors import GeneratorError
from ..limits import Ranged, validation_text
from ..names import SAFE_NAME_RULE, is_safe_name

MAX_BUILDS = 1000  # bundles one zoo file may ask for (the matrix, expanded)


def _safe(value: str) -> str:
    if not is_safe_name(value):
        raise ValueError(f"{value!r} cannot be used in a file name: expected {SAFE_NAME_RULE}")
    return value


SafeName = Annotated[StrictStr, AfterValidator(_safe)]
ZooWeightType = WeightType | Literal["auto"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildFlags(Strict):
    """Per-entry build flags (the `build` command's Pulsar2 names); absent: the recipe's/variant's."""

    hidden_state_type: HiddenType | None = None
    prefill_len: Annotated[StrictInt, Ranged("prefill_len")] | None = None
    kv_cache_len: Annotated[StrictInt, Ranged("kv_cache_len")] | None = None
    last_kv_cache_len: list[Annotated[StrictInt, Ranged("history_len")]] | None = Field(None, max_length=64)
    post_topk: Annotated[StrictInt, Ranged("post_topk")] | None = None
    post_weight_type: WeightType | None = None
    group_size: Annotated[StrictInt, Ranged("group_size")] | None = None
    quant_method: Literal["rtn", "gptq", "awq", "awq+gptq"] | None = None
    kld_budget: Annotated[float, Field(gt=0, le=10)] | None = None
    override: list[StrictStr] | None = Field(None, max_length=256)

    def argv(self) -> list[str]:
        out: list[str] = []
        for key, value in self.model_dump(exclude_none=True).items():
            if key == "last_kv_cache_len":
                out += ["--last_kv_cache_len", *map(str, value)]
            elif key == "override":
                for item in value:
                    out += ["--override", item]
            else:
                out += [f"--{key}", str(value)]
        return out


class ModelEntry(Strict):
    variant: SafeName | None = None
    input: StrictStr | None = Field(None, max_length=4096)
    name: SafeName | None = None
    synthetic: StrictBool = False
    chips: list[StrictStr] | None = Field(None, min_length=1, max_length=16)
    weight_types: list[ZooWeightType] | None = Field(None, min_length=1, max_length=16)
    options: BuildFlags = BuildFlags()


class ZooFile(Strict):
    output_root: StrictStr = "out/zoo"
    check_level: Literal[0, 1, 2] = 0
    chips: list[StrictStr] = Field(["AX650"], min_length=1, max_length=16)
    weight_types: list[ZooWeightType] = Field(["s8"], min_length=1, max_length=16)
    models: list[ModelEntry] = Field(min_length=1, max_length=MAX_BUILDS)


class Job(BaseModel):
    """One bundle of the matrix: what to build and where."""

    model_config = ConfigDict(frozen=True)
    entry: int  # index in `models` (messages name it: models[i])
    label: str  # "<model>_<chip>_<weight type>", the bundle folder's name
    variant: str | None
    input: str | None
    synthetic: bool
    chip: str
    weight_type: str
    check_level: int
    flags: BuildFlags
    out_dir: str

    def argv(self) -> list[str]:
        """`python -m generator build` arguments (after `build`)."""
        return [*([self.variant] if self.variant else []), *(["--input_path", self.input] if self.input else []),
                *(["--synthetic"] if self.synthetic else []), "--chip", self.chip, "-w", self.weight_type,
                "-c", str(self.check_level), "--no-progress", "--output_path", self.out_dir, *self.flags.argv()]


def read_zoo(path: str | Path) -> ZooFile:
    """The zoo file, bounded and validated; GeneratorError naming the file (and the field)."""
    from ..limits import read_yaml

    path = Path(path)
    if not path.is_file():
        raise GeneratorError(f"Zoo file {path}: no such file (make zoo ZOO=... / python -m generator zoo FILE).")
    data: Any = read_yaml(path, "Zoo file")
    if not isinstance(data, dict):
        raise GeneratorError(f"Zoo file {path}: expected a mapping with `models:` at the top level, "
                             f"got {type(data).__name__}.")
    try:
        return ZooFile.model_validate(data)
    except ValidationError as exc:
        raise GeneratorError(f"Zoo file {path}: {validation_text(exc)}.") from None


def expand(zoo: ZooFile, path: str | Path, root: Path) -> list[Job]:
    """The matrix: every model entry x its chips x its weight types, checked against the registry and the
    chip profiles (unknown names: a GeneratorError naming the entry) before anything is built."""
    from ..pipeline import model_name_for
    from ..recipe import registry
    from ..resolve.chips import get_chip

    reg = registry()
    jobs: list[Job] = []
    out_root = Path(zoo.output_root)
    out_root = out_root if out_root.is_absolute() else root / out_root
    for i, m in enumerate(zoo.models):
        where = f"Zoo file {path}: models[{i}]"
        if not m.variant and not m.input:
            raise GeneratorError(f"{where}: give a `variant` (see `make list`) or an `input` checkpoint path.")
        if m.variant and m.variant not in reg.variants:
            raise GeneratorError(f"{where}: unknown variant '{m.variant}'. Known: {', '.join(sorted(reg.variants))}.")
        if m.synthetic and not m.variant:
            raise GeneratorError(f"{where}: `synthetic: true` needs a `variant` (its config is the variant's).")
        if m.input and not Path(m.input).exists():
            raise GeneratorError(f"{where}: input '{m.input}' does not exist.")
        name = m.name or m.variant or model_name_for(m.input)
        for chip in m.chips or zoo.chips:
            try:
                label = get_chip(chip).label.lower()
            except GeneratorError as exc:
                raise GeneratorError(f"{where}: {exc}") from None
            for wt in m.weight_types or zoo.weight_types:
                bundle = f"{name}_{label}_{wt}"
                jobs.append(Job(entry=i, label=bundle, variant=m.variant, input=m.input and str(Path(m.input).resolve()),
                                synthetic=m.synthetic, chip=chip, weight_type=wt, check_level=zoo.check_level,
                                flags=m.options, out_dir=str(out_root / bundle)))
    if len(jobs) > MAX_BUILDS:
        raise GeneratorError(f"Zoo file {path}: {len(jobs)} bundles; at most {MAX_BUILDS} per zoo file.")
    seen: dict[str, int] = {}
    for j in jobs:
        if j.label in seen:
            raise GeneratorError(f"Zoo file {path}: models[{seen[j.label]}] and models[{j.entry}] both make "
                                 f"{j.label}; give one a different `name`.")
        seen[j.label] = j.entry
    return jobs
