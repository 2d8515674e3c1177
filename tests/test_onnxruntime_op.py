"""ai.actsparse::ActSparseMatMul in ONNX Runtime (libactsparse_onnxruntime.so) against a numpy reference,
and OpenVINO reading the same one-node ONNX file."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from actsparse._common import ActSparseError
from actsparse.backends.onnx.runtime import EXACT_CONFIG, onnxruntime_problem, session_options
from actsparse.runtime_ext import ONNXRUNTIME_LIBRARY
from actsparse.runtime_ext import kernels as ks
from conftest import skip_without_extension
from reference import (DECODE_ROWS, int8_groups, int8_live, make_weight, multiplies_in_bf16, quantises_activations, torch_bf16,
                       weights_in_bf16)

skip_without_extension(onnxruntime_problem())

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

# (K, N): not multiples of the vector width; N > 2048 spans several stored column tiles
SHAPES = [(1, 1), (7, 3), (64, 17), (130, 33), (1, 40), (100, 1), (9, 4500)]
U4_SHAPES = [(32, 1), (64, 17), (128, 33), (256, 100), (384, 3)]
GROUPS = [32, 64, 128]


def weight_cases():
    for fmt in ("f32", "f16", "bf16", "u8"):
        for K, N in SHAPES:
            yield pytest.param(fmt, K, N, 0, id=f"{fmt}-K{K}-N{N}")
    for K, N in U4_SHAPES:
        for G in GROUPS:
            if K % G == 0:
                yield pytest.param("u4", K, N, G, id=f"u4-K{K}-N{N}-G{G}")


def make_model(packed, bias, mode, tau, prefill="dense", rank=3, tile_attr=True) -> bytes:
    """One ActSparseMatMul node; the weight (raw bytes for f16/bf16/u8/u4) and params are initializers.
    Without tile_attr the node has no tile_cols, as files exported before it (2048-column tiles)."""
    data = packed.data.view(np.uint8) if packed.format in ("f16", "bf16") else packed.data
    params = [p.reshape(-1) for p in (bias, packed.scale, packed.zero_point) if p is not None]
    params = np.concatenate(params).astype(np.float32) if params else np.zeros(0, np.float32)
    node = helper.make_node("ActSparseMatMul", ["x", "weight", "params"], ["y"], domain="ai.actsparse",
                            weight_format=packed.format, out_features=packed.N, group_size=packed.group_size,
                            mode=float(mode), threshold=float(tau), prefill=prefill, has_bias=int(bias is not None),
                            **({"tile_cols": packed.tile_cols} if tile_attr else {}))
    dims = ["batch", "seq"][:rank - 1]
    graph = helper.make_graph(
        [node], "actsparse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, packed.K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, packed.N])],
        [numpy_helper.from_array(data, "weight"), numpy_helper.from_array(params, "params")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.actsparse", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return model.SerializeToString()


def session(model: bytes | str, threads: int, config: dict | None = None) -> ort.InferenceSession:
    """A session with the library; by default f32 activations throughout (EXACT_CONFIG)."""
    options = session_options(threads, EXACT_CONFIG if config is None else config)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def reference(x, packed, bias, mode, tau, mask):
    """float64 numpy: z' = x − m, zeroed where |x − m| ≤ τ when masked (NaN stays live); y = z'·W + bias.
    Also the sum of |terms| per output, the scale of the rounding error."""
    z = x.astype(np.float64) - np.float32(mode)
    if mask:
        z = np.where(~(np.abs(z) <= tau), z, 0.0)
    if multiplies_in_bf16(packed.format, x.size // packed.K):
        z = torch_bf16(z)
    w = ks.dequantize(packed)
    w = (torch_bf16(w) if weights_in_bf16(packed.format, x.size // packed.K) else w).astype(np.float64)
    b = 0.0 if bias is None else bias.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return z @ w + b, np.abs(z) @ np.abs(w) + np.abs(b)


def check(y, ref, scale, what):
    assert y.shape == ref.shape, f"{what}: shape {y.shape} != {ref.shape}"
    err = np.abs(y - ref)
    tol = 1e-4 * scale + 1e-6
    assert np.all(err <= tol), f"{what}: max err {err.max():.3g}, worst ratio {np.max(err / tol):.3g}"


def make_x(shape, mode, sparsity, rng, tau=0.5):
    """x with about `sparsity` of its channels within τ of the mode, the rest clearly outside."""
    z = rng.uniform(0.6, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    z[rng.random(shape) < sparsity] *= tau / 2.0
    return (z + mode).astype(np.float32)


@pytest.mark.parametrize("fmt,K,N,G", list(weight_cases()))
def test_formats_and_shapes(fmt, K, N, G):
    rng = np.random.default_rng(K * 7919 + N * 31 + G)
    packed = make_weight(fmt, K, N, G, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    mode, tau = 0.3, 0.5
    for rank, shape, mask in [(1, (K,), True), (2, (1, K), True), (2, (3, K), False), (3, (2, 1, K), True),
                              (3, (2, 5, K), False)]:
        for threads in (1, 2):
            s = session(make_model(packed, bias if rank != 2 else None, mode, tau, rank=rank), threads)
            x = make_x(shape, mode, 0.5, rng, tau)
            y = s.run(None, {"x": x})[0]
            ref, scale = reference(x, packed, bias if rank != 2 else None, mode, tau, mask)
            check(y, ref, scale, f"{fmt} x{shape} threads={threads}")


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "u8", "u4"])
def test_prefill_dense_and_sparse(fmt):
    rng = np.random.default_rng(1)
    packed = make_weight(fmt, 256, 130, 64, rng)
    bias = rng.standard_normal(130).astype(np.float32)
    x = make_x((2, 7, 256), -0.4, 0.6, rng)
    for prefill, mask in [("dense", False), ("sparse", True)]:
        for threads in (1, 2):
            y = session(make_model(packed, bias, -0.4, 0.5, prefill), threads).run(None, {"x": x})[0]
            ref, scale = reference(x, packed, bias, -0.4, 0.5, mask)
            check(y, ref, scale, f"{fmt} prefill={prefill} threads={threads}")
    dense, _ = reference(x, packed, bias, -0.4, 0.5, False)
    assert np.abs(ref - dense).max() > 1e-3, "the sparse case must differ from dense to test anything"


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "u8", "u4"])
def test_all_pruned_gives_bias_and_none_pruned_is_dense(fmt):
    rng = np.random.default_rng(2)
    packed = make_weight(fmt, 128, 37, 32, rng)
    bias = rng.standard_normal(37).astype(np.float32)
    x = rng.uniform(-0.5, 0.5, (3, 1, 128)).astype(np.float32) + 0.7
    for threads in (1, 2):
        y = session(make_model(packed, bias, 0.7, 0.5), threads).run(None, {"x": x})[0]
        assert np.array_equal(y, np.broadcast_to(bias, (3, 1, 37))), "every channel within τ: y must be the bias"
        y = session(make_model(packed, bias, 0.7, 0.0), threads).run(None, {"x": x})[0]  # τ = 0 keeps all (x ≠ m)
        ref, scale = reference(x, packed, bias, 0.7, 0.0, False)
        check(y, ref, scale, f"{fmt} τ=0 threads={threads}")


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "u8", "u4"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs_propagate(fmt, bad):
    rng = np.random.default_rng(3)
    packed = make_weight(fmt, 64, 33, 32, rng)
    for shape, prefill in [((3, 1, 64), "dense"), ((1, 6, 64), "sparse"), ((1, 6, 64), "dense")]:
        x = make_x(shape, 0.0, 0.5, rng)
        x.reshape(-1, 64)[-1, 5] = bad
        y = session(make_model(packed, None, 0.0, 0.5, prefill), 2).run(None, {"x": x})[0].reshape(-1, 33)
        if np.isnan(bad):
            assert np.isnan(y[-1]).all(), "NaN is never masked away: it must reach every output of its row"
        else:  # numpy gives ±inf, or NaN where the row's weight is 0; u8/u4 subtract zero-point sums (inf − inf)
            assert not np.isfinite(y[-1]).any(), "an infinite input must reach every output of its row"
        mask = shape[1] == 1 or prefill == "sparse"
        ref, scale = reference(x.reshape(-1, 64)[:-1], packed, None, 0.0, 0.5, mask)
        check(y[:-1], ref, scale, f"{fmt} other rows ({shape}, {prefill})")


def test_concurrent_runs_on_one_and_two_sessions():
    """Several Python threads in session.run at once (ORT releases the GIL): decode and prefill inputs,
    big enough for the threaded paths, on one shared session and on two."""
    rng = np.random.default_rng(4)
    cases = []
    for fmt in ("f32", "u4"):
        packed = make_weight(fmt, 512, 1024, 128, rng)
        bias = rng.standard_normal(1024).astype(np.float32)
        model = make_model(packed, bias, 0.1, 0.5, "sparse")
        inputs = [make_x((1, s, 512), 0.1, 0.5, rng) for s in (1, 1, 3, 9)]
        refs = [reference(x, packed, bias, 0.1, 0.5, True) for x in inputs]
        cases.append((model, inputs, refs))
    errors = []

    def worker(sess, inputs, refs, seed):
        try:
            order = np.random.default_rng(seed).permutation(len(inputs) * 5) % len(inputs)
            for i in order:
                check(sess.run(None, {"x": inputs[i]})[0], *refs[i], f"concurrent input {i}")
        except Exception as err:  # noqa: BLE001 — reported from the main thread
            errors.append(err)

    for model, inputs, refs in cases:
        shared = session(model, 2)
        sessions = [shared, shared, shared, session(model, 2), session(model, 1)]
        threads = [threading.Thread(target=worker, args=(s, inputs, refs, i)) for i, s in enumerate(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


def _openvino_core():
    """An OpenVINO Core with the extension, through which its ONNX frontend builds the op (else the test skips)."""
    import openvino as ov

    from actsparse.backends.openvino.runtime import extension_problem
    from actsparse.runtime_ext import register

    skip_without_extension(extension_problem())
    core = ov.Core()
    register(core)
    return core


@pytest.mark.parametrize("fmt,G", [("f32", 0), ("f16", 0), ("bf16", 0), ("u8", 0), ("u4", 32), ("u4", 64), ("u4", 128)])
@pytest.mark.parametrize("prefill", ["dense", "sparse"])
def test_openvino_reads_the_same_onnx(tmp_path, fmt, G, prefill):
    core = _openvino_core()
    rng = np.random.default_rng(5)
    packed = make_weight(fmt, 256, 70, G, rng)
    bias = rng.standard_normal(70).astype(np.float32)
    path = tmp_path / "actsparse.onnx"
    path.write_bytes(make_model(packed, bias, 0.2, 0.5, prefill))
    ort_session = session(str(path), 2)
    compiled = core.compile_model(core.read_model(path), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"})
    for shape in [(1, 1, 256), (2, 6, 256)]:
        x = make_x(shape, 0.2, 0.5, rng)
        y_ort = ort_session.run(None, {"x": x})[0]
        y_ov = compiled(x)[0]
        ref, scale = reference(x, packed, bias, 0.2, 0.5, shape[1] == 1 or prefill == "sparse")
        check(y_ort, ref, scale, f"ORT {fmt} {shape}")
        check(y_ov, y_ort, scale, f"OpenVINO vs ORT {fmt} {shape}")


@pytest.mark.parametrize("fmt", ["u8", "u4"])
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_tile_cols_attribute_and_files_without_it(tmp_path, fmt, legacy, runtime):
    """u8/u4 weights are stored in 8192-column tiles and the node says so (tile_cols); a node without
    the attribute was exported with 2048-column tiles. ORT and OpenVINO's ONNX frontend read both."""
    rng = np.random.default_rng(8)
    packed = make_weight(fmt, 64, 8300, 32, rng, ks.LEGACY_TILE_COLS if legacy else 0)
    assert packed.tile_cols == (2048 if legacy else 8192)
    bias = rng.standard_normal(8300).astype(np.float32)
    path = tmp_path / "actsparse.onnx"
    path.write_bytes(make_model(packed, bias, 0.2, 0.5, "sparse", tile_attr=not legacy))
    if runtime == "onnxruntime":
        sess = session(str(path), 2)

        def run(x):
            return sess.run(None, {"x": x})[0]
    else:
        core = _openvino_core()
        compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

        def run(x):
            return compiled(x)[0]
    for shape in [(1, 1, 64), (1, 6, 64)]:
        x = make_x(shape, 0.2, 0.5, rng)
        ref, scale = reference(x, packed, bias, 0.2, 0.5, True)
        check(run(x), ref, scale, f"{fmt} legacy={legacy} {shape}")


@pytest.mark.parametrize("fmt,G", [("u8", 0), ("u4", 32), ("u4", 128)])
def test_int8_activations_follow_the_sessions_accuracy_level(fmt, G):
    """ORT quantises the activations of its own int8/int4 MatMuls (DequantizeLinear → MatMul fused into
    MatMulNBits) at session.qdq_matmulnbits_accuracy_level 4, its default: then so do u8/u4 ops, as the kernel
    core's int8_activations (up to DECODE_ROWS rows: runs of 8 live channels; more: groups of 32, u4 where 128 divides the
    group size), on a kernel with int8 dot products. Other levels keep them f32. Sessions of both kinds live in
    one process and keep their own behaviour."""
    rng = np.random.default_rng(9)
    K, N, mode, tau = 256, 70, 0.2, 0.5
    packed = make_weight(fmt, K, N, G, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    model = make_model(packed, bias, mode, tau, "sparse")
    sessions = {level: session(model, 2, {} if level is None else {"session.qdq_matmulnbits_accuracy_level": level})
                for level in (None, "4", "1", "0")}
    w = ks.dequantize(packed).astype(np.float64)
    for shape in [(1, 1, K), (3, 1, K), (1, 7, K), (1, DECODE_ROWS + 3, K)]:
        x = make_x(shape, mode, 0.5, rng, tau)
        rows = int(np.prod(shape[:-1]))
        plain, scale = reference(x, packed, bias, mode, tau, True)
        z = (x - np.float32(mode)).reshape(rows, K)
        z = np.where(np.abs(z) <= tau, np.float32(0), z)
        quantised = quantises_activations(fmt, rows, group_size=G)
        if quantised:
            q = int8_live(z, G if fmt == "u4" else 0) if rows <= DECODE_ROWS else int8_groups(z)
            expected = (q.astype(np.float64) @ w + bias).reshape(plain.shape)
            assert np.abs(expected - plain).max() > 1e-4 * scale.max(), "the quantisation must change the product"
        for level, sess in sessions.items():
            y = sess.run(None, {"x": x})[0]
            check(y, expected if quantised and level in (None, "4") else plain, scale, f"{fmt} {shape} level {level}")


def test_output_shape_is_inferred():
    model = onnx.load_from_string(make_model(make_weight("f32", 16, 5, 0, np.random.default_rng(7)), None, 0, 0.5))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    shape = session(model.SerializeToString(), 1).get_outputs()[0].shape
    assert shape[1:] == [1, 5] and shape[0] == model.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_bad_inputs_are_reported():
    packed = make_weight("u8", 64, 8, 0, np.random.default_rng(6))
    model = onnx.load_from_string(make_model(packed, None, 0.0, 0.5))
    model.graph.input[0].type.tensor_type.shape.dim[-1].dim_param = "K"  # so ORT lets a wrong K reach the op
    sess = session(model.SerializeToString(), 1)
    with pytest.raises(Exception, match="weight has 512 bytes, expected 256"):  # x's K (32) disagrees with the weight
        sess.run(None, {"x": np.zeros((1, 1, 32), np.float32)})
    bad = make_model(ks.PackedWeight("u8", 64, 8, 64, packed.data, packed.scale[:4], packed.zero_point), None, 0, 0.5)
    with pytest.raises(Exception, match="params has 48 bytes, expected 64"):
        session(bad, 1).run(None, {"x": np.zeros((1, 1, 64), np.float32)})
    bad = ks.PackedWeight("u8", 64, 8, 64, packed.data, packed.scale, packed.zero_point, tile_cols=100)
    with pytest.raises(Exception, match="tile_cols must be a power of two from 128 to 8192, got 100"):
        session(make_model(bad, None, 0, 0.5), 1).run(None, {"x": np.zeros((1, 1, 64), np.float32)})


def _u2_model():
    model = onnx.load_from_string(make_model(make_weight("u8", 64, 8, 0, np.random.default_rng(6)), None, 0.0, 0.5))
    next(a for a in model.graph.node[0].attribute if a.name == "weight_format").s = b"u2"
    return model


def test_unknown_weight_format_is_named_by_onnxruntime():
    with pytest.raises(Exception, match="unknown weight_format 'u2'"):
        session(_u2_model().SerializeToString(), 1)


def test_unknown_weight_format_is_named_by_openvino(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(_u2_model().SerializeToString())
    core = _openvino_core()
    with pytest.raises(Exception, match="unknown weight_format 'u2'"):
        core.read_model(path)


def test_missing_library_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_EXT_DIR", str(tmp_path))
    with pytest.raises(ActSparseError, match=ONNXRUNTIME_LIBRARY):
        session_options()
    assert ONNXRUNTIME_LIBRARY in onnxruntime_problem()
