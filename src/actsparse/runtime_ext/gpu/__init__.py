"""ActSparseMatMul for OpenVINO's GPU plugin: the OpenCL source, its custom-layer config, and the program the
plugin would build from them for one node (docs/op.md, "GPU").

:func:`program` writes the source exactly as the plugin assembles it (``custom_primitive.cpp``: its macros per
tensor, then the config's Define elements filled from the node's attributes, then the kernel file), and the work
sizes its WorkSizes rules give; :class:`Runner` runs that through pyopencl (tests, benchmark), binding the
arguments as the config's Buffers say. pyopencl is imported only there.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from .. import GPU_CONFIG as CONFIG

# OpenCL type names the plugin writes in INPUTn_TYPE (it maps no other element type)
CL_TYPES = {np.dtype(np.int8): "char", np.dtype(np.uint8): "uchar", np.dtype(np.int32): "int",
            np.dtype(np.int64): "long", np.dtype(np.float16): "half", np.dtype(np.float32): "float"}


@dataclass(frozen=True)
class Layer:
    """The fields of one CustomLayer that the plugin's parser (``custom_layer.cpp``) reads."""
    name: str
    entry: str
    sources: tuple[Path, ...]
    defines: tuple[tuple[str, str, str, str], ...]  # name, param, default, type
    buffers: tuple[tuple[int, str, int, str], ...]  # arg-index, type, port-index, format
    options: str
    dim: str
    global_rules: tuple[str, ...]
    local_rules: tuple[str, ...]


@functools.lru_cache(maxsize=None)
def layer(config: Path = CONFIG) -> Layer:
    """The config's CustomLayer, read as the plugin's parser reads it."""
    root = ElementTree.parse(config).getroot()
    kernel, buffers = root.find("Kernel"), root.find("Buffers")
    work = root.find("WorkSizes")
    options = root.find("CompilerOptions")

    def rules(attr: str) -> tuple[str, ...]:
        return tuple(work.get(attr, "").split(",")) if work is not None and work.get(attr) else ()

    return Layer(root.get("name"), kernel.get("entry"),
                 tuple(config.parent / s.get("filename") for s in kernel.findall("Source")),
                 tuple((d.get("name"), d.get("param", ""), d.get("default", ""), d.get("type", ""))
                       for d in kernel.findall("Define")),
                 tuple((int(t.get("arg-index")), t.get("type"), int(t.get("port-index")),
                        t.get("format", "BFYX")) for t in buffers.findall("Tensor")),
                 "" if options is None else options.get("options", ""),
                 "" if work is None else work.get("dim", ""), rules("global"), rules("local"))


def attribute_text(value) -> str:
    """An attribute as the plugin's CustomLayerAttributeVisitor prints it: strings as they are, bools and
    integers through std::to_string, floats (visited as double) through std::to_string, i.e. printf's %f."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(np.float32(value))
        return "inf" if value == math.inf else "-inf" if value == -math.inf else "%f" % value
    return str(value)


def _dims(shape) -> list[int]:
    """bfyx sizes of a shape of rank <= 4, as cldnn pads it (trailing 1s)."""
    shape = [int(d) for d in shape]
    if len(shape) > 4:
        raise ValueError(f"the plugin's bfyx macros cover rank <= 4, got shape {shape}")
    return shape + [1] * (4 - len(shape))


def _vector(values, type_name: str) -> str:
    return "(" + type_name + " []){ " + "".join(f"{v}," for v in values) + " } "


def _evaluate(rule: str, variables: dict[str, int]) -> int:
    """A WorkSizes rule as SimpleMathExpression evaluates it: + - * / % on non-negative ints, left to right
    within a precedence level (C division of non-negative values is floor division)."""
    if not re.fullmatch(r"[0-9bBfFyYxX+\-*/%() \t]+", rule):
        raise ValueError(f"illegal WorkSizes rule {rule!r}")
    return int(eval(re.sub(r"[bBfFyYxX]", lambda m: str(variables[m.group().lower()]), rule).replace("/", "//")))


def work_sizes(out_shape, config: Path = CONFIG) -> tuple[list[int], list[int]]:
    """Global and local work sizes for an output of ``out_shape`` (WorkSizes dim="output", the default)."""
    spec = layer(config)
    if spec.dim not in ("", "output"):
        raise ValueError("the sizes are taken from the output only")
    dims = [int(d) for d in out_shape]
    variables = {v: dims[i] if i < len(dims) else 1 for i, v in enumerate("bfyx")}
    global_size = [_evaluate(r, variables) for r in spec.global_rules] or [math.prod(dims)]
    return global_size, [_evaluate(r, variables) for r in spec.local_rules]


def program(attrs: dict, inputs: list[tuple[tuple, np.dtype]], output: tuple[tuple, np.dtype],
            config: Path = CONFIG) -> tuple[str, list[int], list[int]]:
    """(source, global, local) the plugin builds for a node with attributes ``attrs`` (name -> value), input
    shapes and element types ``inputs`` (port order) and ``output``, all bfyx without padding."""
    spec = layer(config)
    global_size, local_size = work_sizes(output[0], config)
    macros = {"NUM_INPUTS": str(len(inputs)),
              "GLOBAL_WORKSIZE_SIZE": str(len(global_size)), "GLOBAL_WORKSIZE": _vector(global_size, "size_t"),
              "LOCAL_WORKSIZE_SIZE": str(len(local_size)), "LOCAL_WORKSIZE": _vector(local_size, "size_t")}
    for name, (shape, dtype) in [(f"INPUT{i}", t) for i, t in enumerate(inputs)] + [("OUTPUT0", output)]:
        dims = _dims(shape)
        pitches = [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1]
        for key, values in (("DIMS", dims), ("LOWER_PADDING", [0] * 4), ("UPPER_PADDING", [0] * 4),
                            ("PITCHES", pitches)):
            macros[f"{name}_{key}_SIZE"] = "4"
            macros[f"{name}_{key}"] = _vector(values, "int")
        macros[f"{name}_TYPE"] = CL_TYPES[np.dtype(dtype)]
        macros[f"{name}_FORMAT_BFYX"] = ""
        macros[f"{name}_OFFSET"] = "0"
    user = "".join(f"#define {name} {'(' + kind + ') {' if kind in ('int[]', 'float[]') else ''}"
                   f"{attribute_text(attrs[param]) if param in attrs else default}"
                   f"{'}' if kind in ('int[]', 'float[]') else ''}\n"
                   for name, param, default, kind in spec.defines)
    source = "".join(f"\n// Custom Layer Kernel {path}\n\n{path.read_text()}" for path in spec.sources)
    jit = "// Custom Layer Built-ins\n\n" + "".join(f"#define {k} {v}\n" for k, v in macros.items())
    code = [f"\n// Layer node using Custom Layer {spec.name}\n", "// Custom Layer User Defines\n", user, source]
    return jit + "".join(part + "\n" for part in code), global_size, local_size


def devices() -> tuple[list, list[str]]:
    """The OpenCL devices pyopencl finds that build a kernel here, and one line for each that does not
    (PoCL 3.0's wheel, LLVM 14, cannot compile for a Zen 5: "unknown target CPU 'generic'")."""
    import pyopencl as cl

    usable, problems = [], []
    try:
        platforms = cl.get_platforms()
    except cl.Error as err:  # no ICD installed
        return [], [f"no OpenCL platform ({err})"]
    for platform in platforms:
        for device in platform.get_devices():
            try:
                cl.Program(cl.Context([device]), "__kernel void probe(__global int* a) { a[0] = 1; }").build()
                usable.append(device)
            except cl.Error as err:
                lines = [line for line in str(err).splitlines() if "error:" in line] or str(err).splitlines()
                problems.append(f"{device.name} ({platform.version.strip()}): {lines[0].strip()}")
    return usable, problems


class Runner:
    """Builds and runs the kernel through pyopencl on one device, as the plugin would for each node; programs
    are cached per source (one per set of macros)."""

    def __init__(self, device=None, config: Path = CONFIG):
        import pyopencl as cl

        self.cl, self.config = cl, config
        self.device = device or devices()[0][0]
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
        self._programs: dict[str, object] = {}

    def kernel(self, source: str):
        """A new kernel object (each holds its own arguments) of the program built from ``source``."""
        spec = layer(self.config)
        if source not in self._programs:
            self._programs[source] = self.cl.Program(self.context, source).build(options=spec.options)
        return self.cl.Kernel(self._programs[source], spec.entry)

    def prepare(self, attrs: dict, inputs: list[np.ndarray], out_shape: tuple, out_dtype):
        """A callable that runs the node once on ``inputs`` (numpy arrays, port order) and returns
        (output, kernel seconds); inputs are copied to the device once."""
        cl = self.cl
        spec = layer(self.config)
        source, global_size, local_size = program(attrs, [(a.shape, a.dtype) for a in inputs],
                                                  (out_shape, out_dtype), self.config)
        kernel = self.kernel(source)
        flags = cl.mem_flags
        buffers = [cl.Buffer(self.context, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(a))
                   if a.nbytes else cl.Buffer(self.context, flags.READ_ONLY, 4) for a in inputs]
        out = np.empty(out_shape, out_dtype)
        out_buffer = cl.Buffer(self.context, flags.WRITE_ONLY, max(out.nbytes, 4))
        args = [None] * len(spec.buffers)
        for index, kind, port, _ in spec.buffers:
            args[index] = buffers[port] if kind == "input" else out_buffer
        kernel.set_args(*args)

        def run(keep=(buffers, out_buffer)) -> tuple[np.ndarray, float]:  # set_args holds no references
            event = cl.enqueue_nd_range_kernel(self.queue, kernel, global_size, local_size or None)
            event.wait()
            cl.enqueue_copy(self.queue, out, out_buffer).wait()
            return out.copy(), 1e-9 * (event.profile.end - event.profile.start)

        return run


def node(packed, bias=None, mode: float = 0.0, threshold: float = 0.0, prefill: str = "dense"):
    """(attributes, weight, params) of the ActSparseMatMul node that holds ``packed``
    (``kernels.PackedWeight``) and ``bias``, laid out as the export writes them (docs/op.md)."""
    data = packed.data
    weight = data if packed.format == "f32" else np.ascontiguousarray(data).view(np.uint8)
    parts = [] if bias is None else [np.asarray(bias, np.float32).ravel()]
    if packed.compact:
        params = np.concatenate([p.view(np.uint8) for p in parts] +
                                [packed.scale.ravel().view(np.uint8), packed.zero_point.ravel().astype(np.uint8)])
    else:
        parts += [] if packed.scale is None else [packed.scale.ravel(), packed.zero_point.ravel()]
        params = np.concatenate([p.astype(np.float32) for p in parts]) if parts else np.zeros(0, np.float32)
    attrs = {"weight_format": packed.format, "out_features": packed.N, "group_size": packed.group_size,
             "mode": mode, "threshold": threshold, "prefill": prefill, "has_bias": bias is not None,
             "tile_cols": packed.tile_cols, "int8_activations": False}
    return attrs, weight, params
