"""One op per MLP: a fused MLP's two ActSparseMatMuls and the activation between them as one ActSparseMLP
(``fuse_mlp``, part of the fusion), and back (``split_mlp``, for runtimes without ActSparseMLP and for evaluation,
which reads the intermediate)."""
from __future__ import annotations

import functools

import numpy as np
import openvino as ov
from openvino import opset13 as ops
from openvino.utils.node_factory import NodeFactory

from ...runtime_ext import MLP_TYPE, OP_TYPE, openvino_extension
from ...runtime_ext.kernels import formats
from .graph import constant_behind
from .twins import ActSparseMLP


# The activations ActSparseMLP computes, by the node that computes them in an optimum export.
_ACTIVATIONS = {("Swish", ""): "silu", ("Gelu", "erf"): "gelu_erf", ("Gelu", "tanh"): "gelu_tanh"}


def skip_convert(out: ov.Output) -> ov.Output:
    """The tensor behind one Convert (a bf16 export's around each op), or ``out``."""
    node = out.get_node()
    return node.input_value(0) if node.get_type_name() == "Convert" else out


def _sole_reader(out: ov.Output, live: set[str]) -> ov.Node | None:
    """The one node of the graph that reads ``out``, or None. Nodes a rewrite dropped may still hold ``out`` until
    Python frees them, hence ``live``: the friendly names of the model's nodes."""
    readers = [i.get_node() for i in out.get_target_inputs() if i.get_node().get_friendly_name() in live]
    return readers[0] if len(readers) == 1 else None


def _activation(node: ov.Node) -> str | None:
    if node.get_type_name() == "Swish" and node.get_input_size() == 2:  # x·sigmoid(β·x): SiLU where β is 1
        beta = constant_behind(node.input_value(1))
        if beta is None or beta.get_data().size != 1 or float(beta.get_data().ravel()[0]) != 1.0:
            return None
    mode = str(node.get_attributes().get("approximation_mode", "")).lower()
    return _ACTIVATIONS.get((node.get_type_name(), mode))


def _halves(split: ov.Node) -> bool:
    """Whether ``split`` cuts its input's last axis into two equal halves."""
    axis, lengths = (constant_behind(split.input_value(i)) for i in (1, 2))
    rank, width = split.get_input_partial_shape(0).rank.get_length(), split.get_input_partial_shape(0)[-1]
    return (axis is not None and lengths is not None and int(axis.get_data()) in (-1, rank - 1) and width.is_static
            and [int(v) for v in lengths.get_data().ravel()] == [width.get_length() // 2] * 2)


def _read_mlp(down: ov.Node, live: set[str]) -> tuple[ov.Node, str, str] | None:
    """``(up, activation, gate)`` where ``down``'s x is act(up's output) or act(one half) · the other half, read only
    there; else None."""
    node = skip_convert(down.input_value(0)).get_node()
    gate, act = "none", node
    if node.get_type_name() == "Multiply":
        halves = [node.input_value(i) for i in (0, 1)]
        acts = [h for h in halves if _activation(h.get_node())]
        if len(acts) != 1:
            return None
        act, other = acts[0].get_node(), next(h for h in halves if h is not acts[0])
        split = act.input_value(0).get_node()
        if (split.get_type_name() != "VariadicSplit" or other.get_node() != split or _sole_reader(other, live) != node
                or _sole_reader(act.input_value(0), live) != act or not _halves(split)):
            return None
        gate = "first" if act.input_value(0).get_index() == 0 else "second"
        up_out = skip_convert(split.input_value(0))
        chain = [act.output(0), node.output(0), split.input_value(0)]
    else:
        up_out = skip_convert(act.input_value(0)) if _activation(act) else None
        chain = [act.output(0), act.input_value(0)] if up_out is not None else []
    if up_out is None or not _activation(act) or up_out.get_node().get_type_name() != OP_TYPE:
        return None
    up = up_out.get_node()
    if any(_sole_reader(out, live) is None for out in chain + [up.output(0), down.input_value(0)]):
        return None  # the intermediate is read elsewhere too
    if (up.get_input_element_type(0) != down.get_output_element_type(0)
            or any(constant_behind(op.input_value(i)) is None for op in (up, down) for i in (1, 2))):
        return None  # weights and params go into one Constant
    return up, _activation(act), gate


# ActSparseMLP's blob: these buffers one after the other, each from a multiple of BLOB_ALIGN bytes.
BUFFERS = ("up_weight_bytes", "up_params_bytes", "down_weight_bytes", "down_params_bytes")
BLOB_ALIGN = 64


def _offsets(sizes: list[int]) -> list[int]:
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + -(-size // BLOB_ALIGN) * BLOB_ALIGN)
    return starts


def _blob(buffers: list[np.ndarray]) -> np.ndarray:
    """The four buffers' bytes in one u8 array: the plugin's per-call cost grows with an op's inputs."""
    starts = _offsets([b.nbytes for b in buffers])
    blob = np.zeros(starts[-1] + buffers[-1].nbytes, np.uint8)
    for start, b in zip(starts, buffers):
        blob[start:start + b.nbytes] = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    return blob


def _unblob(mlp: ov.Node) -> list[ov.Output]:
    """The four buffers of an ActSparseMLP's blob as Constants of the types ActSparseMatMul takes them in."""
    attrs, blob = mlp.get_attributes(), constant_behind(mlp.input_value(1)).get_data()
    sizes = [attrs[name] for name in BUFFERS]
    out = []
    for name, start, size in zip(BUFFERS, _offsets(sizes), sizes):
        fmt = formats()[attrs[f"{name.split('_')[0]}_weight_format"]]
        f32 = fmt["storage"] == "f32" if "weight" in name else not fmt["compact_params"]
        out.append(ops.constant(blob[start:start + size].view(np.float32 if f32 else np.uint8)).output(0))
    return out


def fuse_mlp(model: ov.Model) -> int:
    """Replace each fused MLP (an ActSparseMatMul, [VariadicSplit,] the activation [and the product], and the
    ActSparseMatMul that reads only that) by one ActSparseMLP, in place; return how many. Every custom-op call pays
    the CPU plugin's fixed cost (docs/op.md), so one call a layer instead of two."""
    count, nodes = 0, model.get_ordered_ops()
    live = {node.get_friendly_name() for node in nodes}
    for down in [op for op in nodes if op.get_type_name() == OP_TYPE]:
        found = _read_mlp(down, live)
        if found is None:
            continue
        up, activation, gate = found
        buffers = [constant_behind(op.input_value(i)).get_data() for op in (up, down) for i in (1, 2)]
        attrs = {**{f"up_{k}": v for k, v in up.get_attributes().items()},
                 **{f"down_{k}": v for k, v in down.get_attributes().items()}, "activation": activation, "gate": gate,
                 **{name: int(b.nbytes) for name, b in zip(BUFFERS, buffers)}}
        mlp = ActSparseMLP([up.input_value(0), ops.constant(_blob(buffers)).output(0)], attrs)
        # named after down's op, so that split_mlp gives that op its name back (evaluation finds down's x by it)
        mlp.set_friendly_name(down.get_friendly_name().replace(OP_TYPE, MLP_TYPE))
        down.output(0).replace(mlp.output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


@functools.lru_cache(maxsize=1)
def _ops() -> NodeFactory:
    """Builds the C++ ops themselves (the extension's), so a split model compiles as it is."""
    factory = NodeFactory()
    factory.add_extension(openvino_extension())
    return factory


def split_mlp(model: ov.Model) -> int:
    """Replace each ActSparseMLP by its two ActSparseMatMuls with the activation between them as stock ops, in
    place; return how many. For runtimes without ActSparseMLP (the GPU plugin's kernel is ActSparseMatMul only),
    and for evaluation, which reads the intermediate."""
    count = 0
    for mlp in [op for op in model.get_ordered_ops() if op.get_type_name() == MLP_TYPE]:
        attrs = mlp.get_attributes()
        half = {p: {k[len(p):]: v for k, v in attrs.items() if k.startswith(p) and k not in BUFFERS}
                for p in ("up_", "down_")}
        buffers = _unblob(mlp)
        up = _ops().create(OP_TYPE, [mlp.input_value(0), *buffers[:2]], half["up_"])
        up.set_friendly_name(mlp.get_friendly_name() + "/up")
        h = up.output(0)
        wide = h.get_element_type() != ov.Type.f32  # bf16 ops: the activation between them in f32, as fuse leaves it
        h = ops.convert(h, "f32").output(0) if wide else h
        if attrs["gate"] != "none":
            width = half["up_"]["out_features"] // 2
            parts = ops.variadic_split(h, ops.constant(np.int64(-1)), ops.constant(np.array([width] * 2, np.int64)))
            g, u = parts.outputs() if attrs["gate"] == "first" else parts.outputs()[::-1]
        else:
            g, u = h, None
        act = ops.swish(g) if attrs["activation"] == "silu" else ops.gelu(g, attrs["activation"][len("gelu_"):])
        a = act.output(0) if u is None else ops.multiply(act, u).output(0)
        a = ops.convert(a, mlp.get_input_element_type(0)).output(0) if wide else a
        down = _ops().create(OP_TYPE, [a, *buffers[2:]], half["down_"])
        down.set_friendly_name(mlp.get_friendly_name().replace(MLP_TYPE, OP_TYPE))
        mlp.output(0).replace(down.output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count
