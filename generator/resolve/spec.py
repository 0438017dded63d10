"""Architecture resolution: checkpoint config.json (dimensions) + recipe (quirks) -> one typed ArchSpec.

The spec is everything the graphs, the weight converter and the runner need, with every
expression evaluated; it is printed at build start the way Pulsar2 prints its Config.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import GeneratorError
from ..limits import limits, rule, rule_of, shown
from ..names import safe_name
from ..recipe import Expr, Norm, Recipe
from ..recipe.schema import QkNorm
from ..recipe.expr import ExprError, evaluate
from .rope import RopeTable, extend_rope, resolve_rope

ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh",
    "relu": "relu",
}
LAYER_TYPES = ("full_attention", "sliding_attention")


class NormSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    eps: float
    weight_offset: float = 0.0


class ArchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model_name: str
    model_type: str
    recipe: str
    architecture: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    norm: NormSpec
    final_norm: NormSpec
    hidden_act: str
    mlp_gated: bool
    mlp_bias: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: NormSpec | None  # the per-head q/k norms, when the recipe maps q_norm/k_norm
    post_attention_norm: bool
    post_feedforward_norm: bool
    parallel_residual: bool
    attention_scale: float
    attn_logit_softcap: float | None
    final_logit_softcap: float | None
    sliding_window: int | None
    layer_types: list[str]
    rope: dict[str, RopeTable]
    residual_scale: float
    embedding_scale: float
    logit_scale: float
    tie_word_embeddings: bool
    lm_head_bias: bool
    bos_token_id: int | None
    eos_token_ids: list[int]

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Matmul weights of one decoder layer (q/k/v, o, MLP)."""
        h = self.hidden_size
        return h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + h * self.intermediate_size * (3 if self.mlp_gated else 2)

    def pretty(self, width: int = 80) -> str:
        """The Pulsar2-style `Config(...)` printed at build start, every line within `width` columns
        (long values wrap between their items): rope tables without their frequency lists, layer types
        as the layers of each type, the most common one as a count."""
        from pprint import pformat

        rows = []
        for key, value in self.model_dump().items():
            if key == "rope":  # without the frequency lists; flags only where they differ from the default
                value = {t: f"{r.kind} theta={r.theta:g} rotary_dim={r.rotary_dim}" + " interleaved" * r.interleaved
                         + (f" attention_factor={r.attention_factor:g}" if r.attention_factor != 1 else "")
                         + (f" long_from={r.long_from}" if r.long_from is not None else "")
                         + (f" mrope_section={r.mrope_section}" if r.mrope_section else "")
                         for t, r in self.rope.items()}
            elif key == "layer_types":  # {type: [layers]}, the most common type as a count
                at = {t: [i for i, x in enumerate(value) if x == t] for t in dict.fromkeys(value)}
                common = max(at, key=lambda t: len(at[t]))
                value = {t: (f"{len(v)} layers" if t == common else v) for t, v in at.items()}
            head = f"    {key}="
            text = pformat(value, width=max(width - len(head) - 1, 20), sort_dicts=False, compact=True)
            rows.append(head + text.replace("\n", "\n" + " " * len(head)) + ",")
        return "Config(\n" + "\n".join(rows) + "\n)"


def _normalise_rope(cfg_in: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes `rope_parameters` (flat, or keyed by layer type: the full-attention
    one is read here; a recipe aliases a family's other keys, e.g. Gemma3's sliding-layer base);
    older configs write `rope_theta` + `rope_scaling`. Return the old-style keys (rope_theta,
    rope_scaling, partial_rotary_factor) that recipes refer to."""
    out: dict[str, Any] = {}
    rp = cfg_in.get("rope_parameters")
    if not isinstance(rp, dict) or not rp:
        return out
    if all(isinstance(v, dict) for v in rp.values()):
        flat = rp.get("full_attention") or next(iter(rp.values()))
    else:
        flat = rp
    out["rope_theta"] = flat.get("rope_theta")
    if (flat.get("rope_type") or "default") != "default":
        out["rope_scaling"] = {k: v for k, v in flat.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "partial_rotary_factor" in flat:
        out["partial_rotary_factor"] = flat["partial_rotary_factor"]
    return {k: v for k, v in out.items() if v is not None and cfg_in.get(k) is None}


def _rope_scaling_with_original(cfg: dict[str, Any]):
    """transformers' rule for scaled RoPE kinds that need the pre-training context: a top-level
    `original_max_position_embeddings` (Phi-3 writes it there) wins, else the dict's own, else
    max_position_embeddings."""
    scaling = cfg.get("rope_scaling")
    if not isinstance(scaling, dict):
        return scaling
    scaling = dict(scaling)
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("llama3", "yarn", "longrope", "su"):
        if cfg.get("original_max_position_embeddings") is not None:
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        elif cfg.get("max_position_embeddings") is not None:
            scaling.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return scaling


def _nested(cfg: dict[str, Any], dotted: str) -> Any:
    """The value under a dotted key path (rope_parameters.sliding_attention.rope_theta), else None."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def read_config(recipe: Recipe, raw: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Apply the recipe's reading rules (section, aliases, defaults) and transformers' conventions."""
    cfg_in = raw
    if recipe.config.section:
        cfg_in = raw.get(recipe.config.section)
        if not isinstance(cfg_in, dict):
            raise GeneratorError(f"{where}: the recipe '{recipe.name}' reads section '{recipe.config.section}', which is missing.")
    present = {k: v for k, v in cfg_in.items() if v is not None}
    present.update(_normalise_rope(cfg_in))
    for canonical, keys in recipe.config.aliases.items():
        for key in [keys] if isinstance(keys, str) else keys:
            value = present.get(key) if key in present or "." not in key else _nested(cfg_in, key)
            if value is not None:
                present[canonical] = value
                break
    cfg: dict[str, Any] = dict(recipe.config.defaults)
    cfg.update(present)
    cfg.setdefault("rope_scaling", None)
    cfg["rope_scaling"] = _rope_scaling_with_original(cfg)
    cfg.setdefault("partial_rotary_factor", 1.0)
    if cfg.get("num_key_value_heads") is None and "num_attention_heads" in cfg:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if cfg.get("head_dim") is None and all(type(x) is int and x > 0 for x in (hidden, heads)):  # else refused later
        if hidden % heads:
            raise GeneratorError(f"{where}: no head_dim, and hidden_size ({hidden}) is not a multiple of "
                                 f"num_attention_heads ({heads}); set head_dim.")
        cfg["head_dim"] = hidden // heads
    return cfg


def _value(v, cfg: dict, field: str, recipe: Recipe, extra: dict | None = None):
    if isinstance(v, Expr):
        env = dict(cfg)
        if extra:
            env.update(extra)
        try:
            return evaluate(v.expr, env)
        except ExprError as exc:
            raise GeneratorError(f"{recipe.source}: {field}: {exc} (config keys come from config.json "
                                 f"after the recipe's config.aliases/defaults).") from None
    return v


def _field(model: BaseModel, name: str, path: str, cfg: dict, recipe: Recipe, where: str):
    """A recipe field's value (expressions evaluated), checked against the field's range rule."""
    v = getattr(model, name)
    value = _value(v, cfg, path, recipe)
    ranged = rule_of(type(model), name)
    problem = ranged and ranged.rule.problem(value, ranged.optional)
    if problem:
        origin = f" ({{expr: {shown(v.expr)}}} with {where})" if isinstance(v, Expr) else ""
        raise GeneratorError(f"{recipe.source}: {path}: {problem}{origin}.")
    return value


def _dimension(cfg: dict, key: str, where: str) -> int:
    if cfg.get(key) is None:
        raise GeneratorError(f"{where}: required key '{key}' is missing (the recipe's config.aliases can map it from "
                             f"another name).")
    problem = rule(limits()["config_dimensions"][key]).problem(cfg[key])
    if problem:
        raise GeneratorError(f"{where}: key '{key}': {problem}.")
    return cfg[key]


def _norm(n: Norm, field: str, cfg: dict, recipe: Recipe, where: str) -> NormSpec:
    return NormSpec(kind=n.kind, eps=float(_field(n, "eps", f"{field}.eps", cfg, recipe, where)),
                    weight_offset=n.weight_offset)


def _qk_norm(qk: QkNorm, block: NormSpec, cfg: dict, recipe: Recipe, where: str) -> NormSpec:
    """The q/k norms' spec: the recipe's block.qk_norm, its null eps / weight_offset the block norm's."""
    eps = block.eps if qk.eps is None else float(_field(qk, "eps", "block.qk_norm.eps", cfg, recipe, where))
    offset = block.weight_offset if qk.weight_offset is None else qk.weight_offset
    return NormSpec(kind=qk.kind, eps=eps, weight_offset=offset)


def _token_ids(cfg: dict, key: str, vocab: int, where: str) -> list[int]:
    value = cfg.get(key)
    ids = [e for e in (value if isinstance(value, list) else [value]) if e is not None]
    bad = [e for e in ids if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab]
    if bad:
        raise GeneratorError(f"{where}: key '{key}': expected token ids from 0 to vocab_size - 1 ({vocab - 1}), "
                             f"got {shown(value)}.")
    return ids


def resolve_spec(recipe: Recipe, raw_config: dict[str, Any], *, model_name: str, max_positions: int,
                 where: str = "config.json", config: dict[str, Any] | None = None,
                 extend_method: str = "none", scaling_factor: float | None = None) -> ArchSpec:
    """`config`: read_config(recipe, raw_config, where), when the caller has read it already (a build does).
    `extend_method`/`scaling_factor`: the build's context extension (rope.extend_rope), on full attention."""
    cfg = read_config(recipe, raw_config, where) if config is None else config
    for k, refusal in enumerate(recipe.config.refuse):
        if _value(refusal.when, cfg, f"config.refuse[{k}].when", recipe):
            raise GeneratorError(f"{where}: {refusal.reason} ({refusal.when.expr}), which recipe '{recipe.name}' "
                                 f"does not build. Use a checkpoint without it, or extend the recipe and the "
                                 f"generic block (see ADDING_A_MODEL.md).")
    # a recipe reading a section (InternVL's llm_config) names the architectures found there
    section = raw_config.get(recipe.config.section) if recipe.config.section else None
    archs = (section if isinstance(section, dict) else raw_config).get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise GeneratorError(f"{where}: key 'architectures': expected a list of class names, got {shown(archs)}.")
    arch = next((a for a in archs if a in recipe.architectures), None)
    if archs and arch is None:
        raise GeneratorError(f"{where} declares architectures {archs}, but recipe '{recipe.name}' is for "
                             f"{recipe.architectures}. Pick the matching recipe or drop --recipe to detect it.")
    arch = arch or recipe.architectures[0]

    dims = {k: _dimension(cfg, k, where) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                    "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")}
    if dims["num_attention_heads"] % dims["num_key_value_heads"]:
        raise GeneratorError(f"{where}: num_attention_heads ({dims['num_attention_heads']}) is not a multiple of "
                             f"num_key_value_heads ({dims['num_key_value_heads']}).")
    max_pos = _dimension(cfg, "max_position_embeddings", where) if cfg.get("max_position_embeddings") is not None \
        else max_positions
    b = recipe.block
    val = lambda v, f: _value(v, cfg, f, recipe)  # noqa: E731
    field = lambda model, name, path: _field(model, name, path, cfg, recipe, where)  # noqa: E731

    act_name = val(b.mlp.act, "block.mlp.act")
    if not isinstance(act_name, str) or act_name not in ACTIVATIONS:
        raise GeneratorError(f"{recipe.source}: block.mlp.act: activation {shown(act_name)} is not supported; "
                             f"supported: {', '.join(sorted(ACTIVATIONS))}.")

    # Per-layer attention type: config layer_types when present, else the recipe's rule.
    n_layers = dims["num_hidden_layers"]
    types = cfg.get(b.attention.layer_types_key) if b.attention.layer_types_key else None
    origin = f"{where}: key '{b.attention.layer_types_key}'"
    if types is None:
        types = [_value(b.attention.layer_type_default, cfg, "block.attention.layer_type_default", recipe, {"i": i})
                 for i in range(n_layers)]
        origin = f"{recipe.source}: block.attention.layer_type_default (for each layer i)"
    if not isinstance(types, list) or len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        raise GeneratorError(f"{origin}: expected {n_layers} entries from {LAYER_TYPES}, got {shown(types)}.")
    window = field(b.attention, "sliding_window", "block.attention.sliding_window")
    if "sliding_attention" in types and not window:
        raise GeneratorError(f"{where}: some layers use sliding-window attention but no sliding_window size is set.")

    if val(b.rope.theta, "block.rope.theta") is None:
        raise GeneratorError(f"{where}: no rope_theta (set it in config.json or the recipe's config.defaults).")
    theta = field(b.rope, "theta", "block.rope.theta")
    rope_common = dict(head_dim=dims["head_dim"], interleaved=b.rope.interleaved, max_position_embeddings=max_pos,
                       max_positions_used=max_positions, where=f"{where} rope_scaling",
                       partial_rotary_factor=field(b.rope, "partial_rotary_factor", "block.rope.partial_rotary_factor"))
    scaling, ext_theta = extend_rope(val(b.rope.scaling, "block.rope.scaling"), float(theta), extend_method,
                                     scaling_factor, f"{where} rope_scaling")
    rope = {"full_attention": resolve_rope(scaling, theta=ext_theta, **rope_common)}
    if "sliding_attention" in types:
        local = field(b.rope, "local_theta", "block.rope.local_theta")
        rope["sliding_attention"] = (resolve_rope(None, theta=float(local), **rope_common) if local is not None
                                     else rope["full_attention"])

    softcap = field(b.attention, "logit_softcap", "block.attention.logit_softcap")
    final_softcap = field(recipe.head, "final_logit_softcap", "head.final_logit_softcap")
    have = recipe.tensors.provides()
    block_norm = _norm(b.norm, "block.norm", cfg, recipe, where)
    tie = field(recipe.head, "tie_word_embeddings", "head.tie_word_embeddings")
    bos = _token_ids(cfg, "bos_token_id", dims["vocab_size"], where)
    model_type = safe_name(recipe.model_type or cfg.get("model_type") or recipe.name,
                           f"{recipe.source} field 'model_type'" if recipe.model_type else f"{where} field 'model_type'")
    return ArchSpec(
        model_name=model_name,
        model_type=model_type,
        recipe=recipe.name,
        architecture=arch,
        **dims,
        max_position_embeddings=max_pos,
        norm=block_norm,
        final_norm=_norm(recipe.head.final_norm or b.norm, "head.final_norm", cfg, recipe, where),
        hidden_act=ACTIVATIONS[act_name],
        mlp_gated=b.mlp.gated,
        mlp_bias=field(b.mlp, "bias", "block.mlp.bias"),
        qkv_bias=field(b.attention, "qkv_bias", "block.attention.qkv_bias"),
        o_bias=field(b.attention, "o_bias", "block.attention.o_bias"),
        qk_norm=_qk_norm(b.qk_norm, block_norm, cfg, recipe, where) if "q_norm" in have else None,
        post_attention_norm="post_attention_layernorm" in have,
        post_feedforward_norm="post_feedforward_layernorm" in have,
        parallel_residual=b.parallel_residual,
        attention_scale=float(field(b.attention, "scale", "block.attention.scale")),
        attn_logit_softcap=None if softcap is None else float(softcap),
        final_logit_softcap=None if final_softcap is None else float(final_softcap),
        sliding_window=window if "sliding_attention" in types else None,
        layer_types=list(types),
        rope=rope,
        residual_scale=float(field(b, "residual_scale", "block.residual_scale")),
        embedding_scale=float(field(recipe.embedding, "scale", "embedding.scale")),
        logit_scale=float(field(recipe.head, "logit_scale", "head.logit_scale")),
        tie_word_embeddings=bool(tie),
        lm_head_bias=field(recipe.head, "bias", "head.bias"),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(cfg, "eos_token_id", dims["vocab_size"], where),
    )
