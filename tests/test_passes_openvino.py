"""The reference-pattern rewrite on hand-built graphs, against numpy, with node counts."""
import numpy as np
import openvino as ov
import pytest
from openvino import opset13 as ops

from actsparse import ActSparseError
from actsparse.backends.openvino.calibration import find_groups
from actsparse.backends.openvino.graph import EXACT_CONFIG
from actsparse.backends.openvino.passes import apply_plan, set_prefill_sparse
from reference import pruned_input

K, N1, N2 = 48, 32, 40
RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(N1, K)).astype(np.float32)
W2 = RNG.normal(size=(K, N2)).astype(np.float32)


def _model(w1=None, w2_transposed=False, shared=False):
    """x -> Multiply(norm) -> two MatMuls named like optimum's traced gate/up projections."""
    x = ops.parameter([-1, -1, K], np.float32, name="x")
    h = ops.multiply(x, ops.constant(np.float32(1.0)), name="__module.model.layers.0.post_attention_layernorm/aten::mul/Multiply")
    a = ops.matmul(h, w1 if w1 is not None else ops.constant(W1), False, True,
                   name="__module.model.layers.0.mlp.gate_proj/aten::linear/MatMul")
    w2 = ops.constant(W2.T.copy()) if w2_transposed else ops.constant(W2)
    b = ops.matmul(h, a.input_value(1) if shared else w2, False, w2_transposed or shared,
                   name="__module.model.layers.0.mlp.up_proj/aten::linear/MatMul")
    return ov.Model([a, b], [x])


def _plan(model, mode, tau, sparsity=0.5):
    groups = find_groups(model, {"up"})
    return {"layers": [{"module": t.module, "node": t.node, "kind": t.kind, "group": g.name,
                        "in_features": t.in_features, "out_features": t.out_features,
                        "mode": mode, "threshold": tau, "target_sparsity": sparsity}
                       for g in groups for t in g.targets]}


def _run(model, x):
    compiled = ov.Core().compile_model(model, "CPU", EXACT_CONFIG)
    result = compiled.create_infer_request().infer({"x": x})
    return [np.array(result[o]) for o in compiled.outputs]


def _counts(model):
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    return {t: types.count(t) for t in ("Subtract", "Select", "Add", "LessEqual", "MatMul")}


@pytest.mark.parametrize("mode", [0.0, -0.3])
def test_sparse_prefill_matches_numpy(mode):
    model = _model()
    counts = apply_plan(model, _plan(model, mode, 0.5), prefill="sparse")
    x = RNG.normal(size=(2, 5, K)).astype(np.float32)
    a, b = _run(model, x)
    xp = pruned_input(x, mode, 0.5)
    np.testing.assert_allclose(a, xp @ W1.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b, xp @ W2, rtol=1e-4, atol=1e-4)
    centred = mode != 0
    assert counts == {"masks": 1, "shifts": int(centred), "folds": 2 * centred}
    assert _counts(model) == {"Subtract": int(centred), "Select": 1, "Add": 2 * centred, "LessEqual": 1, "MatMul": 2}


def test_dense_prefill_prunes_only_single_token_steps():
    model = _model()
    apply_plan(model, _plan(model, -0.3, 0.5), prefill="dense")
    prompt = RNG.normal(size=(1, 7, K)).astype(np.float32)
    a, _ = _run(model, prompt)
    np.testing.assert_allclose(a, prompt @ W1.T, rtol=1e-4, atol=1e-4)  # exact: the fold undoes the shift
    step = RNG.normal(size=(1, 1, K)).astype(np.float32)
    a, _ = _run(model, step)
    np.testing.assert_allclose(a, pruned_input(step, -0.3, 0.5) @ W1.T, rtol=1e-4, atol=1e-4)
    assert set_prefill_sparse(model) == 1
    a, _ = _run(model, prompt)
    np.testing.assert_allclose(a, pruned_input(prompt, -0.3, 0.5) @ W1.T, rtol=1e-4, atol=1e-4)


def test_nan_and_inf_propagate_instead_of_being_masked():
    model = _model()
    apply_plan(model, _plan(model, 0.0, 1e6), prefill="sparse")  # τ prunes every finite value
    x = np.zeros((1, 2, K), np.float32)
    x[0, 0, 3], x[0, 1, 5] = np.nan, np.inf
    a, _ = _run(model, x)
    assert np.isnan(a[0, 0]).all()
    assert np.isinf(a[0, 1][W1[:, 5] != 0]).all()


def test_fold_uses_the_decompressed_int8_weights():
    """u8 weight, zero point and scale as NNCF writes them: b' must use the dequantised matrix."""
    q = RNG.integers(0, 256, size=(N1, K)).astype(np.uint8)
    zp = RNG.integers(100, 156, size=(N1, 1)).astype(np.uint8)
    scale = RNG.uniform(0.001, 0.01, size=(N1, 1)).astype(np.float32)
    weight = ops.multiply(ops.subtract(ops.convert(ops.constant(q), "f32"), ops.convert(ops.constant(zp), "f32")),
                          ops.constant(scale))
    dequant = (q.astype(np.float32) - zp) * scale
    model = _model(w1=weight)
    apply_plan(model, _plan(model, 0.7, 0.4), prefill="sparse")
    x = RNG.normal(0.7, 1.0, size=(1, 6, K)).astype(np.float32)
    a, _ = _run(model, x)
    np.testing.assert_allclose(a, pruned_input(x, 0.7, 0.4) @ dequant.T, rtol=1e-4, atol=1e-4)


def test_zero_sparsity_inserts_nothing():
    model = _model()
    before = _counts(model)
    assert apply_plan(model, _plan(model, 0.0, 0.0, sparsity=0.0)) == {"masks": 0, "shifts": 0, "folds": 0}
    assert _counts(model) == before


def test_refuses_non_constant_weight():
    w = ops.parameter([N1, K], np.float32, name="w")
    x = ops.parameter([-1, -1, K], np.float32, name="x")
    mm = ops.matmul(x, w, False, True, name="__module.model.layers.0.mlp.gate_proj/aten::linear/MatMul")
    model = ov.Model([mm], [x, w])
    assert find_groups(model, {"up"}) == []  # calibration skips it, with a logged reason
    plan = {"layers": [{"module": "model.layers.0.mlp.gate_proj", "node": mm.get_friendly_name(), "kind": "gate",
                        "group": "x:0", "in_features": K, "out_features": N1, "mode": 0.0, "threshold": 0.1,
                        "target_sparsity": 0.5}]}
    with pytest.raises(ActSparseError, match="not constant"):
        apply_plan(model, plan)


def test_refuses_shared_weight():
    model = _model(shared=True)
    assert find_groups(model, {"up"}) == []
    with pytest.raises(ActSparseError, match="shared"):
        apply_plan(model, {"layers": [{"module": "model.layers.0.mlp.gate_proj",
                                       "node": "__module.model.layers.0.mlp.gate_proj/aten::linear/MatMul",
                                       "kind": "gate", "group": "g", "in_features": K, "out_features": N1,
                                       "mode": 0.0, "threshold": 0.1, "target_sparsity": 0.5}]})


def test_groups_consumers_of_one_input():
    groups = find_groups(_model(), {"up", "down"})
    assert len(groups) == 1 and sorted(t.kind for t in groups[0].targets) == ["gate", "up"]
    assert sorted((t.in_features, t.out_features) for t in groups[0].targets) == [(K, N1), (K, N2)]


def test_plan_that_does_not_match_is_refused():
    model = _model()
    plan = _plan(model, 0.0, 0.1)
    plan["layers"][0]["node"] = "no such node"
    with pytest.raises(ActSparseError, match="does not match"):
        apply_plan(model, plan)
