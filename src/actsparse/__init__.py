"""actsparse: calibrated activation sparsity (SCAP) for LLM decoding on OpenVINO."""
from __future__ import annotations

import os

from ._common import ActSparseError
from .backends import genai_export, get_backend
from .calibration.plan import read_plan
from .evaluation import evaluate
from .pipeline import export

__version__ = "0.1.0"
__all__ = ["ActSparseError", "evaluate", "export", "genai_batching_pipeline", "genai_pipeline", "load"]


def load(output: str | os.PathLike, device: str = "CPU", **kwargs):
    """Load an actsparse output folder as an optimum-intel ``OVModelForCausalLM`` (or, for an ONNX
    output, an optimum ``ORTModelForCausalLM`` on the CPU; ``device`` is then ignored).

    A fused model needs the ActSparseMatMul extension: it is registered with the Cores that optimum-intel reads
    and compiles models with, or with the ONNX Runtime session; the model is otherwise compiled as written, as
    ``core.compile_model`` and openvino-genai compile it. For an ONNX output, ``session_options`` may be your own
    ``onnxruntime.SessionOptions``: the library is registered after the config entries you set there, which
    then reach the ops (``session.qdq_matmulnbits_accuracy_level``, see ``runtime_ext.register_library``).
    """
    plan, _ = read_plan(output, with_statistics=False)
    return get_backend(output).load(output, plan, device, **kwargs)


def genai_pipeline(output: str | os.PathLike, device: str = "CPU", **config):
    """An ``openvino_genai.LLMPipeline`` for an OpenVINO output folder, with the ActSparseMatMul library loaded
    (genai's ``extensions`` property) where the model is fused. ``config``: device properties and genai options,
    as ``LLMPipeline`` takes them; ``backends.openvino.genai`` says how the op meets genai's PagedAttention.
    """
    backend, plan = genai_export(output)
    return backend.genai_pipeline(output, plan, device, batching=False, **config)


def genai_batching_pipeline(output: str | os.PathLike, device: str = "CPU", scheduler_config=None, **config):
    """An ``openvino_genai.ContinuousBatchingPipeline`` (the engine of OpenVINO Model Server) for an OpenVINO
    output folder, as :func:`genai_pipeline`; ``scheduler_config``: an ``openvino_genai.SchedulerConfig``."""
    backend, plan = genai_export(output)
    return backend.genai_pipeline(output, plan, device, batching=True, scheduler_config=scheduler_config, **config)
