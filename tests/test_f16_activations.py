"""f16 activations (the precision OpenVINO's GPU plugin computes in): the kernel core and the OpenVINO op take
f16 x and return f16 y, computed in f32 from the widened x and rounded to nearest even."""
import re

import numpy as np
import onnx
import openvino as ov
import pytest
from onnx import TensorProto
from openvino import opset13 as ops
from openvino import passes

from actsparse.backends.onnx.runtime import onnxruntime_problem
from actsparse.backends.openvino.fuse import fuse, materialize
from actsparse.backends.openvino.graph import EXACT_CONFIG
from actsparse.backends.openvino.runtime import extension_problem
from actsparse.runtime_ext import OP_TYPE, register
from actsparse.runtime_ext import kernels as ks
from conftest import skip_without_extension
from reference import DECODE_ROWS, make_weight, pruned_input
from test_fusion_openvino import _one_matmul
from test_kernels import FORMATS, KERNELS, check, make_x, reference

skip_without_extension(extension_problem())
HALF_ULP = 2.0 ** -11  # rounding to f16 moves a value by at most this much of its magnitude


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, DECODE_ROWS + 21])
def test_core_f16_activations_in_and_out(kernel, fmt, M):
    """float16 x: y is the f32 call on the widened x, rounded to nearest even as numpy rounds, and matches
    numpy within that rounding (decode and prefill); a NaN stays NaN."""
    rng = np.random.default_rng(16)
    K, N = 131, 300
    packed = make_weight(fmt, K, N, K, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    x, tau = make_x(M, K, 0.2, 0.5, rng)
    xh = x.astype(np.float16)
    xw = xh.astype(np.float32)
    y = ks.matmul(xh, packed, bias, 0.2, tau, True, 2, kernel)
    assert y.dtype == np.float16 and y.shape == (M, N)
    np.testing.assert_array_equal(y, ks.matmul(xw, packed, bias, 0.2, tau, True, 2, kernel).astype(np.float16))
    ref, scale = reference(xw, packed, bias, 0.2, tau, True, kernel)
    check(y.astype(np.float32), ref, scale + np.abs(ref) * HALF_ULP / 1e-4, f"{kernel} {fmt} M={M}")
    xh[-1, 7] = np.nan
    assert np.isnan(ks.matmul(xh, packed, bias, 0.2, tau, True, 2, kernel)[-1]).all()


def _f16_op(fmt, prefill, n=33, k=64, mode=0.25, tau=0.6):
    """A fused one-MatMul model whose op reads an f16 Parameter x, the op, and the dequantised [N, K] weight."""
    model, plan, dequant = _one_matmul(fmt, n, k, mode, tau, prefill)
    assert fuse(model, plan) == {"fused": 1, "refused": 0, "mlp": 0}
    core = ov.Core()
    register(core)
    model = materialize(model, core)
    op = next(o for o in model.get_ordered_ops() if o.get_type_name() == OP_TYPE)
    x = ops.parameter([-1, -1, k], np.float16, name="x")
    op.input(0).replace_source_output(x.output(0))
    op.validate_and_infer_types()
    return core, ov.Model([op.output(0)], [x]), op, dequant


@pytest.mark.parametrize("fmt", ["f32", "f16"])
@pytest.mark.parametrize("prefill", ["dense", "sparse"])
def test_openvino_op_takes_f16_x(fmt, prefill):
    """The op validates with f16 x and returns f16; compiled on the CPU (whose plugin converts x to f32 around
    it) and evaluated directly on f16 tensors (as a plugin computing in f16 would call it), a decode step and
    prefills on either side of the core's decode rows give numpy's result within f16 rounding."""
    mode, tau = 0.25, 0.6
    core, model, op, dequant = _f16_op(fmt, prefill, mode=mode, tau=tau)
    assert op.get_output_element_type(0) == ov.Type.f16
    compiled = core.compile_model(model, "CPU", EXACT_CONFIG)
    rng = np.random.default_rng(25)
    for tokens in (1, 3, DECODE_ROWS + 5):
        x = rng.normal(size=(2, tokens, dequant.shape[1])).astype(np.float16)
        x[0, 0, :4] = mode  # exactly at the mode: pruned where the step masks
        xw = x.astype(np.float32)
        z = (pruned_input(xw, mode, tau) if tokens == 1 or prefill == "sparse" else xw) - np.float32(mode)
        expected = z @ dequant.T + mode * dequant.sum(1)  # z'·W + the folded bias m·rowsum(W)
        atol = 1e-4 * (np.abs(z) @ np.abs(dequant.T) + np.abs(mode * dequant.sum(1))) + HALF_ULP * np.abs(expected)
        out = ov.Tensor(ov.Type.f16, ov.Shape([1]))
        assert op.evaluate([out], [ov.Tensor(x), *(ov.Tensor(op.input_value(i).get_node().data) for i in (1, 2))])
        for y in (np.array(compiled({"x": x})[0]), out.data):
            assert y.dtype == np.float16
            assert np.all(np.abs(y.astype(np.float32) - expected) <= atol), (tokens, np.abs(y - expected).max())


def test_other_x_types_are_refused_in_one_line():
    """OpenVINO: an i32 x is refused with the contract's line (docs/op.md), a line of its own in the error."""
    _, _, op, _ = _f16_op("f32", "dense")
    op.input(0).replace_source_output(ops.parameter([-1, -1, 64], np.int32).output(0))
    with pytest.raises(RuntimeError) as e:
        op.validate_and_infer_types()
    assert re.search(r"^ActSparseMatMul: x must be f32, bf16 or f16, got another type$", str(e.value), re.M), str(e.value)


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.INT32])
def test_onnxruntime_keeps_f32_x(elem):
    """ONNX Runtime's schema declares x float32: an f16 or i32 x is refused in one line when the session loads."""
    pytest.importorskip("onnxruntime")
    skip_without_extension(onnxruntime_problem())
    from test_onnxruntime_op import make_model, session

    model = onnx.load_from_string(make_model(make_weight("f32", 8, 4, 0, np.random.default_rng(0)), None, 0.0, 0.5))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.elem_type = elem
    with pytest.raises(Exception) as e:
        session(model.SerializeToString(), 1)
    assert len(str(e.value).strip().splitlines()) == 1 and "of input parameter (x)" in str(e.value), str(e.value)


def _converted_to_f16(fmt):
    """A fused one-MatMul model (f32 x) through OpenVINO's ConvertFP32ToFP16, the ConvertPrecision the GPU plugin
    applies at its default precision; the f32 model; its core."""
    model, plan, _ = _one_matmul(fmt, 33, 64, 0.25, 0.6, "sparse")
    assert fuse(model, plan) == {"fused": 1, "refused": 0, "mlp": 0}
    core = ov.Core()
    register(core)
    model = materialize(model, core)
    converted = model.clone()
    manager = passes.Manager()
    manager.register_pass(passes.ConvertFP32ToFP16())
    manager.run_passes(converted)
    return converted, model, core


@pytest.mark.parametrize("fmt", ["f32", "f16", "u8"])
def test_convert_precision_to_f16_turns_f32_params_f16_too(fmt):
    """ConvertPrecision to f16 turns the op's x into f16, which it takes, but its f32 params too, which the
    contract refuses: why load(device="GPU") still asks the plugin for f32."""
    with pytest.raises(RuntimeError) as e:
        _converted_to_f16(fmt)
    assert re.search(r"ActSparseMatMul \(opset1::Multiply [^ ]*:f16.*\n"
                     r"ActSparseMatMul: params must be f32 for weight_format " + fmt + ", got f16$", str(e.value), re.M), str(e.value)


def test_convert_precision_to_f16_keeps_compact_u4_params():
    """u4 with compact params (u8 bytes): after ConvertPrecision to f16 the op reads f16 x and returns f16 y,
    the model compiles on the CPU, and its y is the f32 model's on the same (f16) x, rounded to f16."""
    converted, model, core = _converted_to_f16("u4")
    op = next(o for o in converted.get_ordered_ops() if o.get_type_name() == OP_TYPE)
    assert [op.get_input_element_type(i).get_type_name() for i in range(3)] == ["f16", "u8", "u8"]
    assert op.get_output_element_type(0) == ov.Type.f16
    x = np.random.default_rng(4).normal(size=(2, DECODE_ROWS + 5, 64)).astype(np.float16)
    for xs in (x[:, :1], x):
        y = np.array(core.compile_model(converted, "CPU", EXACT_CONFIG)({"x": xs})[0])
        expected = np.array(core.compile_model(model, "CPU", EXACT_CONFIG)({"x": xs.astype(np.float32)})[0])
        assert y.dtype == np.float16
        np.testing.assert_allclose(y.astype(np.float32), expected, rtol=HALF_ULP, atol=1e-6)
