"""A small ONNX graph builder, and a writer for weights stored once and shared by several graphs.

Every shape group of a layer is its own static-shape graph, but all of them reference the same
external weights file (ONNX external data: location + offset + length), so weights are stored once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # blocked DequantizeLinear (int4/int8 with block_size) is opset 21
DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
ALIGN = 64


class WeightsFile:
    """Append-only external-data file; `tensor()` returns an initializer pointing into it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self.offset = 0

    def tensor(self, name: str, raw: bytes | np.ndarray, data_type: int, dims: list[int]) -> TensorProto:
        """raw: the bytes, or a C-contiguous array written as its bytes (no copy of a big tensor)."""
        if isinstance(raw, np.ndarray):
            raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        pad = (-self.offset) % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
        self._f.write(raw)
        t = TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(raw)
        return t

    def close(self):
        self._f.close()


class Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._n = 0

    def input(self, name: str, dtype: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, value: str, name: str, dtype: int, shape: list):
        """Expose `value` as graph output `name`, renaming it where it is produced (no Identity node)."""
        producer = next((n for n in self.nodes if value in n.output), None)
        if producer is None or any(o.name == value for o in self.outputs):
            self.op("Identity", value, out=name)
        else:
            for node in self.nodes:
                for k, v in enumerate(node.output):
                    if v == value:
                        node.output[k] = name
                for k, v in enumerate(node.input):
                    if v == value:
                        node.input[k] = name
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def op(self, op_type: str, *inputs: str | None, out: str | None = None, n_out: int = 1, **attrs):
        self._n += 1
        base = f"{op_type.lower()}_{self._n}"
        outs = [out] if out else [f"{base}_out{i}" if n_out > 1 else base for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, ["" if i is None else i for i in inputs], outs,
                                           name=f"n{self._n}_{op_type}", **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def model(self, extra_initializers: list[TensorProto] = (), doc: str = "") -> onnx.ModelProto:
        used = {i for n in self.nodes for i in n.input}
        inits = self.initializers + [t for t in extra_initializers if t.name in used]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, inits, doc_string=doc)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="axgen")
        model.ir_version = 10
        return model
