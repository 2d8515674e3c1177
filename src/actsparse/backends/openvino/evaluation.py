"""Evaluation runs on OpenVINO: every token pruned, exact f32, the pruned share measured in the graph."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from ...calibration.plan import group_settings
from ...runtime_ext import OP_TYPE
from .. import EvalStep
from .graph import EXACT_CONFIG, tensors_by_name
from .mlp import skip_convert, split_mlp
from .passes import set_dense, set_prefill_sparse
from .runtime import feed, run_chunks


def evaluate_model(core: ov.Core, model: ov.Model, plan: dict, chunks: np.ndarray) -> Iterator[EvalStep]:
    """Run each row of ``chunks`` through ``model`` (rewritten by ``plan``; modified here) with prefill pruned
    too. A decoder yields its logits; an encoder its mean-pooled embeddings and those of the same graph
    with every channel kept (the dense model)."""
    split_mlp(model)  # down's input is inside an ActSparseMLP: back between two ops, it can be read
    set_prefill_sparse(model)
    decoder = any("logits" in o.get_names() for o in model.outputs)
    dense = None if decoder else model.clone()
    tensors = tensors_by_name(model)
    # a fused op's x where its MLP's intermediate no longer carries the name it had (split_mlp)
    tensors.update({f"{op.get_friendly_name()}:x": skip_convert(op.input_value(0)) for op in model.get_ordered_ops()
                    if op.get_type_name() == OP_TYPE})

    def source(group, layer):
        fused = f"actsparse.{group.targets[0].module}/{OP_TYPE}:x"
        return layer.get("mask_source") or (group.name if group.name in tensors else fused)

    applied = [(g, l) for g, l in group_settings(plan) if l["target_sparsity"] > 0 and source(g, l) in tensors]
    shares = []
    for group, layer in applied:
        x = tensors[source(group, layer)]
        pruned = ops.less_equal(ops.abs(ops.subtract(x, np.float32(layer["mode"]))), np.float32(layer["threshold"]))
        shares.append(ops.reduce_mean(ops.convert(pruned, "f32"), ops.constant(np.arange(3)), keep_dims=False))
    first = len(model.outputs)
    model.add_outputs([s.output(0) for s in shares])
    compiled = core.compile_model(model, "CPU", EXACT_CONFIG)
    names = [i.get_any_name() for i in compiled.inputs]
    if decoder:
        output = next(i for i, o in enumerate(compiled.outputs) if "logits" in o.get_names())
    else:
        set_dense(dense)
        dense = core.compile_model(dense, "CPU", EXACT_CONFIG).create_infer_request()
        output = next(i for i, o in enumerate(compiled.outputs) if "last_hidden_state" in o.get_names())
    for row, request in run_chunks(compiled, chunks, "evaluating"):
        pruned = {g.name: float(request.get_output_tensor(first + i).data) for i, (g, _) in enumerate(applied)}
        y = request.get_output_tensor(output).data[0]
        if decoder:
            yield EvalStep(row, pruned, logits=y)
            continue
        # mean-pooled embeddings (every token is real: no padding)
        reference = dense.infer(feed(names, row[None]))["last_hidden_state"][0]
        yield EvalStep(row, pruned, embedding=y.mean(axis=0, dtype=np.float64),
                       dense_embedding=reference.mean(axis=0, dtype=np.float64))
