"""The plan (``actsparse.json``): per-layer mode and threshold, the contract between stages.

For each group of layers reading one tensor x at target sparsity s:

    m = centre of x at s when centred, else 0   (the midpoint of the shortest interval holding a
                                                share s of x: the mode of x as s → 0)
    τ = quantile(|x − m|, s)

``auto`` centring keeps the mode only where it lowers the layer's output error on calibration
samples (``error.py``) by more than ``AUTO_MARGIN``; gated-SiLU inputs, already centred, stay
at m = 0. ``greedy`` allocation spreads a parameter-weighted budget over the groups by the same
error curves. The histograms and error curves are saved beside the plan, so a new sparsity is
re-planned without calibrating.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._common import ActSparseError
from .error import error_at, greedy_allocation
from .stats import StreamingHistogram
from .targets import SPARSITY_KIND, SPARSITY_KINDS, Group, Target

FORMAT_VERSION = 1
PLAN_FILE = "actsparse.json"
STATS_FILE = "actsparse_stats.npz"
CURVE = "error_curve:"  # key prefixes of the layer and model error curves in STATS_FILE
MODEL_CURVE = "model_error:"
AUTO_MARGIN = 0.05
METHODS = ("scap", "teal", "cats")
CENTERING = ("auto", "on", "off")
ALLOCATIONS = ("uniform", "greedy")


def _centred(curve: np.ndarray, sparsity: float) -> bool:
    return error_at(curve[1], sparsity) < (1 - AUTO_MARGIN) * error_at(curve[0], sparsity)


def choose_mode(hist: StreamingHistogram, sparsity: float, centering: str, curve: np.ndarray | None = None) -> float:
    """m for one group: 0, the centre at ``sparsity``, or (auto) that centre where it lowers the
    output error ``curve`` (without a curve, the pruned input energy stands in for it)."""
    if centering == "off" or sparsity <= 0:
        return 0.0
    mode = hist.centre(sparsity)
    if centering == "on":
        return mode
    if curve is not None:
        return mode if _centred(curve, sparsity) else 0.0
    plain = hist.pruned_energy(0.0, hist.threshold(0.0, sparsity))
    centred = hist.pruned_energy(mode, hist.threshold(mode, sparsity))
    return mode if centred < (1 - AUTO_MARGIN) * plain else 0.0


def group_params(group: Group) -> int:
    return sum(t.in_features * t.out_features for t in group.targets)


def layer_costs(curves: dict[str, np.ndarray], centering: str) -> dict[str, np.ndarray]:
    """Each group's layer output error along GRID, centred as ``centering`` would decide."""
    return {name: {"off": plain, "on": centred}.get(centering, np.where(centred < (1 - AUTO_MARGIN) * plain,
                                                                      centred, plain))
            for name, (plain, centred) in curves.items()}


def allocate(groups: list[Group], sparsity: dict[str, float], costs: dict[str, np.ndarray]) -> tuple[dict[str, float], dict]:
    """Greedy per-group sparsities for the parameter-weighted budget of ``sparsity``, and a record.

    ``costs`` are error curves along GRID, each measured with its group alone pruned. Such errors
    compound rather than add up when every group is pruned at once, so the objective is the sum
    of their squares, which spreads the budget more evenly than their sum (SmolLM2 at 40 %:
    perplexity ×1.089 against ×1.104). The greedy result is kept only if its objective is no
    worse than the uniform one at the same budget; the record says which.
    """
    costs = {name: np.square(curve) for name, curve in costs.items()}
    params = {g.name: group_params(g) for g in groups}
    uniform = {g.name: float(sparsity.get(g.sparsity_kind, 0.0)) for g in groups}
    budget = sum(params[n] * s for n, s in uniform.items()) / sum(params.values())
    greedy = greedy_allocation(costs, params, budget)
    objective = {name: sum(error_at(costs[n], s[n]) for n in s) for name, s in (("greedy", greedy), ("uniform", uniform))}
    chosen = greedy if objective["greedy"] <= objective["uniform"] else uniform
    record = {"allocation": "greedy", "budget": round(budget, 6), "objective": objective,
              "kept": "greedy" if chosen is greedy else "uniform"}
    return chosen, record


def build_plan(groups: list[Group], histograms: dict[str, StreamingHistogram], sparsity: dict[str, float],
               *, method: str = "scap", centering: str = "auto", targets: str = "mlp",
               prefill: str = "dense", source_model: str = "", calibration: dict | None = None,
               curves: dict[str, np.ndarray] | None = None, allocation: str = "uniform",
               fixed: dict[str, float] | None = None, mask_sources: dict[str, str] | None = None,
               model_curves: dict[str, np.ndarray] | None = None) -> dict:
    """Thresholds for every group at the sparsity of its kind (``sparsity[kind]``, default 0), or
    (greedy) at sparsities spread by output error over the same parameter-weighted budget, or
    at the ``fixed`` sparsity of each group's first module (re-applying a plan as it was).
    ``mask_sources`` (cats) names, per group, the tensor whose magnitude is thresholded instead of x.
    Greedy allocation spends the budget by ``model_curves`` (the model's output error, one group
    pruned at a time) when given, else by the layers' own output error ``curves``."""
    mask_sources = mask_sources or {}
    if method in ("teal", "cats"):
        centering = "off"
    per_group, record = {g.name: float(sparsity.get(g.sparsity_kind, 0.0)) for g in groups}, {"allocation": allocation}
    if fixed is not None:
        per_group = {g.name: float(fixed[g.targets[0].module]) for g in groups}
    elif allocation == "greedy":
        if not curves and not model_curves:
            raise ActSparseError("greedy allocation needs the error curves of a calibration (re-calibrate)")
        per_group, record = allocate(groups, sparsity, model_curves or layer_costs(curves, centering))
        record["objective_of"] = "model output" if model_curves else "layer outputs"
    layers = []
    for group in groups:
        hist = histograms[group.name]
        s = per_group[group.name]
        mode = choose_mode(hist, s, centering, (curves or {}).get(group.name))
        tau = hist.threshold(mode, s)
        for t in group.targets:
            layers.append({
                "module": t.module, "node": t.node, "kind": t.kind, "group": group.name,
                "in_features": t.in_features, "out_features": t.out_features,
                "mode": mode, "threshold": tau, "target_sparsity": s,
                "calibrated_sparsity": round(hist.sparsity(mode, tau), 6) if s > 0 else 0.0,
                **({"mask_source": mask_sources[group.name]} if group.name in mask_sources else {}),
            })
    return {"format_version": FORMAT_VERSION, "method": method, "mode_centering": centering,
            "targets": targets, "prefill": prefill, "source_model": source_model,
            "calibration": calibration or {}, "statistics": STATS_FILE, **record, "layers": layers}


def plan_groups(plan: dict) -> list[Group]:
    """The groups of a plan's layers, in order."""
    return [group for group, _ in group_settings(plan)]


def group_settings(plan: dict) -> list[tuple[Group, dict]]:
    """Each group of a plan with the layer entry that carries its shared mode, threshold and sparsity."""
    groups: dict[str, tuple[Group, dict]] = {}
    for layer in plan["layers"]:
        target = Target(layer["module"], layer["node"], layer["kind"], layer["in_features"], layer["out_features"])
        groups.setdefault(layer["group"], (Group(layer["group"]), layer))[0].targets.append(target)
    return list(groups.values())


def write_plan(folder: Path, plan: dict, histograms: dict[str, StreamingHistogram],
               curves: dict[str, np.ndarray] | None = None, model_curves: dict[str, np.ndarray] | None = None) -> None:
    (folder / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
    first = next(iter(histograms.values()), StreamingHistogram())
    np.savez_compressed(folder / STATS_FILE, __meta__=np.array([first.bins, first.scale, first.limit]),
                        **{name: h.counts for name, h in histograms.items()},
                        **{CURVE + name: c for name, c in (curves or {}).items()},
                        **{MODEL_CURVE + name: c for name, c in (model_curves or {}).items()})


def read_curves(path: str | Path, prefix: str = CURVE) -> dict[str, np.ndarray]:
    """The error curves (layer, or with ``MODEL_CURVE`` model) saved beside a plan, if any."""
    path = Path(path)
    stats = (path if path.is_dir() else path.parent) / STATS_FILE
    if not stats.is_file():
        return {}
    with np.load(stats) as data:
        return {key[len(prefix):]: data[key] for key in data.files if key.startswith(prefix)}


def read_plan(path: str | Path, with_statistics: bool = True) -> tuple[dict, dict[str, StreamingHistogram]]:
    """Load and validate a plan (a file or a folder holding ``actsparse.json``) and its histograms."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise ActSparseError(f"no actsparse plan at {path}")
    try:
        plan = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ActSparseError(f"plan {path} is not valid JSON: {err}") from None
    problem = _plan_problem(plan)
    if problem:
        raise ActSparseError(f"plan {path} is invalid: {problem}")
    histograms: dict[str, StreamingHistogram] = {}
    if with_statistics and plan.get("statistics"):
        stats = path.parent / plan["statistics"]
        try:
            with np.load(stats) as data:
                bins, scale, limit = data["__meta__"]
                histograms = {g.name: StreamingHistogram(int(bins), float(scale), float(limit), data[g.name])
                              for g in plan_groups(plan)}
        except (OSError, KeyError, ValueError) as err:
            raise ActSparseError(f"statistics {stats} beside the plan are missing or corrupt: {err}") from None
    return plan, histograms


def _plan_problem(plan) -> str | None:
    if not isinstance(plan, dict):
        return "not a JSON object"
    if plan.get("format_version") != FORMAT_VERSION:
        return f"format_version {plan.get('format_version')!r}, expected {FORMAT_VERSION}"
    if not isinstance(plan.get("layers"), list):
        return "no 'layers' list"
    keys = {"module": str, "node": str, "kind": str, "group": str, "in_features": int, "out_features": int,
            "mode": (int, float), "threshold": (int, float), "target_sparsity": (int, float)}
    for i, layer in enumerate(plan["layers"]):
        if not isinstance(layer, dict):
            return f"layer {i} is not an object"
        for key, types in keys.items():
            if not isinstance(layer.get(key), types):
                return f"layer {i} has no valid '{key}'"
        if layer["kind"] not in SPARSITY_KIND:
            return f"layer {i} has unknown kind {layer['kind']!r}"
        if layer["threshold"] < 0 or not 0 <= layer["target_sparsity"] < 1:
            return f"layer {i} has a negative threshold or a sparsity outside [0, 1)"
    return None


def check_sparsity(sparsity: dict[str, float]) -> None:
    for kind, s in sparsity.items():
        if kind not in SPARSITY_KINDS:
            raise ActSparseError(f"unknown sparsity kind {kind!r} (known: {', '.join(SPARSITY_KINDS)})")
        if not 0 <= s < 1:
            raise ActSparseError(f"sparsity for {kind} is {s}; it must be in [0, 1)")
