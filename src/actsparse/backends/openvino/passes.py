"""OpenVINO rewrites that apply a plan: the unfused reference pattern of activation sparsity.

For a group of MatMuls ``y_j = x·W_jᵀ`` that read one tensor x, with mode m and threshold τ:

    z    = x − m                                   (no Subtract when m = 0)
    keep = ¬(|z| ≤ τ)  ∨  keep_dense               NaN/Inf are kept; keep_dense: tokens per sequence ≠ 1
                                                   (cats: |SiLU(gate)| in place of |z|)
    z'   = Select(keep, z, 0)
    y_j  = z'·W_jᵀ + m·rowsum(W_j)                 (no Add when m = 0)

Since ``x·Wᵀ = (x − m)·Wᵀ + m·rowsum(W)``, the fold is exact and an unpruned token gives the
dense result. ``rowsum`` is taken over the weight as the runtime multiplies it, after
decompression of fp16/int8/int4 constants. This pattern runs on stock OpenVINO.
"""
from __future__ import annotations

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from ..._common import ActSparseError
from ...calibration.plan import group_settings
from ...runtime_ext import OP_TYPE
from .graph import EXACT_CONFIG, tensor_name, tensors_by_name, weight_refusal

KEEP_DENSE = "keep_dense"


def _prefix(group) -> str:
    return f"actsparse.{group.targets[0].module}"


def _scalar(value: float, like: ov.Output) -> ov.Node:
    return ops.constant(np.array(value, like.get_element_type().to_dtype()))


def weight_rowsums(matmuls: list[ov.Node]) -> list[np.ndarray]:
    """``rowsum(W)`` (sum over input features) of each MatMul's weight, as the runtime decompresses it."""
    if not matmuls:
        return []
    sums = [ops.reduce_sum(mm.input_value(1), ops.constant(np.array([1 if mm.get_attributes()["transpose_b"] else 0])),
                           keep_dims=False) for mm in matmuls]
    compiled = ov.Core().compile_model(ov.Model([s.output(0) for s in sums], []), "CPU", EXACT_CONFIG)
    result = compiled.create_infer_request().infer({})
    values = [np.array(result[compiled.output(i)], np.float64) for i in range(len(sums))]
    del compiled, result, sums  # drops the temporary consumers of the weights
    return values


def insert_mask(x: ov.Output, matmuls: list[ov.Node], shift, tau, bias: dict, source=None, keep_dense=None,
                name: str = "actsparse") -> None:
    """Insert the pattern in front of ``matmuls`` (which read x): ``shift`` (m, or None for no
    Subtract), ``tau`` and each MatMul's fold ``bias[id(mm)]`` (m·rowsum W; none: no Add) are graph
    values, constants or inputs; ``source`` replaces z in the magnitude test (cats);
    ``keep_dense`` is OR-ed into the keep mask."""
    z = x if shift is None else ops.subtract(x, shift, name=f"{name}/shift").output(0)
    # ¬(|z| ≤ τ) rather than |z| > τ: a NaN input is kept and propagates, as in a dense MatMul
    keep = ops.logical_not(ops.less_equal(ops.abs(z if source is None else source), tau), name=f"{name}/keep")
    if keep_dense is not None:
        keep = ops.logical_or(keep, keep_dense)
    pruned = ops.select(keep, z, _scalar(0.0, x), name=f"{name}/mask")
    for mm in matmuls:
        mm.input(0).replace_source_output(pruned.output(0))
        if id(mm) in bias:
            consumers = list(mm.output(0).get_target_inputs())
            fold = ops.add(mm.output(0), bias[id(mm)], name=f"{mm.get_friendly_name()}/actsparse_fold")
            for consumer in consumers:
                consumer.replace_source_output(fold.output(0))


def apply_plan(model: ov.Model, plan: dict, prefill: str = "dense") -> dict[str, int]:
    """Insert the reference pattern for every group whose sparsity is above 0; return pass counts."""
    if prefill not in ("dense", "sparse"):
        raise ActSparseError(f"unknown prefill policy {prefill!r} (dense or sparse)")
    nodes = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    tensors = tensors_by_name(model)
    counts = {"masks": 0, "shifts": 0, "folds": 0}
    work = []
    for group, first in group_settings(plan):
        if first["target_sparsity"] <= 0:
            continue
        matmuls = []
        for target in group.targets:
            mm = nodes.get(target.node)
            if mm is None or mm.get_type_name() != "MatMul":
                raise ActSparseError(f"plan does not match the model: no MatMul {target.node}")
            reason = weight_refusal(mm)
            if reason:
                raise ActSparseError(f"cannot prune {target.module}: {reason}")
            matmuls.append(mm)
        sources = {tensor_name(mm.input_value(0)) for mm in matmuls}
        if sources != {group.name}:
            raise ActSparseError(f"plan does not match the model: {group.name} is not the input of {group.targets[0].module}")
        source = first.get("mask_source")
        if source is not None and source not in tensors:
            raise ActSparseError(f"plan does not match the model: no mask source {source}")
        work.append((group, matmuls, float(first["mode"]), float(first["threshold"]), tensors.get(source)))

    folds = [mm for _, matmuls, m, _, _ in work if m != 0 for mm in matmuls]
    rowsums = dict(zip((id(mm) for mm in folds), weight_rowsums(folds)))
    for group, matmuls, m, tau, source in work:
        name = _prefix(group)
        x = matmuls[0].input_value(0)
        shift = _scalar(m, x) if m != 0 else None
        keep_dense = None
        if prefill == "dense":
            tokens = ops.gather(ops.shape_of(x), ops.constant(np.array(-2, np.int64)), ops.constant(np.array(0, np.int64)))
            keep_dense = ops.not_equal(tokens, ops.constant(np.array(1, np.int64)), name=f"{name}/{KEEP_DENSE}")
        bias = {id(mm): ops.constant((m * rowsums[id(mm)]).astype(x.get_element_type().to_dtype()))
                for mm in matmuls} if m != 0 else {}
        insert_mask(x, matmuls, shift, _scalar(tau, x), bias, source, keep_dense, name)
        counts["masks"] += 1
        counts["shifts"] += m != 0
        counts["folds"] += len(bias)
    model.validate_nodes_and_infer_types()
    return counts


def set_prefill_sparse(model: ov.Model) -> int:
    """Prune every token, prefill included (the paper's evaluation protocol); return nodes changed.

    Works on the reference pattern (its keep_dense condition becomes false) and on fused
    ActSparseMatMul ops (their ``prefill`` attribute becomes "sparse").
    """
    changed = 0
    for op in model.get_ordered_ops():
        if op.get_friendly_name().endswith(f"/{KEEP_DENSE}"):
            op.output(0).replace(ops.constant(False, ov.Type.boolean).output(0))
            changed += 1
        elif op.get_type_name() == OP_TYPE and op.get_attributes().get("prefill") == "dense":
            op.set_attribute("prefill", "sparse")
            changed += 1
    model.validate_nodes_and_infer_types()
    return changed


def set_dense(model: ov.Model) -> int:
    """Undo the pruning in place (every channel kept), giving the dense model's function; return
    nodes changed. The reference pattern's masks pass x − m through (the fold keeps it exact);
    fused ops get a negative threshold, which keeps every channel."""
    changed = 0
    for op in model.get_ordered_ops():
        if op.get_friendly_name().startswith("actsparse.") and op.get_friendly_name().endswith("/mask"):
            op.output(0).replace(op.input_value(1))
            changed += 1
        elif op.get_type_name() == OP_TYPE:
            op.set_attribute("threshold", -1.0)
            changed += 1
    model.validate_nodes_and_infer_types()
    return changed
