"""Export a Hugging Face folder to ONNX through optimum's exporter, and save rewritten graphs.

Every ONNX output has one layout whatever its size: ``model.onnx`` (the graph) beside
``model.onnx_data`` (every initializer over 1 KiB), so models over protobuf's 2 GB limit need no
special case, and ONNX Runtime, optimum and OpenVINO's ONNX frontend all read it as it is.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..._common import ActSparseError, stage
from .. import FORMATS
from .graph import Index, gemm_refusal

ONNX_NAME = FORMATS["onnx"].model_file
ONNX_DATA = "model.onnx_data"


def export_onnx(hf_dir: Path, output: Path, weight_format: str = "fp32",
                task: str = "text-generation-with-past") -> Path:
    """Write ``model.onnx`` (+ data), tokenizer and configs into ``output``; return the model path."""
    FORMATS["onnx"].check_weight_format(weight_format)
    from optimum.exporters.onnx import main_export
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("optimum").setLevel(logging.ERROR)
            # validation re-runs the model in torch and ORT; our tests compare against torch themselves
            with stage("optimum export"):
                main_export(str(hf_dir), output, task=task, do_validation=False)
    except Exception as err:  # optimum and transformers raise many kinds for a bad model folder
        raise ActSparseError(f"cannot export {hf_dir}: {(str(err).strip().splitlines() or [type(err).__name__])[0]}") from err
    path = output / ONNX_NAME
    if not path.is_file():
        raise ActSparseError(f"optimum wrote no {ONNX_NAME} for {hf_dir}")
    if weight_format == "int8":
        with stage("compress int8"):
            model = read_onnx(path)
            compress_int8(model)
            save_onnx(model, path)
    return path


def compress_int8(model) -> int:
    """Quantize every private f32 MatMul (or Gemm) weight ``W [K, N]`` to u8 codes per output channel,
    asymmetric like NNCF's INT8_ASYM, dequantized in the graph: ``W ≈ (q − zp)·scale``,
    ``scale = (max − min)/255`` over the channel's range widened to hold 0. Returns how many."""
    index, replaced, added, nodes = Index(model), set(), [], []
    for node in model.graph.node:
        nodes.append(node)
        linear = node.op_type == "MatMul" or (node.op_type == "Gemm" and not gemm_refusal(index, node))
        name = node.input[1] if linear else None
        weight = index.inits.get(name)
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT or not index.private(name):
            continue
        w = numpy_helper.to_array(weight)
        lo, hi = np.minimum(w.min(axis=0), 0), np.maximum(w.max(axis=0), 0)
        scale = np.where(hi > lo, (hi - lo) / 255, 1).astype(np.float32)
        zero_point = np.clip(np.round(-lo / scale), 0, 255)
        codes = np.clip(np.round(w / scale) + zero_point, 0, 255).astype(np.uint8)
        added += [numpy_helper.from_array(codes, f"{name}/codes"), numpy_helper.from_array(scale, f"{name}/scale"),
                  numpy_helper.from_array(zero_point.astype(np.uint8), f"{name}/zero_point")]
        node.input[1] = f"{name}/dequantized"
        nodes.insert(-1, helper.make_node("DequantizeLinear", [f"{name}/codes", f"{name}/scale", f"{name}/zero_point"],
                                          [node.input[1]], name=f"{node.name}/DequantizeLinear", axis=1))
        replaced.add(name)
    kept = [init for init in model.graph.initializer if init.name not in replaced] + added
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)
    return len(replaced)


def read_onnx(path: str | Path):
    """The ``ModelProto`` at ``path`` with its external data loaded into memory."""
    return onnx.load(str(path))


def save_onnx(model, path: str | Path) -> None:
    """Save ``model`` over ``path`` in the one layout: graph + ``model.onnx_data`` beside it."""
    path = Path(path)
    data = path.with_name(ONNX_DATA)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file; ``model`` holds every weight in memory
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates the data file owner-only
