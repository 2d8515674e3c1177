"""Graph access on an ONNX ``ModelProto``: readers and producers of tensors, a MatMul's constant weight."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ...runtime_ext import ONNX_DOMAIN

# Ops that may stand between weight initializers and a MatMul.
WEIGHT_PATH_OPS = {"Transpose", "DequantizeLinear", "Identity", "Cast", "Reshape"}
LINEAR_OPS = ("MatMul", "Gemm")


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (subgraphs of If/Loop nodes included)."""
    readers: dict[str, list[onnx.NodeProto]] = {}

    def walk(graph):
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub)
    walk(model.graph)
    return readers


class Index:
    """Initializers, readers and producers of a graph's tensors, for the weight checks below."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.inits, self.readers = model, initializers(model), consumers(model)
        self.producers = {out: node for node in model.graph.node for out in node.output}

    def private(self, name: str) -> bool:
        """Read by one node only, and not a graph output."""
        return len(self.readers.get(name, [])) == 1 and all(o.name != name for o in self.model.graph.output)


def weight_tensors(index: Index, matmul: onnx.NodeProto):
    """The initializers that make the MatMul's weight ``[K, N]``, or why it cannot be rewritten.

    ``("f32", [W], None)`` for a plain f32 weight, ``("u8", [codes, scale, zero_point], dq)`` for
    u8 codes dequantized per output channel by the DequantizeLinear ``dq`` (``--weight-format int8``).
    """
    name = matmul.input[1]
    if matmul.input[0] in index.inits:
        return "input is an initializer"
    if matmul.op_type == "Gemm" and gemm_refusal(index, matmul):
        return gemm_refusal(index, matmul)
    if not index.private(name):
        return "weight is shared with other consumers"
    if name in index.inits:
        weight = index.inits[name]
        if len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            return "weight is not a 2-D FLOAT matrix"
        return "f32", [weight], None
    dq = index.producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) != 3 or not all(i in index.inits for i in dq.input):
        return "weight is not an initializer (computed in the graph or a graph input)"
    codes, scale, zero_point = (index.inits[i] for i in dq.input)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if (len(codes.dims) != 2 or axis not in (1, -1) or codes.data_type != onnx.TensorProto.UINT8
            or list(scale.dims) != [codes.dims[1]] or list(zero_point.dims) != [codes.dims[1]]
            or scale.data_type != onnx.TensorProto.FLOAT or not index.private(dq.input[0])):
        return "weight is not u8 codes dequantized per output channel"
    return "u8", [codes, scale, zero_point], dq


def gemm_refusal(index: Index, gemm: onnx.NodeProto) -> str | None:
    """Why a Gemm is not ``A·B + C`` with B ``[K, N]`` and C a constant, or None."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    if attrs.get("alpha", 1.0) != 1 or attrs.get("beta", 1.0) != 1 or attrs.get("transA", 0) or attrs.get("transB", 0):
        return "Gemm with alpha/beta other than 1 or a transposed operand"
    if len(gemm.input) > 2 and gemm.input[2] and _bias_initializer(index, gemm.input[2]) is None:
        return "Gemm bias is not a FLOAT initializer"
    return None


def _bias_initializer(index: Index, name: str) -> onnx.TensorProto | None:
    while name not in index.inits and name in index.producers and index.producers[name].op_type == "Identity":
        name = index.producers[name].input[0]  # the exporter de-duplicates equal biases through Identity
    init = index.inits.get(name)
    return init if init is not None and init.data_type == onnx.TensorProto.FLOAT else None


def gemm_bias(index: Index, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant bias C of a Gemm, or None (a MatMul, or a Gemm without C)."""
    if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
        return None
    return numpy_helper.to_array(_bias_initializer(index, node.input[2])).astype(np.float32).ravel()


def weight_refusal(index: Index, matmul: onnx.NodeProto) -> str | None:
    tensors = weight_tensors(index, matmul)
    return tensors if isinstance(tensors, str) else None


def read_weight(index: Index, matmul: onnx.NodeProto):
    """``(format, data [K, N], scale [N] or None, zero_point [N] f32 or None, dq node or None)``."""
    fmt, tensors, dq = weight_tensors(index, matmul)
    arrays = [numpy_helper.to_array(t) for t in tensors]
    if fmt == "f32":
        return fmt, np.ascontiguousarray(arrays[0], np.float32), None, None, None
    return fmt, arrays[0], arrays[1].astype(np.float32), arrays[2].astype(np.float32), dq


def dequantized(weight) -> np.ndarray:
    """The f32 ``[K, N]`` weight the runtime multiplies by, from :func:`read_weight`'s result."""
    fmt, data, scale, zero_point, _ = weight
    return data if fmt == "f32" else (data.astype(np.float32) - zero_point) * scale


def constant_sources(index: Index, name: str) -> list[onnx.TensorProto] | None:
    """The initializers that tensor ``name`` is computed from alone (through Transpose, DequantizeLinear...),
    or None when it depends on an input: e.g. a tied lm_head's ``Transpose(embedding)``."""
    if name in index.inits:
        return [index.inits[name]]
    node = index.producers.get(name)
    if node is None or node.op_type not in WEIGHT_PATH_OPS:
        return None
    sources = [constant_sources(index, i) for i in node.input if i]
    return None if any(s is None for s in sources) else [t for s in sources for t in s]


def matmul_weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the constant weight (codes, scales and zero points) of every MatMul of ``model``, by node name."""
    index = Index(model)
    sizes = {}
    for node in index.model.graph.node:
        tensors = constant_sources(index, node.input[1]) if node.op_type in LINEAR_OPS else None
        if tensors:  # attention's activation MatMuls have no constant weight
            sizes[node.name] = sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                                   for t in tensors)
    return sizes


def with_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Make the tensors ``names`` extra graph outputs (f32, shape left to the runtime)."""
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in names)


def uses_custom_op(model: onnx.ModelProto) -> bool:
    return any(node.domain == ONNX_DOMAIN for node in model.graph.node)
