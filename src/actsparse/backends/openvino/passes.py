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

The rules below (``openvino.passes`` MatcherPasses) find the pattern again by its structure, never by
node names: set_prefill_sparse, set_dense, and the fusion in passes/openvino_fuse.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov
from openvino import opset13 as ops
from openvino.passes import AnyInput, Manager, Matcher, MatcherPass, Or, WrapType

from ..._common import ActSparseError
from ...calibration.plan import group_settings
from ...runtime_ext import PROJECTIONS
from ..pattern import KEEP_DENSE, TOKEN_AXIS, refuse
from .graph import EXACT_CONFIG, tensor_name, tensors_by_name, weight_refusal


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
            tokens = ops.gather(ops.shape_of(x), ops.constant(np.array(TOKEN_AXIS, np.int64)),
                                ops.constant(np.array(0, np.int64)))
            keep_dense = ops.not_equal(tokens, ops.constant(np.array(1, np.int64)), name=f"{name}/{KEEP_DENSE}")
        bias = {id(mm): ops.constant((m * rowsums[id(mm)]).astype(x.get_element_type().to_dtype()))
                for mm in matmuls} if m != 0 else {}
        insert_mask(x, matmuls, shift, _scalar(tau, x), bias, source, keep_dense, name)
        counts["masks"] += 1
        counts["shifts"] += m != 0
        counts["folds"] += len(bias)
    model.validate_nodes_and_infer_types()
    return counts


def _constant(output: ov.Output) -> float | None:
    """The value of a one-element Constant, or None."""
    node = output.get_node()
    if node.get_type_name() != "Constant" or node.get_output_partial_shape(0).is_dynamic:
        return None
    data = node.get_data()
    return float(data.ravel()[0]) if data.size == 1 else None


@dataclass
class Mask:
    """One matched reference pattern: ``Select(¬(|source| ≤ τ) [∨ keep_dense], z, 0)``, z = x − m or x."""
    select: ov.Node
    x: ov.Output
    z: ov.Output
    mode: float
    tau: float
    source: ov.Output
    keep: ov.Output
    keep_dense: ov.Output | None

    @property
    def cats(self) -> bool:
        """The magnitude test reads another tensor than z (--method cats)."""
        return self.source != self.z


def mask_pattern(prefill_test: bool | None = None) -> ov.Node:
    """The Select of the reference pattern as an ``openvino.passes`` pattern: with the keep_dense
    test OR-ed into its condition (True), without (False), or either (None)."""
    keep = WrapType("opset1.LogicalNot", [WrapType("opset1.LessEqual", [WrapType("opset1.Abs", [AnyInput()]),
                                                                          WrapType("opset1.Constant")])])
    with_test = WrapType("opset1.LogicalOr", [keep, AnyInput()])
    condition = {None: Or([keep, with_test]), True: with_test, False: keep}[prefill_test]
    return WrapType("opset1.Select", [condition, AnyInput(), WrapType("opset1.Constant")])


def read_mask(select: ov.Node) -> Mask | str:
    """The matched pattern at ``select`` with its constants, or why it is not the reference pattern."""
    condition = select.input_value(0)
    keep, keep_dense = condition, None
    if condition.get_node().get_type_name() == "LogicalOr":
        keep, keep_dense = condition.get_node().input_value(0), condition.get_node().input_value(1)
    less_equal = keep.get_node().input_value(0).get_node()
    source, tau = less_equal.input_value(0).get_node().input_value(0), _constant(less_equal.input_value(1))
    if tau is None or _constant(select.input_value(2)) != 0.0:
        return "τ or the pruned value is not a one-element constant (0)"
    if keep_dense is not None and not is_keep_dense(keep_dense):
        return "the keep condition is OR-ed with something other than the prefill test"
    z = select.input_value(1)
    x, mode = z, 0.0
    # a Subtract of a one-element constant is the shift; the op computes x − m itself, so either reading is exact
    if z.get_node().get_type_name() == "Subtract" and _constant(z.get_node().input_value(1)) is not None:
        x, mode = z.get_node().input_value(0), _constant(z.get_node().input_value(1))
    return Mask(select, x, z, mode, tau, source, keep, keep_dense)


def is_keep_dense(output: ov.Output) -> bool:
    """Whether ``output`` is the prefill test ``tokens ≠ 1``, i.e. NotEqual(Gather(ShapeOf(x), -2, 0), 1)."""
    test = output.get_node()
    if test.get_type_name() != "NotEqual" or _constant(test.input_value(1)) != 1:
        return False
    gather = test.input_value(0).get_node()
    return (gather.get_type_name() == "Gather" and gather.input_value(0).get_node().get_type_name() == "ShapeOf"
            and _constant(gather.input_value(1)) == TOKEN_AXIS and _constant(gather.input_value(2)) == 0)


def fused_op_pattern(**attributes) -> ov.Node:
    """An ActSparseMatMul whose attributes include ``attributes``, or an ActSparseMLP one of whose projections'
    do (a custom op: WrapType knows only the stock opsets, so a predicate on the type)."""
    def matches(output: ov.Output) -> bool:
        return bool(_projections(output.get_node(), **attributes))
    return AnyInput(matches)


def _projections(node: ov.Node, **attributes) -> list[str]:
    """The attribute prefixes of ``node``'s projections (see PROJECTIONS) whose attributes include ``attributes``."""
    found = node.get_attributes() if node.get_type_name() in PROJECTIONS else {}
    return [p for p in PROJECTIONS.get(node.get_type_name(), ())
            if all(found.get(p + k) == v for k, v in attributes.items())]


class Rule(MatcherPass):
    """One rewrite: ``pattern()`` to match, ``check(match) -> reason or None``, ``rewrite(match)``.

    ``count`` is how many nodes it rewrote; a refused match is logged with the reason.
    """

    def __init__(self):
        super().__init__()
        self.count = 0
        self.register_matcher(Matcher(self.pattern(), type(self).__name__), self._callback)

    def _callback(self, matcher: Matcher) -> bool:
        root = matcher.get_match_root()
        match = self.read(root)
        reason = self.check(match)
        if reason:
            return refuse(type(self).__name__, root.get_friendly_name(), reason)
        self.count += self.rewrite(match)
        return True

    def pattern(self) -> ov.Node:
        return fused_op_pattern()

    def read(self, root: ov.Node):
        """What ``check`` and ``rewrite`` take: the matched node itself."""
        return root

    def check(self, match) -> str | None:
        """Why ``match`` is refused, or None."""
        return None

    def rewrite(self, match) -> int:
        """Change the graph; return how many nodes it rewrote."""
        raise NotImplementedError


class MaskRule(Rule):
    """A rule on the reference pattern's Select, which it reads as a :class:`Mask`."""

    def pattern(self) -> ov.Node:
        return mask_pattern()

    def read(self, root: ov.Node) -> Mask | str:
        return read_mask(root)

    def check(self, mask: Mask | str) -> str | None:
        return mask if isinstance(mask, str) else None


class DropKeepDense(MaskRule):
    """Select(keep ∨ keep_dense, z, 0) → Select(keep, z, 0): every token is pruned, prefill included."""

    def pattern(self) -> ov.Node:
        return mask_pattern(prefill_test=True)

    def rewrite(self, mask: Mask) -> int:
        mask.select.input(0).replace_source_output(mask.keep)
        return 1


class FusedPrefillSparse(Rule):
    """ActSparseMatMul(prefill="dense") → prefill="sparse"; the same for each projection of an ActSparseMLP."""

    def pattern(self) -> ov.Node:
        return fused_op_pattern(prefill="dense")

    def rewrite(self, op: ov.Node) -> int:
        dense = _projections(op, prefill="dense")
        for p in dense:
            op.set_attribute(f"{p}prefill", "sparse")
        return len(dense)  # projections, as if each were its own op


class Unmask(MaskRule):
    """Select(keep, z, 0) → z: every channel kept; with the fold b' = m·rowsum(W), z·W + b' = x·W."""

    def rewrite(self, mask: Mask) -> int:
        mask.select.output(0).replace(mask.z)
        return 1


class KeepEveryChannel(Rule):
    """ActSparseMatMul(threshold=τ) → threshold=−1: |z| ≤ −1 never holds, so no channel is pruned (ActSparseMLP:
    in both projections)."""

    def rewrite(self, op: ov.Node) -> int:
        prefixes = _projections(op)
        for p in prefixes:
            op.set_attribute(f"{p}threshold", -1.0)
        return len(prefixes)


def run_rules(model: ov.Model, *rules: Rule) -> dict[str, int]:
    """Run ``rules`` once each, in this order, then revalidate; return each one's count, by class name."""
    manager = Manager()
    for rule in rules:
        manager.register_pass(rule)
    manager.run_passes(model)
    model.validate_nodes_and_infer_types()
    return {type(rule).__name__: rule.count for rule in rules}


def set_prefill_sparse(model: ov.Model) -> int:
    """Prune every token, prefill included (the paper's evaluation protocol); return nodes changed.

    Works on the reference pattern (its keep_dense test is dropped) and on fused ActSparseMatMul
    ops (their ``prefill`` attribute becomes "sparse").
    """
    return sum(run_rules(model, DropKeepDense(), FusedPrefillSparse()).values())


def set_dense(model: ov.Model) -> int:
    """Undo the pruning in place (every channel kept), giving the dense model's function; return
    nodes changed. The reference pattern's masks pass x − m through (the fold keeps it exact);
    fused ops get a negative threshold, which keeps every channel."""
    return sum(run_rules(model, Unmask(), KeepEveryChannel()).values())
