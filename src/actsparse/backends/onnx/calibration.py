"""Calibration on ONNX: find target MatMuls in an ONNX graph and probe their inputs with ONNX Runtime."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx

from ...calibration.stats import SAMPLE_ROWS, RowSampler, StreamingHistogram
from ...calibration.targets import Group, Target, group_targets, kind_of
from .graph import LINEAR_OPS, Index, dequantized, read_weight, weight_tensors, with_outputs
from .runtime import run_chunks, session

log = logging.getLogger("actsparse")

# Node names from torch's ONNX exporter (via optimum): "/model/layers.0/mlp/down_proj/MatMul"; GPT-2's
# Conv1D (addmm) becomes "/transformer/h.0/mlp/c_fc/Gemm" on the input flattened to [tokens, K].
_MODULE_RE = re.compile(r"^/(?P<scope>[\w./]+)/(?:MatMul|Gemm)(?:_\d+)?$")


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
