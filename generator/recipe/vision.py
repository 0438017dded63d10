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
from .values import Expr, Strict, Value




class VisionNorm(Strict):
    kind: Union[Literal["layer_norm", "rms_norm"], Expr] = "layer_norm"  # {expr}: e.g. InternViT's norm_type
    eps: Value = 1.0e-6


class Projector(Strict):
    """MLP projector: [LayerNorm] -> Linear -> act -> Linear (InternVL's mlp1)."""

    norm: StrictBool = True
    norm_eps: Value = 1.0e-5
    act: StrictStr = "gelu"
    norm_kind: Literal["layer_norm", "rms_norm"] = "layer_norm"
    norm_first: StrictBool = False  # the norm over each patch before the merge (Qwen2.5-VL's ln_q), not after
    mid: Literal["llm_hidden", "merged"] = "llm_hidden"  # fc1's width: the LLM's, or the merged patch's


class Resampler(Strict):
    """Perceiver resampler (MiniCPM-V) instead of the projector: generator/export/resampler.py."""

    queries: Value = 64
    heads: Value  # attention heads over the language model's width
    norm_eps: Value = 1.0e-6


class Preprocess(Strict):
    """What the reference processor does to one tile: resize to image_size x image_size with
    `resize`, scale to [0, 1], normalise with mean/std (baked into the graph)."""

    resize: Literal["bicubic", "bilinear"] = "bicubic"
    mean: list[StrictFloat] = [0.485, 0.456, 0.406]
    std: list[StrictFloat] = [0.229, 0.224, 0.225]


class VisionTensors(Strict):
    """Checkpoint names. Module paths get `.weight` / `.bias`; `cls_token`, `pos_embed`, `ls1`, `ls2`
    are whole parameter names; `{i}` is the ViT layer."""

    patch_embed: StrictStr
    cls_token: Union[StrictStr, None] = None
    pos_embed: Union[StrictStr, None] = None  # none with position: rope_2d
    layer: dict[StrictStr, Union[StrictStr, None]]  # norm1 norm2 qkv|q/k/v o_proj q_norm k_norm ls1 ls2 fc1|gate_proj,up_proj fc2
    post_norm: Union[StrictStr, None] = None
    projector: dict[StrictStr, StrictStr]  # norm fc1 fc2
    resampler: dict[StrictStr, StrictStr] = {}  # query query_pos kv_proj ln_q ln_kv in_proj out_proj ln_post proj
    ignore: list[StrictStr] = []


class VisionReference(Strict):
    """transformers' class for the whole vision-language model (verification): its config (values or
    {expr} over the resolved vision spec's fields, `llm_hidden_size`, and the checkpoint's top-level keys;
    `text_config: "*"` is the language model's section), and where each reference tensor comes from
    (generator/verify/relayout.py's syntax; `prefixes` maps the rest by name prefix)."""

    architecture: StrictStr
    config: dict[str, Any] = {}
    tensors: dict[str, StrictStr] = {}
    prefixes: dict[str, StrictStr] = {}
    # transformers-native families (Qwen2.5-VL): the checkpoint's config.json as is (`config` overrides
    # keys), and the transformers image processor whose pixel_values + image_grid_thw the reference
    # takes on the graph's resized picture; the reference then runs on input_ids (its own positions,
    # e.g. mRoPE) instead of embeddings with the features put in
    checkpoint_config: StrictBool = False
    image_processor: Union[StrictStr, None] = None


class VisionRecipe(Strict):
    section: Union[StrictStr, None] = "vision_config"  # the vision config inside config.json (top-level keys
    # also visible); null: the top level (MiniCPM-V names its timm tower instead of sizing it)
    defaults: dict[StrictStr, Union[StrictBool, StrictInt, StrictFloat, StrictStr]] = {}  # keys the config may omit
    image_size: Value  # native size (the position table's grid)
    default_image_size: StrictInt = 224  # Pulsar2's --image_size default
    patch_size: Value
    hidden_size: Value
    num_hidden_layers: Value
    num_attention_heads: Value
    intermediate_size: Value
    norm: VisionNorm = VisionNorm()
    qkv_bias: Value = True
    qk_norm: Value = False
    hidden_act: Value = "gelu"
    layer_scale: Value = True
    drop_cls: StrictBool = True  # the class token's output row is dropped before pixel shuffle
    pixel_shuffle: Value = 0.5  # downsample ratio (1: none)
    projector: Projector = Projector()
    resampler: Union[Resampler, None] = None  # instead of the projector (tensors.projector: {})
    two_stage: StrictBool = False  # two graphs, encoder + resampler (the vendor's --vpm_two_stage)
    preprocess: Preprocess = Preprocess()
    img_start_token: Union[StrictStr, None] = None
    img_context_token: StrictStr
    img_end_token: Union[StrictStr, None] = None
    img_text_separator: StrictStr = ""  # between the image tokens and the user's text (InternVL: "\n")
    tensors: VisionTensors
    reference: Union[VisionReference, None] = None
    # Qwen2.5-VL-style quirks (defaults: none of them). `position: rope_2d`: no table, rotary over the
    # patch's (h, w) (half the rotated pairs each) with `rope_theta`; `mlp: gated`: act(gate) * up -> fc2;
    # `merge: blocks`: patches in merge-block-major order and each s x s block concatenated (s = 1 /
    # pixel_shuffle); `window_size` (pixels): blocks not in `fullatt_blocks` attend within windows of
    # window_size / s / patch_size merged patches; `temporal_patch_size`: the single frame is repeated
    # (the frames' kernels summed); `patch_bias`: the patch embedding has a bias.
    position: Literal["learned", "rope_2d"] = "learned"
    rope_theta: Value = 10000.0
    mlp: Literal["plain", "gated"] = "plain"
    merge: Literal["pixel_shuffle", "blocks"] = "pixel_shuffle"
    window_size: Value = 0
    fullatt_blocks: Union[Expr, list[StrictInt], None] = None
    temporal_patch_size: Value = 1
    patch_bias: StrictBool = True
    # the image tokens by the config's ids ({start, context, end}: exprs), their texts read from the
    # checkpoint's tokenizer (the recipe's texts when it has none): the config's ids are authoritative
    token_ids: dict[Literal["start", "context", "end"], Value] = {}


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
    resampler_queries: int = 0  # 0: no resampler (the projector)
    resampler_heads: int = 0
    resampler_norm_eps: float = 1.0e-6
    two_stage: bool = False
    position_kind: str = "learned"
    rope_theta: float = 10000.0
    mlp_kind: str = "plain"
    merge_kind: str = "pixel_shuffle"
    window: int = 0  # merged patches per window side (0: full attention everywhere)
    fullatt_blocks: list[int] = []
    temporal_patch_size: int = 1
    patch_bias: bool = True
    projector_norm_kind: str = "layer_norm"
    projector_norm_first: bool = False
    projector_mid: str = "llm_hidden"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        if self.resampler_queries:
            return self.resampler_queries
        return int(round(self.grid * self.downsample)) ** 2


ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu",
        "silu": "silu", "relu": "relu"}


def vision_section(v: VisionRecipe, raw: dict[str, Any]) -> dict[str, Any] | None:
    """The config mapping the vision part reads (None: the checkpoint has no vision part)."""
    if v.section is None:
        return raw
    section = raw.get(v.section)
    return section if isinstance(section, dict) else None


def resolve_vision(v: VisionRecipe, raw: dict[str, Any], llm_hidden: int, image_size: int | None,
                   source: str) -> VisionSpec:
    section = vision_section(v, raw)
    if section is None:
        raise GeneratorError(f"{source}: vision.section: config.json has no '{v.section}' mapping, which the "
                             f"recipe's vision part reads; this checkpoint is not the recipe's vision-language model.")
    env = dict(v.defaults)
    env.update({k: val for k, val in raw.items() if not isinstance(val, (dict, list))})
    env.update({k: val for k, val in section.items() if val is not None})

    def get(name: str, value):
        if isinstance(value, Expr):
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
    nk = str(get("norm.kind", v.norm.kind))
    if nk not in ("layer_norm", "rms_norm"):
        raise GeneratorError(f"{source}: vision.norm.kind '{nk}' is not layer_norm or rms_norm.")
    hidden, heads = int(get("hidden_size", v.hidden_size)), int(get("num_attention_heads", v.num_attention_heads))
    if heads <= 0 or hidden % heads:
        raise GeneratorError(f"{source}: vision hidden_size {hidden} is not a multiple of its {heads} heads.")
    rs = {}
    if v.resampler is not None:
        q, rh = int(get("resampler.queries", v.resampler.queries)), int(get("resampler.heads", v.resampler.heads))
        if q <= 0 or int(round(q ** 0.5)) ** 2 != q or rh <= 0 or llm_hidden % rh or llm_hidden % 4:
            raise GeneratorError(f"{source}: vision.resampler: {q} queries (a square number) of {llm_hidden} "
                                 f"features (a multiple of 4: the 2D sin-cos table) in {rh} heads do not fit.")
        rs = dict(resampler_queries=q, resampler_heads=rh, resampler_norm_eps=float(get("resampler.norm_eps", v.resampler.norm_eps)))
    elif v.two_stage:
        raise GeneratorError(f"{source}: vision.two_stage needs a vision.resampler (the second stage).")
    s = int(round(1 / ratio))
    window_px, full = int(get("window_size", v.window_size) or 0), get("fullatt_blocks", v.fullatt_blocks)
    window = window_px // s // patch if window_px else 0
    if window_px and window <= 0:
        raise GeneratorError(f"{source}: vision window_size {window_px} is smaller than one merged patch "
                             f"({s} x {patch} px).")
    if v.position == "rope_2d" and (hidden // heads) % 4:
        raise GeneratorError(f"{source}: vision head size {hidden // heads} is not a multiple of 4, which the "
                             f"2D rotary embedding needs.")
    extra = dict(position_kind=v.position, rope_theta=float(get("rope_theta", v.rope_theta)), mlp_kind=v.mlp,
                 merge_kind=v.merge, window=window, fullatt_blocks=[int(i) for i in (full or [])],
                 temporal_patch_size=int(get("temporal_patch_size", v.temporal_patch_size)),
                 patch_bias=v.patch_bias, projector_norm_kind=v.projector.norm_kind,
                 projector_norm_first=v.projector.norm_first, projector_mid=v.projector.mid)
    return VisionSpec(
        **extra, image_size=size, native_image_size=native, patch_size=patch, hidden_size=hidden,
        num_hidden_layers=int(get("num_hidden_layers", v.num_hidden_layers)), num_attention_heads=heads,
        intermediate_size=int(get("intermediate_size", v.intermediate_size)), norm_kind=nk,
        norm_eps=float(get("norm.eps", v.norm.eps)), qkv_bias=bool(get("qkv_bias", v.qkv_bias)),
        qk_norm=bool(get("qk_norm", v.qk_norm)), hidden_act=ACTS[act], layer_scale=bool(get("layer_scale", v.layer_scale)),
        cls_token=v.tensors.cls_token is not None, drop_cls=v.drop_cls, final_norm=v.tensors.post_norm is not None,
        downsample=ratio, projector_norm=v.projector.norm, projector_norm_eps=float(get("projector.norm_eps", v.projector.norm_eps)),
        projector_act=ACTS[v.projector.act], llm_hidden_size=int(llm_hidden), resize=v.preprocess.resize,
        mean=list(v.preprocess.mean), std=list(v.preprocess.std), two_stage=v.two_stage, **rs)


def vision_tensor_names(v: VisionRecipe, spec: VisionSpec) -> dict[str, str]:
    """Canonical vision name -> checkpoint tensor name, for every tensor the graph reads."""
    t = v.tensors
    out = {"patch_embed.weight": f"{t.patch_embed}.weight"}
    if spec.patch_bias:
        out["patch_embed.bias"] = f"{t.patch_embed}.bias"
    if t.pos_embed:
        out["pos_embed"] = t.pos_embed
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
            bias = key in ("norm1", "norm2", "fc1", "fc2", "o_proj", "gate_proj", "up_proj") and not (key.startswith("norm") and spec.norm_kind == "rms_norm")
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
        out[f"projector.{key}.weight"] = f"{path}.weight"
        if not (key == "norm" and spec.projector_norm_kind == "rms_norm"):
            out[f"projector.{key}.bias"] = f"{path}.bias"
    for key, path in t.resampler.items():  # whole parameters; in_proj_weight/_bias; modules' .weight (.bias)
        whole, sep = key in ("query", "query_pos", "proj"), "_" if key == "in_proj" else "."
        out.update({f"resampler.{key}": path} if whole else {f"resampler.{key}.{p}": f"{path}{sep}{p}" for p in
                   (("weight",) if key == "kv_proj" else ("weight", "bias"))})
    return out


def vision_tensor_shapes(v: VisionRecipe, spec: VisionSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """Checkpoint name -> (shape, kind) of every vision tensor (kinds: conv, linear, norm, bias, table),
    for synthetic checkpoints; the position table is the native image size's."""
    c, inter, p = spec.hidden_size, spec.intermediate_size, spec.patch_size
    s = int(round(1 / spec.downsample))
    n = (spec.native_image_size // p) ** 2 + (1 if spec.cls_token else 0)
    mid = c * s * s if spec.projector_mid == "merged" else spec.llm_hidden_size
    tp, pn = spec.temporal_patch_size, c if spec.projector_norm_first else c * s * s
    fixed = {"patch_embed.weight": ((c, 3, tp, p, p) if tp > 1 else (c, 3, p, p), "conv"), "cls_token": ((1, 1, c), "table"),
             "pos_embed": ((1, n, c), "table"), "projector.norm.weight": ((pn,), "norm"),
             "projector.fc1.weight": ((mid, c * s * s), "linear"),
             "projector.fc2.weight": ((spec.llm_hidden_size, mid), "linear")}
    per_layer = {"qkv.weight": ((3 * c, c), "linear"), "fc1.weight": ((inter, c), "linear"),
                 "fc2.weight": ((c, inter), "linear"), "gate_proj.weight": ((inter, c), "linear"),
                 "up_proj.weight": ((inter, c), "linear"), "ls1": ((c,), "bias"), "ls2": ((c,), "bias")}
    e, q = spec.llm_hidden_size, spec.resampler_queries
    fixed.update({"resampler.query": ((q, e), "table"), "resampler.query_pos": ((q, e), "table"),
                  "resampler.proj": ((e, e), "linear"), "resampler.kv_proj.weight": ((e, c), "linear"),
                  "resampler.in_proj.weight": ((3 * e, e), "linear"), "resampler.in_proj.bias": ((3 * e,), "bias"),
                  "resampler.out_proj.weight": ((e, e), "linear"), "resampler.out_proj.bias": ((e,), "bias")})
    for k in ("ln_q", "ln_kv", "ln_post"):
        fixed.update({f"resampler.{k}.weight": ((e,), "norm"), f"resampler.{k}.bias": ((e,), "bias")})
    out = {}
    for key, name in vision_tensor_names(v, spec).items():
        short = key.split(".", 2)[2] if key.startswith("layers.") else key
        if key in fixed:
            out[name] = fixed[key]
        elif short in per_layer:
            out[name] = per_layer[short]
        elif key.endswith(".bias"):
            rows = {"qkv.bias": 3 * c, "fc1.bias": inter, "gate_proj.bias": inter, "up_proj.bias": inter,
                    "projector.norm.bias": pn,
                    "projector.fc1.bias": mid, "projector.fc2.bias": spec.llm_hidden_size}
            out[name] = ((rows.get(short, c),), "bias")
        elif short.endswith("norm1.weight") or short.endswith("norm2.weight") or "norm" in short:
            out[name] = ((c,), "norm")
        else:  # q_proj / k_proj / v_proj / o_proj
            out[name] = ((c, c), "linear")
    return out


def image_token_texts(v: VisionRecipe, raw: dict[str, Any], tok_dir, source: str) -> dict[str, str | None]:
    """{img_start_token, img_context_token, img_end_token}: the recipe's texts, or with `token_ids` the
    tokenizer's texts of the config's ids."""
    out = {"img_start_token": v.img_start_token, "img_context_token": v.img_context_token,
           "img_end_token": v.img_end_token}
    path = tok_dir / "tokenizer.json"
    if not v.token_ids or not path.is_file():
        return out
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    env = {k: val for k, val in raw.items() if not isinstance(val, (dict, list))}
    for key, value in v.token_ids.items():
        try:
            tid = evaluate(value.expr, env) if isinstance(value, Expr) else value
        except ExprError as exc:
            raise GeneratorError(f"{source}: vision.token_ids.{key}: {exc} (names are config.json's top-level "
                                 f"keys).") from None
        text = tok.id_to_token(int(tid)) if isinstance(tid, int) else None
        if text is None:
            raise GeneratorError(f"{source}: vision.token_ids.{key}: the config's id {tid} is not a token of "
                                 f"the checkpoint's tokenizer ({path}).")
        out[f"img_{key}_token"] = text
    return out
