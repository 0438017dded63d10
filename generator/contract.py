"""The bundle format: written by export, read by everything else (runtime, serve, verify, cli).

One place for what a bundle is: the file names (formatted by the functions here: our own code never
parses a template), the typed manifest (`Manifest`; reading a bundle validates it), the graphs' storage
types and conversions, the board's attention mask (`board_mask`, the one function that builds it),
the shape groups as the manifest records them, post_config.json's sampling settings (`Sampling`) and
the tokenizer server's default address. It imports only the top-level utilities (errors, limits), so
the runtime can depend on it without depending on how a bundle is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import ml_dtypes
import numpy as np
from onnx import TensorProto
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError, Field

from .errors import GeneratorError
from .limits import Ranged, shown, validation_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
POST_CONFIG = "post_config.json"
EMBED_FILE = "model.embed_tokens.weight.bfloat16.bin"

TOKENIZER_HOST = "127.0.0.1"
TOKENIZER_PORT = 12345  # the board runtime's default --url_tokenizer_model port
TOKENIZER_URL = f"http://{TOKENIZER_HOST}:{TOKENIZER_PORT}"

WeightType = Literal["s8", "s4", "bf16", "fp16", "fp32", "fp8_e4m3", "fp8_e5m2"]
HiddenType = Literal["bf16", "fp16", "fp32"]
QUANTIZED_TYPES = ("s8", "s4")  # block-quantized weight types (DequantizeLinear + MatMul in the graphs)
# fp8 (Pulsar2's -w / --post_weight_type choices): FLOAT8E4M3FN / FLOAT8E5M2 initializers, one fp32 scale per
# output channel, DequantizeLinear (axis 1) before the MatMul. uses_dequantize: codes + scales (s8, s4, fp8),
# which the runtime folds into fp32 weights in board numerics (runtime/ort.py).
FP8_TYPES = ("fp8_e4m3", "fp8_e5m2")
is_quantized = QUANTIZED_TYPES.__contains__
is_fp8 = FP8_TYPES.__contains__
uses_dequantize = (*QUANTIZED_TYPES, *FP8_TYPES).__contains__


# -- file names ---------------------------------------------------------------------------------
# The board finds layer i's model through a printf template (`%d`); the manifest records that template
# as data, made by the same functions with "%d" as the layer (and "{group}" as the shape group).

def layer_stem(model_type: str, prefill_len: int, layer: int | str) -> str:
    return f"{model_type}_p{prefill_len}_l{layer}_together"


def layer_graph_name(model_type: str, prefill_len: int, layer: int | str, group: int | str) -> str:
    """Layer `layer`'s ONNX graph for shape group `group`."""
    return f"{layer_stem(model_type, prefill_len, layer)}.g{group}.onnx"


def layer_data_name(model_type: str, prefill_len: int, layer: int | str) -> str:
    """Layer `layer`'s weights, shared by its graphs of every shape group."""
    return f"{layer_stem(model_type, prefill_len, layer)}.data"


def layer_axmodel_name(model_type: str, prefill_len: int, layer: int | str) -> str:
    """What Pulsar2 compiles layer `layer` to (the board's --template_filename_axmodel with "%d")."""
    return f"{layer_stem(model_type, prefill_len, layer)}.axmodel"


def post_stem(model_type: str) -> str:
    return f"{model_type}_post"


def tokenizer_dir_name(model: str) -> str:
    return f"{model}_tokenizer"


def tokenizer_script_name(model: str) -> str:
    return f"{model}_tokenizer_uid.py"


# -- storage types and the mask -------------------------------------------------------------------

def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even) as uint16 bits."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def from_bf16_bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)


# hidden_state_type -> (numpy storage dtype, ONNX element type) at the graph boundary
STORAGE = {"bf16": (np.uint16, TensorProto.BFLOAT16), "fp16": (np.float16, TensorProto.FLOAT16),
           "fp32": (np.float32, TensorProto.FLOAT)}


def to_storage(x: np.ndarray, hidden: str) -> np.ndarray:
    """fp32 values as the graph boundary stores them (bf16 as uint16 bits)."""
    if hidden == "bf16":
        return to_bf16_bits(x)
    return np.ascontiguousarray(x.astype(STORAGE[hidden][0]))


def from_storage(x: np.ndarray, hidden: str) -> np.ndarray:
    return from_bf16_bits(x) if hidden == "bf16" else x.astype(np.float32)


# the mask's "blocked" value per hidden_state_type (fp16 cannot hold -65536), and its stored form
MASK_VALUE = {"bf16": -65536.0, "fp16": -65504.0, "fp32": -65536.0}
MASK_BITS = {hidden: to_storage(np.full(1, v, np.float32), hidden)[0] for hidden, v in MASK_VALUE.items()}


def board_mask(hidden: str, tokens: int, history_rows: int, cached: int) -> np.ndarray:
    """The `mask` input of a layer graph, in the storage type: [1, tokens, history_rows + tokens].

    Column j < history_rows is history row j: open (0) for the `cached` rows holding earlier
    positions, blocked for the rest (a dummy or not yet filled row); the last `tokens` columns are the
    new tokens themselves, causal (token t sees new tokens 0..t). Decode is tokens=1."""
    mask = np.full((1, tokens, history_rows + tokens), MASK_BITS[hidden], STORAGE[hidden][0])
    mask[0, :, :cached] = 0
    mask[0, :, history_rows:][np.tril(np.ones((tokens, tokens), bool))] = 0
    return mask


# -- the manifest -----------------------------------------------------------------------------------

class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShapeGroup(Record):
    """One shape group of the layer graphs, as recorded: group 0 decodes one token against `history`
    rows; groups >= 1 prefill `tokens` rows after `history` cached rows (the first with a dummy 1-row
    history). `capacity`: the largest precompute_len + n a turn may have to use it."""

    index: int
    kind: Literal["decode", "prefill"]
    tokens: int
    history: int
    history_rows: int
    dummy_history: bool
    capacity: int

    @property
    def label(self) -> str:
        """How logs, tables and plots name the group: decode, prefill p128 h0, prefill p128 h256."""
        return "decode" if self.index == 0 else f"prefill p{self.tokens} h{self.history}"


class Graphs(Record):
    layer_template: str
    layer_data_template: str
    axmodel_template: str  # the board's --template_filename_axmodel (printf %d = layer)
    post: str
    post_axmodel: str
    embed: str
    groups: list[ShapeGroup]


def position_rows(rope: dict[str, Any] | None) -> int:
    """Rows of the layers' `indices` input (board contract section 9): 3 (temporal, height, width
    positions) when the rope tables carry an mRoPE split, else 1. `rope`: the spec's tables (objects or
    as the manifest records them)."""
    tables = [t if isinstance(t, dict) else t.model_dump() for t in (rope or {}).values()]
    return 3 if any(t.get("mrope_section") for t in tables) else 1


class ModelSpec(BaseModel):
    """The resolved architecture as the bundle records it (generator/resolve/spec.py's ArchSpec): the
    fields read outside the build are typed here; the rest is kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True)
    model_name: str
    model_type: str
    recipe: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]
    rope: dict[str, dict[str, Any]] = {}  # rope tables per layer type, as recorded

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def position_rows(self) -> int:
        """Rows of the layers' `indices` input: 3 for mRoPE, else 1."""
        return position_rows(self.rope)


class Options(Record):
    """The build options (Pulsar2 llm_build flag names) the bundle was built with."""

    chip: str
    weight_type: WeightType
    hidden_state_type: HiddenType
    prefill_len: int
    kv_cache_len: int
    last_kv_cache_len: list[int]
    post_topk: int
    post_weight_type: WeightType
    group_size: int
    overrides: dict[str, WeightType] = {}
    # context extension (--extend_method / --scaling_factor, resolve/rope.py extend_rope), recorded when used
    extend_method: Literal["none", "PI", "NTK"] = Field("none", exclude_if=lambda v: v == "none")
    scaling_factor: float | None = Field(None, exclude_if=lambda v: v is None)

    @property
    def quantized(self) -> bool:
        """Whether any layer or post weight (overrides too) is codes + scales: the runtime's session settings."""
        return any(map(uses_dequantize, (self.weight_type, self.post_weight_type, *self.overrides.values())))


class RecipeRef(Record):
    name: str
    file: str
    sha256: str  # of the flattened recipe (parents merged): a parent's edit changes it too
    variant: str | None


class InputRef(Record):
    source: str
    files: dict[str, str]  # file name -> sha256
    reference: str | None = None  # the fp32 checkpoint a calibrated (GPTQ/AWQ) source was derived from
    quantization: dict[str, Any] | None = None  # how that calibrated source was made (method, calibration, ...)


class TokenizerFiles(Record):
    dir: str
    server: str
    chat_template: dict[str, Any] | None = None  # the recipe's fallback template, when the checkpoint has none


class FileEntry(Record):
    bytes: int
    sha256: str


def vision_stem(image_size: int) -> str:
    """The vision part's graph and weights (contract section 9: built at --image_size)."""
    return f"vision_part_{image_size}"


def resampler_stem(image_size: int) -> str:
    """A two-stage vision part's second graph (MiniCPM-V's resampler; the first is vision_stem's encoder)."""
    return f"vpm_resampler_{image_size}"


class VisionEntry(Record):
    """The vision part of a vision-language bundle: its graph (uint8 NHWC [1, H, W, 3] RGB in,
    [1, tokens, hidden] image embeddings out), the image tokens, and what the reference processor does
    to one tile before the graph (resize to image_size with `resize`; mean/std are inside the graph)."""

    graph: str
    data: str
    image_size: int
    tokens: int
    weight_type: WeightType
    img_start_token_id: int | None
    img_context_token_id: int
    img_end_token_id: int | None
    resize: Literal["bicubic", "bilinear"]
    mean: list[float]
    std: list[float]
    spec: dict[str, Any]  # the resolved vision spec (generator/recipe/vision.py VisionSpec)
    # two-stage vision parts (the vendor's --vpm_two_stage): `graph` is the encoder (image -> the tower's
    # features [1, g*g, C]), this graph the resampler (features -> [1, tokens, hidden]); absent otherwise
    resampler_graph: str | None = None
    resampler_data: str | None = None
    # what mRoPE positions need (runtime/mrope.py): the patch size, the merge of s x s patches into one
    # image token, the frames per patch, and the (t, h, w) patch grid of an image at image_size
    patch_size: int = 0
    spatial_merge_size: int = 1
    temporal_patch_size: int = 1
    image_grid: list[int] | None = None


class Manifest(Record):
    """manifest.json. Written last (so a bundle with one is complete); `files` lists every other file."""

    format_version: int
    model: str
    recipe: RecipeRef
    chip: str
    options: Options
    spec: ModelSpec
    input: InputRef
    tools: dict[str, str]
    graphs: Graphs
    tokenizer: TokenizerFiles
    scripts: list[str]
    system_prompt: str
    non_standard_ops: list[str]
    build_seconds: float
    peak_rss_mib: float | None = None  # peak resident memory of the build and its checks (older bundles: absent)
    synthetic: bool = False  # built from generated weights (verify regenerates them)
    checks_skipped: str | None = None  # why verification did not run
    weight_type_auto: dict[str, Any] | None = None  # -w auto: the KLD budget, the measured KLD, the per-layer mix
    checks: dict[str, Any] | None = None  # the verification summary
    files: dict[str, FileEntry] | None = None  # absent only while checks run on the unpublished bundle
    vision: VisionEntry | None = None  # vision-language bundles only (text bundles: absent, null)

    # file names, formatted here rather than from the templates
    def layer_graph(self, layer: int, group: int) -> str:
        return layer_graph_name(self.spec.model_type, self.options.prefill_len, layer, group)

    def layer_data(self, layer: int) -> str:
        return layer_data_name(self.spec.model_type, self.options.prefill_len, layer)


def read_manifest(bundle_dir: Path) -> Manifest:
    """The bundle's manifest.json, validated; a GeneratorError naming the file and field otherwise."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise GeneratorError(f"'{bundle_dir}' is not a bundle: it has no {MANIFEST} (build one with `make` or "
                             f"`python -m generator build`).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GeneratorError(f"{path}: unreadable bundle manifest ({exc}); rebuild the bundle.") from None
    if not isinstance(data, dict):
        raise GeneratorError(f"{path}: a bundle manifest is a JSON object, got {type(data).__name__}; rebuild the bundle.")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise GeneratorError(f"{path}: format_version {shown(version)}, this generator reads format {FORMAT_VERSION}; "
                             f"rebuild the bundle.")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise GeneratorError(f"{path}: invalid bundle manifest (built by another generator version?): "
                             f"{validation_text(exc)}. Rebuild the bundle.") from None


# -- post_config.json -------------------------------------------------------------------------------

class Sampling(Record):
    """post_config.json (contract section 4): the board's sampling settings, applied in this order."""

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
            text = validation_text(exc) if isinstance(exc, ValidationError) else str(exc)
            raise GeneratorError(f"{path}: invalid sampling settings: {text}.") from None


# -- a bundle on disk -------------------------------------------------------------------------------

class Bundle:
    """A bundle directory: its validated manifest and where its files are."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.manifest = read_manifest(self.dir)
        self.spec = self.manifest.spec
        self.opts = self.manifest.options
        self.groups = self.manifest.graphs.groups
        self.model = self.manifest.model
        self.system_prompt = self.manifest.system_prompt
        post_cfg = self.dir / POST_CONFIG
        self.sampling = Sampling.read(post_cfg) if post_cfg.is_file() else Sampling()

    def layer_file(self, i: int, group: int) -> Path:
        return self.dir / self.manifest.layer_graph(i, group)

    @property
    def post_file(self) -> Path:
        return self.dir / self.manifest.graphs.post

    @property
    def embed_file(self) -> Path:
        return self.dir / self.manifest.graphs.embed

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / self.manifest.tokenizer.dir

    @property
    def tokenizer_server(self) -> Path:
        return self.dir / self.manifest.tokenizer.server
