"""The steps of ``actsparse.export``, each on its own: options, targets, calibration, plan, rewrite, save."""
import shutil

import numpy as np
import pytest

from actsparse import ActSparseError
from actsparse.backends import get_backend
from actsparse.calibration.error import GRID
from actsparse.calibration.plan import build_plan, read_plan, write_plan
from actsparse.calibration.stats import StreamingHistogram
from actsparse.calibration.targets import Group, Target
from actsparse.pipeline import (ExportOptions, Statistics, calibrate, export, find_targets, make_plan,
                                resolve_sparsity, rewrite, save)
from actsparse.runtime_ext import MLP_TYPE, OP_TYPE
from conftest import skip_without_extension

CALIB = {"calibration_samples": 4, "calibration_seq_len": 32}


@pytest.mark.parametrize("option,value,message", [
    ("format", "tflite", "unknown format 'tflite'"), ("weight_format", "int3", "unknown weight format 'int3'"),
    ("targets", "ffn", "unknown targets 'ffn'"), ("method", "magic", "unknown method 'magic'"),
    ("allocation", "best", "unknown allocation 'best'"), ("mode_centering", "maybe", "unknown mode centering"),
    ("prefill", "never", "unknown prefill 'never'"), ("calibration_samples", 0, "at least 1 sample"),
    ("calibration_seq_len", 1, "at least 2 tokens"), ("sparsity", {"mlp": 0.5}, "unknown sparsity kind 'mlp'"),
    ("sparsity", {"down": 1.0}, "sparsity"),
])
def test_options_refuse_a_bad_value(option, value, message):
    with pytest.raises(ActSparseError, match=message):
        ExportOptions(**{option: value})


def test_options_refuse_combinations_before_any_work():
    with pytest.raises(ActSparseError, match="weight format int4 is not supported with --format onnx"):
        ExportOptions(format="onnx", weight_format="int4")
    with pytest.raises(ActSparseError, match="--method cats prunes the down projections only"):
        ExportOptions(method="cats", allocation="greedy")


def test_options_resolve_sparsity_per_kind():
    options = ExportOptions(sparsity={"sparsity": 0.2, "down": 0.5})
    assert options.sparsity == {"up": 0.2, "down": 0.5, "qkv": 0.2, "o": 0.2}
    assert options.needs_statistics
    assert resolve_sparsity() == {"up": 0.0, "down": 0.0, "qkv": 0.0, "o": 0.0}
    assert not ExportOptions(sparsity={"qkv": 0.5}).needs_statistics  # targets mlp: q/k/v are not pruned
    assert ExportOptions(method="cats", sparsity={"sparsity": 0.4}).sparsity["up"] == 0.0  # cats masks down only
    assert ExportOptions(method="teal").centring == "off" and ExportOptions().centring == "auto"


def _saved_plan(folder, method="scap"):
    groups = [Group("x0", [Target("model.layers.0.mlp.gate_proj", "n0", "gate", 8, 16),
                           Target("model.layers.0.mlp.up_proj", "n1", "up", 8, 16)]),
              Group("x1", [Target("model.layers.0.mlp.down_proj", "n2", "down", 16, 8)])]
    hists = {}
    for i, group in enumerate(groups):
        hists[group.name] = StreamingHistogram()
        hists[group.name].update(np.random.default_rng(i).standard_normal(4000))
    write_plan(folder, build_plan(groups, hists, {"up": 0.3, "down": 0.6}, method=method, allocation="uniform"), hists)
    return folder / "actsparse.json"


def test_options_reuse_a_plans_own_sparsity_when_none_is_given(tmp_path):
    options = ExportOptions(plan=_saved_plan(tmp_path), sparsity={"sparsity": None, "up": None})
    assert options.fixed == {"model.layers.0.mlp.gate_proj": 0.3, "model.layers.0.mlp.up_proj": 0.3,
                             "model.layers.0.mlp.down_proj": 0.6}
    assert options.sparsity == {"up": 0.3, "down": 0.6, "qkv": 0.0, "o": 0.0}
    given = ExportOptions(plan=tmp_path / "actsparse.json", sparsity={"down": 0.1})
    assert given.fixed is None and given.sparsity["down"] == 0.1
    with pytest.raises(ActSparseError, match="calibrated for --method scap"):
        ExportOptions(plan=tmp_path / "actsparse.json", method="cats")


class _NoTargets(type(get_backend("onnx"))):
    def read(self, path):
        return None

    def find_groups(self, graph, kinds):
        return []


def test_find_targets_refuses_a_model_with_nothing_to_prune():
    with pytest.raises(ActSparseError, match="found no mlp projections to prune in tiny"):
        find_targets(_NoTargets(), None, ExportOptions(format="onnx"), "tiny")


def test_export_refuses_cats_where_the_backend_has_no_cats_masks(tiny_llama, tmp_path):
    with pytest.raises(ActSparseError, match="--method cats is not available with --format onnx"):
        export(str(tiny_llama), tmp_path / "out", format="onnx", method="cats", sparsity={"down": 0.5})
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    """The tiny Llama exported to OpenVINO IR, as the first step of an export leaves it."""
    folder = tmp_path_factory.mktemp("exported")
    return get_backend("openvino").export(tiny_llama, folder, "fp32")


@pytest.fixture(scope="module")
def options(texts):
    return ExportOptions(sparsity={"up": 0.3, "down": 0.5}, calibration=str(texts["calibration"]), **CALIB)


def test_find_targets_groups_the_projections_by_input(exported, options):
    groups, sources = find_targets(get_backend("openvino"), exported, options)
    kinds = [[t.kind for t in g.targets] for g in groups]
    assert sorted(map(sorted, kinds)) == [["down"], ["down"], ["gate", "up"], ["gate", "up"]]
    assert {t.module for g in groups for t in g.targets} == {
        f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    assert sources == {}
    cats = ExportOptions(method="cats", sparsity={"down": 0.5})
    _, sources = find_targets(get_backend("openvino"), exported, cats)
    assert set(sources) == {g.name for g in groups if g.sparsity_kind == "down"}


@pytest.fixture(scope="module")
def calibrated(exported, options):
    backend = get_backend("openvino")
    groups, sources = find_targets(backend, exported, options)
    return groups, sources, calibrate(backend, exported, groups, sources, options)


def test_calibrate_counts_every_input_value(calibrated, options):
    groups, _, statistics = calibrated
    tokens = options.calibration_samples * options.calibration_seq_len
    for group in groups:  # one value per token and input channel
        assert statistics.histograms[group.name].total == tokens * group.targets[0].in_features
        assert statistics.curves[group.name].shape[-1] == len(GRID)  # an error per sparsity of the grid
    assert statistics.model_curves == {}  # uniform allocation needs no model probes
    assert statistics.info == {"source": options.calibration, "samples": 4, "seq_len": 32, "error_rows": tokens}


def test_calibrate_nothing_for_a_dense_export(exported):
    dense = ExportOptions(calibration="/nonexistent")  # never read
    groups, _ = find_targets(get_backend("openvino"), exported, dense)
    assert calibrate(get_backend("openvino"), exported, groups, {}, dense) == Statistics()


def test_make_plan_thresholds_each_group_at_its_sparsity(exported, options):
    backend = get_backend("openvino")
    groups, _ = find_targets(backend, exported, options)
    hists = {}
    for i, group in enumerate(groups):
        hists[group.name] = StreamingHistogram()
        hists[group.name].update(np.random.default_rng(i).standard_normal(10000) + 0.1 * i)
    plan = make_plan(groups, Statistics(hists), {}, options, "tiny")
    assert plan["weight_format"] == "fp32" and plan["source_model"] == "tiny" and len(plan["layers"]) == 6
    for layer in plan["layers"]:
        hist, s = hists[layer["group"]], 0.3 if layer["kind"] in ("gate", "up") else 0.5
        assert layer["target_sparsity"] == s
        assert layer["threshold"] == pytest.approx(hist.threshold(layer["mode"], s))
        assert layer["calibrated_sparsity"] == pytest.approx(s, abs=1e-3)
    dense = make_plan(groups, Statistics(), {}, ExportOptions(), "tiny")
    assert dense["statistics"] is None and all(l["target_sparsity"] == 0 for l in dense["layers"])


@pytest.fixture(scope="module")
def planned(calibrated, options):
    groups, sources, statistics = calibrated
    return make_plan(groups, statistics, sources, options), statistics


def _ops(graph):
    return [op.get_type_name() for op in graph.get_ordered_ops()]


def test_rewrite_without_fusion_inserts_one_mask_per_group(exported, planned):
    plan = dict(planned[0])
    no_fuse = ExportOptions(sparsity={"up": 0.3, "down": 0.5}, fuse=False)
    graph = rewrite(get_backend("openvino"), exported, plan, no_fuse)
    assert plan["passes"]["masks"] == 4 and "fused" not in plan["passes"]
    assert OP_TYPE not in _ops(graph)


def test_rewrite_fuses_every_mask(exported, planned, options):
    skip_without_extension(get_backend("openvino").capabilities.fusion_problem)
    plan = dict(planned[0])
    graph = rewrite(get_backend("openvino"), exported, plan, options)
    assert plan["passes"]["masks"] == 4 and plan["passes"]["fused"] == 6 and plan["passes"]["refused"] == 0
    # gate and up share one op, one per group; each layer's two then make one ActSparseMLP
    assert _ops(graph).count(MLP_TYPE) == 2 and OP_TYPE not in _ops(graph) and plan["passes"]["mlp"] == 2


def test_save_writes_the_model_and_the_plan_with_its_statistics(exported, planned, tmp_path):
    folder = shutil.copytree(exported.parent, tmp_path / "out")
    path = folder / exported.name
    plan, statistics = dict(planned[0]), planned[1]
    backend = get_backend("openvino")
    graph = rewrite(backend, path, plan, ExportOptions(sparsity={"up": 0.3, "down": 0.5}, fuse=False))
    save(backend, graph, path, plan, statistics)
    saved, histograms = read_plan(folder)
    assert saved["layers"] == plan["layers"] and saved["passes"] == plan["passes"]
    for name, hist in statistics.histograms.items():
        np.testing.assert_array_equal(histograms[name].counts, hist.counts)
    assert sorted(_ops(backend.read(path))) == sorted(_ops(graph))  # the saved model is the rewritten one
