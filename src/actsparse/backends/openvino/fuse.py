"""Fuse the reference pattern, found by its structure, into ``ActSparseMatMul``: one op per mask.

    Select(¬(|x − m| ≤ τ) ∨ keep_dense, x − m, 0) → MatMul(·, W) [→ Add(m·rowsum W)]
        ⇒  ActSparseMatMul(x, pack(W), [b' = m·rowsum W | scale | zero_point]; m, τ, prefill)

The op computes the same function (see passes/openvino.py), so the fusion is exact up to
float summation order. W is re-laid out input-channel-major ``[K, N]`` here, once, in column tiles
(``kernels.to_tiles``): a pruned input channel is then one contiguous slice per tile that the kernel
never reads, and the slices of live channels follow one another. Compressed
weights keep their integer codes: u8 per output channel, u4 group-wise (two codes a byte,
low nibble first along N; the kernels' own packer), with f32 scales and zero points (u4: f16 scales and
u8 zero points, as NNCF writes them, in a u8 params tensor, where they hold those values); f16 weights, and f32
weights of a plan whose weight format is bf16 (rounded to nearest even), are stored as their raw bytes (u8) so
that no plugin widens them to f32. The layout replaces the original
constant, so the model holds one copy of the weights.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from ...runtime_ext import OP_TYPE
from ...runtime_ext.kernels import TILE_COLS, compact_u4_params, formats, pack_u4, to_bf16, to_tiles
from ..pattern import prefixes
from .export import save_ir
from .graph import constant_behind
from .mlp import fuse_mlp
from .passes import Mask, MaskRule, run_rules
from .runtime import bf16_io
from .twins import ActSparseMatMul


def _unpack_u4(packed: np.ndarray, count: int) -> np.ndarray:
    """OpenVINO u4 constants hold two codes a byte, the first in the low nibble."""
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2], out[1::2] = packed.ravel() & 0x0F, packed.ravel() >> 4
    return out[:count]


def read_weight(matmul: ov.Node):
    """The MatMul's weight as ``(format, data, scale, zero_point, group_size)``, or a refusal reason.

    ``data`` is input-channel-major ``[K, N]`` (u4: one code a byte, packed by the kernels'
    ``pack_u4`` once the consumers of a group are concatenated; f16: the raw bytes, ``[K, 2N]`` u8).
    """
    out = matmul.input_value(1)
    node = out.get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    n_out, k_in = (int(d) for d in out.get_shape())
    if not matmul.get_attributes()["transpose_b"]:
        n_out, k_in = k_in, n_out
        if node.get_type_name() != "Constant":
            return "compressed weight is not in [out, in] layout"
    if node.get_type_name() == "Constant":
        kind = node.get_output_element_type(0).get_type_name()
        if kind not in ("f32", "f16"):
            return f"weight constant of type {kind} without decompression"
        w = node.get_data()
        data = np.ascontiguousarray(w.T if matmul.get_attributes()["transpose_b"] else w)
        # f16 travels as raw bytes (u8 [K, 2N]): the CPU plugin widens f16 constants to f32 at compile
        # time and has no u16, so any other element type would double the bytes read per token
        return kind, data.view(np.uint8) if kind == "f16" else data, None, None, 0
    group = k_in
    if node.get_type_name() == "Reshape":  # u4: [N, K/G, G] → [N, K]
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Multiply":
        return f"weight decompression ends in {node.get_type_name()}, not Multiply"
    sub, scale = node.input_value(0), node.input_value(1)
    if constant_behind(sub) is not None:
        sub, scale = scale, sub
    scale_node = constant_behind(scale, "f16", "f32")
    if sub.get_node().get_type_name() != "Subtract" or scale_node is None:
        return "weight decompression is not (codes − zero point) · scale"
    codes_node = constant_behind(sub.get_node().input_value(0), "u8", "u4")
    zp_node = constant_behind(sub.get_node().input_value(1), "u8", "u4")
    if codes_node is None or zp_node is None:
        return "weight codes or zero point are not u8/u4 constants"
    fmt = codes_node.get_output_element_type(0).get_type_name()
    shape = list(codes_node.get_output_shape(0))
    if fmt == "u4":
        if len(shape) != 3:
            return "u4 weight is not group-wise [N, K/G, G]"
        group = shape[2]
        codes = _unpack_u4(codes_node.get_data(), n_out * k_in).reshape(n_out, k_in)
        zp = _unpack_u4(zp_node.get_data(), n_out * (k_in // group)).reshape(n_out, k_in // group)
        scale_v = scale_node.get_data().astype(np.float32).reshape(n_out, k_in // group)
        return "u4", np.ascontiguousarray(codes.T), np.ascontiguousarray(scale_v.T), np.ascontiguousarray(zp.T.astype(np.float32)), group
    codes = codes_node.get_data().reshape(n_out, k_in)
    zp = zp_node.get_data().astype(np.float32).reshape(-1)
    scale_v = scale_node.get_data().astype(np.float32).reshape(-1)
    if zp.size != n_out or scale_v.size != n_out:
        return "u8 weight is not per output channel"
    return "u8", np.ascontiguousarray(codes.T), scale_v, zp, k_in


def materialize(model: ov.Model, core: ov.Core) -> ov.Model:
    """The fused model with the C++ op in place of its Python twin (which cannot run), via IR.

    ``core`` must have the extension registered.
    """
    with tempfile.TemporaryDirectory(prefix="actsparse-ir-") as tmp:
        save_ir(model, Path(tmp) / "model.xml")  # aligned weights, as an export writes them
        return core.read_model(f"{tmp}/model.xml")


class Group(NamedTuple):
    """A matched pattern (or why it cannot be read), the MatMuls that read its mask and their weights
    (:func:`read_weight`)."""
    mask: Mask | str
    matmuls: list[ov.Node]
    weights: list


def _width(mm: ov.Node) -> int:
    return mm.get_output_partial_shape(0)[-1].get_length()


class FuseActSparseMatMul(MaskRule):
    """Select(¬(|x − m| ≤ τ) [∨ keep_dense], x − m, 0) → MatMul(·, W_j) [→ Add(b'_j)], for every MatMul
    reading the mask ⇒ ActSparseMatMul(x, pack([W_1 … W_n]), [b' | scale | zero point]) → VariadicSplit.

    Exact: the op computes Select(keep, x − m, 0)·W + b' itself. b'_j = m·rowsum(W_j), the fold
    apply_plan writes after each MatMul when m ≠ 0 (absent: b'_j = 0).
    """

    def __init__(self, weight_format: str | None = None, names: dict[str, str] | None = None):
        self.weight_format, self.names, self.refused = weight_format, names or {}, 0
        super().__init__()

    def read(self, root: ov.Node) -> Group:
        mask = super().read(root)
        # the readers come as a set: sorted, a group's layout is the same from run to run
        readers = sorted((i.get_node() for i in root.output(0).get_target_inputs()),
                         key=lambda n: n.get_friendly_name())
        weights = [read_weight(mm) if mm.get_type_name() == "MatMul" and not isinstance(mask, str) else None
                   for mm in readers]
        return Group(mask, readers, weights)

    def check(self, group: Group) -> str | None:
        reason = self._refusal(group)
        self.refused += sum(mm.get_type_name() == "MatMul" for mm in group.matmuls) if reason else 0
        return reason

    @staticmethod
    def _refusal(group: Group) -> str | None:
        if isinstance(group.mask, str):
            return group.mask
        if group.mask.cats:  # the op masks x by x itself
            return "its mask comes from another tensor (cats)"
        select = group.mask.select.output(0)
        if any(mm.get_type_name() != "MatMul" or mm.get_attributes()["transpose_a"] or mm.input_value(0) != select
               for mm in group.matmuls):
            return "the mask is read by something other than the first input of a MatMul"
        reasons = [f"{mm.get_friendly_name()}: {w}" for mm, w in zip(group.matmuls, group.weights)
                   if isinstance(w, str)]
        if reasons:
            return "; ".join(reasons)
        if len({(w[0], w[4]) for w in group.weights}) > 1:
            return "consumers of one input have different weight formats"
        return None

    @staticmethod
    def _fold(mm: ov.Node, mask: Mask) -> ov.Node | None:
        """The Add(b') that follows ``mm`` when the pattern has a shift, or None."""
        readers = [i.get_node() for i in mm.output(0).get_target_inputs()]
        if mask.mode == 0 or len(readers) != 1 or readers[0].get_type_name() != "Add":
            return None
        add, bias = readers[0], readers[0].input_value(1).get_node()
        if (bias.get_type_name() != "Constant" or bias.get_output_element_type(0) != ov.Type.f32
                or bias.get_output_partial_shape(0).is_dynamic or add.input_value(0) != mm.output(0)
                or int(np.prod(bias.get_output_shape(0))) != _width(mm)):
            return None
        return add

    def rewrite(self, group: Group) -> int:
        mask, matmuls, weights = group
        widths = [_width(mm) for mm in matmuls]
        folds = [self._fold(mm, mask) for mm in matmuls]
        fmt, group_size = weights[0][0], weights[0][4]
        data = np.concatenate([w[1] for w in weights], axis=1)
        if fmt == "f32" and self.weight_format == "bf16":  # rounded once, stored as raw bytes like f16
            fmt, data = "bf16", to_bf16(data).view(np.uint8)
        params = []
        if any(f is not None for f in folds):
            params.append(np.concatenate([f.input_value(1).get_node().get_data().ravel() if f is not None
                                          else np.zeros(n, np.float32) for f, n in zip(folds, widths)]))
        if formats()[fmt]["params"] != "none":
            scale, zero_point = (np.concatenate([w[i] for w in weights], axis=-1) for i in (2, 3))
            params += [scale, zero_point]
        data = pack_u4(data, scale, zero_point, group_size).data if fmt == "u4" else to_tiles(data, fmt)
        compact = compact_u4_params(scale, zero_point) if formats()[fmt]["compact_params"] else None
        if compact is not None:  # u4 as bytes [bias f32 | scale f16 | zero point u8]: 3 bytes a group and column, not 8
            params = np.concatenate([p.ravel().astype(np.float32).view(np.uint8) for p in params[:-2]] +
                                    [compact[0].ravel().view(np.uint8), compact[1].ravel()])
        else:
            params = np.concatenate([p.ravel().astype(np.float32) for p in params]) if params else np.zeros(0, np.float32)
        op = ActSparseMatMul([mask.x, ops.constant(data).output(0), ops.constant(params).output(0)],
                             {"weight_format": fmt, "out_features": int(sum(widths)), "group_size": int(group_size),
                              "mode": mask.mode, "threshold": mask.tau,
                              "prefill": "dense" if mask.keep_dense is not None else "sparse",
                              "has_bias": any(f is not None for f in folds), "tile_cols": TILE_COLS[fmt]})
        first = matmuls[0].get_friendly_name()
        op.set_friendly_name(f"{self.names.get(first, first)}/{OP_TYPE}")
        # bf16 weights are for CPUs where OpenVINO runs the graph in bf16: the op then also takes and
        # returns bf16 (Converts in the file), so the plugin needs no Reorders around it
        y = bf16_io(op) if fmt == "bf16" else op.output(0)
        outputs = [y]
        if len(matmuls) > 1:
            split = ops.variadic_split(y, ops.constant(np.int64(-1)), ops.constant(np.array(widths, np.int64)))
            outputs = split.outputs()
        for mm, fold, out in zip(matmuls, folds, outputs):
            (fold if fold is not None else mm).output(0).replace(out)
        return len(matmuls)


def fuse(model: ov.Model, plan: dict) -> dict[str, int]:
    """Replace every reference pattern (mask, its MatMuls and fold Adds) by one ActSparseMatMul, then each MLP's two
    by one ActSparseMLP (``mlp.fuse_mlp``); return counts of MatMuls fused and refused and of MLPs made one op. The
    plan gives the weight format (bf16) and the ops' names.

    Consumers of one input (gate+up, q+k+v) become a single op over their weights concatenated
    along N, followed by a VariadicSplit: one live-channel list and one call per group, since
    every custom-op call pays the CPU plugin's generic shape inference.
    """
    rule = FuseActSparseMatMul(plan.get("weight_format"), prefixes(plan))
    fused = run_rules(model, rule)[type(rule).__name__]
    return {"fused": fused, "refused": rule.refused, "mlp": fuse_mlp(model)}
