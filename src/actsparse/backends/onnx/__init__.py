"""The ONNX backend: export through optimum's exporter, probes and rewrites on ONNX graphs, ONNX Runtime.

Apps that run a fused model themselves use :func:`session_options` (or ``runtime_ext.register_library``).
"""
from __future__ import annotations

import functools
from pathlib import Path

import onnx

from .. import FORMATS, Backend, Capabilities
from . import calibration, export, passes
from .evaluation import evaluate_model
from .graph import matmul_weight_bytes
from .runtime import EXACT_CONFIG, load, onnxruntime_problem, session_options, time_decode

__all__ = ["BACKEND", "EXACT_CONFIG", "OnnxBackend", "evaluate_model", "session_options"]


class OnnxBackend(Backend):
    format = FORMATS["onnx"]

    @functools.cached_property
    def capabilities(self) -> Capabilities:
        return Capabilities(weight_formats=self.format.weight_formats, fusion_problem=onnxruntime_problem(),
                            model_error_probes=False, cats=False)

    def export(self, hf_dir, folder, weight_format):
        return export.export_onnx(hf_dir, folder, weight_format)

    def read(self, path):
        return export.read_onnx(path)

    def find_groups(self, graph, kinds):
        return calibration.find_groups(graph, kinds)

    def collect_statistics(self, path, groups, chunks):
        return calibration.collect_statistics(path, groups, chunks)

    def dense_weight(self, graph, target):
        return calibration.dense_weight(graph, target)

    def apply_plan(self, graph, plan, prefill):
        return passes.apply_plan(graph, plan, prefill)

    def fuse(self, graph, plan):
        return passes.fuse(graph, plan)

    def save(self, graph, path):
        export.save_onnx(graph, path)

    def evaluate(self, folder, plan, chunks):
        return evaluate_model(Path(folder) / self.format.model_file, plan, chunks)

    def time_decode(self, folder, prompt_tokens, decode_tokens, threads):
        return time_decode(Path(folder) / self.format.model_file, prompt_tokens, decode_tokens, threads)

    def weight_bytes(self, folder):
        return matmul_weight_bytes(onnx.load(str(Path(folder) / self.format.model_file), load_external_data=False))

    def load(self, folder, plan, device, **kwargs):
        return load(folder, plan, **kwargs)


BACKEND = OnnxBackend()
