"""Pre-quantized GPTQ checkpoints as input (e.g. Qwen2.5-0.5B-Instruct-GPTQ-Int8, the vendor doc's example).

A GPTQ checkpoint stores each quantized linear module `<prefix>` as four tensors instead of
`<prefix>.weight` (AutoGPTQ / GPTQModel / optimum "gptq" packing, what transformers' GPTQ
integration reads):

    <prefix>.qweight  int32 [in * bits / 32, out]   32/bits codes per int32, packed along the input dim
    <prefix>.qzeros   int32 [groups, out * bits / 32] one zero point per (group, output), packed along out
    <prefix>.scales   fp16  [groups, out]             one scale per (group, output)
    <prefix>.g_idx    int32 [in]                      the group of each input row (optional)
    <prefix>.bias     (optional, unchanged)

Packing: code k of an int32 occupies bits [k * bits, (k + 1) * bits), lowest first; so input row r
is field r % (32 / bits) of qweight row r // (32 / bits), and output column c is field
c % (32 / bits) of qzeros column c // (32 / bits). The int32 values are read as unsigned.

Dequantization: W[out, in] = scales[g, out] * (code[in, out] - zero[g, out]) with g = g_idx[in].
g_idx is authoritative: with act-order (desc_act) it is a permutation of groups, not
in // group_size; without g_idx it is in // group_size (group_size -1: one group). The product of
an fp16 scale and a small integer is exact in float32, so the float weight this module hands on is
exactly the checkpoint's value, not a rounding of it.

Zero points (the classic trap): checkpoint_format "gptq" (v1, AutoGPTQ and the default) stores
zero - 1 and readers add 1 back; "gptq_v2" (GPTQModel's format="gptq_v2") stores the zero itself.
Only symmetric quantization is accepted, whose zero is always 2 ** (bits - 1): 128 for int8 (v1
stores 127, qzeros words 0x7F7F7F7F) and 8 for int4 (v1 stores 7, words 0x77777777). Every zero
is checked against that, so a checkpoint whose format label is wrong fails with a message instead
of producing weights shifted by one step.

Settings come from config.json `quantization_config` (transformers, optimum, GPTQModel) or, when it
has none, from a separate quantize_config.json (AutoGPTQ): quant_method, bits, group_size, sym,
desc_act, checkpoint_format (alias format). Asymmetric quantization, bits other than 4 and 8, other
formats (marlin, bitblas, ...) and other methods (awq, bitsandbytes, fp8, ...) are refused, naming
the file and the field.

The rest of the pipeline never sees the packing: `Checkpoint` asks `attach` for a view (built on its
public stored_* methods, the tensors as the files hold them) and, when there is one, exposes a virtual `<prefix>.weight` (float32) per packed module and hides the packed
tensors. The transformers reference cannot load GPTQ without optimum/gptqmodel, so verification
builds it from config.json without its quantization_config and feeds it these dequantized weights
(relayout.reference_from_tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GeneratorError
from .source import read_json_object

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

SUPPORTED_BITS = (4, 8)
FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what to add to a stored zero
PACKED = ("qweight", "qzeros", "scales", "g_idx")
QUANTIZER = "axgen-generator"  # quantization_config.meta.quantizer of checkpoints generator/quantize writes


@dataclass(frozen=True)
class GptqConfig:
    bits: int
    group_size: int  # -1: one group spanning the whole input
    desc_act: bool
    checkpoint_format: str
    where: str  # "<dir>/config.json quantization_config" or "<dir>/quantize_config.json"

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def zero(self) -> int:
        """The zero point of symmetric quantization."""
        return 2 ** (self.bits - 1)

    @property
    def zero_offset(self) -> int:
        return FORMATS[self.checkpoint_format]

    def describe(self) -> str:
        act = ", act-order" if self.desc_act else ""
        return f"GPTQ int{self.bits}, group size {self.group_size}{act}, format {self.checkpoint_format}"


def read_quant_config(directory: Path, config: dict[str, Any]) -> GptqConfig | None:
    """The checkpoint's quantization settings, or None when it declares none."""
    qc = config.get("quantization_config")
    if qc is not None:
        file, prefix = directory / "config.json", "quantization_config."
        if not isinstance(qc, dict):
            raise GeneratorError(f"{file}: quantization_config should be a mapping, got {qc!r}.")
    elif (directory / "quantize_config.json").is_file():
        file, prefix = directory / "quantize_config.json", ""
        qc = read_json_object(file)
    else:
        return None

    def field(key: str) -> str:
        return f"{file}: {prefix}{key}"

    method = str(qc.get("quant_method", "gptq")).lower()  # AutoGPTQ's quantize_config.json has no quant_method
    if method != "gptq":
        raise GeneratorError(f"{field('quant_method')} is {qc.get('quant_method')!r}; only pre-quantized GPTQ "
                             f"checkpoints (quant_method 'gptq', int4/int8, symmetric) are read. Use the fp16/bf16 "
                             f"checkpoint of this model instead (the build quantizes it itself, --weight_type).")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if qc.get("is_marlin_format"):
        fmt = "marlin"
    if fmt not in FORMATS:
        key = "checkpoint_format" if qc.get("checkpoint_format") else "format" if qc.get("format") else "is_marlin_format"
        raise GeneratorError(f"{field(key)} is {fmt!r}; supported GPTQ checkpoint formats: {', '.join(FORMATS)} "
                             f"(the qweight/qzeros/scales/g_idx packing). Re-export it with GPTQModel format='gptq'.")
    bits = qc.get("bits")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise GeneratorError(f"{field('bits')} is {bits!r}; GPTQ input supports bits 8 (int8) and 4 (int4) only.")
    sym = qc.get("sym", True)
    if sym is not True:
        raise GeneratorError(f"{field('sym')} is {sym!r}: asymmetric GPTQ is not supported; only symmetric "
                             f"quantization (sym: true, zero point {2 ** (bits - 1)}) is read.")
    group_size = qc.get("group_size", 128)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise GeneratorError(f"{field('group_size')} is {group_size!r}; expected a positive integer or -1 "
                             f"(one group over all input rows).")
    if qc.get("dynamic"):
        raise GeneratorError(f"{field('dynamic')} sets per-module overrides; only one bits/group_size for every "
                             f"module is supported.")
    return GptqConfig(bits=bits, group_size=group_size, desc_act=bool(qc.get("desc_act", False)),
                      checkpoint_format=fmt, where=f"{file}" if not prefix else f"{file} quantization_config")


def unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unpack int32 words into `32 / bits` codes each along `axis` (0: rows, 1: columns), lowest bits first."""
    u = np.ascontiguousarray(words).view(np.uint32)
    shifts = (np.arange(32 // bits, dtype=np.uint32) * np.uint32(bits))
    mask = np.uint32((1 << bits) - 1)
    if axis == 0:  # [R, C] -> [R, k, C] -> [R * k, C]
        codes = (u[:, None, :] >> shifts[None, :, None]) & mask
        return codes.reshape(u.shape[0] * shifts.size, u.shape[1]).astype(np.int32)
    codes = (u[:, :, None] >> shifts[None, None, :]) & mask  # [R, C] -> [R, C, k] -> [R, C * k]
    return codes.reshape(u.shape[0], u.shape[1] * shifts.size).astype(np.int32)


@dataclass(frozen=True)
class Grid:
    """One packed module as codes and scales: W[in, out] = codes * scales[in // group] (symmetric)."""
    codes: np.ndarray  # int8 [in, out], -2^(bits-1) .. 2^(bits-1) - 1
    scales: np.ndarray  # float32 [groups, out]
    group: int
    bits: int

    def for_build(self, wtype: str, group: int) -> tuple[np.ndarray, np.ndarray] | str:
        """(codes [K, N], scales [ceil(K/group), N]) on the build's grid, or why they do not fit: the
        bits must be the weight type's and each build group must lie inside one checkpoint group."""
        bits = {"s8": 8, "s4": 4}.get(wtype)
        if bits != self.bits:
            return f"int{self.bits} codes do not fit weight type {wtype}"
        k = self.codes.shape[0]
        if self.group % group and not (self.group >= k and group >= k):
            return f"checkpoint group size {self.group} is not a multiple of --group_size {group}"
        rows = np.arange(-(-k // group)) * group // self.group
        return self.codes, np.ascontiguousarray(self.scales[rows])

    def scaled(self, factor: float) -> Grid:
        return Grid(self.codes, (self.scales * np.float32(factor)).astype(np.float32), self.group, self.bits)

    @staticmethod
    def concat(grids: list[Grid], factors: list[float] | None = None) -> Grid | str:
        """Grids of linears fused along the output dim (q, k, v -> qkv), each scale times its factor."""
        if len({(g.group, g.bits, g.codes.shape[0]) for g in grids}) != 1:
            return "its parts differ in bits or group size"
        factors = factors or [1.0] * len(grids)
        return Grid(np.concatenate([g.codes for g in grids], axis=1),
                    np.concatenate([g.scaled(f).scales for g, f in zip(grids, factors)], axis=1),
                    grids[0].group, grids[0].bits)


class GptqView:
    """The packed modules of one checkpoint and their dequantized `<prefix>.weight`."""

    def __init__(self, ckpt: Checkpoint, cfg: GptqConfig, prefixes: list[str]):
        self.ckpt, self.cfg = ckpt, cfg
        raw = self.stored = set(ckpt.stored_names())
        self.modules: dict[str, str] = {}  # virtual '<prefix>.weight' -> prefix
        self.dims: dict[str, tuple[int, int, int]] = {}  # prefix -> (out, in, groups)
        hidden: set[str] = set()
        for prefix in sorted(prefixes):
            self._check_module(prefix, raw)
            self.modules[f"{prefix}.weight"] = prefix
            hidden.update(f"{prefix}.{s}" for s in PACKED)
        self.visible = (raw - hidden) | set(self.modules)

    def _file(self, name: str) -> Path:
        return self.ckpt.stored_file(name)

    def _check_module(self, prefix: str, raw: set[str]):
        cfg = self.cfg
        for part in ("qzeros", "scales"):
            if f"{prefix}.{part}" not in raw:
                raise GeneratorError(f"{self._file(prefix + '.qweight')}: GPTQ module '{prefix}' has a qweight but no "
                                     f"'{prefix}.{part}'; the checkpoint is incomplete.")
        if f"{prefix}.weight" in raw:
            raise GeneratorError(f"{self._file(prefix + '.weight')}: '{prefix}' has both a float weight and GPTQ "
                                 f"qweight; which one is meant is ambiguous.")
        shape = self.ckpt.stored_shape
        qw, qz, sc = shape(f"{prefix}.qweight"), shape(f"{prefix}.qzeros"), shape(f"{prefix}.scales")

        def bad(what: str):
            raise GeneratorError(f"{self._file(prefix + '.qweight')}: GPTQ module '{prefix}' {what} ({cfg.where} says "
                                 f"bits {cfg.bits}, group_size {cfg.group_size}; qweight {qw}, qzeros {qz}, scales {sc}).")

        if len(qw) != 2 or len(qz) != 2 or len(sc) != 2:
            bad("has tensors that are not 2-D")
        out = sc[1]
        rows = qw[0] * cfg.per_word
        if f"{prefix}.g_idx" in raw:
            g = shape(f"{prefix}.g_idx")
            if len(g) != 1:
                bad(f"has a g_idx of shape {g}, expected one entry per input row")
            in_features = g[0]
            if rows != in_features:
                bad(f"has {in_features} input rows (g_idx) but its qweight holds {rows} codes per column at "
                    f"{cfg.bits} bits; the bits setting does not match the packing")
        elif cfg.desc_act:
            raise GeneratorError(f"{self._file(prefix + '.qweight')}: GPTQ module '{prefix}' has no g_idx, but "
                                 f"{cfg.where} says desc_act (act-order): the group of each input row is unknown.")
        else:
            in_features = rows
        groups = 1 if cfg.group_size == -1 else -(-in_features // cfg.group_size)
        if qw[1] != out:
            bad(f"has qweight with {qw[1]} output columns but scales with {out}")
        if sc[0] != groups:
            bad(f"has {sc[0]} scale rows; {in_features} input rows in groups of {cfg.group_size} make {groups}")
        if qz[0] != groups or qz[1] * cfg.per_word != out:
            bad(f"has qzeros of shape {qz}; expected ({groups}, {out // cfg.per_word}) ({cfg.per_word} zeros per int32)")
        self.dims[prefix] = (out, in_features, groups)

    # -- the Checkpoint interface ------------------------------------------------------------------
    def names(self) -> set[str]:
        return set(self.visible)

    def has(self, name: str) -> bool:
        return name in self.visible

    def is_packed(self, name: str) -> bool:
        return name in self.modules

    def file_of(self, name: str) -> Path:
        """The file holding a packed module's qweight."""
        return self._file(self.modules[name] + ".qweight")

    def shape(self, name: str) -> tuple[int, int]:
        out, in_features, _ = self.dims[self.modules[name]]
        return (out, in_features)

    def weight(self, name: str):
        """The float32 [out, in] weight of a packed module, as a torch tensor."""
        import torch

        return torch.from_numpy(self.dequantize(self.modules[name]))

    def _raw(self, name: str, kinds: str) -> np.ndarray:
        import torch

        t = self.ckpt.stored_tensor(name)
        if kinds == "int" and t.dtype != torch.int32:
            raise GeneratorError(f"{self._file(name)}: GPTQ tensor '{name}' has dtype {t.dtype}; the packing stores int32.")
        if kinds == "float" and not t.is_floating_point():
            raise GeneratorError(f"{self._file(name)}: GPTQ tensor '{name}' has dtype {t.dtype}; scales are floats (fp16).")
        return t.float().numpy() if kinds == "float" else t.numpy()

    def dequantize(self, prefix: str) -> np.ndarray:
        codes, scales, g_idx = self._parts(prefix)
        w = codes.astype(np.float32) * scales[g_idx]  # [in, out], exact in float32
        return np.ascontiguousarray(w.T)

    def grid(self, name: str) -> Grid | str:
        """A packed module's own codes and scales (for a build that keeps them), or why it has none:
        act-order (g_idx not r // group_size) leaves no grid the blocked DequantizeLinear can take."""
        prefix = self.modules[name]
        codes, scales, g_idx = self._parts(prefix)
        in_features = codes.shape[0]
        group = in_features if self.cfg.group_size == -1 else self.cfg.group_size
        if not np.array_equal(g_idx, np.arange(in_features) // group):
            return f"'{prefix}' is act-order (g_idx is not row // group_size)"
        return Grid(codes.astype(np.int8), scales, group, self.cfg.bits)

    def _parts(self, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(signed codes int32 [in, out], scales float32 [groups, out], g_idx int64 [in])."""
        cfg = self.cfg
        out, in_features, groups = self.dims[prefix]
        codes = unpack(self._raw(f"{prefix}.qweight", "int"), cfg.bits, axis=0)  # [in, out]
        zeros = unpack(self._raw(f"{prefix}.qzeros", "int"), cfg.bits, axis=1) + cfg.zero_offset  # [groups, out]
        if not np.all(zeros == cfg.zero):
            found = sorted(set(np.unique(zeros - cfg.zero_offset).tolist()))[:4]
            hint = (" These look like exact zeros: is this a gptq_v2 checkpoint labelled 'gptq'?"
                    if cfg.zero_offset and found == [cfg.zero] else
                    " These look like zero - 1: is this a v1 checkpoint labelled 'gptq_v2'?"
                    if not cfg.zero_offset and found == [cfg.zero - 1] else "")
            stored = cfg.zero - cfg.zero_offset
            how = f"{stored} (zero - 1)" if cfg.zero_offset else f"{stored} (the zero itself)"
            raise GeneratorError(f"{self._file(prefix + '.qzeros')}: '{prefix}.qzeros' holds the stored zero points "
                                 f"{found}, but symmetric int{cfg.bits} has zero point {cfg.zero}, which "
                                 f"checkpoint_format '{cfg.checkpoint_format}' ({cfg.where}) stores as {how}.{hint}")
        scales = self._raw(f"{prefix}.scales", "float")  # [groups, out]
        if f"{prefix}.g_idx" in self.stored:
            g_idx = self._raw(f"{prefix}.g_idx", "int").astype(np.int64)
            if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
                raise GeneratorError(f"{self._file(prefix + '.g_idx')}: '{prefix}.g_idx' names groups "
                                     f"{int(g_idx.min())}..{int(g_idx.max())}, but the module has {groups} "
                                     f"(scales rows).")
        else:
            g_idx = np.zeros(in_features, np.int64) if cfg.group_size == -1 else np.arange(in_features) // cfg.group_size
        return codes - zeros[g_idx], scales, g_idx


def attach(ckpt: Checkpoint) -> GptqView | None:
    """A view over ckpt's GPTQ-packed modules, or None for an ordinary checkpoint."""
    cfg = read_quant_config(ckpt.dir, ckpt.config)
    prefixes = [n[: -len(".qweight")] for n in ckpt.stored_names() if n.endswith(".qweight")]
    if cfg is None:
        if prefixes:
            raise GeneratorError(f"Checkpoint '{ckpt.source}' has GPTQ-packed tensors ('{prefixes[0]}.qweight', ...) but "
                                 f"neither quantization_config in {ckpt.dir / 'config.json'} nor a quantize_config.json "
                                 f"says how they are packed (bits, group_size, sym).")
        return None
    if not prefixes:
        raise GeneratorError(f"{cfg.where} declares a GPTQ checkpoint, but '{ckpt.source}' has no '.qweight' tensors. "
                             f"Remove quantization_config if the weights are not quantized.")
    return GptqView(ckpt, cfg, prefixes)


def reference_of(config: dict[str, Any]) -> str | None:
    """The fp32 checkpoint a GPTQ checkpoint written by generator/quantize was quantized from
    (quantization_config.meta.source), else None."""
    return provenance(config).get("reference")


def provenance(config: dict[str, Any]) -> dict[str, Any]:
    """The manifest's input entries of a checkpoint generator/quantize wrote: reference (the fp32 source)
    and quantization (method, calibration text, ...); {} for any other checkpoint."""
    qc = config.get("quantization_config")
    meta = qc.get("meta") if isinstance(qc, dict) else None
    if not (isinstance(meta, dict) and QUANTIZER in (meta.get("quantizer") or []) and isinstance(meta.get("source"), str)):
        return {}
    info = {k: v for k, v in meta.items() if k not in ("quantizer", "source")}
    return {"reference": meta["source"], "quantization": {"bits": qc.get("bits"), "group_size": qc.get("group_size"), **info}}
