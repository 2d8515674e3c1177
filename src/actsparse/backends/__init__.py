"""One interface over the runtimes: every stage of actsparse reaches OpenVINO or ONNX Runtime through a Backend.

Each runtime is one package (``backends/openvino``, ``backends/onnx``) that alone imports that runtime;
:func:`get_backend` imports it on demand, so the ONNX path never loads OpenVINO and the other way round.
This module holds what is known without a runtime: the format names, their model files and weight formats.
"""
from __future__ import annotations

import abc
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .._common import ActSparseError
from ..calibration.plan import read_plan
from ..calibration.stats import StreamingHistogram
from ..calibration.targets import Group, Target


@dataclass(frozen=True)
class Format:
    """A backend as known before its runtime is imported."""

    name: str
    package: str  # the module that implements it
    model_file: str  # its model in an output folder
    weight_formats: tuple[str, ...]

    def check_weight_format(self, weight_format: str) -> None:
        if weight_format not in self.weight_formats:
            raise ActSparseError(f"weight format {weight_format} is not supported with --format {self.name} "
                                 f"(supported: {', '.join(self.weight_formats)})")


# bf16 (OpenVINO): the IR is fp32 and OpenVINO picks the inference precision (bf16 by default on CPUs with
# AVX512-BF16 or AMX); the fused ActSparseMatMul ops store their weights in bf16, half the bytes of fp32.
FORMATS = {f.name: f for f in (
    Format("openvino", "actsparse.backends.openvino", "openvino_model.xml", ("fp32", "bf16", "fp16", "int8", "int4")),
    Format("onnx", "actsparse.backends.onnx", "model.onnx", ("fp32", "int8")),
)}
WEIGHT_FORMATS = tuple(dict.fromkeys(w for f in FORMATS.values() for w in f.weight_formats))


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do on this machine."""

    weight_formats: tuple[str, ...]
    fusion_problem: str | None  # why the ActSparseMatMul op cannot run here, None when it can
    model_error_probes: bool  # model output-error curves (greedy allocation by the model's own error)
    cats: bool  # CATS masks: the SiLU(gate) tensor that masks each down projection
    fp32_runs_in_bf16: bool = False  # the runtime computes an fp32 model in bf16 here (so should fused weights)

    @property
    def fusion(self) -> bool:
        return self.fusion_problem is None


@dataclass
class EvalStep:
    """One evaluated sequence: ``logits`` ``[seq, vocab]`` of a decoder, or the mean-pooled embeddings of an
    encoder (``embedding``) and of the same graph with every channel kept (``dense_embedding``); ``pruned`` is
    the share of ``|x − m| ≤ τ`` on each pruned group's input (by group name)."""

    row: np.ndarray
    pruned: dict[str, float]
    logits: np.ndarray | None = None
    embedding: np.ndarray | None = None
    dense_embedding: np.ndarray | None = None


# settings(group, s) -> (m, τ) of a group at sparsity s, for model_error_curves
Settings = Callable[[Group, float], tuple[float, float]]


class Backend(abc.ABC):
    """The runtime-specific steps of actsparse; everything else (statistics, plans, the export flow) is shared.

    A *graph* is the runtime's in-memory model (``ov.Model``, ``onnx.ModelProto``); a *path* is its file in
    an output folder. Methods raise :class:`ActSparseError` for bad input.
    """

    format: Format

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend can do here (computed once)."""

    @abc.abstractmethod
    def export(self, hf_dir: Path, folder: Path, weight_format: str) -> Path:
        """Export the Hugging Face model ``hf_dir`` with its tokenizer into ``folder``; return the model's path."""

    @abc.abstractmethod
    def read(self, path: Path) -> Any:
        """The graph at ``path``."""

    @abc.abstractmethod
    def find_groups(self, graph: Any, kinds: set[str]) -> list[Group]:
        """The prunable MatMuls of ``graph`` whose kind is in ``kinds``, grouped by input tensor."""

    def cats_sources(self, graph: Any, groups: list[Group]) -> dict[str, str]:
        """For CATS: down-projection group name -> the SiLU(gate) tensor that masks it."""
        raise ActSparseError(f"--method cats is not available with --format {self.format.name}")

    @abc.abstractmethod
    def collect_statistics(self, path: Path, groups: list[Group], chunks: np.ndarray
                           ) -> tuple[dict[str, StreamingHistogram], dict[str, np.ndarray]]:
        """Run ``chunks`` (``[samples, seq]`` token ids) through the model at ``path``: one histogram of each
        group's input, and sample token rows of it (``[rows, K]``) for output-error estimates."""

    @abc.abstractmethod
    def dense_weight(self, graph: Any, target: Target) -> np.ndarray:
        """The target MatMul's weight as f32 ``[K, N]``, decompressed."""

    def model_error_curves(self, path: Path, groups: list[Group], chunks: np.ndarray, settings: Settings,
                           grid: np.ndarray, sources: dict[str, str]) -> dict[str, np.ndarray]:
        """The model's output error with one group alone pruned, at each sparsity of ``grid``
        (only where ``capabilities.model_error_probes``)."""
        raise ActSparseError(f"model error probes are not available with --format {self.format.name}")

    @abc.abstractmethod
    def apply_plan(self, graph: Any, plan: dict, prefill: str) -> dict[str, int]:
        """Insert the plan's shift, mask and folded bias into ``graph``; return counts of what was rewritten."""

    @abc.abstractmethod
    def fuse(self, graph: Any, plan: dict) -> dict[str, int]:
        """Fuse the inserted patterns into ActSparseMatMul ops (only where ``capabilities.fusion``)."""

    @abc.abstractmethod
    def save(self, graph: Any, path: Path) -> None:
        """Write ``graph`` over the model at ``path``."""

    @abc.abstractmethod
    def evaluate(self, folder: Path, plan: dict, chunks: np.ndarray) -> Iterator[EvalStep]:
        """Run every row of ``chunks`` through the model of ``folder`` with every token pruned (prefill
        too), exact f32 numerics, measuring the pruned share of each group of ``plan``."""

    @abc.abstractmethod
    def time_decode(self, folder: Path, prompt_tokens: int, decode_tokens: int, threads: int | None) -> dict:
        """``prefill_ms``, ``decode_ms_per_token`` (medians) and ``inference_precision`` of the model of
        ``folder`` under the runtime's default CPU configuration, in this process."""

    @abc.abstractmethod
    def weight_bytes(self, folder: Path) -> dict[str, int]:
        """Bytes of the constant weight (codes, scales, zero points) of every MatMul of ``folder``, by node."""

    @abc.abstractmethod
    def load(self, folder: Path, plan: dict, device: str, **kwargs) -> Any:
        """The output ``folder`` as an Optimum model, the op registered where the model is fused."""

    def genai_pipeline(self, folder: Path, plan: dict, device: str, batching: bool, **config) -> Any:
        """An openvino-genai ``LLMPipeline`` (or, with ``batching``, a ``ContinuousBatchingPipeline``) for
        ``folder``, the op's library loaded where the model is fused. Only for what :func:`genai_export` accepts."""
        raise NotImplementedError

    def time_genai(self, folder: Path, plan: dict, prompt_tokens: int, decode_tokens: int, threads: int | None) -> dict:
        """As :meth:`time_decode`, through openvino-genai's ``LLMPipeline``: TTFT as ``prefill_ms``, TPOT as
        ``decode_ms_per_token``, from genai's own metrics. Only for what :func:`genai_export` accepts."""
        raise NotImplementedError


def get_backend(format_or_folder: str | os.PathLike) -> Backend:
    """The backend of a format name (``"openvino"``, ``"onnx"``) or of an output folder, by the model it holds."""
    name = os.fspath(format_or_folder)
    if name in FORMATS:
        return importlib.import_module(FORMATS[name].package).BACKEND
    folder = Path(name)
    if isinstance(format_or_folder, str) and os.sep not in name and not folder.exists():
        raise ActSparseError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")
    if not folder.is_dir():
        raise ActSparseError(f"{folder} is not a folder")
    for fmt in FORMATS.values():
        if (folder / fmt.model_file).is_file():
            return get_backend(fmt.name)
    raise ActSparseError(f"{folder} holds no model ({' or '.join(f.model_file for f in FORMATS.values())})")


def genai_export(folder: str | os.PathLike) -> tuple[Backend, dict]:
    """The backend and plan of ``folder`` once it is an export openvino-genai can run (OpenVINO IR with the
    tokenizer IR); otherwise :class:`ActSparseError` in one line."""
    backend = get_backend(folder)
    if backend.format.name != "openvino":
        raise ActSparseError(f"openvino-genai runs OpenVINO exports, and {folder} is a --format "
                             f"{backend.format.name} export")
    if not (Path(folder) / "openvino_tokenizer.xml").is_file():
        raise ActSparseError(f"{folder} has no openvino_tokenizer.xml, which openvino-genai needs: export it "
                             "again with this version of actsparse")
    plan, _ = read_plan(folder, with_statistics=False)
    return backend, plan
