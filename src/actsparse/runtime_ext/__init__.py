"""Finds the built ActSparseMatMul libraries and registers them with an OpenVINO Core or ONNX Runtime
session options; imports neither runtime (their backends, ``actsparse.backends``, do).

The op type and its namespaces are one constant each, shared with the C++ sources
(``OPENVINO_OP("ActSparseMatMul", "actsparse")`` and the ONNX-frontend mapping).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from .._common import ActSparseError

OP_TYPE = "ActSparseMatMul"
MLP_TYPE = "ActSparseMLP"  # OpenVINO only: a layer's whole MLP, two ActSparseMatMuls and the activation
# Each op's projections, by the prefix of their attributes (ActSparseMLP: up_weight_format, down_threshold, ...).
PROJECTIONS = {OP_TYPE: ("",), MLP_TYPE: ("up_", "down_")}
OPENVINO_OPSET = "actsparse"
ONNX_DOMAIN = "ai.actsparse"
OPENVINO_LIBRARY = "libactsparse_openvino.so"


def library_path(name: str, what: str, remedy: str) -> Path:
    """Path of the built library ``name``: in ``$ACTSPARSE_EXT_DIR`` (a development build) if set, else in this
    package's folders. An editable install keeps the sources in the checkout and installs the built libraries
    into site-packages; both folders are on ``__path__``, so it is searched whole."""
    env = os.environ.get("ACTSPARSE_EXT_DIR")
    folders = [Path(env)] if env else [Path(folder) for folder in __path__]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise ActSparseError(f"the ActSparseMatMul {what} {name} was not built (looked in "
                         f"{', '.join(map(str, folders))}); {remedy}")


def openvino_extension() -> str:
    """Path of the OpenVINO extension library, for ``core.add_extension``."""
    return str(library_path(OPENVINO_LIBRARY, "OpenVINO extension",
                            "reinstall actsparse with a C++17 compiler available"))


GPU_CONFIG = Path(__file__).with_name("gpu") / "actsparse_gpu.xml"


def gpu_config() -> str:
    """Path of the GPU plugin's custom-layer config for the op (its OpenCL kernel beside it), for
    ``core.set_property("GPU", {"CONFIG_FILE": ...})``."""
    return str(GPU_CONFIG)


_pinned = {}  # libraries held open for the life of the process


def register(core) -> None:
    """Add the extension to an ``ov.Core`` (adding it twice is harmless).

    The library is also held open here: a Core unloads its extensions when it is destroyed,
    and a node of the op that outlives that Core (a model, an output held in Python) would
    then run its destructor from unmapped code.
    """
    path = openvino_extension()
    try:
        if path not in _pinned:
            _pinned[path] = ctypes.CDLL(path)
        core.add_extension(path)
    except Exception as err:  # a library built against another OpenVINO fails to load
        raise ActSparseError(f"cannot load {path} into OpenVINO: {str(err).strip().splitlines()[-1]}") from None


ONNXRUNTIME_LIBRARY = "libactsparse_onnxruntime.so"


def onnxruntime_library() -> str:
    """Path of the ONNX Runtime custom-op library, for ``SessionOptions.register_custom_ops_library``."""
    return str(library_path(ONNXRUNTIME_LIBRARY, "ONNX Runtime library", "reinstall actsparse with a C++17 "
                            "compiler and apt-get (or ORT_INCLUDE_DIR) available"))


def register_library(options):
    """Register the custom-op library with ``options`` (an ``onnxruntime.SessionOptions``) and return them.

    The library reads the options' config when it is registered, so entries added afterwards do not reach
    the ops: ``session.qdq_matmulnbits_accuracy_level`` other than 4 (ORT's default, which quantises the
    activations of ORT's own int8/int4 MatMuls to int8, and so then do the ops with u8/u4 weights) keeps them f32.
    """
    path = onnxruntime_library()
    try:
        options.register_custom_ops_library(path)
    except Exception as err:  # e.g. a runtime older than the headers the library was built with
        raise ActSparseError(f"cannot load {path} into ONNX Runtime: {str(err).strip().splitlines()[-1]}") from None
    return options
