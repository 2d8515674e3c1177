"""Calibration quality: greedy allocation, centring, cats and encoder evaluation."""
import numpy as np
import pytest

import actsparse
from actsparse.calibration.error import GRID, error_at, error_curves, greedy_allocation
from actsparse.calibration.plan import group_params
from actsparse.calibration.stats import StreamingHistogram
from conftest import plan_of, run_cli
from reference import ov_logits, torch_logits, torch_model_with_plan

CALIB = {"calibration_samples": 16, "calibration_seq_len": 64}


def _convex_curves(rng, n):
    """Increasing convex error curves of different steepness, one per group."""
    return {f"g{i}": rng.uniform(0.01, 2.0) * GRID ** rng.uniform(1.5, 4.0) for i in range(n)}


@pytest.mark.parametrize("budget", [0.1, 0.37, 0.5, 0.72])
def test_greedy_meets_its_budget_and_beats_uniform(budget):
    rng = np.random.default_rng(int(budget * 100))
    costs = _convex_curves(rng, 8)
    params = {g: int(rng.integers(1, 10)) * 1000 for g in costs}
    result = greedy_allocation(costs, params, budget)
    reached = sum(params[g] * s for g, s in result.items()) / sum(params.values())
    assert reached == pytest.approx(budget, abs=0.01)
    greedy = sum(error_at(costs[g], s) for g, s in result.items())
    uniform = sum(error_at(costs[g], budget) for g in costs)
    assert greedy < uniform  # the curves differ, so spreading the budget by cost must pay
    assert len({round(s, 3) for s in result.values()}) > 1


def test_error_curves_match_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    rows = np.maximum(rng.normal(-0.5, 1, (64, 24)), -0.3).astype(np.float32)  # skewed, bounded below
    weight = rng.normal(0, 1, (24, 40)).astype(np.float32)
    hist = StreamingHistogram()
    hist.update(rows)
    curves = error_curves(hist, rows, weight)
    for j in (4, 10, 16):
        s = float(GRID[j])
        for row, centre in ((0, 0.0), (1, hist.centre(s))):
            tau = hist.threshold(centre, s)
            pruned = np.where(np.abs(rows - centre) <= tau, rows - centre, 0.0)
            expected = np.mean(np.sum((pruned @ weight) ** 2, axis=1) / np.sum((rows @ weight) ** 2, axis=1))
            assert curves[row, j] == pytest.approx(expected, rel=1e-4)
    assert curves[1, 10] < curves[0, 10]  # centring pays on a skewed input


def test_centre_is_the_middle_of_the_shortest_window():
    rng = np.random.default_rng(1)
    x = np.concatenate([np.full(3000, -0.17) + rng.exponential(0.05, 3000), rng.normal(0.5, 1, 2000)])
    hist = StreamingHistogram()
    hist.update(x)
    xs, k = np.sort(x), int(0.6 * len(x))
    widths = xs[k:] - xs[:-k]
    best = int(np.argmin(widths))
    assert hist.centre(0.6) == pytest.approx(0.5 * (xs[best] + xs[best + k]), abs=0.01)
    assert hist.centre(0.6) > hist.mode() + 0.02  # inside the pruned bulk, not on its edge


def test_model_error_curves_are_the_torch_kl(tiny_llama, texts, tmp_path):
    """Greedy's model error, one group pruned at a time, is KL(dense ‖ pruned) of the next-token
    distributions, here against the torch model with the same m and τ on that group alone."""
    import openvino as ov
    import torch
    from transformers import AutoTokenizer

    from actsparse.backends.openvino.calibration import find_groups, model_error_curves
    from actsparse.calibration.targets import TARGET_KINDS
    from actsparse.backends.openvino.export import export_openvino

    ir = export_openvino(tiny_llama, tmp_path / "ir")
    groups = find_groups(ov.Core().read_model(ir), TARGET_KINDS["mlp"])[:3]
    tokens = AutoTokenizer.from_pretrained(tiny_llama)(texts["evaluation"].read_text()[:4000])["input_ids"]
    chunks = np.array([tokens[:40], tokens[40:80]])

    def settings(group, s):  # an arbitrary centre and threshold per group and sparsity
        return 0.01 * groups.index(group), 5.0 * s

    curves = model_error_curves(ir, groups, chunks, settings, np.array([0.0, 0.3, 0.6]))
    dense = torch.log_softmax(torch.tensor(torch_logits(torch_model_with_plan(tiny_llama, {"layers": []}), chunks)), -1)
    for group in groups:
        assert curves[group.name][0] == 0
        for j, s in ((1, 0.3), (2, 0.6)):
            m, tau = settings(group, s)
            plan = {"layers": [{"module": t.module, "mode": m, "threshold": tau, "target_sparsity": s}
                               for t in group.targets]}
            pruned = torch.log_softmax(torch.tensor(torch_logits(torch_model_with_plan(tiny_llama, plan), chunks)), -1)
            kl = float((dense.exp() * (dense - pruned)).sum(-1).mean())
            assert kl > 1e-6
            assert curves[group.name][j] == pytest.approx(kl, rel=1e-3)


@pytest.fixture(scope="module")
def greedy_export(tiny_llama, texts, tmp_path_factory):
    return actsparse.export(str(tiny_llama), tmp_path_factory.mktemp("greedy") / "out", sparsity={"sparsity": 0.4},
                            allocation="greedy", prefill="sparse", calibration=str(texts["calibration"]), **CALIB)


def test_greedy_export_spreads_the_budget(greedy_export):
    plan = plan_of(greedy_export)
    assert plan["allocation"] == "greedy" and plan["budget"] == pytest.approx(0.4)
    groups = {}
    for layer in plan["layers"]:
        groups.setdefault(layer["group"], []).append(layer)
    params = {g: sum(l["in_features"] * l["out_features"] for l in ls) for g, ls in groups.items()}
    reached = sum(params[g] * ls[0]["target_sparsity"] for g, ls in groups.items()) / sum(params.values())
    assert reached == pytest.approx(0.4, abs=0.01)
    assert plan["objective"]["greedy"] <= plan["objective"]["uniform"]
    assert len({ls[0]["target_sparsity"] for ls in groups.values()}) > 1
    for ls in groups.values():  # the thresholds give the per-group sparsities on the calibration data
        assert ls[0]["calibrated_sparsity"] == pytest.approx(ls[0]["target_sparsity"], abs=0.02)


def test_greedy_plan_reapplies_as_it_was(greedy_export, tmp_path):
    source = plan_of(greedy_export)["source_model"]
    again = actsparse.export(source, tmp_path / "again", plan=greedy_export, prefill="sparse")
    old, new = plan_of(greedy_export)["layers"], plan_of(again)["layers"]
    assert [(l["target_sparsity"], l["threshold"]) for l in new] == [(l["target_sparsity"], l["threshold"]) for l in old]
    assert plan_of(again)["allocation"] == "greedy"


def test_cats_matches_the_torch_reference(tiny_llama, texts, tmp_path):
    out = actsparse.export(str(tiny_llama), tmp_path / "cats", sparsity={"down": 0.5}, method="cats",
                           prefill="sparse", calibration=str(texts["calibration"]), **CALIB)
    plan = plan_of(out)
    down = [l for l in plan["layers"] if l["kind"] == "down"]
    assert all("act_fn" in l["mask_source"] and l["mode"] == 0 for l in down)
    assert all(l["target_sparsity"] == 0 for l in plan["layers"] if l["kind"] != "down")
    assert plan["passes"]["refused"] == len(down)  # the op masks x by itself: cats stays unfused
    from transformers import AutoTokenizer

    ids = np.array([AutoTokenizer.from_pretrained(tiny_llama)(texts["evaluation"].read_text()[:2000])["input_ids"][:48]])
    expected = torch_logits(torch_model_with_plan(tiny_llama, plan), ids)
    dense = torch_logits(torch_model_with_plan(tiny_llama, {"layers": []}), ids)
    assert np.abs(expected - dense).max() > 1e-3
    np.testing.assert_allclose(ov_logits(out, ids), expected, atol=2e-4, rtol=1e-3)
    result = actsparse.evaluate(out, text=str(texts["evaluation"]), samples=4, seq_len=64)
    assert result["sparsity"]["down"] == pytest.approx(0.5, abs=0.1)


def test_cats_refuses_a_gelu_model(tiny_gelu, texts, tmp_path):
    proc = run_cli("export", tiny_gelu, tmp_path / "out", "--method", "cats", "--sparsity-down", "0.5",
                   "--calibration", texts["calibration"], "--calibration-samples", "4", "--calibration-seq-len", "32")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]  # beside the progress bar
    assert len(errors) == 1 and "cats needs a SiLU-gated MLP" in errors[0]
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_greedy_is_refused_for_cats(tiny_llama, tmp_path):
    proc = run_cli("export", tiny_llama, tmp_path / "out", "--method", "cats", "--allocation", "greedy",
                   "--sparsity-down", "0.5")
    assert proc.returncode == 1 and "cats prunes the down projections only" in proc.stderr


def _slice(name: str, layers: int, folder):
    """The first ``layers`` layers of a built-in model, as a Hugging Face folder."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from actsparse.exports.models import is_decoder, resolve_model

    source = resolve_model(name)
    model = (AutoModelForCausalLM if is_decoder(source) else AutoModel).from_pretrained(source, dtype=torch.float32)
    stack = model.model.layers if is_decoder(source) else model.encoder.layer
    del stack[layers:]
    model.config.num_hidden_layers = layers
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_auto_centering_centres_minilm_and_not_smollm2(tmp_path):
    wiki = {"calibration_samples": 8, "calibration_seq_len": 128}
    minilm = actsparse.export(str(_slice("minilm-l6", 2, tmp_path / "minilm")), tmp_path / "m",
                              sparsity={"down": 0.6}, **wiki)
    assert [l["mode"] < -0.05 for l in plan_of(minilm)["layers"] if l["kind"] == "down"] == [True, True]
    smollm = actsparse.export(str(_slice("smollm2-135m", 2, tmp_path / "smollm")), tmp_path / "s",
                              sparsity={"sparsity": 0.4}, **wiki)
    assert all(l["mode"] == 0 for l in plan_of(smollm)["layers"])


@pytest.mark.slow
def test_encoder_eval_gives_cosine_one_at_sparsity_zero(tmp_path):
    import openvino as ov
    import torch
    from transformers import AutoModel, AutoTokenizer

    from actsparse.backends.openvino.graph import EXACT_CONFIG
    from actsparse.backends.openvino.passes import set_dense
    from actsparse.backends.openvino.runtime import feed, read_model

    hf = _slice("minilm-l6", 1, tmp_path / "minilm")
    dense = actsparse.export(str(hf), tmp_path / "dense", sparsity={"sparsity": 0})
    result = actsparse.evaluate(dense, samples=4, seq_len=64)
    assert result["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and result["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert "perplexity" not in result

    sparse = actsparse.export(str(hf), tmp_path / "sparse", sparsity={"down": 0.6}, calibration_samples=8,
                              calibration_seq_len=64)
    result = actsparse.evaluate(sparse, samples=4, seq_len=64)
    assert 0.8 < result["min_cosine"] <= result["mean_cosine"] < 0.9999
    assert result["sparsity"]["down"] == pytest.approx(0.6, abs=0.1)
    # the dense twin the cosine is taken against is the torch model
    ids = np.array([AutoTokenizer.from_pretrained(hf)("The river runs north of the city.")["input_ids"]])
    core = ov.Core()
    model = read_model(core, sparse / "openvino_model.xml")
    set_dense(model)
    compiled = core.compile_model(model, "CPU", EXACT_CONFIG)
    got = compiled(feed([i.get_any_name() for i in compiled.inputs], ids))["last_hidden_state"]
    with torch.no_grad():
        expected = AutoModel.from_pretrained(hf).eval()(torch.tensor(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
