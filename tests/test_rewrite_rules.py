"""The rewrite rules find the reference pattern by its structure: each rule on a tiny graph, run before and
after against numpy, node counts, models whose nodes were all renamed, and patterns they must leave alone."""
import logging
from types import SimpleNamespace

import numpy as np
import onnx
import openvino as ov
import pytest
from onnx import TensorProto, helper, numpy_helper
from openvino import opset13 as ops

from actsparse.backends.onnx import calibration as onnx_calibration
from actsparse.backends.onnx import passes as onnx_passes
from actsparse.backends.onnx.runtime import onnxruntime_problem, session
from actsparse.backends.openvino import passes as ov_passes
from actsparse.backends.openvino.calibration import find_groups
from actsparse.backends.openvino.fuse import fuse, materialize
from actsparse.backends.openvino.graph import EXACT_CONFIG
from actsparse.backends.openvino.runtime import extension_problem
from actsparse.runtime_ext import MLP_TYPE, OP_TYPE, register
from conftest import skip_without_extension
from reference import pruned_input

RNG = np.random.default_rng(7)
K, N_GATE, N_UP, N_DOWN = 32, 24, 24, 16
W_GATE, W_UP = (RNG.normal(size=(n, K)).astype(np.float32) for n in (N_GATE, N_UP))
Q_DOWN = RNG.integers(0, 256, (N_UP, N_DOWN)).astype(np.uint8)  # ONNX layout [in, out]
ZP_DOWN = RNG.integers(100, 156, N_DOWN).astype(np.uint8)
SCALE_DOWN = RNG.uniform(0.01, 0.05, N_DOWN).astype(np.float32)
W_DOWN = (Q_DOWN.astype(np.float32) - ZP_DOWN) * SCALE_DOWN
UP_MODE, UP_TAU, DOWN_TAU = 0.2, 0.5, 0.3


def _silu(v):
    return v / (1 + np.exp(-v))


def _numpy_mlp(x, pruned=True, prefill_dense=False):
    """The pruned MLP (gate/up centred at UP_MODE, down at 0), in numpy; prefill_dense: no pruning."""
    sparse = pruned and not prefill_dense
    h = pruned_input(x, UP_MODE, UP_TAU) if sparse else x
    a = _silu(h @ W_GATE.T) * (h @ W_UP.T)
    return (pruned_input(a, 0.0, DOWN_TAU) if sparse else a) @ W_DOWN


def _plan(groups, modes):
    return {"layers": [{"module": t.module, "node": t.node, "kind": t.kind, "group": g.name,
                        "in_features": t.in_features, "out_features": t.out_features,
                        "mode": modes[t.kind][0], "threshold": modes[t.kind][1], "target_sparsity": 0.5}
                       for g in groups for t in g.targets]}


MODES = {"gate": (UP_MODE, UP_TAU), "up": (UP_MODE, UP_TAU), "down": (0.0, DOWN_TAU)}


# ----------------------------------------------------------------------------------------------- OpenVINO
def _ov_mlp():
    """x -> gate/up (f32 weights) -> SiLU(gate)·up -> down (u8 weight as NNCF writes it), named as optimum traces."""
    x = ops.parameter([-1, -1, K], np.float32, name="x")
    h = ops.multiply(x, np.float32(1.0), name="__module.model.layers.0.post_attention_layernorm/aten::mul/Multiply")
    gate = ops.matmul(h, ops.constant(W_GATE), False, True,
                      name="__module.model.layers.0.mlp.gate_proj/aten::linear/MatMul")
    up = ops.matmul(h, ops.constant(W_UP), False, True, name="__module.model.layers.0.mlp.up_proj/aten::linear/MatMul")
    a = ops.multiply(ops.swish(gate), up, name="__module.model.layers.0.mlp/aten::mul/Multiply")
    codes, zp = ops.constant(np.ascontiguousarray(Q_DOWN.T)), ops.constant(ZP_DOWN[:, None])
    w = ops.multiply(ops.subtract(ops.convert(codes, "f32"), ops.convert(zp, "f32")), ops.constant(SCALE_DOWN[:, None]))
    down = ops.matmul(a, w, False, True, name="__module.model.layers.0.mlp.down_proj/aten::linear/MatMul")
    return ov.Model([down], [x])


def _ov_pattern(prefill="sparse"):
    model = _ov_mlp()
    plan = _plan(find_groups(model, {"up", "down"}), MODES)
    assert ov_passes.apply_plan(model, plan, prefill) == {"masks": 2, "shifts": 1, "folds": 2}
    return model, plan


def _ov_rename(model):
    """Every node gets a meaningless friendly name, every tensor loses its names."""
    for i, op in enumerate(model.get_ordered_ops()):
        op.set_friendly_name(f"n{RNG.integers(1 << 30)}_{i}")
        for out in op.outputs():
            out.get_tensor().set_names(set())
    return model


def _ov_types(model):
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    return {t: types.count(t) for t in set(types)}


def _ov_run(model, x):
    core = ov.Core()
    if {OP_TYPE, MLP_TYPE} & set(_ov_types(model)):
        register(core)
        model = materialize(model, core)
    return core.compile_model(model, "CPU", EXACT_CONFIG)({0: x})[0]


def test_openvino_unmask_rule_gives_the_dense_model():
    model, _ = _ov_pattern()
    _ov_rename(model)
    x = RNG.normal(size=(1, 3, K)).astype(np.float32)
    assert ov_passes.run_rules(model, ov_passes.Unmask()) == {"Unmask": 2}
    assert "Select" not in _ov_types(model)
    np.testing.assert_allclose(_ov_run(model, x), _numpy_mlp(x, pruned=False), rtol=1e-4, atol=1e-4)


def test_openvino_fused_op_rules_set_prefill_and_threshold():
    skip_without_extension(extension_problem())
    model, plan = _ov_pattern("dense")
    fuse(model, plan)
    step = RNG.normal(size=(1, 1, K)).astype(np.float32)
    prompt = RNG.normal(size=(1, 4, K)).astype(np.float32)
    np.testing.assert_allclose(_ov_run(model, prompt), _numpy_mlp(prompt, prefill_dense=True), rtol=1e-4, atol=1e-4)
    assert ov_passes.run_rules(model, ov_passes.FusedPrefillSparse()) == {"FusedPrefillSparse": 2}
    assert ov_passes.run_rules(model, ov_passes.FusedPrefillSparse()) == {"FusedPrefillSparse": 0}
    np.testing.assert_allclose(_ov_run(model, prompt), _numpy_mlp(prompt), rtol=1e-4, atol=1e-4)
    assert ov_passes.run_rules(model, ov_passes.KeepEveryChannel()) == {"KeepEveryChannel": 2}
    np.testing.assert_allclose(_ov_run(model, step), _numpy_mlp(step, pruned=False), rtol=1e-4, atol=1e-4)


def _ov_select(condition, z, other=0.0):
    return ops.select(condition, z, ops.constant(np.float32(other)))


def _ov_unsupported():
    """Patterns the rules must leave alone, each in front of its own MatMul."""
    x = ops.parameter([-1, -1, K], np.float32, name="x")
    other = ops.parameter([-1, -1, K], np.float32, name="other")
    tau = np.float32(0.5)

    def keep(v):
        return ops.logical_not(ops.less_equal(ops.abs(v), tau))

    def matmul(v):
        return ops.matmul(v, ops.constant(RNG.normal(size=(8, K)).astype(np.float32)), False, True)

    masks = {"cats": _ov_select(keep(other), x),  # the mask reads another tensor than z
             "not_zero": _ov_select(keep(x), x, 1.0),  # pruned channels become 1, not 0
             "odd_or": _ov_select(ops.logical_or(keep(x), ops.greater(other, tau)), x),  # OR-ed with something else
             "not_keep": _ov_select(ops.less_equal(ops.abs(x), tau), x)}  # no Not: not the pattern at all
    results = [matmul(mask) for mask in masks.values()]
    z = ops.subtract(x, np.float32(0.1))
    shared = _ov_select(keep(z), z)  # read by a MatMul and an Add
    results += [matmul(shared), ops.add(shared, np.float32(1.0))]
    return ov.Model(results, [x, other])


def test_openvino_unsupported_patterns_are_left_unchanged(caplog):
    model = _ov_unsupported()
    before = _ov_types(model)
    inputs = [RNG.normal(size=(1, 2, K)).astype(np.float32) for _ in range(2)]
    expected = ov.Core().compile_model(model, "CPU", EXACT_CONFIG)(inputs)
    with caplog.at_level(logging.WARNING, logger="actsparse"):
        assert fuse(model, {}) == {"fused": 0, "refused": 4, "mlp": 0}  # one MatMul each, "not_keep" is no pattern at all
    assert _ov_types(model) == before
    for reason in ("another tensor (cats)", "pruned value is not a one-element constant (0)",
                   "OR-ed with something other than the prefill test",
                   "something other than the first input of a MatMul"):
        assert reason in caplog.text
    got = ov.Core().compile_model(model, "CPU", EXACT_CONFIG)(inputs)
    for i in range(len(model.outputs)):
        np.testing.assert_array_equal(got[i], expected[i])


# ----------------------------------------------------------------------------------------------------- ONNX
def _onnx_mlp():
    """The same MLP in ONNX: MatMul weights [K, N], the down weight u8 behind a DequantizeLinear."""
    names = {m: f"/model/layers.0/mlp/{m}_proj/MatMul" for m in ("gate", "up", "down")}
    nodes = [helper.make_node("MatMul", ["x", "w_gate"], ["gate"], name=names["gate"]),
             helper.make_node("MatMul", ["x", "w_up"], ["up"], name=names["up"]),
             helper.make_node("Sigmoid", ["gate"], ["sig"], name="/model/layers.0/mlp/act/Sigmoid"),
             helper.make_node("Mul", ["gate", "sig"], ["silu"], name="/model/layers.0/mlp/act/Mul"),
             helper.make_node("Mul", ["silu", "up"], ["a"], name="/model/layers.0/mlp/Mul"),
             helper.make_node("DequantizeLinear", ["q_down", "s_down", "zp_down"], ["w_down"], name="/dq", axis=1),
             helper.make_node("MatMul", ["a", "w_down"], ["y"], name=names["down"])]
    inits = [numpy_helper.from_array(v, n) for n, v in (("w_gate", W_GATE.T.copy()), ("w_up", W_UP.T.copy()),
                                                         ("q_down", Q_DOWN), ("s_down", SCALE_DOWN),
                                                         ("zp_down", ZP_DOWN))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N_DOWN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _onnx_pattern(prefill="sparse"):
    model = _onnx_mlp()
    plan = _plan(onnx_calibration.find_groups(model, {"up", "down"}), MODES)
    assert onnx_passes.apply_plan(model, plan, prefill) == {"masks": 2, "shifts": 1, "folds": 2}
    onnx.checker.check_model(model)
    return model, plan


def _onnx_rename(model):
    for i, node in enumerate(model.graph.node):
        node.name = f"n{RNG.integers(1 << 30)}_{i}"
    return model


def _onnx_types(model):
    types = [n.op_type for n in model.graph.node]
    return {t: types.count(t) for t in set(types)}


def _onnx_run(model, x):
    return session(model).run(None, {"x": x})[0]


def test_onnx_unsupported_patterns_are_left_unchanged(caplog):
    tau = numpy_helper.from_array(np.array(0.5, np.float32), "tau")
    zero, one = (numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("zero", 0.0), ("one", 1.0)))
    nodes, inits, outputs = [], [tau, zero, one], []

    def pattern(name, source, other="zero", read_twice=False):
        nodes.extend([helper.make_node("Abs", [source], [f"{name}/abs"]),
                      helper.make_node("LessOrEqual", [f"{name}/abs", "tau"], [f"{name}/small"]),
                      helper.make_node("Not", [f"{name}/small"], [f"{name}/keep"]),
                      helper.make_node("Where", [f"{name}/keep", "x", other], [f"{name}/mask"]),
                      helper.make_node("MatMul", [f"{name}/mask", f"{name}/w"], [f"{name}/y"])])
        inits.append(numpy_helper.from_array(RNG.normal(size=(K, 8)).astype(np.float32), f"{name}/w"))
        outputs.append(f"{name}/y")
        if read_twice:
            nodes.append(helper.make_node("Relu", [f"{name}/mask"], [f"{name}/relu"]))
            outputs.append(f"{name}/relu")

    pattern("cats", "other")
    pattern("not_zero", "x", other="one")
    pattern("shared", "x", read_twice=True)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", K])
                                           for n in ("x", "other")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    inputs = {n: RNG.normal(size=(1, 2, K)).astype(np.float32) for n in ("x", "other")}
    expected = session(model).run(None, inputs)
    with caplog.at_level(logging.WARNING, logger="actsparse"):
        assert onnx_passes.fuse(model, {}) == {"fused": 0, "refused": 3}  # one MatMul each
    for reason in ("another tensor (cats)", "pruned value is not a one-element constant (0)",
                   "something other than the first input of a MatMul"):
        assert reason in caplog.text
    assert _onnx_types(model) == _onnx_types(onnx.load_from_string(before))
    for got, want in zip(session(model).run(None, inputs), expected):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------- both backends
def _ov_drop_keep_dense(model):
    return ov_passes.run_rules(model, ov_passes.DropKeepDense())["DropKeepDense"]


BACKENDS = {
    "openvino": SimpleNamespace(pattern=_ov_pattern, rename=_ov_rename, types=_ov_types, run=_ov_run, fuse=fuse,
                                library=extension_problem, mask="Select", prefill_test={"LogicalOr", "NotEqual"},
                                drop_keep_dense=_ov_drop_keep_dense, fused={"fused": 3, "refused": 0, "mlp": 1},
                                ops={MLP_TYPE: 1}),
    "onnx": SimpleNamespace(pattern=_onnx_pattern, rename=_onnx_rename, types=_onnx_types, run=_onnx_run,
                            fuse=onnx_passes.fuse, library=onnxruntime_problem, mask="Where",
                            prefill_test={"Or", "Greater", "Gather", "Shape"},
                            drop_keep_dense=onnx_passes.set_prefill_sparse, fused={"fused": 3, "refused": 0},
                            ops={OP_TYPE: 2})}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rename", [False, True])
def test_fusion_ignores_node_names(backend, rename):
    """Both runtimes' rules fuse a model whose nodes were all renamed into the same ops, with the same outputs."""
    backend = BACKENDS[backend]
    skip_without_extension(backend.library())
    model, plan = backend.pattern()
    x = RNG.normal(size=(1, 3, K)).astype(np.float32)
    unfused = backend.run(model, x)
    np.testing.assert_allclose(unfused, _numpy_mlp(x), rtol=1e-4, atol=1e-4)
    if rename:
        backend.rename(model)
    assert backend.fuse(model, plan) == backend.fused  # OpenVINO: the MLP's two ops become one ActSparseMLP
    types = backend.types(model)
    assert backend.ops.items() <= types.items() and not {"MatMul", backend.mask, "DequantizeLinear"} & set(types)
    np.testing.assert_allclose(backend.run(model, x), unfused, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_rule_drops_the_keep_dense_test_of_a_renamed_model(backend):
    backend = BACKENDS[backend]
    model, _ = backend.pattern("dense")
    backend.rename(model)
    prompt = RNG.normal(size=(1, 4, K)).astype(np.float32)
    np.testing.assert_allclose(backend.run(model, prompt), _numpy_mlp(prompt, prefill_dense=True), rtol=1e-4, atol=1e-4)
    before = backend.types(model)
    assert backend.drop_keep_dense(model) == 2
    after = backend.types(model)
    assert all(before[t] for t in backend.prefill_test) and not backend.prefill_test & set(after)
    assert after[backend.mask] == before[backend.mask] == 2
    np.testing.assert_allclose(backend.run(model, prompt), _numpy_mlp(prompt), rtol=1e-4, atol=1e-4)
    assert backend.drop_keep_dense(model) == 0  # nothing left to change


def test_onnx_fused_initializers_replace_the_weights():
    skip_without_extension(onnxruntime_problem())
    model, plan = _onnx_pattern()
    onnx_passes.fuse(model, plan)
    inits = {i.name for i in model.graph.initializer}  # one copy of the weights: the originals are gone
    assert len(inits) == 5 and not {"w_gate", "w_up", "q_down", "s_down", "zp_down"} & inits
    assert "actsparse.model.layers.0.mlp.down_proj/weight" in inits  # named after the plan's module
    assert _onnx_types(model) == {OP_TYPE: 2, "Split": 1, "Sigmoid": 1, "Mul": 2}
