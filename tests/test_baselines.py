"""The two baselines of ``actsparse bench``: the dense export, and our op at s=0 (benchmark.export_at_zero)."""
import numpy as np
import pytest

import actsparse
from actsparse import ActSparseError
from actsparse.backends.openvino.runtime import extension_problem
from actsparse.benchmark import bench, export_at_zero
from actsparse.runtime_ext import MLP_TYPE, OP_TYPE
from conftest import plan_of, skip_without_extension
from reference import ov_logits

skip_without_extension(extension_problem())
CALIB = {"calibration_samples": 8, "calibration_seq_len": 64}


@pytest.fixture(scope="module")
def exports(tiny_llama, texts, tmp_path_factory):
    """Dense and sparse (centred, so the zero export must drop the mode and its fold), and the s=0 export."""
    root = tmp_path_factory.mktemp("baselines")
    common = dict(calibration=str(texts["calibration"]), **CALIB)
    dense = actsparse.export(str(tiny_llama), root / "dense", sparsity={"sparsity": 0}, **common)
    sparse = actsparse.export(str(tiny_llama), root / "sparse", sparsity={"up": 0.5, "down": 0.5},
                              mode_centering="on", **common)
    return {"dense": dense, "sparse": sparse, "s0": export_at_zero(sparse, dense, root / "s0")}


def _ids(folder, texts, n=40):
    from transformers import AutoTokenizer

    return np.array([AutoTokenizer.from_pretrained(folder)(texts["evaluation"].read_text()[:2000])["input_ids"][:n]])


def test_zero_export_is_the_fused_op_computing_the_dense_model(exports, texts):
    """Every token through the op at threshold 0 (prefill pruned too): the dense export's logits, in exact f32."""
    zero, sparse = plan_of(exports["s0"]), plan_of(exports["sparse"])
    assert zero["passes"]["fused"] == sparse["passes"]["fused"] > 0
    xml = (exports["s0"] / "openvino_model.xml").read_text()
    assert xml.count(f'type="{OP_TYPE}"') + 2 * xml.count(f'type="{MLP_TYPE}"') == sparse["passes"]["masks"]
    assert all(l["threshold"] == l["mode"] == l["target_sparsity"] == 0 for l in zero["layers"])
    assert zero["weight_format"] == sparse["weight_format"]
    assert any(l["mode"] != 0 for l in sparse["layers"])
    ids = _ids(exports["dense"], texts)
    dense = ov_logits(exports["dense"], ids)
    np.testing.assert_allclose(ov_logits(exports["s0"], ids, prefill_sparse=True), dense, atol=2e-4, rtol=1e-3)
    assert np.abs(ov_logits(exports["sparse"], ids, prefill_sparse=True) - dense).max() > 1e-2  # it does prune


def test_zero_export_refuses_a_dense_export_and_leaves_nothing(exports, tmp_path):
    with pytest.raises(ActSparseError, match="prunes no layer"):
        export_at_zero(exports["dense"], exports["dense"], tmp_path / "s0")
    assert not (tmp_path / "s0").exists()


def test_bench_reports_both_baselines_from_one_run(exports):
    result = bench(exports["sparse"], exports["dense"], prompt_tokens=8, decode_tokens=2, runs=2)
    for name in ("sparse", "s0", "dense"):
        assert len(result[name]["decode_ms_per_token_runs"]) == 2 and result[name]["prefill_ms"] > 0
    ms = {name: result[name]["decode_ms_per_token"] for name in ("sparse", "s0", "dense")}
    assert result["decode_speedup"] == pytest.approx(ms["dense"] / ms["sparse"])
    assert result["decode_speedup_vs_s0"] == pytest.approx(ms["s0"] / ms["sparse"])
    assert result["s0_vs_dense"] == pytest.approx(ms["dense"] / ms["s0"])
    assert not list(exports["sparse"].parent.glob(".sparse.s0-*"))  # its s=0 export was temporary


def test_bench_refuses_a_baseline_in_another_weight_format(exports, tmp_path):
    import json
    import shutil

    other = shutil.copytree(exports["dense"], tmp_path / "dense-int8")
    plan = plan_of(other)
    (other / "actsparse.json").write_text(json.dumps({**plan, "weight_format": "int8"}))
    with pytest.raises(ActSparseError, match="weight format int8, the export fp32"):
        bench(exports["sparse"], other, runs=1)


def test_zero_export_of_an_onnx_export_computes_the_dense_model(tiny_llama, texts, tmp_path):
    """ONNX Runtime, exact f32, every token through the op at threshold 0: the dense export's logits."""
    import onnx

    from actsparse.backends.onnx.passes import set_prefill_sparse
    from actsparse.backends.onnx.runtime import feed, onnxruntime_problem, session

    skip_without_extension(onnxruntime_problem())
    common = dict(format="onnx", calibration=str(texts["calibration"]), **CALIB)
    dense = actsparse.export(str(tiny_llama), tmp_path / "dense", sparsity={"sparsity": 0}, **common)
    sparse = actsparse.export(str(tiny_llama), tmp_path / "sparse", sparsity={"up": 0.5, "down": 0.5},
                              mode_centering="on", **common)
    zero = export_at_zero(sparse, dense, tmp_path / "s0")
    assert plan_of(zero)["passes"]["fused"] == plan_of(sparse)["passes"]["fused"] > 0
    ids = _ids(dense, texts)

    def run(folder, prefill_sparse=False):
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        if prefill_sparse:
            set_prefill_sparse(graph)
        return graph, session(graph, folder, exact=True)

    graph, sess = run(zero, prefill_sparse=True)
    assert sum(node.op_type == OP_TYPE for node in graph.graph.node) == plan_of(sparse)["passes"]["masks"]
    got = sess.run(["logits"], feed(sess.get_inputs(), ids))[0]
    _, sess = run(dense)
    np.testing.assert_allclose(got, sess.run(["logits"], feed(sess.get_inputs(), ids))[0], atol=2e-4, rtol=1e-3)


def test_probe_layers_fused_at_threshold_0_compute_the_dense_layers():
    """The demo's probe (and kernel_bench) time these models: ours at s=0 must be the plugin's product, in f32."""
    import openvino as ov

    from actsparse.backends.openvino.graph import EXACT_CONFIG
    from actsparse.backends.openvino.probe import dense_model, fused_model
    from actsparse.runtime_ext import register

    rng = np.random.default_rng(1)
    core = ov.Core()
    register(core)
    dense = dense_model([(64, 320), (160, 64)] * 2, "fp32", rng)
    x = {0: rng.standard_normal((1, 1, 64)).astype(np.float32), 1: rng.standard_normal((1, 1, 160)).astype(np.float32)}

    def outputs(model):
        return list(core.compile_model(model, "CPU", EXACT_CONFIG).create_infer_request().infer(x).values())

    expected = outputs(dense)
    assert len(expected) == 4 and [y.shape[-1] for y in expected] == [320, 64, 320, 64]
    for got, want in zip(outputs(fused_model(dense, {64: 0.0, 160: 0.0}, core, "fp32")), expected):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    pruned = outputs(fused_model(dense, {64: 0.7, 160: 0.7}, core, "fp32"))
    assert np.abs(pruned[0] - expected[0]).max() > 1e-3  # a threshold does prune
