"""The vision part of a vision-language recipe: a ViT tower, pixel shuffle and a projector, as data.

As the decoder block is read from `block:`, the vision graph (generator/export/vision.py) is read
from `vision:`: how to read the vision config (a section of config.json, expressions over its keys
and the top-level ones), the ViT block's quirks (norm kind/eps, q/k/v bias, q/k norm, activation,
layer scale, class token, final norm), the position embedding (learned, interpolated to the build's
image size), pixel shuffle, the projector, the preprocessing facts (mean, std, resize rule) and the
image tokens; where each tensor lives in the checkpoint. `resolve_vision` evaluates it against a
config into a frozen `VisionSpec`, which the manifest records and the runtime reads.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from ..errors import GeneratorError
from .expr import ExprError, evaluate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Expr(_Strict):
    expr: str


VValue = Union[_Expr, StrictBool, StrictInt, StrictFloat, StrictStr, None]


class VisionNorm(_Strict):
    kind: Literal["layer_norm", "rms_norm"] = "layer_norm"
    eps: VValue = 1.0e-6


class Projector(_Strict):
    """MLP projector: [LayerNorm] -> Linear -> act -> Linear (InternVL's mlp1)."""

    norm: StrictBool = True
    norm_eps: VValue = 1.0e-5
    act: StrictStr = "gelu"


class Preprocess(_Strict):
    """What the reference processor does to one tile: resize to image_size x image_size with
    `resize`, scale to [0, 1], normalise with mean/std (baked into the graph)."""

    resize: Literal["bicubic", "bilinear"] = "bicubic"
    mean: list[StrictFloat] = [0.485, 0.456, 0.406]
    std: list[StrictFloat] = [0.229, 0.224, 0.225]


class VisionTensors(_Strict):
    """Checkpoint names. Module paths get `.weight` / `.bias`; `cls_token`, `pos_embed`, `ls1`, `ls2`
    are whole parameter names; `{i}` is the ViT layer."""

    patch_embed: StrictStr
    cls_token: Union[StrictStr, None] = None
    pos_embed: StrictStr
    layer: dict[StrictStr, Union[StrictStr, None]]  # norm1 norm2 qkv|q/k/v o_proj q_norm k_norm ls1 ls2 fc1 fc2
    post_norm: Union[StrictStr, None] = None
    projector: dict[StrictStr, StrictStr]  # norm fc1 fc2
    ignore: list[StrictStr] = []


class VisionReference(_Strict):
    """transformers' class for the whole vision-language model (verification): its config (values or
    {expr} over the resolved vision spec's fields, `llm_hidden_size`, and the checkpoint's top-level keys;
    `text_config: "*"` is the language model's section), and where each reference tensor comes from
    (generator/verify/relayout.py's syntax; `prefixes` maps the rest by name prefix)."""

    architecture: StrictStr
    config: dict[str, Any] = {}
    tensors: dict[str, StrictStr] = {}
    prefixes: dict[str, StrictStr] = {}


class VisionRecipe(_Strict):
    section: StrictStr = "vision_config"  # the vision config inside config.json (top-level keys also visible)
    image_size: VValue  # native size (the position table's grid)
    default_image_size: StrictInt = 224  # Pulsar2's --image_size default
    patch_size: VValue
    hidden_size: VValue
    num_hidden_layers: VValue
    num_attention_heads: VValue
    intermediate_size: VValue
    norm: VisionNorm = VisionNorm()
    qkv_bias: VValue = True
    qk_norm: VValue = False
    hidden_act: VValue = "gelu"
    layer_scale: VValue = True
    drop_cls: StrictBool = True  # the class token's output row is dropped before pixel shuffle
    pixel_shuffle: VValue = 0.5  # downsample ratio (1: none)
    projector: Projector = Projector()
    preprocess: Preprocess = Preprocess()
    img_start_token: Union[StrictStr, None] = None
    img_context_token: StrictStr
    img_end_token: Union[StrictStr, None] = None
    img_text_separator: StrictStr = ""  # between the image tokens and the user's text (InternVL: "\n")
    tensors: VisionTensors
    reference: Union[VisionReference, None] = None


class VisionSpec(BaseModel):
    """The vision part resolved against a config and an image size (what the graph builder reads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    image_size: int
    native_image_size: int
    patch_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    norm_kind: str
    norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    hidden_act: str
    layer_scale: bool
    cls_token: bool
    drop_cls: bool
    final_norm: bool
    downsample: float
    projector_norm: bool
    projector_norm_eps: float
    projector_act: str
    llm_hidden_size: int
    resize: str
    mean: list[float]
    std: list[float]

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return int(round(self.grid * self.downsample)) ** 2


ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu",
        "silu": "silu", "relu": "relu"}


def resolve_vision(v: VisionRecipe, raw: dict[str, Any], llm_hidden: int, image_size: int | None,
                   source: str) -> VisionSpec:
    section = raw.get(v.section)
    if not isinstance(section, dict):
        raise GeneratorError(f"{source}: vision.section: config.json has no '{v.section}' mapping, which the "
                             f"recipe's vision part reads; this checkpoint is not the recipe's vision-language model.")
    env = {k: val for k, val in raw.items() if not isinstance(val, (dict, list))}
    env.update({k: val for k, val in section.items() if val is not None})

    def get(name: str, value):
        if isinstance(value, _Expr):
            try:
                return evaluate(value.expr, env)
            except ExprError as exc:
                raise GeneratorError(f"{source}: vision.{name}: {exc} (names are keys of config.json's "
                                     f"'{v.section}' and its top-level keys).") from None
        return value

    native, patch = int(get("image_size", v.image_size)), int(get("patch_size", v.patch_size))
    size = int(image_size or v.default_image_size)
    ratio = float(get("pixel_shuffle", v.pixel_shuffle))
    grid = size // patch if patch > 0 else 0
    if patch <= 0 or size % patch or size <= 0 or size > 4096:
        raise GeneratorError(f"--image_size {size}: must be a positive multiple of the vision patch size {patch} "
                             f"(at most 4096).")
    if ratio <= 0 or ratio > 1 or abs(grid * ratio - round(grid * ratio)) > 1e-9 or \
            abs(1 / ratio - round(1 / ratio)) > 1e-9:
        raise GeneratorError(f"--image_size {size}: the {grid}x{grid} patch grid cannot be pixel-shuffled by "
                             f"{ratio}; pick an image size whose grid ({size}/{patch}) is a multiple of "
                             f"{round(1 / ratio) if ratio > 0 else '?'}.")
    act = str(get("hidden_act", v.hidden_act))
    if act not in ACTS or v.projector.act not in ACTS:
        raise GeneratorError(f"{source}: vision: activation '{act}' / '{v.projector.act}' is not one of "
                             f"{', '.join(ACTS)}.")
    hidden, heads = int(get("hidden_size", v.hidden_size)), int(get("num_attention_heads", v.num_attention_heads))
    if heads <= 0 or hidden % heads:
        raise GeneratorError(f"{source}: vision hidden_size {hidden} is not a multiple of its {heads} heads.")
    return VisionSpec(
        image_size=size, native_image_size=native, patch_size=patch, hidden_size=hidden,
        num_hidden_layers=int(get("num_hidden_layers", v.num_hidden_layers)), num_attention_heads=heads,
        intermediate_size=int(get("intermediate_size", v.intermediate_size)), norm_kind=v.norm.kind,
        norm_eps=float(get("norm.eps", v.norm.eps)), qkv_bias=bool(get("qkv_bias", v.qkv_bias)),
        qk_norm=bool(get("qk_norm", v.qk_norm)), hidden_act=ACTS[act], layer_scale=bool(get("layer_scale", v.layer_scale)),
        cls_token=v.tensors.cls_token is not None, drop_cls=v.drop_cls, final_norm=v.tensors.post_norm is not None,
        downsample=ratio, projector_norm=v.projector.norm, projector_norm_eps=float(get("projector.norm_eps", v.projector.norm_eps)),
        projector_act=ACTS[v.projector.act], llm_hidden_size=int(llm_hidden), resize=v.preprocess.resize,
        mean=list(v.preprocess.mean), std=list(v.preprocess.std))


def vision_tensor_names(v: VisionRecipe, spec: VisionSpec) -> dict[str, str]:
    """Canonical vision name -> checkpoint tensor name, for every tensor the graph reads."""
    t = v.tensors
    out = {"patch_embed.weight": f"{t.patch_embed}.weight", "patch_embed.bias": f"{t.patch_embed}.bias",
           "pos_embed": t.pos_embed}
    if t.cls_token:
        out["cls_token"] = t.cls_token
    for i in range(spec.num_hidden_layers):
        for key, path in t.layer.items():
            if path is None:
                continue
            p = path.format(i=i)
            if key in ("ls1", "ls2"):
                if spec.layer_scale:
                    out[f"layers.{i}.{key}"] = p
                continue
            if key in ("q_norm", "k_norm") and not spec.qk_norm:
                continue
            out[f"layers.{i}.{key}.weight"] = f"{p}.weight"
            bias = key in ("norm1", "norm2", "fc1", "fc2", "o_proj") and not (key.startswith("norm") and spec.norm_kind == "rms_norm")
            if key in ("qkv", "q_proj", "k_proj", "v_proj"):
                bias = spec.qkv_bias
            if key in ("q_norm", "k_norm"):
                bias = spec.norm_kind == "layer_norm"
            if bias:
                out[f"layers.{i}.{key}.bias"] = f"{p}.bias"
    if t.post_norm:
        out["post_norm.weight"] = f"{t.post_norm}.weight"
        if spec.norm_kind == "layer_norm":
            out["post_norm.bias"] = f"{t.post_norm}.bias"
    for key, path in t.projector.items():
        if key == "norm" and not spec.projector_norm:
            continue
        out[f"projector.{key}.weight"], out[f"projector.{key}.bias"] = f"{path}.weight", f"{path}.bias"
    return out


def vision_tensor_shapes(v: VisionRecipe, spec: VisionSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """Checkpoint name -> (shape, kind) of every vision tensor (kinds: conv, linear, norm, bias, table),
    for synthetic checkpoints; the position table is the native image size's."""
    c, inter, p = spec.hidden_size, spec.intermediate_size, spec.patch_size
    s = int(round(1 / spec.downsample))
    n = (spec.native_image_size // p) ** 2 + (1 if spec.cls_token else 0)
    fixed = {"patch_embed.weight": ((c, 3, p, p), "conv"), "cls_token": ((1, 1, c), "table"),
             "pos_embed": ((1, n, c), "table"), "projector.norm.weight": ((c * s * s,), "norm"),
             "projector.fc1.weight": ((spec.llm_hidden_size, c * s * s), "linear"),
             "projector.fc2.weight": ((spec.llm_hidden_size, spec.llm_hidden_size), "linear")}
    per_layer = {"qkv.weight": ((3 * c, c), "linear"), "fc1.weight": ((inter, c), "linear"),
                 "fc2.weight": ((c, inter), "linear"), "ls1": ((c,), "bias"), "ls2": ((c,), "bias")}
    out = {}
    for key, name in vision_tensor_names(v, spec).items():
        short = key.split(".", 2)[2] if key.startswith("layers.") else key
        if key in fixed:
            out[name] = fixed[key]
        elif short in per_layer:
            out[name] = per_layer[short]
        elif key.endswith(".bias"):
            rows = {"qkv.bias": 3 * c, "fc1.bias": inter, "projector.norm.bias": c * s * s,
                    "projector.fc1.bias": spec.llm_hidden_size, "projector.fc2.bias": spec.llm_hidden_size}
            out[name] = ((rows.get(short, c),), "bias")
        elif short.endswith("norm1.weight") or short.endswith("norm2.weight") or "norm" in short:
            out[name] = ((c,), "norm")
        else:  # q_proj / k_proj / v_proj / o_proj
            out[name] = ((c, c), "linear")
    return out
