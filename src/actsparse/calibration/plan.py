"""The plan (``actsparse.json``): per-layer mode and threshold, the contract between stages.

For each group of layers reading one tensor x at target sparsity s:

    m = mode(x) when centred, else 0
    τ = quantile(|x − m|, s)

``auto`` centring keeps the mode only where it lowers the pruned input energy
``E[(x − m)² · 1{|x − m| ≤ τ}]`` (the output error of the layer, up to its weights) by more
than ``AUTO_MARGIN``; gated-SiLU inputs, already centred, stay at m = 0.
The histograms are saved beside the plan so a new sparsity is re-planned without calibrating.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._common import ActSparseError
from .stats import StreamingHistogram
from .targets import SPARSITY_KIND, SPARSITY_KINDS, Group, Target

FORMAT_VERSION = 1
PLAN_FILE = "actsparse.json"
STATS_FILE = "actsparse_stats.npz"
AUTO_MARGIN = 0.05
METHODS = ("scap", "teal")
CENTERING = ("auto", "on", "off")


def choose_mode(hist: StreamingHistogram, sparsity: float, centering: str) -> float:
    if centering == "off" or sparsity <= 0:
        return 0.0
    mode = hist.mode()
    if centering == "on":
        return mode
    plain = hist.pruned_energy(0.0, hist.threshold(0.0, sparsity))
    centred = hist.pruned_energy(mode, hist.threshold(mode, sparsity))
    return mode if centred < (1 - AUTO_MARGIN) * plain else 0.0


def build_plan(groups: list[Group], histograms: dict[str, StreamingHistogram], sparsity: dict[str, float],
               *, method: str = "scap", centering: str = "auto", targets: str = "mlp",
               prefill: str = "dense", source_model: str = "", calibration: dict | None = None) -> dict:
    """Thresholds for every group at the sparsity of its kind (``sparsity[kind]``, default 0)."""
    if method == "teal":
        centering = "off"
    layers = []
    for group in groups:
        hist = histograms[group.name]
        s = float(sparsity.get(group.sparsity_kind, 0.0))
        mode = choose_mode(hist, s, centering)
        tau = hist.threshold(mode, s)
        for t in group.targets:
            layers.append({
                "module": t.module, "node": t.node, "kind": t.kind, "group": group.name,
                "in_features": t.in_features, "out_features": t.out_features,
                "mode": mode, "threshold": tau, "target_sparsity": s,
                "calibrated_sparsity": round(hist.sparsity(mode, tau), 6) if s > 0 else 0.0,
            })
    return {"format_version": FORMAT_VERSION, "method": method, "mode_centering": centering,
            "targets": targets, "prefill": prefill, "source_model": source_model,
            "calibration": calibration or {}, "statistics": STATS_FILE, "layers": layers}


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


def write_plan(folder: Path, plan: dict, histograms: dict[str, StreamingHistogram]) -> None:
    (folder / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
    first = next(iter(histograms.values()), StreamingHistogram())
    np.savez_compressed(folder / STATS_FILE, __meta__=np.array([first.bins, first.scale, first.limit]),
                        **{name: h.counts for name, h in histograms.items()})


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
