"""ActSparseMatMul in OpenVINO: the fusion pass and the C++ op against the unfused reference and numpy."""
import json
import subprocess
import sys

import numpy as np
import openvino as ov
import pytest
from openvino import opset13 as ops

import actsparse
from actsparse.backends.openvino.calibration import find_groups
from actsparse.backends.openvino.fuse import fuse, materialize, read_weight
from actsparse.backends.openvino.graph import EXACT_CONFIG
from actsparse.backends.openvino.passes import apply_plan, set_prefill_sparse
from actsparse.backends.openvino.runtime import extension_problem, read_model
from actsparse.runtime_ext import MLP_TYPE, OP_TYPE, register
from conftest import plan_of, run_cli, skip_without_extension
from reference import (DECODE_ROWS, int8_groups, int8_live, multiplies_in_bf16, ov_logits, pruned_input, quantises_activations, torch_bf16,
                       weights_in_bf16)

skip_without_extension(extension_problem())
RNG = np.random.default_rng(0)
NAME = "__module.model.layers.0.mlp.down_proj/aten::linear/MatMul"


def _compressed(fmt, n, k, group=32):
    """A weight subgraph as NNCF writes it, and the dequantised [N, K] matrix it computes."""
    if fmt == "f32":
        w = RNG.normal(size=(n, k)).astype(np.float32)
        return ops.constant(w), w
    if fmt == "f16":
        w = RNG.normal(size=(n, k)).astype(np.float16)
        return ops.convert(ops.constant(w), "f32"), w.astype(np.float32)
    shape = (n, k) if fmt == "u8" else (n, k // group, group)
    zshape = (n, 1) if fmt == "u8" else (n, k // group, 1)
    top = 256 if fmt == "u8" else 16
    q = RNG.integers(0, top, size=shape).astype(np.uint8)
    zp = RNG.integers(0, top, size=zshape).astype(np.uint8)
    scale = RNG.uniform(0.01, 0.1, size=zshape).astype(np.float16)
    codes, zero = (ops.constant(q), ops.constant(zp)) if fmt == "u8" else (
        ov.op.Constant(ov.Tensor(q, shape, ov.Type.u4)) if False else ops.constant(q, ov.Type.u4),
        ops.constant(zp, ov.Type.u4))
    w = ops.multiply(ops.subtract(ops.convert(codes, "f16"), ops.convert(zero, "f16")), ops.constant(scale))
    if fmt == "u4":
        w = ops.reshape(w, ops.constant(np.array([n, k], np.int64)), False)
    dequant = ((q.astype(np.float32) - zp) * scale.astype(np.float32)).reshape(n, k)
    return ops.convert(w, "f32"), dequant


def _one_matmul(fmt, n, k, mode, tau, prefill):
    x = ops.parameter([-1, -1, k], np.float32, name="x")
    h = ops.multiply(x, np.float32(1.0), name="__module.model.layers.0.mlp/aten::mul/Multiply")
    weight, dequant = _compressed(fmt, n, k)
    mm = ops.matmul(h, weight, False, True, name=NAME)
    model = ov.Model([mm], [x])
    groups = find_groups(model, {"down"})
    plan = {"layers": [{"module": t.module, "node": t.node, "kind": t.kind, "group": g.name, "in_features": k,
                        "out_features": n, "mode": mode, "threshold": tau, "target_sparsity": 0.5}
                       for g in groups for t in g.targets]}
    apply_plan(model, plan, prefill)
    return model, plan, dequant


def _run(model, x, config=EXACT_CONFIG):
    core = ov.Core()
    register(core)
    compiled = core.compile_model(materialize(model, core), "CPU", config)
    return np.array(compiled.create_infer_request().infer({"x": x})[compiled.output(0)])


@pytest.mark.parametrize("fmt", ["f32", "f16", "u8", "u4"])
@pytest.mark.parametrize("n,k", [(33, 64), (7, 96), (1, 32)])
@pytest.mark.parametrize("mode", [0.0, 0.25])
def test_one_node_matches_numpy_and_the_unfused_pattern(fmt, n, k, mode):
    tau = 0.6
    model, plan, dequant = _one_matmul(fmt, n, k, mode, tau, "sparse")
    x = RNG.normal(size=(2, 3, k)).astype(np.float32)
    x[0, 0, :4] = mode  # exactly at the mode: pruned
    unfused = _run(model, x)
    assert fuse(model, plan) == {"fused": 1, "refused": 0, "mlp": 0}
    assert [op.get_type_name() for op in model.get_ordered_ops()].count(OP_TYPE) == 1
    assert "MatMul" not in [op.get_type_name() for op in model.get_ordered_ops()]
    fused = _run(model, x)
    # z'·W + m·rowsum(W) (the folded bias keeps f32 weights); this 6-token prefill multiplies in bf16 on
    # CPUs with AVX512-BF16 unless the weights are f32
    z, w = pruned_input(x, mode, tau) - np.float32(mode), dequant.T
    bf16 = multiplies_in_bf16(fmt, 6)
    if bf16:
        z, w = torch_bf16(z), torch_bf16(w) if weights_in_bf16(fmt, 6) else w
    expected = z @ w + mode * dequant.sum(1)
    atol = (2 ** -8 if bf16 else 1e-4) * (np.abs(z) @ np.abs(w)).max()
    np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-4 * np.abs(x).sum(-1, keepdims=True).max())
    np.testing.assert_allclose(fused, unfused, rtol=1e-4, atol=atol + 1e-4 * np.abs(x).sum(-1, keepdims=True).max())


def _ov_bf16(x: np.ndarray) -> np.ndarray:
    """x through OpenVINO's own f32 -> bf16 Convert (not round-to-nearest-even on every CPU)."""
    p = ops.parameter([-1], np.float32)
    model = ov.Model([ops.convert(ops.convert(p, "bf16"), "f32")], [p])
    return ov.Core().compile_model(model, "CPU", EXACT_CONFIG)({0: x.ravel()})[0].reshape(x.shape)


def test_bf16_plan_stores_fused_weights_in_bf16():
    """weight format bf16: the fused op holds W rounded to bf16 (half the bytes) and computes with it; it
    takes and returns bf16 activations (Converts around it), as OpenVINO's bf16 mode passes them anyway."""
    k, n, mode, tau = 96, 2100, 0.25, 0.6  # n spans two stored column tiles
    model, plan, dequant = _one_matmul("f32", n, k, mode, tau, "sparse")
    plan["weight_format"] = "bf16"
    x = RNG.normal(size=(2, 3, k)).astype(np.float32)
    unfused = _run(model, x)
    assert fuse(model, plan) == {"fused": 1, "refused": 0, "mlp": 0}
    op = next(o for o in model.get_ordered_ops() if o.get_type_name() == OP_TYPE)
    assert op.get_attributes()["weight_format"] == "bf16"
    assert op.input_value(1).get_node().get_byte_size() == 2 * k * n
    convert_in, convert_out = op.input_value(0).get_node(), next(iter(op.output(0).get_target_inputs())).get_node()
    assert [(c.get_type_name(), c.get_output_element_type(0).get_type_name()) for c in (convert_in, convert_out)] == \
        [("Convert", "bf16"), ("Convert", "f32")]
    atol = 1e-4 * np.abs(x).sum(-1, keepdims=True).max()
    for xs in (x[:, :1], x):  # one token per sequence (decode), then three (prefill, sparse here)
        fused = _run(model, xs)
        z = pruned_input(_ov_bf16(xs), mode, tau) - np.float32(mode)  # x arrives in bf16
        if multiplies_in_bf16("bf16", xs.shape[0] * xs.shape[1]):
            z = torch_bf16(z)  # prefill multiplies in bf16 on CPUs with AVX512-BF16
        # z'·W in bf16; the folded bias m·rowsum(W) keeps the f32 weights; the result leaves in bf16
        # (summed in another order, it may round to the neighbouring bf16 value: 2^-7 relative at most)
        expected = torch_bf16(z @ torch_bf16(dequant).T + mode * dequant.sum(1))
        np.testing.assert_allclose(fused, expected, rtol=2 ** -7, atol=atol)
    assert np.abs(fused - unfused).max() < 2 ** -7 * (np.abs(pruned_input(x, mode, tau)) @ np.abs(dequant.T)).max()


@pytest.mark.parametrize("fmt", ["f32", "f16", "u8", "u4"])
def test_consumers_of_one_input_become_one_op(fmt):
    """gate and up (odd widths) → one ActSparseMatMul over both weights, then a VariadicSplit."""
    k, mode, tau = 64, 0.1, 0.5
    x = ops.parameter([-1, -1, k], np.float32, name="x")
    h = ops.multiply(x, np.float32(1.0), name="__module.model.layers.0.post_attention_layernorm/aten::mul/Multiply")
    (wg, dg), (wu, du) = _compressed(fmt, 33, k), _compressed(fmt, 17, k)
    gate = ops.matmul(h, wg, False, True, name="__module.model.layers.0.mlp.gate_proj/aten::linear/MatMul")
    up = ops.matmul(h, wu, False, True, name="__module.model.layers.0.mlp.up_proj/aten::linear/MatMul")
    model = ov.Model([gate, up], [x])
    groups = find_groups(model, {"up"})
    plan = {"layers": [{"module": t.module, "node": t.node, "kind": t.kind, "group": g.name, "in_features": k,
                        "out_features": t.out_features, "mode": mode, "threshold": tau, "target_sparsity": 0.5}
                       for g in groups for t in g.targets]}
    apply_plan(model, plan, "sparse")
    assert fuse(model, plan) == {"fused": 2, "refused": 0, "mlp": 0}
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    assert types.count(OP_TYPE) == 1 and types.count("VariadicSplit") == 1
    xs = RNG.normal(size=(1, 3, k)).astype(np.float32)
    core = ov.Core()
    register(core)
    compiled = core.compile_model(materialize(model, core), "CPU", EXACT_CONFIG)
    result = compiled.create_infer_request().infer({"x": xs})
    z = pruned_input(xs, mode, tau) - np.float32(mode)  # z'; the folded bias adds mode·W back
    if multiplies_in_bf16(fmt, 3):
        z = torch_bf16(z)  # u4 decode steps multiply bf16 activations on CPUs with AVX512-BF16
    tol = 1e-4 * np.abs(xs).sum()
    np.testing.assert_allclose(result[compiled.output(0)], z @ dg.T + mode * dg.sum(1), rtol=1e-4, atol=tol)
    np.testing.assert_allclose(result[compiled.output(1)], z @ du.T + mode * du.sum(1), rtol=1e-4, atol=tol)


def test_dense_prefill_and_decode_and_every_channel_pruned():
    model, plan, dequant = _one_matmul("f32", 40, 64, -0.2, 0.5, "dense")
    fuse(model, plan)
    prompt = RNG.normal(size=(1, 5, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(model, prompt), prompt @ dequant.T, rtol=1e-4, atol=1e-3)
    step = RNG.normal(size=(1, 1, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(model, step), pruned_input(step, -0.2, 0.5) @ dequant.T, rtol=1e-4, atol=1e-3)
    quiet = np.full((1, 1, 64), -0.2, np.float32)  # every channel at the mode: the output is b' exactly
    np.testing.assert_allclose(_run(model, quiet), quiet @ dequant.T, rtol=1e-5, atol=1e-4)
    assert set_prefill_sparse(model) == 1
    np.testing.assert_allclose(_run(model, prompt), pruned_input(prompt, -0.2, 0.5) @ dequant.T, rtol=1e-4, atol=1e-3)


def test_paged_attention_layout_prunes_only_single_row_steps():
    """openvino-genai's PagedAttention flattens every sequence's tokens into rows of [tokens, 1, K] (a static 1):
    a prompt there must stay dense, as it does in the stateful graph, and only a one-row step is pruned. In the
    stateful graph, one token per sequence is a decode step at any batch size."""
    model, plan, dequant = _one_matmul("f32", 40, 64, -0.2, 0.5, "dense")
    fuse(model, plan)
    rows = RNG.normal(size=(5, 1, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(model, rows), pruned_input(rows, -0.2, 0.5) @ dequant.T, rtol=1e-4, atol=1e-3)
    model.reshape({"x": [-1, 1, 64]})
    np.testing.assert_allclose(_run(model, rows), rows @ dequant.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(_run(model, rows[:1]), pruned_input(rows[:1], -0.2, 0.5) @ dequant.T, rtol=1e-4, atol=1e-3)
    assert set_prefill_sparse(model) == 1
    np.testing.assert_allclose(_run(model, rows), pruned_input(rows, -0.2, 0.5) @ dequant.T, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("legacy", [False, True])
def test_ir_without_tile_cols_reads_2048_column_tiles(legacy):
    """The op's tile_cols says how W is stored (exports write it; u8 uses 8192-column tiles); an IR
    written before the attribute existed has none and was stored in 2048-column tiles."""
    from actsparse.backends.openvino.twins import ActSparseMatMul
    from actsparse.runtime_ext import kernels as ks

    k, n, mode, tau = 64, 8300, 0.1, 0.6
    q = RNG.integers(0, 256, (k, n)).astype(np.uint8)
    scale, zp = RNG.uniform(0.01, 0.1, n).astype(np.float32), RNG.integers(100, 156, n).astype(np.float32)
    packed = ks.pack_u8(q, scale, zp, ks.LEGACY_TILE_COLS if legacy else 0)
    attrs = {"weight_format": "u8", "out_features": n, "group_size": k, "mode": mode, "threshold": tau,
             "prefill": "sparse", "has_bias": False, **({} if legacy else {"tile_cols": packed.tile_cols})}
    x = ops.parameter([-1, -1, k], np.float32, name="x")
    op = ActSparseMatMul([x.output(0), ops.constant(packed.data).output(0),
                          ops.constant(np.concatenate([scale, zp])).output(0)], attrs)
    model = ov.Model([op.output(0)], [x])
    dequant = (q - zp) * scale
    for xs in (RNG.normal(size=(1, 1, k)), RNG.normal(size=(1, 5, k))):
        xs = xs.astype(np.float32)
        z, w = pruned_input(xs, mode, tau) - mode, dequant
        if weights_in_bf16("u8", xs.shape[1]):  # a prefill on CPUs with AVX512-BF16
            z, w = torch_bf16(z), torch_bf16(w)
        np.testing.assert_allclose(_run(model, xs), z @ w, rtol=1e-4, atol=1e-4 * np.abs(xs).sum() * np.abs(dequant).max())


def test_u4_params_compact_and_f32_give_the_same_results():
    """The fusion stores u4 params compactly, as u8 bytes [bias f32 | scale f16 | zero point u8] (NNCF's own
    f16 scales and u4 zero points, exactly); an IR with the f32 layout [bias | scale | zero point] (written
    before) gives bitwise the same results, decode and prefill."""
    k, n, mode, tau, group = 128, 40, 0.25, 0.6, 32
    model, plan, dequant = _one_matmul("u4", n, k, mode, tau, "sparse")
    fuse(model, plan)
    op = next(o for o in model.get_ordered_ops() if o.get_type_name() == OP_TYPE)
    params = op.input_value(2).get_node().get_data()
    ng = k // group
    assert params.dtype == np.uint8 and params.size == 4 * n + 3 * ng * n
    bias, scale = params[:4 * n].view(np.float32), params[4 * n:4 * n + 2 * ng * n].view(np.float16)
    zp = params[4 * n + 2 * ng * n:]
    np.testing.assert_allclose(bias, mode * dequant.sum(1), rtol=1e-5)
    xs = [RNG.normal(size=(1, t, k)).astype(np.float32) for t in (1, 7)]
    compact = [_run(model, x) for x in xs]
    legacy = np.concatenate([bias, scale.astype(np.float32), zp.astype(np.float32)])
    op.input(2).replace_source_output(ops.constant(legacy).output(0))
    for x, y in zip(xs, compact):
        np.testing.assert_array_equal(_run(model, x), y)


def test_bad_tile_cols_is_refused_when_the_ir_is_read():
    from actsparse.backends.openvino.twins import ActSparseMatMul

    x = ops.parameter([-1, 8], np.float32, name="x")
    op = ActSparseMatMul([x.output(0), ops.constant(np.zeros((8, 4), np.float32)).output(0),
                          ops.constant(np.zeros(0, np.float32)).output(0)],
                         {"weight_format": "f32", "out_features": 4, "group_size": 0, "mode": 0.0, "threshold": 0.5,
                          "prefill": "dense", "has_bias": False, "tile_cols": 100})
    core = ov.Core()
    register(core)
    with pytest.raises(Exception, match="tile_cols must be a power of two from 128 to 8192, got 100"):
        materialize(ov.Model([op.output(0)], [x]), core)


def _fused(fmt, n, k, mode, tau):
    """A fused one-node model (Python twin), its dequantised [N, K] weight, and a Core with the extension."""
    model, plan, dequant = _one_matmul(fmt, n, k, mode, tau, "sparse")
    fuse(model, plan)
    core = ov.Core()
    register(core)
    return model, dequant, core


def test_bf16_graphs_give_the_op_a_bf16_prefill():
    """Where OpenVINO runs a graph in bf16, it widens x to f32 for the op (a custom op keeps its declared types):
    the op sees that x holds bf16 values and multiplies a prompt in bf16, as the plugin's own FullyConnected does,
    with nothing done to the graph. A decode step, and x with other values, stay exact."""
    k, n, mode, tau = 64, 40, 0.1, 0.6
    model, dequant, core = _fused("u8", n, k, mode, tau)
    x = model.get_parameters()[0]
    mul = next(iter(x.output(0).get_target_inputs())).get_node()
    # as in an LLM: a FullyConnected and a norm's Multiply, which the plugin runs in bf16, feed the op
    mul.input(0).replace_source_output(ops.matmul(x, RNG.normal(size=(k, k)).astype(np.float32) / 8, False, False).output(0))
    mul.input(1).replace_source_output(ops.constant(RNG.uniform(0.5, 2, k).astype(np.float32)).output(0))
    # the op's input, read out through an identity FullyConnected (a Result straight after the Multiply would keep
    # it in f32: the plugin leaves a graph's tail in f32)
    seen = ops.matmul(mul, np.eye(k, dtype=np.float32), False, False)
    model = ov.Model([model.get_results()[0].input_value(0), seen.output(0)], [x])
    config = {**EXACT_CONFIG, "INFERENCE_PRECISION_HINT": "bf16"}
    for tokens in (DECODE_ROWS + 4, 1):
        inputs = RNG.normal(size=(1, tokens, k)).astype(np.float32)
        result = core.compile_model(materialize(model, core), "CPU", config)({"x": inputs})
        y, h = result[0], result[1]
        assert not (h.view(np.uint32) & 0xFFFF).any()  # the op's input: bf16 values
        z, w = pruned_input(h, mode, tau) - np.float32(mode), dequant.T
        if multiplies_in_bf16("u8", tokens, bf16_io=True):
            z, w = torch_bf16(z), torch_bf16(w)
        np.testing.assert_allclose(y, z @ w + mode * dequant.sum(1), rtol=1e-5, atol=1e-5 * np.abs(h).sum())
    assert "Convert" not in [o.get_type_name() for o in model.get_ordered_ops()]
    x = RNG.normal(size=(1, 6, k)).astype(np.float32)  # f32 values: exact even under the bf16 hint
    fused, dequant, _ = _fused("u8", n, k, mode, tau)
    y = core.compile_model(materialize(fused, core), "CPU", config)({"x": x})[0]
    np.testing.assert_allclose(y, pruned_input(x, mode, tau) @ dequant.T, rtol=1e-4, atol=1e-4 * np.abs(x).sum())


@pytest.mark.parametrize("fmt", ["u8", "u4"])
def test_int8_activations_on_request(fmt):
    """Exports leave int8_activations off, so the op computes in f32 whatever the plugin's dynamic quantisation;
    backends.openvino.int8_activations turns it on (before compiling) for a decode step (runs of 8 live channels)
    and a prompt (u8: groups of 32 channels)."""
    from actsparse.backends.openvino.runtime import int8_activations

    k, n, mode, tau = 256, 96, 0.1, 0.6
    model, dequant, core = _fused(fmt, n, k, mode, tau)
    bias = mode * dequant.sum(1)
    for tokens in (1, DECODE_ROWS + 3):
        x = RNG.normal(size=(1, tokens, k)).astype(np.float32)
        z = (pruned_input(x, mode, tau) - np.float32(mode)).reshape(tokens, k)
        results = {}
        for name, config in [("exact", EXACT_CONFIG), ("default", {**EXACT_CONFIG, "DYNAMIC_QUANTIZATION_GROUP_SIZE": "32"}),
                             ("quantised", EXACT_CONFIG)]:
            fused = materialize(model, core)
            op = next(o for o in fused.get_ordered_ops() if o.get_type_name() == OP_TYPE)
            assert op.get_attributes()["int8_activations"] is False
            if name == "quantised":
                assert int8_activations(fused, True) == 1 and op.get_attributes()["int8_activations"] is True
            results[name] = core.compile_model(fused, "CPU", config)({"x": x})[0].reshape(tokens, n)
        atol = 1e-5 * (np.abs(z) @ np.abs(dequant.T)).max()
        plain = torch_bf16(z) if multiplies_in_bf16(fmt, tokens) else z  # u4 decode multiplies bf16 values on such CPUs
        np.testing.assert_allclose(results["exact"], plain @ dequant.T + bias, rtol=1e-5, atol=atol)
        np.testing.assert_array_equal(results["default"], results["exact"])
        quantised = plain
        if quantises_activations(fmt, tokens, group_size=32):  # _one_matmul's u4 groups are 32 channels (no int8 prefill)
            quantised = int8_live(z, 32 if fmt == "u4" else 0) if tokens == 1 else int8_groups(z)
        np.testing.assert_allclose(results["quantised"], quantised @ dequant.T + bias, rtol=1e-5, atol=atol)


def test_nan_propagates_through_the_op():
    model, plan, _ = _one_matmul("f32", 8, 32, 0.0, 100.0, "sparse")
    fuse(model, plan)
    x = np.zeros((1, 1, 32), np.float32)
    x[0, 0, 5] = np.nan
    assert np.isnan(_run(model, x)).all()


def test_refuses_what_it_cannot_fuse():
    x = ops.parameter([-1, -1, 16], np.float32, name="x")
    w = ops.multiply(ops.convert(ops.constant(RNG.integers(-8, 8, (4, 16)).astype(np.int8)), "f32"),
                     ops.constant(np.ones((4, 1), np.float32)))
    assert "not (codes − zero point) · scale" in read_weight(ops.matmul(x, w, False, True))


@pytest.fixture(scope="module")
def tiny_exports(tiny_llama, texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    common = dict(calibration=str(texts["calibration"]), calibration_samples=8, calibration_seq_len=64,
                  sparsity={"up": 0.4, "down": 0.5})
    first = actsparse.export(str(tiny_llama), root / "fp32-True", **common)
    common["plan"] = first / "actsparse.json"
    out = {("fp32", True): first}
    for fmt, fused in (("fp32", False), ("int8", True), ("int8", False)):
        out[fmt, fused] = actsparse.export(str(tiny_llama), root / f"{fmt}-{fused}", weight_format=fmt, fuse=fused,
                                           **common)
    return out


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_fused_export_matches_unfused(tiny_exports, fmt):
    fused, unfused = tiny_exports[fmt, True], tiny_exports[fmt, False]
    assert plan_of(fused)["passes"]["fused"] == 6 and "fused" not in plan_of(unfused)["passes"]
    fused_ops = [op.get_type_name() for op in read_model(ov.Core(), fused / "openvino_model.xml").get_ordered_ops()]
    assert fused_ops.count(MLP_TYPE) == 2 and OP_TYPE not in fused_ops  # per layer: one ActSparseMLP
    assert plan_of(fused)["passes"]["mlp"] == 2
    ops_in = {op.get_type_name() for op in ov.Core().read_model(unfused / "openvino_model.xml").get_ordered_ops()}
    assert OP_TYPE not in ops_in and "Select" in ops_in
    ids = np.arange(3, 43, dtype=np.int64)[None]
    for prefill_sparse in (False, True):  # dense prompt (exact), then every token pruned
        np.testing.assert_allclose(ov_logits(fused, ids, prefill_sparse), ov_logits(unfused, ids, prefill_sparse),
                                   atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(ov_logits(fused, ids[:, :1]), ov_logits(unfused, ids[:, :1]), atol=2e-4, rtol=1e-3)


def test_fused_ir_loads_in_a_fresh_process(tiny_exports):
    folder = tiny_exports["int8", True]
    code = ("import actsparse, sys; m = actsparse.load(sys.argv[1]); "
            "out = m.generate(input_ids=__import__('torch').tensor([[5, 6, 7]]), max_new_tokens=4, min_new_tokens=4, "
            "do_sample=False); print(out.shape[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "7"


def test_eval_of_a_fused_export_exits_cleanly(tiny_exports, texts):
    """evaluate() drops its Core before the op's nodes; that segfaulted while the Core unloaded the library."""
    proc = run_cli("eval", tiny_exports["fp32", True], "--text", texts["evaluation"], "--samples", "2", "--seq-len", "32",
                   "--json")
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert json.loads(proc.stdout)["sparsity"]["up"] > 0


def test_concurrent_requests_are_independent(tiny_exports):
    """Several streams and requests in flight at once: every result equals its sequential one."""
    from actsparse.backends.openvino.runtime import feed

    folder = tiny_exports["fp32", True]
    core = ov.Core()
    register(core)
    compiled = core.compile_model(folder / "openvino_model.xml", "CPU",
                                  {**EXACT_CONFIG, "NUM_STREAMS": "2", "INFERENCE_NUM_THREADS": "2"})
    names = [i.get_any_name() for i in compiled.inputs]
    inputs = [feed(names, RNG.integers(0, 300, (1, 1 + i % 3))) for i in range(12)]
    sequential = []
    for item in inputs:
        request = compiled.create_infer_request()
        sequential.append(np.array(request.infer(item)[compiled.output("logits")]))
    def run(item):  # a fresh request each: the KV cache state belongs to the request
        request = compiled.create_infer_request()
        request.start_async(item)
        request.wait()
        return np.array(request.get_tensor(compiled.output("logits")).data)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # four requests in flight over two streams
        results = list(pool.map(run, inputs * 3))
    sequential = sequential * 3
    for got, expected in zip(results, sequential):
        np.testing.assert_array_equal(got, expected)
