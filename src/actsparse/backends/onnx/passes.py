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

The graph is edited through onnx-ir; the rules find the pattern by its structure, not by node names.
Weights are read from the protobuf (backends.onnx.graph), found by the name of the MatMul's output tensor.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ..._common import ActSparseError
from ...calibration.plan import group_settings
from ...runtime_ext import ONNX_DOMAIN, OP_TYPE
from ...runtime_ext.kernels import TILE_COLS, formats, to_tiles
from ..pattern import KEEP_DENSE, TOKEN_AXIS, prefixes, refuse
from .graph import LINEAR_OPS, Index, dequantized, gemm_bias, read_weight, weight_refusal, weight_tensors


def _edit(model: onnx.ModelProto, *passes: ir.passes.PassBase) -> None:
    """Run onnx-ir ``passes`` on ``model`` in place (tensors not loaded, e.g. external data, stay as they are)."""
    edited = ir.from_proto(model)
    ir.passes.Sequential(*passes)(edited)
    model.CopyFrom(ir.to_proto(edited))


def _initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _take_over(old: ir.Value, new: ir.Value, suffix: str) -> None:
    """``new`` replaces ``old`` for every reader and graph output and takes its name; ``old`` gets ``suffix``."""
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name, new.name = f"{name}{suffix}", name
    # the type goes with the name: a graph output may lack a shape, a value_info may not
    new.type, new.shape, old.type, old.shape = old.type, old.shape, None, None


class _Planned(ir.passes.InPlacePass):
    """Insert the reference pattern in front of each planned group (see the module docstring)."""

    def __init__(self, work: list, prefill: str):
        super().__init__()
        self.work, self.prefill = work, prefill
        self.counts = {"masks": 0, "shifts": 0, "folds": 0}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        order = {id(node): i for i, node in enumerate(graph)}
        for name, group, m, tau, rowsums in self.work:
            matmuls = [nodes[t.node] for t in group.targets]
            x = matmuls[0].inputs[0]
            tape = ir.tape.Tape()
            z = x
            if m != 0:
                mode = _initializer(graph, np.array(m, np.float32), f"{name}/mode")
                z = tape.op("Sub", [x, mode], name=f"{name}/shift")
                self.counts["shifts"] += 1
            # Not(|z| ≤ τ) rather than |z| > τ: a NaN input is kept and propagates, as in a dense MatMul
            small = tape.op("LessOrEqual", [tape.op("Abs", [z], name=f"{name}/abs"),
                                            _initializer(graph, np.array(tau, np.float32), f"{name}/tau")],
                            name=f"{name}/small")
            keep = tape.op("Not", [small], name=f"{name}/keep")
            if self.prefill == "dense":  # more than one token per sequence is prefill: computed dense
                tokens = tape.op("Gather", [tape.op("Shape", [x], name=f"{name}/shape"),
                                            _initializer(graph, np.array(TOKEN_AXIS, np.int64), f"{name}/seq_axis")],
                                 name=f"{name}/tokens")
                test = tape.op("Greater", [tokens, _initializer(graph, np.array(1, np.int64), f"{name}/one")],
                               name=f"{name}/{KEEP_DENSE}")
                keep = tape.op("Or", [keep, test], name=f"{name}/keep_any")
            mask = tape.op("Where", [keep, z, _initializer(graph, np.array(0.0, np.float32), f"{name}/zero")],
                           name=f"{name}/mask")
            graph.insert_before(min(matmuls, key=lambda n: order[id(n)]), tape.nodes)
            self.counts["masks"] += 1
            for mm, rowsum in zip(matmuls, rowsums):
                mm.replace_input_with(0, mask)
                if m != 0:
                    bias = _initializer(graph, (m * rowsum).astype(np.float32), f"{mm.name}/actsparse_bias")
                    fold = ir.node("Add", [None, bias], name=f"{mm.name}/actsparse_fold")
                    _take_over(mm.outputs[0], fold.outputs[0], "/unfolded")  # consumers and graph outputs read the Add
                    fold.replace_input_with(0, mm.outputs[0])
                    graph.insert_after(mm, fold)
                    self.counts["folds"] += 1
        return ir.passes.PassResult(model, modified=bool(self.work))


def apply_plan(model: onnx.ModelProto, plan: dict, prefill: str = "dense") -> dict[str, int]:
    """Insert the reference pattern for every group whose sparsity is above 0; return pass counts."""
    if prefill not in ("dense", "sparse"):
        raise ActSparseError(f"unknown prefill policy {prefill!r} (dense or sparse)")
    nodes = {n.name: n for n in model.graph.node}
    index = Index(model)
    work = []
    for group, first in group_settings(plan):
        if first["target_sparsity"] <= 0:
            continue
        if first.get("mask_source"):
            raise ActSparseError("plans of --method cats are not supported with --format onnx")
        for target in group.targets:
            mm = nodes.get(target.node)
            if mm is None or mm.op_type not in LINEAR_OPS:
                raise ActSparseError(f"plan does not match the model: no MatMul {target.node}")
            reason = weight_refusal(index, mm)
            if reason:
                raise ActSparseError(f"cannot prune {target.module}: {reason}")
            if mm.input[0] != group.name:
                raise ActSparseError(f"plan does not match the model: {group.name} is not the input of {target.module}")
        m, tau = float(first["mode"]), float(first["threshold"])
        rowsums = [dequantized(read_weight(index, nodes[t.node])).astype(np.float64).sum(axis=0) if m != 0 else None
                   for t in group.targets]
        work.append((f"actsparse.{group.targets[0].module}", group, m, tau, rowsums))
    rewrite = _Planned(work, prefill)
    if work:
        _edit(model, rewrite)
    return rewrite.counts


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant (initializer or Constant node), or None."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().ravel()[0])


def _produced_by(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


class Mask(NamedTuple):
    """A reference pattern ``Where(Not(|source| ≤ τ) [∨ keep_dense], z, 0)``, z = x − m or x."""
    where: ir.Node
    x: ir.Value
    mode: float
    tau: float
    keep: ir.Value
    keep_dense: ir.Value | None


def is_keep_dense(value: ir.Value) -> bool:
    """Whether ``value`` is the prefill test ``tokens > 1``: Greater(Gather(Shape(x), -2), 1)."""
    greater = _produced_by(value, "Greater")
    gather = greater and _produced_by(greater.inputs[0], "Gather")
    return bool(gather and _scalar(greater.inputs[1]) == 1 and _produced_by(gather.inputs[0], "Shape")
                and _scalar(gather.inputs[1]) == TOKEN_AXIS)


def read_mask(node: ir.Node) -> Mask | str | None:
    """The reference pattern whose Where is ``node``; None where ``node`` is no such Where (nothing to
    say), a reason where it has the pattern's shape but cannot be read (the rule refuses it)."""
    where = node if node.op_type == "Where" and node.domain in ("", "ai.onnx") and len(node.inputs) == 3 else None
    keep, keep_dense = (None, None) if where is None else (where.inputs[0], None)
    either = _produced_by(keep, "Or")
    if either is not None:
        keep, keep_dense = either.inputs
    negation = _produced_by(keep, "Not")
    small = negation and _produced_by(negation.inputs[0], "LessOrEqual")
    magnitude = small and _produced_by(small.inputs[0], "Abs")
    if not magnitude:
        return None
    z, tau = where.inputs[1], _scalar(small.inputs[1])
    if magnitude.inputs[0] is not z:
        return "its mask comes from another tensor (cats)"
    if tau is None or _scalar(where.inputs[2]) != 0.0:
        return "τ or the pruned value is not a one-element constant (0)"
    if keep_dense is not None and not is_keep_dense(keep_dense):
        return "the keep condition is OR-ed with something other than the prefill test"
    shift = _produced_by(z, "Sub")
    # a Sub of a one-element constant is the shift; the op computes x − m itself, so either reading is exact
    if shift is not None and _scalar(shift.inputs[1]) is not None:
        return Mask(where, shift.inputs[0], _scalar(shift.inputs[1]), tau, keep, keep_dense)
    return Mask(where, z, 0.0, tau, keep, keep_dense)


class Rule(ir.passes.InPlacePass):
    """One rewrite over the main graph: ``match(node) -> match or None``, ``check(match) -> reason or None``,
    ``rewrite(model, match)`` returning how many nodes it rewrote (``count`` sums them). A refused match is
    logged with its reason."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in list(model.graph):
            match = self.match(node)
            reason = None if match is None else self.check(match)
            if reason:
                refuse(type(self).__name__, node.name or node.outputs[0].name, reason)
            elif match is not None:
                self.count += self.rewrite(model, match)
        return ir.passes.PassResult(model, modified=self.count > 0)

    def match(self, node: ir.Node):
        raise NotImplementedError

    def check(self, match) -> str | None:
        return None

    def rewrite(self, model: ir.Model, match) -> int:
        raise NotImplementedError


class DropKeepDense(Rule):
    """Where(keep ∨ keep_dense, z, 0) → Where(keep, z, 0): every token is pruned, prefill included."""

    def match(self, node: ir.Node) -> Mask | None:
        mask = read_mask(node)
        return mask if isinstance(mask, Mask) and mask.keep_dense is not None else None

    def rewrite(self, model: ir.Model, mask: Mask) -> int:
        mask.where.replace_input_with(0, mask.keep)
        return 1


def _is_fused_op(node: ir.Node) -> bool:
    return node.op_type == OP_TYPE and node.domain == ONNX_DOMAIN


class FusedPrefillSparse(Rule):
    """ActSparseMatMul(prefill="dense") → prefill="sparse"."""

    def match(self, node: ir.Node) -> ir.Node | None:
        prefill = node.attributes.get("prefill") if _is_fused_op(node) else None
        return node if prefill is not None and prefill.as_string() == "dense" else None

    def rewrite(self, model: ir.Model, op: ir.Node) -> int:
        op.attributes["prefill"] = ir.AttrString("prefill", "sparse")
        return 1


def set_prefill_sparse(model: onnx.ModelProto) -> int:
    """Prune every token, prefill included (the paper's evaluation protocol); return nodes changed.

    The reference pattern's keep_dense test is dropped; fused ops get ``prefill="sparse"``.
    """
    rules = DropKeepDense(), FusedPrefillSparse()
    _edit(model, *rules, RemoveUnusedNodesPass())
    return sum(rule.count for rule in rules)


class Group(NamedTuple):
    """A matched pattern (or why it cannot be read), the nodes reading its mask, the protobuf twins of the
    linear ones (None for others) and their weight initializers (or why there are none)."""
    mask: Mask | str
    linears: list[ir.Node]
    protos: list[onnx.NodeProto | None]
    weights: list


class FuseActSparseMatMul(Rule):
    """Where(Not(|x − m| ≤ τ) [∨ keep_dense], x − m, 0) → MatMul/Gemm(·, W_j) [→ Add(b_j)], for every
    linear node reading the mask ⇒ ActSparseMatMul(x, tiles([W_1 … W_n]), [b' | scale | zero point]) → Split.

    Exact: the op computes Where(keep, x − m, 0)·W + b' itself, with b'_j = b_j + C_j: the fold
    b_j = m·rowsum(W_j) apply_plan writes when m ≠ 0, and a Gemm's own bias C_j.
    """

    def __init__(self, index: Index, names: dict[str, str] | None = None):
        super().__init__()
        self.index, self.names, self.refused = index, names or {}, 0

    def match(self, node: ir.Node) -> Group | None:
        mask = read_mask(node)
        if mask is None:
            return None
        linears = node.outputs[0].consumers()
        protos = [self.index.producers[n.outputs[0].name] if n.op_type in LINEAR_OPS else None for n in linears]
        return Group(mask, linears, protos, [p and weight_tensors(self.index, p) for p in protos])

    def check(self, group: Group) -> str | None:
        reason = self._refusal(group)
        self.refused += sum(p is not None for p in group.protos) if reason else 0
        return reason

    @staticmethod
    def _refusal(group: Group) -> str | None:
        if isinstance(group.mask, str):
            return group.mask
        mask = group.mask.where.outputs[0]
        if not group.linears or any(p is None or n.inputs[0] is not mask for n, p in zip(group.linears, group.protos)):
            return "the mask is read by something other than the first input of a MatMul"
        reasons = [f"{p.name}: {w}" for p, w in zip(group.protos, group.weights) if isinstance(w, str)]
        if not reasons and len({w[0] for w in group.weights}) > 1:
            reasons = ["consumers of one input have different weight formats"]
        return "; ".join(reasons) or None

    @staticmethod
    def _fold(linear: ir.Node, mask: Mask, width: int) -> ir.Node | None:
        """The Add(b) with b a constant ``[width]`` that follows ``linear`` when the pattern has a shift, or None."""
        readers = linear.outputs[0].consumers()
        add = readers[0] if len(readers) == 1 and mask.mode != 0 else None
        if add is None or add.op_type != "Add" or add.inputs[0] is not linear.outputs[0]:
            return None
        bias = ir.convenience.get_const_tensor(add.inputs[1])
        return add if bias is not None and bias.dtype == ir.DataType.FLOAT and bias.size == width else None

    def rewrite(self, model: ir.Model, group: Group) -> int:
        mask, linears, protos, _ = group
        weights = [read_weight(self.index, p) for p in protos]
        graph, fmt = model.graph, weights[0][0]
        widths = [w[1].shape[1] for w in weights]
        folds = [self._fold(n, mask, width) for n, width in zip(linears, widths)]
        first = protos[0].name or linears[0].outputs[0].name
        prefix = self.names.get(first, f"actsparse.{first}")
        params = [np.concatenate([self._bias(p, f, n) for p, f, n in zip(protos, folds, widths)])]
        quantised = formats()[fmt]["params"] != "none"
        if quantised:
            params += [np.concatenate([w[i] for w in weights]) for i in (2, 3)]
        weight = _initializer(graph, to_tiles(np.concatenate([w[1] for w in weights], axis=1), fmt), f"{prefix}/weight")
        params = _initializer(graph, np.concatenate(params).astype(np.float32), f"{prefix}/params")
        op = ir.node(OP_TYPE, [mask.x, weight, params], domain=ONNX_DOMAIN, name=f"{prefix}/{OP_TYPE}",
                     attributes={"weight_format": fmt, "out_features": int(sum(widths)),
                                 "group_size": int(weights[0][1].shape[0]) if quantised else 0,
                                 "mode": mask.mode, "threshold": mask.tau,
                                 "prefill": "dense" if mask.keep_dense is not None else "sparse", "has_bias": 1,
                                 "tile_cols": TILE_COLS[fmt]})
        outputs, nodes = op.outputs, [op]
        if len(linears) > 1:
            sizes = _initializer(graph, np.array(widths, np.int64), f"{prefix}/widths")
            split = ir.node("Split", [op.outputs[0], sizes],
                            attributes={"axis": -1}, num_outputs=len(linears), name=f"{prefix}/split")
            outputs, nodes = split.outputs, nodes + [split]
        # the mask comes after x's producer and before every linear node, hence before every consumer
        graph.insert_before(mask.where, nodes)
        for linear, fold, out in zip(linears, folds, outputs):
            _take_over((fold or linear).outputs[0], out, "/unfused")
        model.opset_imports.setdefault(ONNX_DOMAIN, 1)
        return len(linears)

    def _bias(self, linear: onnx.NodeProto, fold: ir.Node | None, width: int) -> np.ndarray:
        """b' of one consumer: a Gemm's own bias plus the fold. Zeros rather than none:
        OpenVINO's ONNX frontend reads an empty initializer as one value."""
        bias = np.zeros(width, np.float32)
        if fold is not None:
            bias += ir.convenience.get_const_tensor(fold.inputs[1]).numpy().ravel()
        own = gemm_bias(self.index, linear)
        return bias if own is None else bias + own


def fuse(model: onnx.ModelProto, plan: dict) -> dict[str, int]:
    """Replace each reference pattern, its MatMuls, fold Adds (and weight DequantizeLinears) by one
    ActSparseMatMul; return counts of linear nodes fused and refused. The plan names the new nodes.

    Consumers of one input (gate+up, q+k+v) become a single op over their weights concatenated
    along N, then a Split: one live-channel list and one kernel call per group. u8 codes stay u8,
    with their per-output-channel scales and zero points in ``params``.
    """
    rule = FuseActSparseMatMul(Index(model), names=prefixes(plan))
    _edit(model, rule, RemoveUnusedNodesPass())
    return {"fused": rule.count, "refused": rule.refused}


def remove_dead_code(model: onnx.ModelProto) -> None:
    """Drop the nodes and initializers that no graph output depends on any more (e.g. the weights the
    fused ops replace, a Gemm's bias Identity)."""
    _edit(model, RemoveUnusedNodesPass())
