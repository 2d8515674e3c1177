"""Running models in ONNX Runtime: sessions with the op's library, feeding optimum's graphs, decoding."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
from tqdm.auto import tqdm

from ..._common import ActSparseError
from ...runtime_ext import register_library
from .graph import uses_custom_op

# ORT fuses DequantizeLinear → MatMul into MatMulNBits, which by default quantizes its input to int8:
# accuracy level 1 keeps it f32, so int8 weights change nothing but the weights.
EXACT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def onnxruntime_problem() -> str | None:
    """Why the ONNX Runtime custom-op library cannot be used here, or None."""
    try:
        session_options()
    except ActSparseError as err:
        return str(err)
    return None


def session_options(threads: int | None = None, config: dict[str, str] | None = None, library: bool = True):
    """An ``onnxruntime.SessionOptions`` with the custom-op library registered (:func:`register_library`), for
    sessions over models that use ai.actsparse::ActSparseMatMul; ``threads`` intra-op threads and the session
    ``config`` entries when given, set before the library. ``library=False``: the same options without it.
    """
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return register_library(options) if library else options


def load(folder: Path, plan: dict, **kwargs):
    """``folder`` as an optimum ``ORTModelForCausalLM`` on the CPU; see :func:`actsparse.load`."""
    from optimum.onnxruntime import ORTModelForCausalLM

    options = kwargs.pop("session_options", None)
    if plan.get("passes", {}).get("fused"):
        options = session_options() if options is None else register_library(options)
    return ORTModelForCausalLM.from_pretrained(folder, session_options=options, **kwargs)


def session(model: onnx.ModelProto | str | Path, folder: str | Path | None = None, exact: bool = True,
            threads: int | None = None):
    """An ORT CPU session of ``model`` (a proto whose external data, if any, lies in ``folder``, or a path),
    with the custom-op library where the graph has ActSparseMatMul nodes.

    ``exact``: f32 arithmetic throughout (:data:`EXACT_CONFIG`), as calibration and evaluation need; else the
    runtime's defaults, as deployed. ``threads``: intra-op threads (ORT's default when None).
    """
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


def time_decode(path: Path, prompt_tokens: int, decode_tokens: int, threads: int | None = None) -> dict:
    """Median prefill ms of a ``prompt_tokens`` prompt and decode ms/token after it, in ONNX Runtime
    (the KV cache travels from the ``present.*`` outputs back into ``past_key_values.*``)."""
    sess = session(path, exact=False, threads=threads)  # the runtime's default, as deployed
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
    # ORT's defaults: int8 weights (behind DequantizeLinear, which MatMulNBits absorbs) meet int8 activations
    int8 = any(node.op_type == "DequantizeLinear" for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {"prefill_ms": 1e3 * float(np.median(prefill[1:])), "decode_ms_per_token": 1e3 * float(np.median(steps)),
            "inference_precision": "f32, int8 activations at int8 weights" if int8 else "f32"}
