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


def runs_in_bf16(core, device: str = "CPU", config: dict | None = None) -> bool:
    """Whether ``device`` will run a graph compiled with ``config`` in bf16 (the CPU plugin's default
    where the CPU has AVX512-BF16 or AMX)."""
    config = config or {}
    if str(config.get("EXECUTION_MODE_HINT", "")).upper().endswith("ACCURACY"):
        return False
    try:
        hint = config.get("INFERENCE_PRECISION_HINT") or core.get_property(device, "INFERENCE_PRECISION_HINT")
    except RuntimeError:  # a device without the property (or none at all): not ours to change
        return False
    return (hint.to_string() if hasattr(hint, "to_string") else str(hint)) == "bf16"


def bf16_io(op):
    """Put one f32 ActSparseMatMul between Convert(bf16) and Convert(f32); return the f32 output that now
    feeds its consumers. In a graph the device runs in bf16, the values there are bf16 anyway: the
    Converts change nothing but let the plugin drop the bf16<->f32 Reorders it would put around the op,
    and the op's prefill then multiplies in bf16 like the plugin's own FullyConnected. Under f32
    inference they round x and y (bf16 exports accept that: their weights are bf16 already)."""
    from openvino import opset13 as ops

    consumers = list(op.output(0).get_target_inputs())
    op.input(0).replace_source_output(ops.convert(op.input_value(0), "bf16").output(0))
    op.validate_and_infer_types()
    back = ops.convert(op.output(0), "f32").output(0)
    for consumer in consumers:
        consumer.replace_source_output(back)
    return back


def bf16_activations(model) -> int:
    """:func:`bf16_io` for every ActSparseMatMul of ``model`` that takes f32, in place; return how many.
    Only for a device that runs the graph in bf16 (see compile_model)."""
    wrapped = [bf16_io(op) for op in model.get_ordered_ops()
               if op.get_type_name() == OP_TYPE and op.get_input_element_type(0).to_string() == "f32"]
    if wrapped:
        model.validate_nodes_and_infer_types()
    return len(wrapped)


def quantises_activations(core, device: str = "CPU", config: dict | None = None) -> bool:
    """Whether ``device`` quantises the activations of its own int8/int4-weight FullyConnected to int8 for a
    graph compiled with ``config``: a non-zero DYNAMIC_QUANTIZATION_GROUP_SIZE (the CPU plugin's default)."""
    config = config or {}
    try:
        size = config.get("DYNAMIC_QUANTIZATION_GROUP_SIZE", None)
        size = core.get_property(device, "DYNAMIC_QUANTIZATION_GROUP_SIZE") if size is None else size
        return int(size) != 0
    except (RuntimeError, TypeError, ValueError):  # a device without the property: no quantisation
        return False


def int8_activations(model, on: bool) -> int:
    """Set the ``int8_activations`` attribute of every u8/u4-weight ActSparseMatMul of ``model``, in place;
    return how many: they then quantise their activations to int8 (decode and prompt), or compute in f32."""
    ops = [op for op in model.get_ordered_ops()
           if op.get_type_name() == OP_TYPE and op.get_attributes().get("weight_format") in ("u8", "u4")]
    for op in ops:
        op.set_attribute("int8_activations", bool(on))
    return len(ops)


def compile_model(core, model, device: str = "CPU", config: dict | None = None):
    """``core.compile_model``, after :func:`bf16_activations` where the device runs the graph in bf16, and
    with int8 activations for u8/u4 weights exactly where the device quantises its own (see
    :func:`quantises_activations`): the op then computes what the plugin's FullyConnected would."""
    if runs_in_bf16(core, device, config):
        bf16_activations(model)
    int8_activations(model, quantises_activations(core, device, config))
    return core.compile_model(model, device, config or {})


ONNXRUNTIME_LIBRARY = "libactsparse_onnxruntime.so"


def onnxruntime_library() -> str:
    """Path of the ONNX Runtime custom-op library, for ``SessionOptions.register_custom_ops_library``."""
    return str(library_path(ONNXRUNTIME_LIBRARY, "ONNX Runtime library", "reinstall actsparse with a C++17 "
                            "compiler and apt-get (or ORT_INCLUDE_DIR) available"))


def onnxruntime_problem() -> str | None:
    """Why the ONNX Runtime custom-op library cannot be used here, or None."""
    try:
        session_options()
    except ActSparseError as err:
        return str(err)
    return None


def session_options(threads: int | None = None, config: dict[str, str] | None = None, library: bool = True):
    """An ``onnxruntime.SessionOptions`` with the custom-op library registered (:func:`register_library`), for
    sessions over models that use ai.actsparse::ActSparseMatMul; ``threads`` intra-op threads and the session
    ``config`` entries when given, set before the library. ``library=False``: the same options without it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return register_library(options) if library else options


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
