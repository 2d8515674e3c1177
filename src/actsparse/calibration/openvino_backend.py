"""OpenVINO backend of calibration: find target MatMuls in an ``ov.Model`` and probe their inputs."""
from __future__ import annotations

import logging
import re
from typing import Iterator

import numpy as np
import openvino as ov
from tqdm.auto import tqdm

from .stats import StreamingHistogram
from .targets import Group, Target, group_targets, kind_of

log = logging.getLogger("actsparse")

# Node names from OpenVINO's PyTorch frontend: "__module.model.layers.0.mlp.down_proj/aten::linear/MatMul".
_MODULE_RE = re.compile(r"^__module\.(?P<module>[\w.]+?)/aten::(?:linear|addmm|matmul|mm)/MatMul")
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


def find_groups(model: ov.Model, kinds: set[str]) -> list[Group]:
    """Target MatMuls of ``model`` whose sparsity kind is in ``kinds``, grouped by input tensor."""
    found = []
    for op in model.get_ordered_ops():
        match = _MODULE_RE.match(op.get_friendly_name()) if op.get_type_name() == "MatMul" else None
        kind = kind_of(match["module"]) if match else None
        if kind is None:
            continue
        reason = weight_refusal(op) or (None if not op.get_attributes()["transpose_a"] else "input is transposed")
        if reason:
            log.warning("not pruning %s: %s", match["module"], reason)
            continue
        k, n = weight_shape(op)
        found.append((tensor_name(op.input_value(0)), Target(match["module"], op.get_friendly_name(), kind, k, n)))
    return group_targets(found, kinds)


def feed(model_inputs: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of an optimum-exported graph for a ``[batch, seq]`` block of token ids, from position 0."""
    batch, seq = ids.shape
    values = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
              "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), ids.shape).copy(),
              "beam_idx": np.arange(batch, dtype=np.int32)}
    missing = [name for name in model_inputs if name not in values]
    if missing:
        raise ValueError(f"do not know how to feed model inputs {missing}")
    return {name: values[name] for name in model_inputs}


def run_chunks(compiled: ov.CompiledModel, chunks: np.ndarray, desc: str) -> Iterator[tuple[np.ndarray, ov.InferRequest]]:
    """Run each ``[seq]`` row of ``chunks`` as its own sequence (state reset), yielding it and the request."""
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    for row in tqdm(chunks, desc=desc, unit="sample", leave=False):
        request.reset_state()
        request.infer(feed(names, row[None]))
        yield row, request


def collect_statistics(model: ov.Model, groups: list[Group], chunks: np.ndarray,
                       core: ov.Core | None = None) -> dict[str, StreamingHistogram]:
    """Stream every group's input tensor over ``chunks`` into one histogram per group.

    The probes are extra outputs of the exported graph itself; ``model`` is modified.
    """
    by_name = tensors_by_name(model)
    first = len(model.outputs)
    model.add_outputs([by_name[g.name] for g in groups])
    compiled = (core or ov.Core()).compile_model(model, "CPU", EXACT_CONFIG)
    histograms = {g.name: StreamingHistogram() for g in groups}
    for _, request in run_chunks(compiled, chunks, "calibrating"):
        for i, group in enumerate(groups):
            histograms[group.name].update(request.get_output_tensor(first + i).data)
    return histograms
