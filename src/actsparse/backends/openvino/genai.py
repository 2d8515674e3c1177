"""openvino-genai pipelines over an OpenVINO export, with the op's library loaded into genai's Core.

genai reads the IR itself. Where the device runs the graph in bf16, the pipeline reads a copy of the IR text
whose ops sit between bf16 Converts, as ``actsparse.load`` puts them (``runtime.bf16_activations``): the op
computes the same without them, but the plugin then puts a Reorder on each side of every op call.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import openvino as ov
import openvino_genai

from ..._common import ActSparseError
from ...runtime_ext import openvino_extension
from .runtime import bf16_activations_ir, runs_in_bf16


def _properties(folder: Path, plan: dict, config: dict) -> dict:
    props = dict(config)
    if plan.get("passes", {}).get("fused"):
        props.setdefault("extensions", [openvino_extension()])
    return props


@contextlib.contextmanager
def _as_compiled(folder: Path, plan: dict, device: str, config: dict) -> Iterator[Path]:
    """``folder``, or where the device runs the graph in bf16, a temporary folder of links to its files but
    for an IR with the ops between bf16 Converts. genai reads it while the pipeline is built."""
    _check_tokenizer(folder)
    if not (plan.get("passes", {}).get("fused") and runs_in_bf16(ov.Core(), device, config)):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="actsparse-genai-") as tmp:
        for path in Path(folder).iterdir():
            if path.name != "openvino_model.xml":
                (Path(tmp) / path.name).symlink_to(path.resolve())
        (Path(tmp) / "openvino_model.xml").write_text(
            bf16_activations_ir((Path(folder) / "openvino_model.xml").read_text()))
        yield Path(tmp)


def llm_pipeline(folder: Path, plan: dict, device: str = "CPU", **config) -> openvino_genai.LLMPipeline:
    """``openvino_genai.LLMPipeline`` for ``folder``; ``config`` holds device properties and genai options
    (``ATTENTION_BACKEND``, ``scheduler_config``, ...), as ``LLMPipeline`` takes them."""
    try:
        with _as_compiled(folder, plan, device, config) as path:
            return openvino_genai.LLMPipeline(str(path), device, **_properties(folder, plan, config))
    except RuntimeError as err:
        raise ActSparseError(f"openvino-genai cannot load {folder} on {device}: {_first_line(err)}") from None


def batching_pipeline(folder: Path, plan: dict, device: str = "CPU",
                      scheduler_config: openvino_genai.SchedulerConfig | None = None,
                      **config) -> openvino_genai.ContinuousBatchingPipeline:
    """``openvino_genai.ContinuousBatchingPipeline`` for ``folder``, the engine of OpenVINO Model Server.

    Under PagedAttention the tokens of every sequence of a step reach the op as rows of one ``[tokens, 1, K]``
    input, so the op cannot tell a prompt from several sequences' decode steps: a step of one row is a decode
    step (pruned), a step of more rows is computed as the export's ``prefill`` says (dense by default)."""
    try:
        with _as_compiled(folder, plan, device, config) as path:
            return openvino_genai.ContinuousBatchingPipeline(str(path), scheduler_config or openvino_genai.SchedulerConfig(),
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
    rng = np.random.default_rng(0)
    ttft, tpot = [], []
    for rep in range(3):  # the first repetition warms up
        # a new prompt each time: genai's prefix cache would otherwise skip a repeated prompt's prefill
        ids = ov.Tensor(rng.integers(0, vocab, (1, prompt_tokens)).astype(np.int64))
        metrics = pipe.generate(ids, config).perf_metrics
        if rep:
            ttft.append(metrics.get_ttft().mean)
            tpot.append(metrics.get_tpot().mean)
    return {"prefill_ms": float(np.median(ttft)), "decode_ms_per_token": float(np.median(tpot)),
            "inference_precision": "genai default", "runtime": "openvino-genai"}
