"""openvino-genai pipelines over an OpenVINO export, with the op's library loaded into genai's Core.

genai reads and compiles the IR itself; the op needs nothing else, so it computes as under ``actsparse.load``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai

from ..._common import ActSparseError
from ...runtime_ext import openvino_extension


def _properties(folder: Path, plan: dict, config: dict) -> dict:
    props = dict(config)
    if plan.get("passes", {}).get("fused"):
        props.setdefault("extensions", [openvino_extension()])
    return props


def llm_pipeline(folder: Path, plan: dict, device: str = "CPU", **config) -> openvino_genai.LLMPipeline:
    """``openvino_genai.LLMPipeline`` for ``folder``; ``config`` holds device properties and genai options
    (``ATTENTION_BACKEND``, ``scheduler_config``, ...), as ``LLMPipeline`` takes them."""
    _check_tokenizer(folder)
    try:
        return openvino_genai.LLMPipeline(str(folder), device, **_properties(folder, plan, config))
    except RuntimeError as err:
        raise ActSparseError(f"openvino-genai cannot load {folder} on {device}: {_first_line(err)}") from None


def batching_pipeline(folder: Path, plan: dict, device: str = "CPU",
                      scheduler_config: openvino_genai.SchedulerConfig | None = None,
                      **config) -> openvino_genai.ContinuousBatchingPipeline:
    """``openvino_genai.ContinuousBatchingPipeline`` for ``folder``, the engine of OpenVINO Model Server.

    Under PagedAttention the tokens of every sequence of a step reach the op as rows of one ``[tokens, 1, K]``
    input, so the op cannot tell a prompt from several sequences' decode steps: a step of one row is a decode
    step (pruned), a step of more rows is computed as the export's ``prefill`` says (dense by default)."""
    _check_tokenizer(folder)
    try:
        return openvino_genai.ContinuousBatchingPipeline(str(folder), scheduler_config or openvino_genai.SchedulerConfig(),
                                                         device, _properties(folder, plan, config))
    except RuntimeError as err:
        raise ActSparseError(f"openvino-genai cannot load {folder} on {device}: {_first_line(err)}") from None


def _check_tokenizer(folder: Path) -> None:
    if not (Path(folder) / "openvino_tokenizer.xml").is_file():
        raise ActSparseError(f"{folder} has no openvino_tokenizer.xml, which openvino-genai needs: export it "
                             "again with this version of actsparse")


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # OpenVINO's messages start with "Exception from src/...:NNN:" lines; the reason is the last line
    return lines[-1] if lines else type(err).__name__


def time_generate(folder: Path, plan: dict, prompt_tokens: int, decode_tokens: int, threads: int | None) -> dict:
    """Median TTFT (``prefill_ms``) and TPOT (``decode_ms_per_token``) from genai's own ``PerfMetrics``, over two
    greedy generations from a ``prompt_tokens`` prompt of random ids after a warm-up, under genai's defaults."""
    pipe = llm_pipeline(folder, plan, "CPU", **({"INFERENCE_NUM_THREADS": threads} if threads else {}))
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = decode_tokens
    vocab = len(pipe.get_tokenizer().get_vocab())
    ids = ov.Tensor(np.random.default_rng(0).integers(0, vocab, (1, prompt_tokens)).astype(np.int64))
    ttft, tpot = [], []
    for rep in range(3):  # the first repetition warms up
        metrics = pipe.generate(ids, config).perf_metrics
        if rep:
            ttft.append(metrics.get_ttft().mean)
            tpot.append(metrics.get_tpot().mean)
    return {"prefill_ms": float(np.median(ttft)), "decode_ms_per_token": float(np.median(tpot)),
            "inference_precision": "genai default", "runtime": "openvino-genai"}
