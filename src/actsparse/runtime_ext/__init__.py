"""Finds the built ActSparseMatMul libraries and registers them with OpenVINO (no Optimum here).

The op type and its namespaces are one constant each, shared with the C++ sources
(``OPENVINO_OP("ActSparseMatMul", "actsparse")`` and the ONNX-frontend mapping).
"""
from __future__ import annotations

import os
from pathlib import Path

from .._common import ActSparseError

OP_TYPE = "ActSparseMatMul"
OPENVINO_OPSET = "actsparse"
ONNX_DOMAIN = "ai.actsparse"
OPENVINO_LIBRARY = "libactsparse_openvino.so"


def library_dir() -> Path:
    """``$ACTSPARSE_EXT_DIR`` (a development build) or this package's folder (the installed wheel)."""
    return Path(os.environ.get("ACTSPARSE_EXT_DIR") or Path(__file__).parent)


def openvino_extension() -> str:
    """Path of the OpenVINO extension library, for ``core.add_extension``."""
    path = library_dir() / OPENVINO_LIBRARY
    if not path.is_file():
        raise ActSparseError(f"the ActSparseMatMul OpenVINO extension {OPENVINO_LIBRARY} was not built "
                             f"(looked in {path.parent}); reinstall actsparse with a C++17 compiler available")
    return str(path)


def extension_problem() -> str | None:
    """Why the OpenVINO extension cannot be used here, or None."""
    try:
        register(__import__("openvino").Core())
    except ActSparseError as err:
        return str(err)
    return None


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
            import ctypes

            _pinned[path] = ctypes.CDLL(path)
        core.add_extension(path)
    except Exception as err:  # a library built against another OpenVINO fails to load
        raise ActSparseError(f"cannot load {path} into OpenVINO: {str(err).strip().splitlines()[-1]}") from None


def read_model(core, xml):
    """``core.read_model(xml)``, registering the extension first when the IR uses the op."""
    if OP_TYPE in Path(xml).read_text(errors="replace"):
        register(core)
    return core.read_model(xml)


ONNXRUNTIME_LIBRARY = "libactsparse_onnxruntime.so"


def onnxruntime_library() -> str:
    """Path of the ONNX Runtime custom-op library, for ``SessionOptions.register_custom_ops_library``."""
    path = library_dir() / ONNXRUNTIME_LIBRARY
    if not path.is_file():
        raise ActSparseError(f"the ActSparseMatMul ONNX Runtime library {ONNXRUNTIME_LIBRARY} was not built "
                             f"(looked in {path.parent}); reinstall actsparse with a C++17 compiler and apt-get "
                             "(or ORT_INCLUDE_DIR) available")
    return str(path)


def onnxruntime_problem() -> str | None:
    """Why the ONNX Runtime custom-op library cannot be used here, or None."""
    try:
        session_options()
    except ActSparseError as err:
        return str(err)
    return None


def session_options(threads: int | None = None):
    """An ``onnxruntime.SessionOptions`` with the custom-op library registered (and ``threads``
    intra-op threads when given), for sessions over models that use ai.actsparse::ActSparseMatMul."""
    import onnxruntime as ort

    path = onnxruntime_library()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        options.register_custom_ops_library(path)
    except Exception as err:  # e.g. a runtime older than the headers the library was built with
        raise ActSparseError(f"cannot load {path} into ONNX Runtime: {str(err).strip().splitlines()[-1]}") from None
    return options
