"""ONNX backend of calibration: find target MatMuls in an ONNX graph and probe their inputs with ONNX Runtime."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper
from tqdm.auto import tqdm

from .stats import SAMPLE_ROWS, RowSampler, StreamingHistogram
from .targets import Group, Target, group_targets, kind_of

log = logging.getLogger("actsparse")

# ORT fuses DequantizeLinear → MatMul into MatMulNBits, which by default quantizes its input to int8:
# accuracy level 1 keeps it f32, so int8 weights change nothing but the weights.
EXACT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
# Ops that may stand between weight initializers and a MatMul.
WEIGHT_PATH_OPS = {"Transpose", "DequantizeLinear", "Identity", "Cast", "Reshape"}
# Node names from torch's ONNX exporter (via optimum): "/model/layers.0/mlp/down_proj/MatMul"; GPT-2's
# Conv1D (addmm) becomes "/transformer/h.0/mlp/c_fc/Gemm" on the input flattened to [tokens, K].
_MODULE_RE = re.compile(r"^/(?P<scope>[\w./]+)/(?:MatMul|Gemm)(?:_\d+)?$")
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


def module_of(node: onnx.NodeProto) -> str | None:
    """The Hugging Face module that traced ``node``, from its scope name, or None."""
    match = _MODULE_RE.match(node.name) if node.op_type in LINEAR_OPS else None
    return match["scope"].replace("/", ".") if match else None


def find_groups(model: onnx.ModelProto, kinds: set[str]) -> list[Group]:
    """Target MatMuls of ``model`` whose sparsity kind is in ``kinds``, grouped by input tensor."""
    index = Index(model)
    found = []
    for node in model.graph.node:
        module = module_of(node)
        kind = kind_of(module) if module else None
        if kind is None:
            continue
        tensors = weight_tensors(index, node)
        if isinstance(tensors, str):
            log.warning("not pruning %s: %s", module, tensors)
            continue
        k, n = tensors[1][0].dims
        found.append((node.input[0], Target(module, node.name, kind, int(k), int(n))))
    return group_targets(found, kinds)


def dense_weight(model: onnx.ModelProto, target: Target) -> np.ndarray:
    """The target MatMul's weight as f32 ``[K, N]``, dequantized (ONNX MatMul weights already are input-major)."""
    node = next(n for n in model.graph.node if n.name == target.node)
    return dequantized(read_weight(Index(model), node))


def session(model: onnx.ModelProto | str | Path, folder: str | Path | None = None, exact: bool = True,
            threads: int | None = None):
    """An ORT CPU session of ``model`` (a proto whose external data, if any, lies in ``folder``, or a path),
    with the custom-op library where the graph has ActSparseMatMul nodes.

    ``exact``: f32 arithmetic throughout (:data:`EXACT_CONFIG`), as calibration and evaluation need; else the
    runtime's defaults, as deployed. ``threads``: intra-op threads (ORT's default when None).
    """
    import onnxruntime as ort

    from ..runtime_ext import session_options

    config = dict(EXACT_CONFIG if exact else {})
    if isinstance(model, onnx.ModelProto):
        if folder is not None:  # the proto was loaded without its weights: ORT reads them from there
            config["session.model_external_initializers_file_folder_path"] = str(folder)
        graph, model = model, model.SerializeToString()
    else:
        graph, model = onnx.load(str(model), load_external_data=False), str(model)
    options = session_options(threads, config, library=uses_custom_op(graph))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def feed(inputs, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of an optimum-exported graph for a ``[batch, seq]`` block of token ids, from position 0.

    ``inputs`` are the session's ``NodeArg``s; a with-past decoder gets an empty KV cache
    (``[batch, kv_heads, 0, head_dim]``).
    """
    batch, seq = ids.shape
    values = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
              "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), ids.shape).copy()}
    result = {}
    for arg in inputs:
        if arg.name.startswith("past_key_values."):
            _, heads, _, dim = arg.shape
            dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
            result[arg.name] = np.zeros((batch, heads, 0, dim), dtype)
        elif arg.name in values:
            result[arg.name] = values[arg.name]
        else:
            raise ValueError(f"do not know how to feed model input {arg.name}")
    return result


def run_chunks(sess, chunks: np.ndarray, desc: str, outputs: list[str] | None = None
               ) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Run each ``[seq]`` row of ``chunks`` as its own sequence, yielding it and the ``outputs`` values."""
    for row in tqdm(chunks, desc=desc, unit="sample", leave=False):
        yield row, sess.run(outputs, feed(sess.get_inputs(), row[None]))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Make the tensors ``names`` extra graph outputs (f32, shape left to the runtime)."""
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in names)


def collect_statistics(model: str | Path, groups: list[Group], chunks: np.ndarray,
                       sample_rows: int = SAMPLE_ROWS
                       ) -> tuple[dict[str, StreamingHistogram], dict[str, np.ndarray]]:
    """Stream every group's input tensor over ``chunks`` into one histogram per group, and keep
    ``sample_rows`` token rows of it (``[rows, K]``) for output-error estimates.

    The probes are extra outputs of the exported graph itself, run by ONNX Runtime.
    """
    model = Path(model)
    graph = onnx.load(str(model), load_external_data=False)
    names = list(dict.fromkeys(g.name for g in groups))
    with_outputs(graph, names)
    sess = session(graph, model.parent)
    histograms = {name: StreamingHistogram() for name in names}
    sampler = RowSampler(sample_rows, len(chunks))
    for _, values in run_chunks(sess, chunks, "calibrating", names):
        for name, x in zip(names, values):
            histograms[name].update(x)
            sampler.update(name, x)
    return histograms, sampler.samples()


def uses_custom_op(model: onnx.ModelProto) -> bool:
    from ..runtime_ext import ONNX_DOMAIN

    return any(node.domain == ONNX_DOMAIN for node in model.graph.node)


def evaluate(folder: Path, plan: dict, chunks: np.ndarray) -> dict:
    """Negative log-likelihood, correct next-token predictions, token count and measured sparsity
    per group name of ``folder/model.onnx`` over ``chunks``, every token pruned (prefill too).

    Measured sparsity is the share of ``|x − m| ≤ τ`` on each pruned input, computed in the graph.
    """
    from ..evaluation import next_token_scores
    from ..exports.onnx import ONNX_NAME
    from ..passes.onnx import set_prefill_sparse
    from .plan import group_settings

    graph = onnx.load(str(folder / ONNX_NAME), load_external_data=False)
    set_prefill_sparse(graph)
    produced = {name for node in graph.graph.node for name in node.output}
    applied = [(g, l) for g, l in group_settings(plan) if l["target_sparsity"] > 0 and g.name in produced]
    probes = []
    for group, layer in applied:
        name = f"actsparse.eval.{group.targets[0].module}"
        graph.graph.initializer.extend([numpy_helper.from_array(np.array(layer["mode"], np.float32), f"{name}/mode"),
                                        numpy_helper.from_array(np.array(layer["threshold"], np.float32), f"{name}/tau")])
        graph.graph.node.extend([
            onnx.helper.make_node("Sub", [group.name, f"{name}/mode"], [f"{name}/shift"]),
            onnx.helper.make_node("Abs", [f"{name}/shift"], [f"{name}/abs"]),
            onnx.helper.make_node("LessOrEqual", [f"{name}/abs", f"{name}/tau"], [f"{name}/small"]),
            onnx.helper.make_node("Cast", [f"{name}/small"], [f"{name}/share"], to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("ReduceMean", [f"{name}/share"], [f"{name}/pruned"], keepdims=0)])
        probes.append(f"{name}/pruned")
    with_outputs(graph, probes)
    sess = session(graph, folder)
    nll, correct, count, pruned = 0.0, 0, 0, np.zeros(len(probes))
    for row, (logits, *shares) in run_chunks(sess, chunks, "evaluating", ["logits", *probes]):
        row_nll, row_correct = next_token_scores(logits[0], row)
        nll, correct, count = nll + row_nll, correct + row_correct, count + len(row) - 1
        pruned += [float(s) for s in shares]
    measured = {g.name: float(p) / max(len(chunks), 1) for (g, _), p in zip(applied, pruned)}
    return {"nll": nll, "correct": correct, "tokens": count, "measured": measured}


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


def matmul_weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of the constant weight (codes, scales and zero points) of every MatMul at ``path``, by node name."""
    index = Index(onnx.load(str(path), load_external_data=False))
    sizes = {}
    for node in index.model.graph.node:
        tensors = constant_sources(index, node.input[1]) if node.op_type in LINEAR_OPS else None
        if tensors:  # attention's activation MatMuls have no constant weight
            sizes[node.name] = sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                                   for t in tensors)
    return sizes


def time_decode(folder: Path, prompt_tokens: int, decode_tokens: int, threads: int | None = None) -> dict:
    """Median prefill ms of a ``prompt_tokens`` prompt and decode ms/token after it, in ONNX Runtime
    (the KV cache travels from the ``present.*`` outputs back into ``past_key_values.*``)."""
    import time

    from ..exports.onnx import ONNX_NAME

    sess = session(folder / ONNX_NAME, exact=False, threads=threads)  # the runtime's default, as deployed
    names = [o.name for o in sess.get_outputs()]
    vocab = next(o.shape[-1] for o in sess.get_outputs() if o.name == "logits")
    ids = np.random.default_rng(0).integers(0, vocab, (1, prompt_tokens))
    prefill, steps = [], []
    for rep in range(3):  # the first repetition warms up
        start = time.perf_counter()
        outputs = dict(zip(names, sess.run(None, feed(sess.get_inputs(), ids))))
        prefill.append(time.perf_counter() - start)
        for pos in range(prompt_tokens, prompt_tokens + decode_tokens):
            inputs = {"input_ids": outputs["logits"][:, -1:].argmax(-1).astype(np.int64),
                      "attention_mask": np.ones((1, pos + 1), np.int64), "position_ids": np.array([[pos]], np.int64)}
            inputs.update({name.replace("present.", "past_key_values."): value
                           for name, value in outputs.items() if name.startswith("present.")})
            inputs = {arg.name: inputs[arg.name] for arg in sess.get_inputs()}
            start = time.perf_counter()
            outputs = dict(zip(names, sess.run(None, inputs)))
            steps.append(time.perf_counter() - start) if rep else None
    return {"prefill_ms": 1e3 * float(np.median(prefill[1:])), "decode_ms_per_token": 1e3 * float(np.median(steps))}
