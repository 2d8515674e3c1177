"""actsparse: calibrated activation sparsity (SCAP) for LLM decoding on OpenVINO."""
from __future__ import annotations

import os

from ._common import ActSparseError

__version__ = "0.1.0"
__all__ = ["ActSparseError", "evaluate", "export", "load"]


def export(model: str, output: str | os.PathLike, **options):
    """Export ``model`` with calibrated activation sparsity; see :func:`actsparse.pipeline.export`."""
    from .pipeline import export as _export

    return _export(model, output, **options)


def evaluate(output: str | os.PathLike, **options) -> dict:
    """Perplexity and measured sparsity; see :func:`actsparse.evaluation.evaluate`."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(output, **options)


def load(output: str | os.PathLike, device: str = "CPU", **kwargs):
    """Load an actsparse output folder as an optimum-intel ``OVModelForCausalLM`` (or, for an ONNX
    output, an optimum ``ORTModelForCausalLM`` on the CPU; ``device`` is then ignored).

    A fused model needs the ActSparseMatMul extension: it is registered with the Cores that
    optimum-intel reads and compiles models with, or with the ONNX Runtime session. Where OpenVINO
    will run the model in bf16, its ops take and return bf16 (``runtime_ext.bf16_activations``); where it
    quantises the activations of its own int8/int4 FullyConnected (its default), so do the ops with such weights
    (``runtime_ext.int8_activations``). For an ONNX output, ``session_options`` may be your own
    ``onnxruntime.SessionOptions``: the library is registered after the config entries you set there, which
    then reach the ops (``session.qdq_matmulnbits_accuracy_level``, see ``runtime_ext.register_library``).
    """
    from pathlib import Path

    from .calibration.plan import read_plan
    from .runtime_ext import (bf16_activations, int8_activations, quantises_activations, register, register_library,
                              runs_in_bf16, session_options)

    plan, _ = read_plan(output, with_statistics=False)
    if (Path(output) / "model.onnx").is_file():
        from optimum.onnxruntime import ORTModelForCausalLM

        options = kwargs.pop("session_options", None)
        if plan.get("passes", {}).get("fused"):
            options = session_options() if options is None else register_library(options)
        return ORTModelForCausalLM.from_pretrained(output, session_options=options, **kwargs)
    from optimum.intel import OVModelForCausalLM
    from optimum.intel.openvino import modeling_base, modeling_decoder

    if not plan.get("passes", {}).get("fused"):
        return OVModelForCausalLM.from_pretrained(output, device=device, **kwargs)
    for core in {id(m.core): m.core for m in (modeling_base, modeling_decoder)}.values():
        register(core)
    if kwargs.get("compile_only"):
        return OVModelForCausalLM.from_pretrained(output, device=device, **kwargs)
    compile_now = kwargs.pop("compile", True)
    model = OVModelForCausalLM.from_pretrained(output, device=device, compile=False, **kwargs)
    if runs_in_bf16(modeling_base.core, model._device, model.ov_config):
        bf16_activations(model.model)
    int8_activations(model.model, quantises_activations(modeling_base.core, model._device, model.ov_config))
    if compile_now:
        model.compile()
    return model
