"""The OpenVINO backend: IR export through optimum-intel, probes and rewrites on ``ov.Model``, the CPU plugin.

Apps that run a fused IR themselves add ``runtime_ext.openvino_extension()`` to their Core (or to openvino-genai's
``extensions``) and compile it as any IR; :func:`prepare` first saves two Reorders per op call where the device
runs bf16.
"""
from __future__ import annotations

import functools
from pathlib import Path

import openvino as ov

from .. import FORMATS, Backend, Capabilities
from . import calibration, export, fuse, genai, passes
from .evaluation import evaluate_model
from .graph import matmul_weight_bytes
from .runtime import (bf16_activations, cpu_runs_bf16, extension_problem, int8_activations, load, prepare, read_model,
                      runs_in_bf16, time_decode)

__all__ = ["BACKEND", "OpenVINOBackend", "bf16_activations", "evaluate_model", "int8_activations", "prepare",
           "read_model", "runs_in_bf16"]


class OpenVINOBackend(Backend):
    format = FORMATS["openvino"]

    @functools.cached_property
    def capabilities(self) -> Capabilities:
        return Capabilities(weight_formats=self.format.weight_formats, fusion_problem=extension_problem(),
                            model_error_probes=True, cats=True, fp32_runs_in_bf16=cpu_runs_bf16())

    def export(self, hf_dir, folder, weight_format):
        return export.export_openvino(hf_dir, folder, weight_format)

    def read(self, path):
        return read_model(ov.Core(), path)

    def find_groups(self, graph, kinds):
        return calibration.find_groups(graph, kinds)

    def cats_sources(self, graph, groups):
        return calibration.cats_sources(graph, groups)

    def collect_statistics(self, path, groups, chunks):
        return calibration.collect_statistics(path, groups, chunks)

    def dense_weight(self, graph, target):
        return calibration.dense_weight(graph, target)

    def model_error_curves(self, path, groups, chunks, settings, grid, sources):
        return calibration.model_error_curves(path, groups, chunks, settings, grid, sources)

    def apply_plan(self, graph, plan, prefill):
        return passes.apply_plan(graph, plan, prefill)

    def fuse(self, graph, plan):
        return fuse.fuse(graph, plan)

    def save(self, graph, path):
        export.save_ir_over(graph, path)

    def evaluate(self, folder, plan, chunks):
        core = ov.Core()
        return evaluate_model(core, read_model(core, Path(folder) / self.format.model_file), plan, chunks)

    def time_decode(self, folder, prompt_tokens, decode_tokens, threads):
        return time_decode(Path(folder) / self.format.model_file, prompt_tokens, decode_tokens, threads)

    def weight_bytes(self, folder):
        return matmul_weight_bytes(ov.Core().read_model(Path(folder) / self.format.model_file))

    def load(self, folder, plan, device, **kwargs):
        return load(folder, plan, device, **kwargs)

    def time_genai(self, folder, plan, prompt_tokens, decode_tokens, threads):
        return genai.time_generate(Path(folder), plan, prompt_tokens, decode_tokens, threads)

    def genai_pipeline(self, folder, plan, device, batching, **config):
        if batching:
            return genai.batching_pipeline(Path(folder), plan, device, **config)
        return genai.llm_pipeline(Path(folder), plan, device, **config)


BACKEND = OpenVINOBackend()
