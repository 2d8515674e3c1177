"""Evaluation runs in ONNX Runtime: every token pruned, exact f32, the pruned share measured in the graph."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from ...calibration.plan import group_settings
from .. import EvalStep
from .graph import with_outputs
from .passes import set_prefill_sparse
from .runtime import run_chunks, session


def evaluate_model(path: Path, plan: dict, chunks: np.ndarray) -> Iterator[EvalStep]:
    """Run each row of ``chunks`` through the decoder at ``path`` with prefill pruned too, yielding its logits
    and the share of ``|x − m| ≤ τ`` on each pruned input of ``plan``."""
    graph = onnx.load(str(path), load_external_data=False)
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
    sess = session(graph, path.parent)
    for row, (logits, *shares) in run_chunks(sess, chunks, "evaluating", ["logits", *probes]):
        yield EvalStep(row, {g.name: float(s) for (g, _), s in zip(applied, shares)}, logits=logits[0])
