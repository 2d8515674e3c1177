"""ActSparseMLP in OpenVINO: a layer's MLP (up or gate+up, the activation, down) fused into one op, against numpy
and against its two ActSparseMatMuls."""
import math
import re

import numpy as np
import openvino as ov
import pytest
from openvino import opset13 as ops

from actsparse.backends.openvino.calibration import find_groups
from actsparse.backends.openvino.fuse import fuse, materialize
from actsparse.backends.openvino.mlp import split_mlp
from actsparse.backends.openvino.graph import EXACT_CONFIG
from actsparse.backends.openvino.passes import apply_plan
from actsparse.backends.openvino.runtime import extension_problem, prepare
from actsparse.backends.openvino.twins import ActSparseMLP
from actsparse.runtime_ext import MLP_TYPE, OP_TYPE, register
from conftest import skip_without_extension
from reference import pruned_input, quantises_activations
from test_fusion_openvino import _compressed

skip_without_extension(extension_problem())
RNG = np.random.default_rng(7)
PREFIX = "__module.model.layers.0.mlp"
ACTIVATIONS = {
    "silu": (lambda g: ops.swish(g), lambda v: v / (1 + np.exp(-v))),
    "gelu_erf": (lambda g: ops.gelu(g, "erf"), lambda v: 0.5 * v * (1 + np.vectorize(math.erf)(v / np.sqrt(2)))),
    "gelu_tanh": (lambda g: ops.gelu(g, "tanh"),
                  lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))),
}
MODES, TAUS = {"up": 0.1, "down": 0.02}, {"up": 0.5, "down": 0.08}


def _mlp(fmt, act, gate, inputs=(), k=64, inter=96, out=40, weight_format=None):
    """An MLP as optimum exports it, planned and fused; its numpy reference ``f(x)``; the plan's fusion counts.
    gate "first": act(gate_proj)·up_proj; "second": gate_proj·act(up_proj) (the concatenated weights put gate_proj
    first); "none": act(up_proj) alone (fc1 → fc2 MLPs). down's τ lies in the widest gap between the intermediate's
    values (|a − m|, near 0.08) over ``inputs``, so that no value sits within rounding of it."""
    x = ops.parameter([-1, -1, k], np.float32, name="x")
    h = ops.multiply(x, np.float32(1.0), name="__module.model.layers.0.post_attention_layernorm/aten::mul/Multiply")
    (wg, dg), (wu, du), (wd, dd) = (_compressed(fmt, n, kk) for n, kk in ((inter, k), (inter, k), (out, inter)))
    up = ops.matmul(h, wu, False, True, name=f"{PREFIX}.up_proj/aten::linear/MatMul")
    node, np_act = ACTIVATIONS[act]
    if gate == "none":
        a = node(up)
    else:
        g = ops.matmul(h, wg, False, True, name=f"{PREFIX}.gate_proj/aten::linear/MatMul")
        a = ops.multiply(node(g), up) if gate == "first" else ops.multiply(g, node(up))
    down = ops.matmul(a, wd, False, True, name=f"{PREFIX}.down_proj/aten::linear/MatMul")
    model = ov.Model([down], [x])

    def intermediate(xs):
        xs = pruned_input(xs.astype(np.float64), MODES["up"], TAUS["up"])
        u = xs @ du.T
        return np_act(u) if gate == "none" else np_act(xs @ dg.T) * u if gate == "first" else (xs @ dg.T) * np_act(u)

    taus = dict(TAUS)
    if inputs:
        values = np.sort(np.abs(np.concatenate([(intermediate(xs) - MODES["down"]).ravel() for xs in inputs])))
        window = values[(values > 0.04) & (values < 0.12)]
        widest = int(np.argmax(np.diff(window)))
        taus["down"] = float(np.float32((window[widest] + window[widest + 1]) / 2))
    plan = {"layers": [{"module": t.module, "node": t.node, "kind": t.kind, "group": grp.name,
                        "in_features": t.in_features, "out_features": t.out_features, "mode": MODES[kind],
                        "threshold": taus[kind], "target_sparsity": 0.5}
                       for kind in ("up", "down") for grp in find_groups(model, {kind}) for t in grp.targets],
            "weight_format": weight_format}
    apply_plan(model, plan, "sparse")
    counts = fuse(model, plan)

    def reference(xs, check=True):
        a = intermediate(xs)
        near = np.abs(np.abs(a - MODES["down"]) - taus["down"]) < 1e-5
        assert not (check and near.any()), "an intermediate value within rounding of τ: its mask could go either way"
        return pruned_input(a, MODES["down"], taus["down"]) @ dd.T

    return model, reference, counts


def _compile(model, config=EXACT_CONFIG):
    core = ov.Core()
    register(core)
    return core.compile_model(materialize(model, core), "CPU", config)


@pytest.mark.parametrize("fmt", ["f32", "f16", "u8"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("gate", ["first", "second", "none"])
def test_one_op_per_mlp_matches_numpy(fmt, act, gate):
    inputs = [RNG.normal(size=(1, tokens, 64)).astype(np.float32) for tokens in (1, 3, 24)]
    model, reference, counts = _mlp(fmt, act, gate, inputs)
    assert counts == {"fused": 2 if gate == "none" else 3, "refused": 0, "mlp": 1}
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    assert types.count(MLP_TYPE) == 1 and OP_TYPE not in types
    assert types.count("Multiply") == 1 and not {"Swish", "Gelu", "VariadicSplit"} & set(types)  # the norm's Multiply
    compiled = _compile(model)
    for xs in inputs:  # a decode step; prompts pruned here (prefill sparse), by rows and by the GEMM
        expected = reference(xs)
        np.testing.assert_allclose(compiled({"x": xs})[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("fmt", ["f32", "u8", "u4"])
def test_split_mlp_gives_back_the_two_ops(fmt):
    """split_mlp (for runtimes without ActSparseMLP, such as the GPU plugin's kernel) rebuilds the two ops and the
    activation between them, computing the same."""
    model, _, _ = _mlp(fmt, "silu", "first")
    xs = RNG.normal(size=(1, 5, 64)).astype(np.float32)
    fused = _compile(model)({"x": xs})[0]
    assert split_mlp(model) == 1
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    assert types.count(OP_TYPE) == 2 and MLP_TYPE not in types and {"Swish", "VariadicSplit"} <= set(types)
    np.testing.assert_allclose(_compile(model)({"x": xs})[0], fused, rtol=1e-4, atol=1e-4 * np.abs(fused).max())


def test_bf16_mlp_rounds_as_the_two_ops_do():
    """bf16 weights: the op takes and returns bf16 and rounds its intermediate to bf16 where the two ops' graph
    would hold it in bf16, so it computes as that graph does, within the rounding of one bf16 step."""
    model, reference, counts = _mlp("f32", "silu", "first", weight_format="bf16")  # its τ: only a scale here
    assert counts["mlp"] == 1
    xs = RNG.normal(size=(1, 20, 64)).astype(np.float32)
    core = ov.Core()
    register(core)
    unfused_model = materialize(model, core)
    assert split_mlp(unfused_model) == 1
    for config in (EXACT_CONFIG, {**EXACT_CONFIG, "INFERENCE_PRECISION_HINT": "bf16"}):
        for rows in (xs[:, :1], xs):
            fused = _compile(model, config)({"x": rows})[0]
            unfused = _compile(unfused_model, config)({"x": rows})[0]
            scale = np.abs(reference(rows, check=False)).max()
            np.testing.assert_allclose(fused, unfused, rtol=0, atol=2 ** -6 * scale)


def test_not_fused_where_the_intermediate_is_read_elsewhere():
    model, _, counts = _mlp_with_extra_reader()
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    assert counts == {"fused": 3, "refused": 0, "mlp": 0}
    assert types.count(OP_TYPE) == 2 and MLP_TYPE not in types


def _mlp_with_extra_reader():
    """_mlp's graph before fusion, with the activation's product read by a second Result."""
    x = ops.parameter([-1, -1, 64], np.float32, name="x")
    h = ops.multiply(x, np.float32(1.0), name="__module.model.layers.0.post_attention_layernorm/aten::mul/Multiply")
    (wg, _), (wu, _), (wd, _) = (_compressed("f32", n, kk) for n, kk in ((48, 64), (48, 64), (40, 48)))
    g = ops.matmul(h, wg, False, True, name=f"{PREFIX}.gate_proj/aten::linear/MatMul")
    up = ops.matmul(h, wu, False, True, name=f"{PREFIX}.up_proj/aten::linear/MatMul")
    a = ops.multiply(ops.swish(g), up)
    down = ops.matmul(a, wd, False, True, name=f"{PREFIX}.down_proj/aten::linear/MatMul")
    model = ov.Model([down, ops.reduce_sum(a, np.int64(-1), False)], [x])
    plan = {"layers": [{"module": t.module, "node": t.node, "kind": t.kind, "group": grp.name,
                        "in_features": t.in_features, "out_features": t.out_features, "mode": MODES[kind],
                        "threshold": TAUS[kind], "target_sparsity": 0.5}
                       for kind in ("up", "down") for grp in find_groups(model, {kind}) for t in grp.targets]}
    apply_plan(model, plan, "sparse")
    return model, plan, fuse(model, plan)


def test_prepare_for_gpu_splits_the_mlp():
    """The GPU plugin's kernel is ActSparseMatMul's: prepare() for a GPU gives each MLP its two ops back (real ones:
    the split model compiles as it is)."""
    xs = RNG.normal(size=(1, 1, 64)).astype(np.float32)
    model, reference, _ = _mlp("f32", "silu", "first", [xs, RNG.normal(size=(1, 8, 64)).astype(np.float32)])
    core = ov.Core()
    register(core)
    model = materialize(model, core)
    prepare(core, model, "GPU")
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    assert types.count(OP_TYPE) == 2 and MLP_TYPE not in types
    expected = reference(xs)
    np.testing.assert_allclose(core.compile_model(model, "CPU", EXACT_CONFIG)({"x": xs})[0], expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("edit,message", [
    (lambda a, i: i.__setitem__(1, ops.constant(np.zeros(7, np.uint8)).output(0)),
     "ActSparseMLP: blob has 7 bytes, expected 65440 for up_weight_bytes=49152, up_params_bytes=768, "
     "down_weight_bytes=15360, down_params_bytes=160 (each buffer from a multiple of 64 bytes)"),
    (lambda a, i: i.__setitem__(1, ops.constant(np.zeros(65440 // 4, np.float32)).output(0)),
     "ActSparseMLP: blob must be u8, got f32"),
    (lambda a, i: a.__setitem__("up_out_features", 191),
     "ActSparseMLP: up: params has 768 bytes, expected 764 for N=191, has_bias=1, weight_format f32"),
    (lambda a, i: a.__setitem__("activation", "relu"), "activation must be silu, gelu_erf or gelu_tanh, got 'relu'"),
    (lambda a, i: a.__setitem__("gate", "both"), "gate must be first, second or none, got 'both'"),
    (lambda a, i: a.__setitem__("down_threshold", float("nan")), "ActSparseMLP: down: threshold must be finite or +inf"),
])
def test_malformed_mlp_is_refused_in_one_line_when_read(edit, message):
    model, _, _ = _mlp("f32", "silu", "first")
    op = next(o for o in model.get_ordered_ops() if o.get_type_name() == MLP_TYPE)
    attrs, inputs = dict(op.get_attributes()), [op.input_value(i) for i in range(2)]
    edit(attrs, inputs)
    op.output(0).replace(ActSparseMLP(inputs, attrs).output(0))
    core = ov.Core()
    register(core)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        materialize(model, core)


def test_int8_activations_reach_both_projections():
    """backends.openvino.int8_activations sets each u8/u4 projection's flag, ActSparseMLP's two included; the op then
    quantises its activations to int8 and stays within that rounding of its f32 result."""
    from actsparse.backends.openvino.runtime import int8_activations

    xs = RNG.normal(size=(1, 1, 64)).astype(np.float32)
    model, reference, _ = _mlp("u8", "silu", "first", [xs, RNG.normal(size=(1, 8, 64)).astype(np.float32)])
    core = ov.Core()
    register(core)
    model = materialize(model, core)  # as an export is read
    exact = _compile(model)({"x": xs})[0]
    assert int8_activations(model, True) == 2
    op = next(o for o in model.get_ordered_ops() if o.get_type_name() == MLP_TYPE)
    assert op.get_attributes()["up_int8_activations"] and op.get_attributes()["down_int8_activations"]
    quantised = _compile(model)({"x": xs})[0]
    if quantises_activations("u8", 1):
        assert not np.array_equal(quantised, exact)
    else:
        np.testing.assert_array_equal(quantised, exact)  # no int8 dot products on this CPU: the flag changes nothing
    np.testing.assert_allclose(quantised, exact, rtol=0, atol=0.05 * np.abs(exact).max())
