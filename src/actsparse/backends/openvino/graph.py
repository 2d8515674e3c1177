"""Graph access on an ``ov.Model``: tensors by name, a MatMul's constant weight and its shape."""
from __future__ import annotations

import openvino as ov

# Ops that may stand between a weight constant and the MatMul (decompression of fp16/int8/int4 weights).
WEIGHT_PATH_OPS = {"Constant", "Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"}
# Exact numerics: f32 compute, f32 KV cache, no dynamic quantization of activations.
EXACT_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32",
                "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def tensor_name(output: ov.Output) -> str:
    return f"{output.get_node().get_friendly_name()}:{output.get_index()}"


def tensors_by_name(model: ov.Model) -> dict[str, ov.Output]:
    """Every tensor of ``model`` under its :func:`tensor_name`."""
    return {tensor_name(out): out for op in model.get_ordered_ops() for out in op.outputs()}


def constant_behind(output: ov.Output, *types: str) -> ov.Node | None:
    """The Constant that ``output`` is, through Converts (of one of ``types`` where given), or None."""
    node = output.get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return node if not types or node.get_output_element_type(0).get_type_name() in types else None


def weight_constants(matmul: ov.Node) -> list[ov.Node] | str:
    """The constants (codes, scales, zero points) that make the MatMul's weight, or why there are none."""
    stack, seen, constants = [matmul.input_value(1).get_node()], set(), []
    while stack:
        node = stack.pop()
        if node.get_type_name() not in WEIGHT_PATH_OPS:
            return f"weight is not constant (computed by {node.get_type_name()})"
        if id(node) not in seen:
            seen.add(id(node))
            constants += [node] if node.get_type_name() == "Constant" else []
            stack.extend(v.get_node() for v in node.input_values())
    return constants


def weight_refusal(matmul: ov.Node) -> str | None:
    """Why the weight of ``matmul`` cannot be rewritten, or None: it must be constant and not shared."""
    weight = matmul.input_value(1)
    if len(weight.get_target_inputs()) != 1:
        return "weight is shared with other consumers"
    constants = weight_constants(matmul)
    if isinstance(constants, str):
        return constants
    if not weight.get_partial_shape().is_static or len(weight.get_partial_shape()) != 2:
        return "weight is not a static 2-D matrix"
    return None


def weight_shape(matmul: ov.Node) -> tuple[int, int]:
    """(in_features, out_features) of a MatMul whose weight is its second input."""
    rows, cols = (int(d) for d in matmul.input_value(1).get_shape())
    return (cols, rows) if matmul.get_attributes()["transpose_b"] else (rows, cols)


def matmul_weight_bytes(model: ov.Model) -> dict[str, int]:
    """Bytes of the constant weight (codes, scales and zero points) of every MatMul of ``model``, by node name."""
    per_matmul = {}
    for op in model.get_ordered_ops():
        constants = weight_constants(op) if op.get_type_name() == "MatMul" else "not a MatMul"
        if not isinstance(constants, str):  # attention's activation MatMuls have no constant weight
            per_matmul[op.get_friendly_name()] = sum(c.get_byte_size() for c in constants)
    return per_matmul
