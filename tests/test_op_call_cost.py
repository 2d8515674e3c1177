"""The OpenVINO op's per-call binding (docs/op.md, "Validation"): the CPU plugin clones a dynamic ActSparseMatMul
node on every call to infer its shape. A call whose sizes differ from those bound must be bound again, and
refused with the contract's line, before any byte is read; calls after it compute the op as numpy does."""
from __future__ import annotations

import re

import numpy as np
import pytest

from actsparse import ActSparseError, runtime_ext
from conftest import skip_without_extension

try:
    runtime_ext.openvino_extension()
except ActSparseError as err:
    skip_without_extension(str(err))

import openvino as ov  # noqa: E402

from test_corrupt_models import K, base, reference, write_ir  # noqa: E402


def compiled_with_unknown_k(tmp_path, fmt: str, G: int, threads: int = 0):
    """The one-node model of test_corrupt_models with x declared [?, ?, ?]: the graph binds no K, so every call's
    K comes from its x."""
    parts = base(fmt, G)
    write_ir(parts, tmp_path / "model.xml")
    core = ov.Core()
    runtime_ext.register(core)
    model = core.read_model(tmp_path / "model.xml")
    model.reshape({0: ov.PartialShape([-1, -1, -1])})
    config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0", "INFERENCE_NUM_THREADS": threads}
    return parts, core.compile_model(model, "CPU", config).create_infer_request()


def check(parts, request, x):
    y = request.infer({0: x})[0]
    ref, scale = reference(parts, x)
    err = np.abs(y - ref)
    assert np.all(err <= 1e-2 * scale + 1e-5), f"x{x.shape}: max err {err.max():.3g}"


@pytest.mark.parametrize("fmt,G", [("f32", 0), ("u4", 32)])
def test_a_call_of_another_k_is_bound_again(tmp_path, fmt, G):
    parts, request = compiled_with_unknown_k(tmp_path, fmt, G)
    rng = np.random.default_rng(1)
    with pytest.raises(RuntimeError, match=r"ActSparseMatMul: (weight|params) has \d+ bytes, expected"):
        request.infer({0: rng.standard_normal((1, 1, K + 32)).astype(np.float32)})
    for tokens in (1, 1, 4):  # each call's clone differs from the graph's binding (K unknown there): bound again
        check(parts, request, rng.standard_normal((1, tokens, K)).astype(np.float32))


@pytest.mark.parametrize("fmt,G", [("f32", 0), ("u4", 32)])
def test_one_thread_a_call_of_another_k_gives_nan_not_the_last_y(tmp_path, fmt, G):
    """With one inference thread the plugin (2026.4) drops the op's error and returns its last y, over the buffer it
    handed the op (the previous call's shape): the op fills that buffer with NaN before raising, so a call of the
    wrong K cannot pass for the previous call's result."""
    parts, request = compiled_with_unknown_k(tmp_path, fmt, G, threads=1)
    rng = np.random.default_rng(3)
    check(parts, request, rng.standard_normal((1, 2, K)).astype(np.float32))
    try:
        y = request.infer({0: rng.standard_normal((1, 1, K + 32)).astype(np.float32)})[0]
    except RuntimeError as err:
        assert re.search(r"ActSparseMatMul: (weight|params) has \d+ bytes, expected", str(err)), str(err)
    else:
        assert np.isnan(y).any(), "a call of the wrong K returned the last call's numbers"
    check(parts, request, rng.standard_normal((1, 3, K)).astype(np.float32))


@pytest.mark.parametrize("fmt,G", [("bf16", 0), ("u8", K)])
def test_clones_compute_the_op_the_binding_compute_the_op(tmp_path, fmt, G):
    """x declared [?, ?, K], as exports declare it, one thread: every call's clone binds as the graph did."""
    parts = base(fmt, G)
    write_ir(parts, tmp_path / "model.xml")
    core = ov.Core()
    runtime_ext.register(core)
    config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0", "INFERENCE_NUM_THREADS": "1"}
    request = core.compile_model(core.read_model(tmp_path / "model.xml"), "CPU", config).create_infer_request()
    rng = np.random.default_rng(2)
    for tokens in (1, 1, 3, 1):
        check(parts, request, rng.standard_normal((1, tokens, K)).astype(np.float32))
