"""``actsparse.evaluate``: quality and measured sparsity of an output folder.

Decoders: perplexity and next-token accuracy. Encoders: cosine similarity of mean-pooled
embeddings against the same graph with every channel kept (the dense model).

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

    from .exports.openvino import IR_NAME
    from .runtime_ext import read_model

    output = Path(output)
    if not output.is_dir():
        raise ActSparseError(f"{output} is not a folder")
    plan, _ = read_plan(output, with_statistics=False)
    if (output / "model.onnx").is_file():
        return _evaluate_onnx(output, plan, text, samples, seq_len)
    if not (output / IR_NAME).is_file():
        raise ActSparseError(f"{output} has no {IR_NAME}")
    core = ov.Core()
    return evaluate_model(core, read_model(core, output / IR_NAME), plan, output, text, samples, seq_len)


def next_token_scores(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Negative log-likelihood and correct argmax predictions of ``ids[1:]`` from ``logits[:-1]``."""
    logits, targets = logits[:-1].astype(np.float64), ids[1:]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted[np.arange(len(targets)), targets] - np.log(np.exp(shifted).sum(axis=-1))
    return -float(log_probs.sum()), int((logits.argmax(axis=-1) == targets).sum())


def evaluate_model(core, model, plan: dict, tokenizer_dir: str | os.PathLike, text: str = "builtin:wiki",
                   samples: int = 32, seq_len: int = 256) -> dict:
    """:func:`evaluate` of an OpenVINO ``model`` rewritten by ``plan`` (modified here)."""
    from openvino import opset13 as ops
    from transformers import AutoTokenizer

    from .calibration.openvino_backend import EXACT_CONFIG, feed, run_chunks, tensors_by_name
    from .calibration.text import read_documents, token_chunks
    from .passes.openvino import set_dense, set_prefill_sparse

    set_prefill_sparse(model)
    decoder = any("logits" in o.get_names() for o in model.outputs)
    dense = None if decoder else model.clone()  # an encoder is compared with its own dense twin
    # Measured sparsity: the share of |x − m| ≤ τ on each pruned input, computed in the graph.
    tensors = tensors_by_name(model)
    applied = [(g, l) for g, l in group_settings(plan) if l["target_sparsity"] > 0 and g.name in tensors]
    keeps = {}
    for group, layer in applied:
        x = tensors[layer.get("mask_source") or group.name]
        pruned = ops.less_equal(ops.abs(ops.subtract(x, np.float32(layer["mode"]))), np.float32(layer["threshold"]))
        keeps[group.name] = ops.reduce_mean(ops.convert(pruned, "f32"), ops.constant(np.arange(3)), keep_dims=False)
    first = len(model.outputs)
    model.add_outputs([k.output(0) for k in keeps.values()])
    compiled = core.compile_model(model, "CPU", EXACT_CONFIG)
    if decoder:
        logits_index = next(i for i, o in enumerate(compiled.outputs) if "logits" in o.get_names())
    else:  # an encoder: its embeddings are compared with those of the same graph with every channel kept
        set_dense(dense)
        dense = core.compile_model(dense, "CPU", EXACT_CONFIG).create_infer_request()
        hidden = next(i for i, o in enumerate(compiled.outputs) if "last_hidden_state" in o.get_names())

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chunks = token_chunks(tokenizer, read_documents(text, "evaluation"), samples, seq_len)
    nll, correct, count, cosines = 0.0, 0, 0, []
    pruned_share = np.zeros(len(keeps))
    for row, request in run_chunks(compiled, chunks, "evaluating"):
        pruned_share += [float(request.get_output_tensor(first + i).data) for i in range(len(keeps))]
        if not decoder:  # mean-pooled embeddings (every token is real: no padding)
            sparse = request.get_output_tensor(hidden).data[0].mean(axis=0, dtype=np.float64)
            reference = dense.infer(feed([i.get_any_name() for i in compiled.inputs], row[None]))
            reference = reference["last_hidden_state"][0].mean(axis=0, dtype=np.float64)
            cosines.append(float(sparse @ reference / (np.linalg.norm(sparse) * np.linalg.norm(reference))))
            continue
        row_nll, row_correct = next_token_scores(request.get_output_tensor(logits_index).data[0], row)
        nll, correct, count = nll + row_nll, correct + row_correct, count + len(row) - 1

    measured = sparsity_report(plan, dict(zip(keeps, pruned_share / len(chunks))))
    quality = ({"perplexity": float(np.exp(nll / count)), "next_token_accuracy": correct / count, "tokens": count}
               if decoder else {"mean_cosine": float(np.mean(cosines)), "min_cosine": float(np.min(cosines)),
                                "tokens": int(chunks.size)})
    return {**quality, "samples": int(len(chunks)), "seq_len": seq_len, "text": text, **measured}


def sparsity_report(plan: dict, measured: dict[str, float]) -> dict:
    """``sparsity`` (mean per kind) and ``layers`` (per module) from the measured share per group."""
    by_kind: dict[str, list[float]] = {}
    layers = {}
    for group, _ in group_settings(plan):
        if group.name in measured:
            by_kind.setdefault(group.sparsity_kind, []).append(measured[group.name])
            layers.update({t.module: round(measured[group.name], 6) for t in group.targets})
    return {"sparsity": {kind: float(np.mean(v)) for kind, v in by_kind.items()}, "layers": layers}


def _evaluate_onnx(output: Path, plan: dict, text: str, samples: int, seq_len: int) -> dict:
    """:func:`evaluate` of an ONNX output, run by ONNX Runtime."""
    from transformers import AutoTokenizer

    from .calibration.onnx_backend import evaluate as run
    from .calibration.text import read_documents, token_chunks

    chunks = token_chunks(AutoTokenizer.from_pretrained(output), read_documents(text, "evaluation"), samples, seq_len)
    result = run(output, plan, chunks)
    return {"perplexity": float(np.exp(result["nll"] / result["tokens"])),
            "next_token_accuracy": result["correct"] / result["tokens"], "tokens": result["tokens"],
            "samples": int(len(chunks)), "seq_len": seq_len, "text": text,
            **sparsity_report(plan, result["measured"])}
