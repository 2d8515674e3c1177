"""``actsparse.evaluate``: perplexity, next-token accuracy and measured sparsity of an output folder.

The paper's protocol: every token is pruned, prefill included, whatever the export's
prefill policy, so the figures are the conservative ones. Numerics are exact f32
(no dynamic quantization, f32 KV cache), so dense and sparse differ only by the pruning.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._common import ActSparseError
from .calibration.plan import group_settings, read_plan


def evaluate(output: str | os.PathLike, text: str = "builtin:wiki", samples: int = 32, seq_len: int = 256) -> dict:
    import openvino as ov
    from openvino import opset13 as ops
    from transformers import AutoTokenizer

    from .calibration.openvino_backend import EXACT_CONFIG, run_chunks, tensors_by_name
    from .calibration.text import read_documents, token_chunks
    from .exports.openvino import IR_NAME
    from .passes.openvino import set_prefill_sparse
    from .runtime_ext import read_model

    output = Path(output)
    if not output.is_dir():
        raise ActSparseError(f"{output} is not a folder")
    plan, _ = read_plan(output, with_statistics=False)
    if not (output / IR_NAME).is_file():
        raise ActSparseError(f"{output} has no {IR_NAME}")
    core = ov.Core()
    model = read_model(core, output / IR_NAME)
    set_prefill_sparse(model)
    # Measured sparsity: the share of |x − m| ≤ τ on each pruned input, computed in the graph.
    tensors = tensors_by_name(model)
    applied = [(g, l) for g, l in group_settings(plan) if l["target_sparsity"] > 0 and g.name in tensors]
    keeps = {}
    for group, layer in applied:
        x = tensors[group.name]
        pruned = ops.less_equal(ops.abs(ops.subtract(x, np.float32(layer["mode"]))), np.float32(layer["threshold"]))
        keeps[group.name] = ops.reduce_mean(ops.convert(pruned, "f32"), ops.constant(np.arange(3)), keep_dims=False)
    first = len(model.outputs)
    model.add_outputs([k.output(0) for k in keeps.values()])
    compiled = core.compile_model(model, "CPU", EXACT_CONFIG)
    logits_index = next(i for i, o in enumerate(compiled.outputs) if "logits" in o.get_names())

    tokenizer = AutoTokenizer.from_pretrained(output)
    chunks = token_chunks(tokenizer, read_documents(text, "evaluation"), samples, seq_len)
    nll, correct, count = 0.0, 0, 0
    pruned_share = np.zeros(len(keeps))
    for row, request in run_chunks(compiled, chunks, "evaluating"):
        logits = request.get_output_tensor(logits_index).data[0, :-1].astype(np.float64)
        targets = row[1:]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted[np.arange(len(targets)), targets] - np.log(np.exp(shifted).sum(axis=-1))
        nll -= float(log_probs.sum())
        correct += int((logits.argmax(axis=-1) == targets).sum())
        count += len(targets)
        pruned_share += [float(request.get_output_tensor(first + i).data) for i in range(len(keeps))]

    measured = dict(zip(keeps, pruned_share / len(chunks)))
    by_kind: dict[str, list[float]] = {}
    layers = {}
    for group, _ in applied:
        if group.name in measured:
            by_kind.setdefault(group.sparsity_kind, []).append(measured[group.name])
            for target in group.targets:
                layers[target.module] = round(measured[group.name], 6)
    return {"perplexity": float(np.exp(nll / count)), "next_token_accuracy": correct / count, "tokens": count,
            "samples": int(len(chunks)), "seq_len": seq_len, "text": text,
            "sparsity": {kind: float(np.mean(v)) for kind, v in by_kind.items()}, "layers": layers}
