"""openvino-genai pipelines over an OpenVINO export, with the op's library loaded into genai's Core.

genai reads the IR itself. Where the device runs the graph in bf16, the pipeline reads a copy of the IR text
whose ops sit between bf16 Converts, as ``actsparse.load`` puts them (``runtime.prepare``): the op
computes the same without them, but the plugin then puts a Reorder on each side of every op call.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai

from ..._common import ActSparseError
from ...runtime_ext import openvino_extension
from .runtime import bf16_activations_ir, runs_in_bf16


def _pipeline(make, folder: Path, plan: dict, device: str, config: dict):
    """``make(path, properties)``: the pipeline, built from ``folder`` or, where the device runs the graph in bf16,
    from a temporary folder of links to its files but for an IR with the ops between bf16 Converts (genai reads
    it while the pipeline is built). The op's library goes into ``extensions`` where the model is fused."""
    fused = plan.get("passes", {}).get("fused")
    props = {**({"extensions": [openvino_extension()]} if fused else {}), **config}
    try:
        with contextlib.ExitStack() as stack:
            path = Path(folder)
            if fused and runs_in_bf16(ov.Core(), device, config):
                path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="actsparse-genai-")))
                for file in Path(folder).iterdir():
                    if file.name != "openvino_model.xml":
                        (path / file.name).symlink_to(file.resolve())
                (path / "openvino_model.xml").write_text(
                    bf16_activations_ir((Path(folder) / "openvino_model.xml").read_text()))
            return make(str(path), props)
    except RuntimeError as err:  # OpenVINO's message ends with the reason, after lines of source locations
        raise ActSparseError(f"openvino-genai cannot load {folder} on {device}: {str(err).strip().splitlines()[-1]}"
                             ) from None


def llm_pipeline(folder: Path, plan: dict, device: str = "CPU", **config) -> openvino_genai.LLMPipeline:
    """``openvino_genai.LLMPipeline`` for ``folder``; ``config`` holds device properties and genai options
    (``ATTENTION_BACKEND``, ``scheduler_config``, ...), as ``LLMPipeline`` takes them."""
    return _pipeline(lambda path, props: openvino_genai.LLMPipeline(path, device, **props), folder, plan, device, config)


def batching_pipeline(folder: Path, plan: dict, device: str = "CPU",
                      scheduler_config: openvino_genai.SchedulerConfig | None = None,
                      **config) -> openvino_genai.ContinuousBatchingPipeline:
    """``openvino_genai.ContinuousBatchingPipeline`` for ``folder``, the engine of OpenVINO Model Server.

    Under PagedAttention the tokens of every sequence of a step reach the op as rows of one ``[tokens, 1, K]``
    input, so the op cannot tell a prompt from several sequences' decode steps: a step of one row is a decode
    step (pruned), a step of more rows is computed as the export's ``prefill`` says (dense by default)."""
    scheduler = scheduler_config or openvino_genai.SchedulerConfig()
    return _pipeline(lambda path, props: openvino_genai.ContinuousBatchingPipeline(path, scheduler, device, props),
                     folder, plan, device, config)


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
