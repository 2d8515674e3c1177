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
from typing import Iterable

import numpy as np

from ._common import ActSparseError
from .backends import EvalStep, get_backend
from .calibration.plan import group_settings, read_plan
from .calibration.text import read_documents, token_chunks


def evaluate(output: str | os.PathLike, text: str = "builtin:wiki", samples: int = 32, seq_len: int = 256) -> dict:
    """Quality and measured sparsity of the output folder ``output`` on ``samples`` sequences of ``seq_len``
    tokens of ``text`` (see the module's docstring)."""
    from transformers import AutoTokenizer

    output = Path(output)
    if not output.is_dir():
        raise ActSparseError(f"{output} is not a folder")
    plan, _ = read_plan(output, with_statistics=False)
    backend = get_backend(output)
    chunks = token_chunks(AutoTokenizer.from_pretrained(output), read_documents(text, "evaluation"), samples, seq_len)
    return {**score(backend.evaluate(output, plan, chunks), plan), "samples": int(len(chunks)), "seq_len": seq_len,
            "text": text}


def score(steps: Iterable[EvalStep], plan: dict) -> dict:
    """Quality and measured sparsity (:func:`sparsity_report`) from a backend's evaluation steps."""
    nll, correct, count, cosines, tokens, pruned, rows = 0.0, 0, 0, [], 0, {}, 0
    for step in steps:
        rows += 1
        tokens += len(step.row)
        for name, share in step.pruned.items():
            pruned[name] = pruned.get(name, 0.0) + share
        if step.logits is None:
            a, b = step.embedding, step.dense_embedding
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
            continue
        row_nll, row_correct = next_token_scores(step.logits, step.row)
        nll, correct, count = nll + row_nll, correct + row_correct, count + len(step.row) - 1
    measured = sparsity_report(plan, {name: share / rows for name, share in pruned.items()})
    if cosines:
        return {"mean_cosine": float(np.mean(cosines)), "min_cosine": float(np.min(cosines)), "tokens": tokens,
                **measured}
    return {"perplexity": float(np.exp(nll / count)), "next_token_accuracy": correct / count, "tokens": count,
            **measured}


def next_token_scores(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Negative log-likelihood and correct argmax predictions of ``ids[1:]`` from ``logits[:-1]``."""
    logits, targets = logits[:-1].astype(np.float64), ids[1:]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted[np.arange(len(targets)), targets] - np.log(np.exp(shifted).sum(axis=-1))
    return -float(log_probs.sum()), int((logits.argmax(axis=-1) == targets).sum())


def sparsity_report(plan: dict, measured: dict[str, float]) -> dict:
    """``sparsity`` (mean per kind) and ``layers`` (per module) from the measured share per group."""
    by_kind: dict[str, list[float]] = {}
    layers = {}
    for group, _ in group_settings(plan):
        if group.name in measured:
            by_kind.setdefault(group.sparsity_kind, []).append(measured[group.name])
            layers.update({t.module: round(measured[group.name], 6) for t in group.targets})
    return {"sparsity": {kind: float(np.mean(v)) for kind, v in by_kind.items()}, "layers": layers}
