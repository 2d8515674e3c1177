"""The ONNX path: export, calibration in ONNX Runtime, reference pattern, fusion, eval; against torch and OpenVINO."""
import json
import logging
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import actsparse
from actsparse import ActSparseError
from actsparse.backends.onnx.calibration import find_groups, module_of
from actsparse.backends.onnx.graph import Index, dequantized, read_weight, weight_refusal
from actsparse.backends.onnx.runtime import feed, session
from actsparse.calibration.plan import build_plan
from actsparse.calibration.stats import StreamingHistogram
from actsparse.backends.onnx.passes import apply_plan, fuse, set_prefill_sparse
from actsparse.backends.onnx.runtime import onnxruntime_problem
from actsparse.backends.openvino.runtime import extension_problem
from actsparse.runtime_ext import OP_TYPE
from conftest import plan_of, run_cli, skip_without_extension
from reference import (assert_close_through_flips, pruned_input, quantises_activations, torch_logits,
                       torch_model_with_plan)

CALIB = {"calibration_samples": 8, "calibration_seq_len": 64}


def _heldout_ids(folder, texts, n=48):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(texts["evaluation"].read_text()[:2000])["input_ids"]
    return np.array([ids[:n]], np.int64)


def _graph(folder, prefill_sparse=False):
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    if prefill_sparse:
        set_prefill_sparse(graph)
    return graph


def ort_logits(folder, ids, prefill_sparse=False, exact=True):
    graph = _graph(folder, prefill_sparse)
    sess = session(graph, folder, exact=exact)
    return sess.run(["logits"], feed(sess.get_inputs(), ids))[0]


def _op_count(folder, op_type):
    return sum(node.op_type == op_type for node in _graph(folder).graph.node)


@pytest.fixture(scope="module")
def exports(tiny_llama, texts, tmp_path_factory):
    """Sparse (centred, so shifts and folds are exercised; prefill pruned), fused when the library
    is there; the same plan unfused; and dense."""
    root = tmp_path_factory.mktemp("onnx-exports")
    common = dict(format="onnx", calibration=str(texts["calibration"]), mode_centering="on", **CALIB)
    sparse = actsparse.export(str(tiny_llama), root / "sparse", sparsity={"up": 0.3, "down": 0.5},
                              prefill="sparse", **common)
    return {"sparse": sparse,
            "unfused": actsparse.export(str(tiny_llama), root / "unfused", plan=sparse / "actsparse.json",
                                        prefill="sparse", fuse=False, **common),
            "dense": actsparse.export(str(tiny_llama), root / "dense", sparsity={"sparsity": 0}, **common)}


@pytest.fixture
def ort_library():
    skip_without_extension(onnxruntime_problem())


def test_unfused_export_matches_torch_reference(tiny_llama, texts, exports):
    folder = exports["unfused"]
    plan = plan_of(folder)
    assert {l["kind"] for l in plan["layers"]} == {"gate", "up", "down"}
    assert plan["passes"] == {"masks": 4, "shifts": 4, "folds": 6}
    assert _op_count(folder, OP_TYPE) == 0 and _op_count(folder, "Where") >= 4
    ids = _heldout_ids(tiny_llama, texts)
    expected = torch_logits(torch_model_with_plan(tiny_llama, plan), ids)
    dense = torch_logits(torch_model_with_plan(tiny_llama, {"layers": []}), ids)
    assert np.abs(expected - dense).max() > 1e-3  # the pruning does change the logits
    assert_close_through_flips(ort_logits(folder, ids), expected)


def test_zero_sparsity_is_the_torch_model(tiny_llama, texts, exports):
    folder = exports["dense"]
    assert plan_of(folder)["passes"] == {"masks": 0, "shifts": 0, "folds": 0}
    assert _op_count(folder, "Where") == _op_count(exports["unfused"], "Where") - 4  # no inserted mask
    ids = _heldout_ids(tiny_llama, texts)
    np.testing.assert_allclose(ort_logits(folder, ids), torch_logits(torch_model_with_plan(tiny_llama, {"layers": []}), ids),
                               atol=2e-4, rtol=1e-3)


def test_fused_equals_unfused(tiny_llama, texts, exports, ort_library):
    fused, unfused = exports["sparse"], exports["unfused"]
    assert plan_of(fused)["passes"]["fused"] == 6
    assert _op_count(fused, OP_TYPE) == 4 and _op_count(fused, "Split") == 2  # gate+up share one op
    assert not {l["node"] for l in plan_of(fused)["layers"]} & {n.name for n in _graph(fused).graph.node}
    sizes = [sum(math.prod(i.dims) for i in _graph(f).graph.initializer) for f in (fused, unfused)]
    assert sizes[0] <= sizes[1]  # the re-laid-out weights replace the originals: one copy
    ids = _heldout_ids(tiny_llama, texts)
    for prefill_sparse in (False, True):  # the fused prompt path dense, then pruned
        np.testing.assert_allclose(ort_logits(fused, ids, prefill_sparse), ort_logits(unfused, ids, prefill_sparse),
                                   atol=1e-4, rtol=1e-4)
    # one decode step after the prompt: pruned in both, whatever the prefill policy
    np.testing.assert_allclose(ort_logits(fused, ids[:, :1]), ort_logits(unfused, ids[:, :1]), atol=1e-4, rtol=1e-4)


def test_one_file_two_runtimes(tiny_llama, texts, exports, ort_library):
    """OpenVINO reads the fused ONNX file through its ONNX frontend, with the extension registered."""
    import openvino as ov

    from actsparse.backends.openvino.graph import EXACT_CONFIG
    from actsparse.runtime_ext import register

    skip_without_extension(extension_problem())
    folder = exports["sparse"]
    core = ov.Core()
    register(core)
    compiled = core.compile_model(core.read_model(folder / "model.onnx"), "CPU", EXACT_CONFIG)
    ids = _heldout_ids(tiny_llama, texts)
    inputs = {}
    for port in compiled.inputs:
        name, shape = port.get_any_name(), port.get_partial_shape()
        inputs[name] = (np.zeros((1, shape[1].get_length(), 0, shape[3].get_length()), np.float32)
                        if name.startswith("past_key_values.") else
                        {"input_ids": ids, "attention_mask": np.ones_like(ids),
                         "position_ids": np.arange(ids.shape[1])[None]}[name])
    got = compiled.create_infer_request().infer(inputs)[compiled.output("logits")]
    np.testing.assert_allclose(got, ort_logits(folder, ids), atol=1e-4, rtol=1e-4)


def test_gpt2_gemm_layers_centred_match_torch(tiny_gelu, texts, tmp_path):
    """GPT-2's Conv1D exports as Gemm (bias C) on flattened tokens; its down input is centred (m ≈ −0.17)."""
    common = dict(format="onnx", calibration=str(texts["calibration"]), targets="all", prefill="sparse", **CALIB)
    fused = actsparse.export(str(tiny_gelu), tmp_path / "fused", sparsity={"sparsity": 0.5}, **common)
    unfused = actsparse.export(str(tiny_gelu), tmp_path / "unfused", plan=fused / "actsparse.json", fuse=False, **common)
    plan = plan_of(unfused)
    modes = {l["module"]: l["mode"] for l in plan["layers"]}
    assert len(modes) == 8 and all(modes[f"transformer.h.{i}.mlp.c_proj"] < -0.1 for i in range(2))
    assert plan["passes"]["masks"] == 8 and plan["passes"]["folds"] >= 2
    ids = _heldout_ids(tiny_gelu, texts)
    expected = torch_logits(torch_model_with_plan(tiny_gelu, plan), ids)
    assert_close_through_flips(ort_logits(unfused, ids), expected)
    skip_without_extension(onnxruntime_problem())  # the fused half needs the custom-op library
    assert plan_of(fused)["passes"]["fused"] == 8 and _op_count(fused, "Gemm") == 0
    np.testing.assert_allclose(ort_logits(fused, ids), ort_logits(unfused, ids), atol=1e-4, rtol=1e-4)


def _two_layer_graph():
    """up_proj reads x through an initializer weight; down_proj's weight is computed (a Transpose)."""
    rng = np.random.default_rng(0)
    w_up, w_down = rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w_up"], ["h"], name="/model/layers.0/mlp/up_proj/MatMul"),
             helper.make_node("Transpose", ["w_down_t"], ["w_down"], name="/t"),
             helper.make_node("MatMul", ["h", "w_down"], ["logits"], name="/model/layers.0/mlp/down_proj/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w_up, "w_up"), numpy_helper.from_array(w_down, "w_down_t")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w_up, w_down.T


def _run(model, x):
    return session(model).run(["logits"], {"x": x})[0]


@pytest.mark.parametrize("fused", [False, True])
def test_computed_weight_is_left_dense_and_the_pattern_is_exact(caplog, fused):
    if fused:
        skip_without_extension(onnxruntime_problem())
    model, w_up, w_down = _two_layer_graph()
    with caplog.at_level(logging.WARNING, logger="actsparse"):
        groups = find_groups(model, {"up", "down"})
    assert [t.module for g in groups for t in g.targets] == ["model.layers.0.mlp.up_proj"]
    assert "not pruning model.layers.0.mlp.down_proj: weight is not an initializer" in caplog.text
    hist = StreamingHistogram()
    hist.update(np.random.default_rng(1).normal(0.1, 1, 10000))
    plan = build_plan(groups, {groups[0].name: hist}, {"up": 0.5}, centering="on")
    m, tau = plan["layers"][0]["mode"], plan["layers"][0]["threshold"]
    assert m != 0 and tau > 0
    assert apply_plan(model, plan, prefill="dense") == {"masks": 1, "shifts": 1, "folds": 1}
    if fused:
        assert fuse(model, plan) == {"fused": 1, "refused": 0}
        assert [n.op_type for n in model.graph.node] == [OP_TYPE, "Transpose", "MatMul"]
        assert {i.name for i in model.graph.initializer} == {"w_down_t", f"actsparse.{plan['layers'][0]['module']}/weight",
                                                              f"actsparse.{plan['layers'][0]['module']}/params"}
    x = np.random.default_rng(2).normal(0.1, 1, (1, 3, 8)).astype(np.float32)
    x[0, 0, 0] = np.nan  # kept, never masked away: the whole row becomes NaN
    dense = x @ w_up @ w_down
    np.testing.assert_allclose(_run(model, x), dense, rtol=1e-4, atol=1e-4)  # prefill: exact dense
    for t in range(3):  # decode steps: pruned, the shift folded back exactly
        expected = pruned_input(x[:, t:t + 1], m, tau) @ w_up @ w_down
        np.testing.assert_allclose(_run(model, x[:, t:t + 1]), expected, rtol=1e-4, atol=1e-4)
    assert np.isnan(_run(model, x[:, :1])).all() and np.isfinite(_run(model, x[:, 1:2])).all()


def test_int8_pattern_and_fusion_match_torch_with_the_same_weights(tiny_llama, texts, exports, tmp_path, ort_library):
    """int8: u8 codes per output channel behind DequantizeLinear; the fused op keeps the codes."""
    import torch

    common = dict(format="onnx", weight_format="int8", plan=exports["sparse"] / "actsparse.json", prefill="sparse",
                  mode_centering="on")
    fused = actsparse.export(str(tiny_llama), tmp_path / "fused", **common)
    unfused = actsparse.export(str(tiny_llama), tmp_path / "unfused", fuse=False, **common)
    assert plan_of(fused)["passes"]["fused"] == 6 and plan_of(fused)["weight_format"] == "int8"
    graph = _graph(fused)
    ops = [n for n in graph.graph.node if n.op_type == OP_TYPE]
    assert {helper.get_attribute_value(a) for n in ops for a in n.attribute if a.name == "weight_format"} == {b"u8"}
    assert {i.data_type for i in graph.graph.initializer if i.name in {n.input[1] for n in ops}} == {TensorProto.UINT8}
    ids = _heldout_ids(tiny_llama, texts)
    np.testing.assert_allclose(ort_logits(fused, ids), ort_logits(unfused, ids), atol=1e-4, rtol=1e-4)
    # the reference: the torch model with every Linear set to the dequantized weight, pruned by the plan
    model = torch_model_with_plan(tiny_llama, plan_of(unfused))
    modules, index = dict(model.named_modules()), Index(onnx.load(str(unfused / "model.onnx")))
    with torch.no_grad():
        for node in index.model.graph.node:
            module = module_of(node)
            if module in modules and weight_refusal(index, node) is None:
                weight = dequantized(read_weight(index, node))
                modules[module].weight.copy_(torch.from_numpy(weight.T))
                assert read_weight(index, node)[0] == "u8"
    assert_close_through_flips(ort_logits(unfused, ids), torch_logits(model, ids))
    # Under ORT's defaults the unfused MatMuls become MatMulNBits at accuracy level 4, which quantises its
    # activations to int8 in blocks of 32 channels (its block size for per-channel weights), one scale
    # max|x|/127 each; so does the ops' prompt (groups of 32 channels) on a kernel with int8 dot products:
    # then fused and unfused agree as closely as in f32, while both move off the exact logits.
    loose = {name: ort_logits(folder, ids, exact=False) for name, folder in (("fused", fused), ("unfused", unfused))}
    exact = ort_logits(fused, ids)
    for name, logits in loose.items():
        assert 1e-4 < np.abs(logits - exact).max() < 0.05 * np.abs(exact).max(), name
    if quantises_activations("u8", ids.size):
        np.testing.assert_allclose(loose["fused"], loose["unfused"], atol=1e-4, rtol=1e-4)
    else:  # the ops stay f32 while MatMulNBits quantises
        assert np.abs(loose["fused"] - loose["unfused"]).max() < 0.05 * np.abs(exact).max()
    from actsparse.benchmark import measure  # what `actsparse bench` reports it ran

    assert measure(fused, 8, 2, 1)["inference_precision"] == "f32, int8 activations at int8 weights"


@pytest.mark.parametrize("weight_format", ["int4", "bf16"])
def test_weight_formats_without_onnx_support_are_refused(tiny_llama, tmp_path, weight_format):
    proc = run_cli("export", tiny_llama, tmp_path / "out", "--format", "onnx", "--weight-format", weight_format,
                   "--sparsity", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"weight format {weight_format} is not supported with --format onnx" in proc.stderr
    assert "export:" not in proc.stderr  # refused before any work starts
    assert not (tmp_path / "out").exists()


def test_eval_on_onnx_matches_openvino_dense(tiny_llama, texts, exports, tmp_path):
    heldout = ["--text", texts["evaluation"], "--samples", "4", "--seq-len", "64"]
    proc = run_cli("eval", exports["sparse"], *heldout, "--json")
    assert proc.returncode == 0, proc.stderr
    sparse = json.loads(proc.stdout)
    assert math.isfinite(sparse["perplexity"]) and sparse["tokens"] == 4 * 63
    assert set(sparse["sparsity"]) == {"up", "down"} and 0.2 < sparse["sparsity"]["up"] < 0.4
    ov_dense = actsparse.export(str(tiny_llama), tmp_path / "ov-dense", sparsity={"sparsity": 0},
                                calibration=str(texts["calibration"]), **CALIB)
    options = dict(text=str(texts["evaluation"]), samples=4, seq_len=64)
    onnx_result, ov_result = actsparse.evaluate(exports["dense"], **options), actsparse.evaluate(ov_dense, **options)
    assert onnx_result["perplexity"] == pytest.approx(ov_result["perplexity"], rel=1e-4)
    assert onnx_result["next_token_accuracy"] == ov_result["next_token_accuracy"]
    assert sparse["perplexity"] != pytest.approx(onnx_result["perplexity"], rel=1e-4)


def test_load_returns_an_optimum_model_that_generates(exports, ort_library):
    """With ORT's default options, or the caller's own (the library is registered with them)."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for kwargs in ({}, {"session_options": options}):
        model = actsparse.load(exports["sparse"], **kwargs)
        assert type(model).__name__ == "ORTModelForCausalLM"
        out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 7)
    assert model.model.get_session_options().intra_op_num_threads == 1


def test_bench_weight_share_counts_every_linear(tiny_llama, exports):
    """f for Amdahl's limit: pruned share of the bytes of every Linear's weight (from torch, independently)."""
    import torch
    from transformers import AutoModelForCausalLM

    from actsparse.benchmark import sparsified_share

    linears = {name: m.weight.numel() for name, m in AutoModelForCausalLM.from_pretrained(tiny_llama).named_modules()
               if isinstance(m, torch.nn.Linear)}
    plan = plan_of(exports["sparse"])
    expected = sum(linears[l["module"]] * l["target_sparsity"] for l in plan["layers"]) / sum(linears.values())
    assert sparsified_share(plan, exports["dense"]) == pytest.approx(expected)


def test_bench_reports_ratios_against_the_dense_baseline(exports):
    from actsparse.benchmark import bench, sparsified_share

    result = bench(exports["sparse"], exports["dense"], prompt_tokens=8, decode_tokens=2, runs=3)
    for side in ("sparse", "dense"):
        assert result[side]["decode_ms_per_token"] > 0 and result[side]["prefill_ms"] > 0
        assert result[side]["peak_rss_mb"] > 50
        assert result[side]["inference_precision"] == "f32"  # ONNX Runtime's CPU provider
        runs = result[side]["decode_ms_per_token_runs"]
        assert len(runs) == 3 and result[side]["decode_ms_per_token"] == pytest.approx(np.median(runs))
    assert result["decode_speedup"] == pytest.approx(result["dense"]["decode_ms_per_token"]
                                                     / result["sparse"]["decode_ms_per_token"])
    share = sparsified_share(plan_of(exports["sparse"]), exports["dense"])
    assert 0 < share < 1 and result["amdahl_limit"] == pytest.approx(1 / (1 - share))
    assert result["of_limit"] == pytest.approx(result["decode_speedup"] * (1 - share))
    assert result["prefill_ratio"] == pytest.approx(result["sparse"]["prefill_ms"] / result["dense"]["prefill_ms"])


def test_genai_refuses_an_onnx_export_in_one_line(exports):
    with pytest.raises(ActSparseError, match=r"^openvino-genai runs OpenVINO exports, and .* is a --format onnx export$"):
        actsparse.genai_pipeline(exports["sparse"])
    proc = run_cli("bench", exports["sparse"], "--baseline", exports["dense"], "--runs", "1", "--runtime", "genai")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("is a --format onnx export")


def test_bench_refuses_a_sparse_baseline_in_one_line(exports):
    proc = run_cli("bench", exports["sparse"], "--baseline", exports["sparse"], "--runs", "1")
    layers = sum(layer["target_sparsity"] > 0 for layer in plan_of(exports["sparse"])["layers"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and layers > 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"actsparse: error: --baseline {exports['sparse']} is a sparse export ({layers} layers pruned): give the "
        "dense export of the same model (actsparse export MODEL OUT --sparsity 0)")


def test_bench_without_the_library_says_so_in_one_line(exports, tmp_path):
    proc = run_cli("bench", exports["sparse"], "--baseline", exports["dense"], "--runs", "1",
                   env={"ACTSPARSE_EXT_DIR": str(tmp_path)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"actsparse: error: benchmark of {exports['sparse']} failed: the ActSparseMatMul ONNX Runtime library "
        f"libactsparse_onnxruntime.so was not built (looked in {tmp_path}); reinstall actsparse with a C++17 "
        "compiler and apt-get (or ORT_INCLUDE_DIR) available")
