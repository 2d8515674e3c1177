"""ONNX rewrites that apply a plan: the reference pattern in standard ops, and its fusion.

For a group of MatMuls ``y_j = x·W_j`` (W_j ``[K, N_j]``) that read one tensor x, with mode m
and threshold τ, :func:`apply_plan` writes

    z    = x − m                                   (no Sub when m = 0)
    keep = Not(|z| ≤ τ)  ∨  tokens > 1             NaN/Inf are kept; the Or only with prefill dense
    y_j  = Where(keep, z, 0)·W_j + m·rowsum(W_j)   (no Add when m = 0)

which is exact for an unpruned token since ``x·W = (x − m)·W + m·rowsum(W)`` (``rowsum`` over
the weight as the runtime multiplies it, dequantized for int8); it runs on any ONNX runtime.
:func:`fuse` then replaces each group's pattern by one ``ai.actsparse::ActSparseMatMul`` over the
group's weights concatenated along N (followed by a Split), with the OpenVINO op's node contract:
inputs x, weight ``[K, N]`` (f32, or u8 codes; bytes in the kernels' tile-major order), params ``[b' | scale | zero_point]``.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..._common import ActSparseError
from ...calibration.plan import group_settings
from ...runtime_ext import ONNX_DOMAIN, OP_TYPE
from ...runtime_ext.kernels import TILE_COLS, to_tiles
from .graph import LINEAR_OPS, Index, consumers, dequantized, gemm_bias, read_weight, weight_refusal

log = logging.getLogger("actsparse")
KEEP_DENSE = "keep_dense"


def _prefix(group) -> str:
    return f"actsparse.{group.targets[0].module}"


def _insert(graph: onnx.GraphProto, before: dict[str, list[onnx.NodeProto]],
            after: dict[str, list[onnx.NodeProto]]) -> None:
    """Rebuild the node list with new nodes placed just before / after the named nodes (stays topological)."""
    nodes = []
    for node in graph.node:
        nodes += before.get(node.name, []) + [node] + after.get(node.name, [])
    graph.ClearField("node")
    graph.node.extend(nodes)


def apply_plan(model: onnx.ModelProto, plan: dict, prefill: str = "dense") -> dict[str, int]:
    """Insert the reference pattern for every group whose sparsity is above 0; return pass counts."""
    if prefill not in ("dense", "sparse"):
        raise ActSparseError(f"unknown prefill policy {prefill!r} (dense or sparse)")
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    index = Index(model)
    counts = {"masks": 0, "shifts": 0, "folds": 0}
    before, after, constants = {}, {}, []
    for group, first in group_settings(plan):
        if first["target_sparsity"] <= 0:
            continue
        if first.get("mask_source"):
            raise ActSparseError("plans of --method cats are not supported with --format onnx")
        matmuls = []
        for target in group.targets:
            mm = nodes.get(target.node)
            if mm is None or mm.op_type not in LINEAR_OPS:
                raise ActSparseError(f"plan does not match the model: no MatMul {target.node}")
            reason = weight_refusal(index, mm)
            if reason:
                raise ActSparseError(f"cannot prune {target.module}: {reason}")
            if mm.input[0] != group.name:
                raise ActSparseError(f"plan does not match the model: {group.name} is not the input of {target.module}")
            matmuls.append(mm)
        name, m, tau = _prefix(group), float(first["mode"]), float(first["threshold"])
        constants += [numpy_helper.from_array(np.array(v, np.float32), f"{name}/{what}")
                      for what, v in (("tau", tau), ("zero", 0.0)) + ((("mode", m),) if m != 0 else ())]
        pattern, z = [], group.name
        if m != 0:
            z = f"{name}/shift"
            pattern.append(helper.make_node("Sub", [group.name, f"{name}/mode"], [z], name=z))
            counts["shifts"] += 1
        # Not(|z| ≤ τ) rather than |z| > τ: a NaN input is kept and propagates, as in a dense MatMul
        pattern += [helper.make_node("Abs", [z], [f"{name}/abs"], name=f"{name}/abs"),
                    helper.make_node("LessOrEqual", [f"{name}/abs", f"{name}/tau"], [f"{name}/small"], name=f"{name}/small"),
                    helper.make_node("Not", [f"{name}/small"], [f"{name}/keep"], name=f"{name}/keep")]
        keep = f"{name}/keep"
        if prefill == "dense":  # more than one token per sequence is prefill: computed dense
            constants += [numpy_helper.from_array(np.array(v, np.int64), f"{name}/{what}")
                          for what, v in (("seq_axis", -2), ("one", 1))]
            pattern += [helper.make_node("Shape", [group.name], [f"{name}/shape"], name=f"{name}/shape"),
                        helper.make_node("Gather", [f"{name}/shape", f"{name}/seq_axis"], [f"{name}/tokens"],
                                         name=f"{name}/tokens"),
                        helper.make_node("Greater", [f"{name}/tokens", f"{name}/one"], [f"{name}/{KEEP_DENSE}"],
                                         name=f"{name}/{KEEP_DENSE}"),
                        helper.make_node("Or", [keep, f"{name}/{KEEP_DENSE}"], [f"{name}/keep_any"],
                                         name=f"{name}/keep_any")]
            keep = f"{name}/keep_any"
        pattern.append(helper.make_node("Where", [keep, z, f"{name}/zero"], [f"{name}/mask"], name=f"{name}/mask"))
        before[matmuls[0].name] = pattern
        counts["masks"] += 1
        for mm in matmuls:
            mm.input[0] = f"{name}/mask"
            if m != 0:
                rowsum = dequantized(read_weight(index, mm)).astype(np.float64).sum(axis=0)
                bias = f"{mm.name}/actsparse_bias"
                constants.append(numpy_helper.from_array((m * rowsum).astype(np.float32), bias))
                out, unfolded = mm.output[0], f"{mm.output[0]}/unfolded"
                mm.output[0] = unfolded  # the Add takes over the MatMul's output name: consumers stay as they are
                after[mm.name] = [helper.make_node("Add", [unfolded, bias], [out], name=f"{mm.name}/actsparse_fold")]
                counts["folds"] += 1
    _insert(graph, before, after)
    graph.initializer.extend(constants)
    return counts


def set_prefill_sparse(model: onnx.ModelProto) -> int:
    """Prune every token, prefill included (the paper's evaluation protocol); return nodes changed.

    The reference pattern's keep_dense condition becomes a constant false; fused ops get
    ``prefill="sparse"``.
    """
    changed = 0
    for node in model.graph.node:
        if node.name.endswith(f"/{KEEP_DENSE}") and node.op_type != "Constant":
            node.CopyFrom(helper.make_node("Constant", [], list(node.output), name=node.name,
                                           value=numpy_helper.from_array(np.array(False))))
            changed += 1
        elif node.op_type == OP_TYPE and node.domain == ONNX_DOMAIN:
            for attr in node.attribute:
                if attr.name == "prefill" and attr.s == b"dense":
                    attr.s = b"sparse"
                    changed += 1
    remove_dead_code(model)
    return changed


def _bias(index: Index, linear: onnx.NodeProto, fold: onnx.NodeProto | None, width: int) -> np.ndarray:
    """b' of one consumer: a Gemm's own bias plus the fold m·rowsum(W). Zeros rather than none:
    OpenVINO's ONNX frontend reads an empty initializer as one value."""
    bias = np.zeros(width, np.float32)
    if fold is not None:
        bias += numpy_helper.to_array(index.inits[fold.input[1]])
    own = gemm_bias(index, linear)
    return bias if own is None else bias + own


def fuse(model: onnx.ModelProto, plan: dict) -> dict[str, int]:
    """Replace each group's pattern, MatMuls, fold Adds (and weight DequantizeLinears) by one
    ActSparseMatMul; return counts.

    Consumers of one input (gate+up, q+k+v) become a single op over their weights concatenated
    along N, then a Split: one live-channel list and one kernel call per group. u8 codes stay u8,
    with their per-output-channel scales and zero points in ``params``.
    """
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    index = Index(model)
    counts = {"fused": 0, "refused": 0}
    removed, replacement, new_inits = set(), {}, []
    for group, layer in group_settings(plan):
        prefix = _prefix(group)
        if f"{prefix}/mask" not in nodes:
            continue
        matmuls = [nodes[t.node] for t in group.targets]
        folds = [nodes.get(f"{mm.name}/actsparse_fold") for mm in matmuls]
        widths = [t.out_features for t in group.targets]
        weights = [read_weight(index, mm) for mm in matmuls]
        fmt = weights[0][0]
        if any(w[0] != fmt for w in weights):
            log.warning("not fusing %s: consumers of one input have different weight formats", group.targets[0].module)
            counts["refused"] += len(matmuls)
            continue
        params = [np.concatenate([_bias(index, mm, f, n) for mm, f, n in zip(matmuls, folds, widths)])]
        if fmt == "u8":
            params += [np.concatenate([w[i] for w in weights]) for i in (2, 3)]
        new_inits += [numpy_helper.from_array(to_tiles(np.concatenate([w[1] for w in weights], axis=1), fmt),
                                              f"{prefix}/weight"),
                      numpy_helper.from_array(np.concatenate(params).astype(np.float32), f"{prefix}/params")]
        outputs = [(f if f is not None else mm).output[0] for mm, f in zip(matmuls, folds)]
        fused = f"{prefix}/{OP_TYPE}"
        op = helper.make_node(OP_TYPE, [group.name, f"{prefix}/weight", f"{prefix}/params"],
                              [outputs[0] if len(outputs) == 1 else fused], name=fused, domain=ONNX_DOMAIN,
                              weight_format=fmt, out_features=int(sum(widths)),
                              group_size=int(weights[0][1].shape[0]) if fmt == "u8" else 0,
                              mode=float(layer["mode"]), threshold=float(layer["threshold"]),
                              prefill="dense" if f"{prefix}/{KEEP_DENSE}" in nodes else "sparse", has_bias=1,
                              tile_cols=TILE_COLS[fmt])
        fused_nodes = [op]
        if len(outputs) > 1:
            new_inits.append(numpy_helper.from_array(np.array(widths, np.int64), f"{prefix}/widths"))
            fused_nodes.append(helper.make_node("Split", [fused, f"{prefix}/widths"], outputs, name=f"{prefix}/split",
                                                axis=-1))
        # the mask comes after x's producer and before every MatMul, hence before every consumer
        replacement[id(nodes[f"{prefix}/mask"])] = fused_nodes
        removed.update(id(n) for n in graph.node if n.name.startswith(f"{prefix}/"))
        removed.update(id(n) for n in matmuls + [f for f in folds if f is not None] + [w[4] for w in weights if w[4]])
        counts["fused"] += len(matmuls)
    if not removed:
        return counts
    kept = []
    for node in graph.node:
        kept += replacement.get(id(node), []) if id(node) in removed else [node]
    graph.ClearField("node")
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    remove_dead_code(model)
    if not any(o.domain == ONNX_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ONNX_DOMAIN, 1))
    return counts


def remove_dead_code(model: onnx.ModelProto) -> None:
    """Drop the nodes and initializers that no graph output depends on any more (e.g. the weights the
    fused ops replace, a Gemm's bias Identity)."""
    graph = model.graph
    while True:
        used = set(consumers(model)) | {o.name for o in graph.output}
        live = [node for node in graph.node if any(out in used for out in node.output)]
        if len(live) == len(graph.node):
            break
        graph.ClearField("node")
        graph.node.extend(live)
    live = [init for init in graph.initializer if init.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(live)
