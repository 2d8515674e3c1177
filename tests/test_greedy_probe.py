"""Greedy allocation's scaled model-error probe against the full one, its cost, and how it is chosen and recorded."""
import numpy as np
import pytest

from actsparse import ActSparseError
from actsparse.calibration.error import GRID, MODEL_GRID, SCALED_PROBE_AT, error_at
from actsparse.calibration.plan import layer_costs
from conftest import plan_of, run_cli

CALIB = ("--calibration-samples", "4", "--calibration-seq-len", "32")


@pytest.fixture(scope="module")
def probed(tiny_llama, texts, tmp_path_factory):
    """The tiny model's IR, its groups, probe chunks and statistics (no model curves yet)."""
    from transformers import AutoTokenizer

    from actsparse.backends import get_backend
    from actsparse.calibration.targets import TARGET_KINDS
    from actsparse.calibration.text import token_chunks
    from actsparse.pipeline import measure_statistics

    backend = get_backend("openvino")
    ir = backend.export(tiny_llama, tmp_path_factory.mktemp("probe") / "ir", "fp32")
    groups = backend.find_groups(backend.read(ir), TARGET_KINDS["mlp"])
    chunks = token_chunks(AutoTokenizer.from_pretrained(tiny_llama), [texts["calibration"].read_text()], 6, 48)
    return backend, ir, groups, chunks, measure_statistics(backend, ir, groups, chunks, {})


def _curves_and_passes(probed, probe, monkeypatch):
    """The model curves by ``probe``, and how many forward passes computed them (calls of the graph's feed)."""
    from actsparse.backends.openvino import calibration
    from actsparse.pipeline import model_error_curves

    backend, ir, groups, chunks, statistics = probed
    calls, original = [], calibration.feed

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(calibration, "feed", counting)
    curves = model_error_curves(backend, ir, groups, chunks, {}, statistics, "auto", probe)
    monkeypatch.undo()
    return curves, len(calls)


def test_scaled_probe_meets_the_full_probe_at_its_sparsity(probed, monkeypatch):
    """The scaled curve is the layer curve's shape through the full probe's model error at SCALED_PROBE_AT,
    for one dense and one pruned pass per probe sample and group instead of one per sparsity of MODEL_GRID."""
    from actsparse.pipeline import model_probe_cost

    _, _, groups, chunks, statistics = probed
    full, full_passes = _curves_and_passes(probed, "full", monkeypatch)
    scaled, scaled_passes = _curves_and_passes(probed, "scaled", monkeypatch)
    samples = min(4, len(chunks))
    assert full_passes == samples * (1 + len(groups) * (len(MODEL_GRID) - 1))
    assert scaled_passes == samples * (1 + len(groups))
    for probe, passes in (("full", full_passes), ("scaled", scaled_passes)):
        assert model_probe_cost(probe, len(groups), chunks)["forward_passes"] == passes
    layer = layer_costs(statistics.curves, "auto")
    at = int(np.argmin(np.abs(GRID - SCALED_PROBE_AT)))
    for group in groups:
        probed_error = full[group.name][at]
        assert probed_error > 1e-6
        assert scaled[group.name][at] == pytest.approx(probed_error, rel=1e-6)
        expected = layer[group.name] * probed_error / error_at(layer[group.name], SCALED_PROBE_AT)
        np.testing.assert_allclose(scaled[group.name], expected, rtol=1e-6)
        assert np.all(np.diff(scaled[group.name]) >= 0)  # an error curve: rises with sparsity


def test_greedy_probe_is_checked_and_recorded(probed, tiny_llama, texts, tmp_path):
    from actsparse.pipeline import ExportOptions, calibrate

    with pytest.raises(ActSparseError, match="unknown greedy probe 'all'"):
        ExportOptions(greedy_probe="all")
    proc = run_cli("export", tiny_llama, tmp_path / "bad", "--allocation", "greedy", "--greedy-probe", "all")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "invalid choice: 'all'" in proc.stderr
    backend, ir, groups, _, _ = probed
    options = ExportOptions(sparsity={"sparsity": 0.4}, allocation="greedy", calibration=str(texts["calibration"]),
                            calibration_samples=4, calibration_seq_len=32)
    record = calibrate(backend, ir, groups, {}, options).info["model_probe"]  # the default: scaled
    assert record["probe"] == "scaled" and record["sparsities"] == 1
    assert record["forward_passes"] == 4 * (1 + len(groups)) and record["tokens_per_pass"] == 32
    out = tmp_path / "full"
    proc = run_cli("export", tiny_llama, out, "--sparsity", "0.4", "--allocation", "greedy", "--greedy-probe", "full",
                   "--calibration", texts["calibration"], *CALIB)
    assert proc.returncode == 0, proc.stderr
    record = plan_of(out)["calibration"]["model_probe"]
    assert record["probe"] == "full" and record["sparsities"] == len(MODEL_GRID) - 1
    assert record["forward_passes"] == 4 * (1 + len(groups) * record["sparsities"])
