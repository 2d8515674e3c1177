"""The GPU plugin's ActSparseMatMul kernel (runtime_ext/gpu) on an OpenCL CPU device (PoCL), built with the
macros OpenVINO's GPU plugin would define for each node and bound as the config's Buffers say; against numpy
(the op as docs/op.md defines it) and the CPU op. The config is checked against what the plugin's parser reads."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from actsparse._common import ActSparseError
from actsparse.runtime_ext import OP_TYPE, gpu, gpu_config
from actsparse.runtime_ext import kernels as ks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runner():
    pytest.importorskip("pyopencl", reason="pyopencl is not installed (the test extra installs it)")
    usable, problems = gpu.devices()
    if not usable:
        why = "no OpenCL device builds kernels here: " + ("; ".join(problems) or "none found")
        if os.environ.get("ACTSPARSE_REQUIRE_OPENCL"):  # CI installs PoCL: there a skip would hide a failure
            raise RuntimeError(f"ACTSPARSE_REQUIRE_OPENCL is set but {why}")
        pytest.skip(why)
    return gpu.Runner(usable[0])


# -- the config, as custom_layer.cpp parses it -------------------------------------------------------------------

# what LoadSingleLayer and its Process*Node read: element -> attributes (anything else is ignored by the plugin)
PARSED = {"CustomLayer": {"name", "type", "version"}, "Kernel": {"entry"}, "Source": {"filename"},
          "Define": {"name", "param", "default", "type"}, "Buffers": set(),
          "Tensor": {"arg-index", "type", "port-index", "format"}, "Data": {"arg-index", "name"},
          "CompilerOptions": {"options"}, "WorkSizes": {"global", "local", "dim"}}
FORMATS = {"BFYX", "bfyx", "BYXF", "byxf", "FYXB", "fyxb", "YXFB", "yxfb", "ANY", "any"}


def test_config_has_only_what_the_plugin_parser_reads():
    assert gpu_config() == str(gpu.CONFIG) and Path(gpu_config()).is_file()
    root = ElementTree.parse(gpu_config()).getroot()
    assert (root.tag, root.get("type"), root.get("version"), root.get("name")) == \
        ("CustomLayer", "SimpleGPU", "1", OP_TYPE)
    for element in root.iter():
        assert element.tag in PARSED and set(element.attrib) <= PARSED[element.tag], element.tag
    assert [e.tag for e in root] == ["Kernel", "Buffers", "WorkSizes"]

    spec = gpu.layer()
    source = "".join(path.read_text() for path in spec.sources)
    signature = re.search(r"__kernel[^{]*void\s+" + spec.entry + r"\s*\(([^)]*)\)", source)
    assert signature, f"no kernel {spec.entry} in {spec.sources}"
    # every Define takes an attribute the op visits (the plugin's visitor sees nothing else)
    visited = set(re.findall(r'on_attribute\((?:prefix \+ )?"(\w+)"',
                             (ROOT / "src/actsparse/runtime_ext/openvino/actsparse_op.cpp").read_text()))
    assert {param for _, param, _, _ in spec.defines} <= visited
    assert all(name and kind in ("", "int[]", "float[]") for name, _, _, kind in spec.defines)
    # one buffer per kernel argument, in order: the op's three inputs, then its output
    assert sorted(b[0] for b in spec.buffers) == list(range(signature.group(1).count(",") + 1))
    assert [(kind, port) for _, kind, port, _ in sorted(spec.buffers)] == \
        [("input", 0), ("input", 1), ("input", 2), ("output", 0)]
    assert all(fmt in FORMATS for *_, fmt in spec.buffers)
    # the work sizes as SimpleMathExpression evaluates them, against the kernel's fixed group size
    assert gpu.work_sizes((1, 1, 11008)) == ([(11008 + 127) // 128 * 64], [64])
    assert gpu.work_sizes((3, 7, 300)) == ([(3 * 7 * 300 + 127) // 128 * 64], [64])
    assert re.search(r"#define ASP_WG 64\b", source) and "reqd_work_group_size(ASP_WG" in source


def test_attributes_print_as_the_plugin_visitor_prints_them():
    # std::to_string: bool and int as numbers, float (visited as double) with %f, so six decimals
    assert [gpu.attribute_text(v) for v in (True, False, 8192, "u4", 0.25, -1.5, 1e-7, float("inf"))] == \
        ["1", "0", "8192", "u4", "0.250000", "-1.500000", "0.000000", "inf"]
    attrs, _, _ = gpu.node(ks.pack_f32(np.ones((4, 3), np.float32), 128), np.zeros(3), 0.5, 0.125, "sparse")
    source, _, _ = gpu.program(attrs, [((1, 4), np.float32), ((12,), np.float32), ((3,), np.float32)],
                               ((1, 3), np.float32))
    for line in ("#define ASP_WEIGHT_FORMAT f32", "#define ASP_MODE 0.500000", "#define ASP_THRESHOLD 0.125000",
                 "#define ASP_HAS_BIAS 1", "#define ASP_PREFILL sparse", "#define INPUT0_TYPE float",
                 "#define INPUT0_DIMS (int []){ 1,4,1,1, } "):
        assert line in source.splitlines(), line


# -- the kernel against numpy and the CPU op ---------------------------------------------------------------------

def packed_weight(fmt: str, K: int, N: int, group: int, tile_cols: int, rng) -> ks.PackedWeight:
    w = rng.standard_normal((K, N)).astype(np.float32)
    if fmt in ("f32", "f16", "bf16"):
        return getattr(ks, f"pack_{fmt}")(w, tile_cols)
    if fmt == "u8":
        return ks.pack_u8(rng.integers(0, 256, (K, N)), rng.uniform(0.001, 0.01, N),
                          rng.integers(0, 256, N).astype(np.float32), tile_cols)
    scale = rng.uniform(0.01, 0.1, (K // group, N)).astype(np.float16).astype(np.float32)
    return ks.pack_u4(rng.integers(0, 16, (K, N)), scale, rng.integers(0, 16, (K // group, N)).astype(np.float32),
                      group, tile_cols, compact=fmt == "u4c")


def run_gpu(runner, packed, bias, x, mode, tau, prefill, half=False):
    """y of the kernel for x [M, K] as a [1, M, K] input; ``half``: as the GPU plugin's default f16 precision
    hands it over (x, y and every f32 input in half). Returns y (float32) and the inputs as the kernel saw them."""
    attrs, weight, params = gpu.node(packed, bias, mode, tau, prefill)
    if half:
        x = x.astype(np.float16)
        weight = weight.astype(np.float16) if weight.dtype == np.float32 else weight
        params = params.astype(np.float16) if params.dtype == np.float32 else params
    y, _ = runner.prepare(attrs, [x.reshape(1, *x.shape), weight, params], (1, x.shape[0], packed.N), x.dtype)()
    return y.reshape(x.shape[0], packed.N).astype(np.float32), x.astype(np.float32), weight, params


def reference(x, W, bias, mode, tau, prune):
    """The op (docs/op.md) in float64 from f32 z, and a bound on its rounding error: sum |z'||W| + |bias|."""
    z = x - np.float32(mode)
    if prune:
        z = np.where(np.abs(z) <= np.float32(tau), np.float32(0), z)
    z = z.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf * 0 in the NaN/Inf cases
        return z @ W + bias, np.abs(z) @ np.abs(W) + np.abs(bias)


def dequantized(packed, weight, params, bias):
    """W and bias as the kernel received them (half where the f16 precision rounded the f32 inputs)."""
    n = 0 if bias is None else packed.N
    if params.dtype == np.float16 and packed.scale is not None:  # f32 params the plugin turned to half
        scale, zero_point = np.split(params[n:].astype(np.float32), 2)
        packed = dataclasses.replace(packed, scale=scale.reshape(packed.scale.shape),
                                     zero_point=zero_point.reshape(packed.scale.shape))
    if weight.dtype == np.float16:  # f32 weights turned to half
        packed = dataclasses.replace(packed, data=weight.astype(np.float32))
    b = np.zeros(packed.N) if bias is None else params[:n] if params.dtype == np.float16 else bias
    return ks.dequantize(packed).astype(np.float64), b.astype(np.float64)


CASES = [  # (K, N, group, tile_cols, prefill): N, K not multiples of the 64-item group, two tiles with a last one
    # of one column, K over one decode chunk (512) with a tail and the format's own tile width (tile_cols 0, as
    # exports write), K = N = 1; each format prefills dense and sparse
    (300, 333, 30, 128, "dense"), (70, 129, 7, 128, "sparse"), (1100, 137, 100, 0, "dense"), (1, 1, 1, 128, "sparse")]
FORMATS_ALL = ["f32", "f16", "bf16", "u8", "u4", "u4c"]


@pytest.mark.parametrize("fmt", FORMATS_ALL)
@pytest.mark.parametrize("K,N,group,tile_cols,prefill", CASES)
def test_kernel_matches_numpy_and_the_cpu_op(runner, fmt, K, N, group, tile_cols, prefill):
    rng = np.random.default_rng(K * N)
    packed = packed_weight(fmt, K, N, group, tile_cols, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    mode, tau = 0.25, 0.5
    for rows in (1, 19):  # a decode step; a prefill of two full 8-row tiles and a tail
        prune = rows == 1 or prefill == "sparse"
        x = rng.standard_normal((rows, K)).astype(np.float32)
        y, xs, weight, params = run_gpu(runner, packed, bias, x, mode, tau, prefill)
        W, b = dequantized(packed, weight, params, bias)
        expected, scale = reference(xs, W, b, mode, tau, prune)
        np.testing.assert_array_less(np.abs(y - expected), 1e-5 * scale + 1e-6)
        # the CPU op on the same inputs (its avx2 kernel: f32 products throughout)
        cpu = ks.matmul(x, packed, bias, mode, tau, mask=prune, kernel="avx2")
        np.testing.assert_array_less(np.abs(y - cpu), 2e-5 * scale + 1e-6)


def layer(fmt: str, K: int, N: int, group: int, seed: int):
    """rng, packed weight, bias and the dequantised W (float64) of a random layer."""
    rng = np.random.default_rng(seed)
    packed = packed_weight(fmt, K, N, group, 128, rng)
    return rng, packed, rng.standard_normal(N).astype(np.float32), ks.dequantize(packed).astype(np.float64)


@pytest.mark.parametrize("fmt", FORMATS_ALL)
def test_kernel_in_half_as_the_gpu_plugin_runs_it(runner, fmt):
    """f16 inference precision: x, y and the f32 inputs (f32 weights, f32 params) arrive in half."""
    rng, packed, bias, _ = layer(fmt, 200, 150, 20, 7)
    for rows, prefill in ((1, "dense"), (9, "sparse")):
        x = rng.standard_normal((rows, 200)).astype(np.float32)
        y, xs, weight, params = run_gpu(runner, packed, bias, x, 0.25, 0.5, prefill, half=True)
        W, b = dequantized(packed, weight, params, bias)
        expected, scale = reference(xs, W, b, 0.25, 0.5, rows == 1 or prefill == "sparse")
        np.testing.assert_array_less(np.abs(y - expected), 1e-3 * scale + 1e-3 * np.abs(expected) + 1e-4)


@pytest.mark.parametrize("fmt", ["f16", "u4c"])
def test_all_and_no_channels_pruned(runner, fmt):
    rng, packed, bias, W = layer(fmt, 130, 70, 10, 3)
    for rows in (1, 12):
        x = rng.standard_normal((rows, 130)).astype(np.float32)
        expected, scale = reference(x, W, bias, 0.0, 0.0, prune=False)
        # threshold +inf (printed "inf"): every channel pruned, y is the bias exactly
        y, *_ = run_gpu(runner, packed, bias, x, 0.0, float("inf"), "sparse")
        np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape))
        # nothing pruned: threshold 0 (no z is exactly 0) in a decode step, a dense prefill at any threshold
        y, *_ = run_gpu(runner, packed, bias, x, 0.0, 0.0 if rows == 1 else float("inf"), "dense")
        np.testing.assert_array_less(np.abs(y - expected), 1e-5 * scale + 1e-6)


@pytest.mark.parametrize("fmt", ["f32", "bf16", "u8", "u4"])
def test_nan_and_inf_as_the_cpu_op(runner, fmt):
    """NaN is never pruned and reaches every output of its row; an Inf is kept and makes its row non-finite."""
    rng, packed, bias, W = layer(fmt, 100, 90, 10, 5)
    for rows, prefill, nan, inf in ((1, "dense", True, False), (1, "dense", False, True), (3, "sparse", True, True),
                                    (3, "dense", True, True)):
        x = rng.standard_normal((rows, 100)).astype(np.float32)
        if nan:
            x[0, 11] = np.nan
        if inf:
            x[-1, 40] = np.inf
        prune = rows == 1 or prefill == "sparse"
        y, *_ = run_gpu(runner, packed, bias, x, 0.25, 0.5, prefill)
        cpu = ks.matmul(x, packed, bias, 0.25, 0.5, mask=prune, kernel="avx2")
        expected, _ = reference(x, W, bias, 0.25, 0.5, prune)
        finite = np.isfinite(expected)
        assert not finite[-1].any() and (np.isnan(expected[0]).all() or not nan)
        for got in (cpu, y):
            assert np.isnan(got[0]).all() or not nan
            np.testing.assert_array_equal(np.isfinite(got), finite)
        np.testing.assert_allclose(y[finite], expected[finite], rtol=1e-4, atol=1e-4)


def test_load_on_gpu_refuses_without_a_gpu_device(tmp_path):
    import openvino as ov

    from actsparse.backends.openvino.runtime import load

    if any(d.startswith("GPU") for d in ov.Core().available_devices):
        pytest.skip("OpenVINO has a GPU here: the refusal is for machines without one")
    with pytest.raises(ActSparseError) as err:
        load(tmp_path, {"passes": {"fused": True}}, device="GPU")
    assert len(str(err.value).splitlines()) == 1 and "no GPU" in str(err.value)
