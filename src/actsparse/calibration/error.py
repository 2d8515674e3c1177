"""Output error of pruning a layer's input, measured on calibration samples.

For a group reading x (sample rows ``X [R, K]``) through weights ``W [K, N]`` (its consumers
concatenated), centre c (0, or the histogram's centre at s), mask source a (x itself, or
SiLU(gate) for cats) and threshold τ(s):

    err(s) = mean over tokens t of ‖((x_t − c) · 1{|a_t − c| ≤ τ(s)}) · W‖² / ‖x_t · W‖²

is the relative output error the mask introduces (the m·rowsum(W) fold is exact, so only the
pruned part of x − c is lost), taken per token: a ratio of sums would be ruled by the few
tokens with massive activations, and call a layer cheap to prune whose other tokens it ruins. It is tabulated once on ``GRID`` uncentred and centred, and saved
beside the histograms: centring and greedy allocation then re-plan without samples or weights.
"""
from __future__ import annotations

import numpy as np

from .stats import StreamingHistogram

GRID = np.round(np.linspace(0.0, 0.95, 20), 4)
# Sparsities at which greedy allocation's full probe prunes the whole model, one group at a time (then
# interpolated onto GRID), the one sparsity at which the scaled probe does, and the calibration
# samples and tokens both probe with.
MODEL_GRID = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95])
SCALED_PROBE_AT = 0.5
MODEL_PROBE = (4, 128)
GREEDY_PROBES = ("scaled", "full")


def error_curves(hist: StreamingHistogram, rows: np.ndarray, weight: np.ndarray, centred: bool = True,
                 mask_rows: np.ndarray | None = None) -> np.ndarray:
    """``[2, len(GRID)]``: err(s) uncentred (row 0) and centred on ``hist.centre(s)`` (row 1; a copy
    of row 0 when not ``centred``)."""
    rows = np.asarray(rows, np.float32)
    weight = np.asarray(weight, np.float32)
    # ‖P·W‖² = Σ (P·W·Wᵀ) ∘ P: the Gram form is cheaper when W is wide (gate+up)
    gram = weight @ weight.T if weight.shape[1] > weight.shape[0] else None

    def energy(p: np.ndarray) -> np.ndarray:  # per token
        return np.sum((p @ gram) * p, axis=1) if gram is not None else np.sum(np.square(p @ weight), axis=1)

    dense = np.maximum(energy(rows), np.finfo(np.float32).tiny)
    source = rows if mask_rows is None else np.asarray(mask_rows, np.float32)
    curves = np.zeros((2, len(GRID)))
    for j, s in enumerate(GRID[1:], start=1):
        for i, centre in enumerate((0.0, hist.centre(float(s)) if centred else 0.0)):
            tau = hist.threshold(centre, float(s))
            curves[i, j] = float(np.mean(energy(np.where(np.abs(source - centre) <= tau, rows - centre, 0.0)) / dense))
    return curves


def error_at(curve: np.ndarray, sparsity: float) -> float:
    """err at any sparsity, linear between grid points."""
    return float(np.interp(sparsity, GRID, curve))


def scaled_curve(layer_curve: np.ndarray, probed: float, at: float) -> np.ndarray:
    """The layer's error curve scaled to meet the model error ``probed`` at sparsity ``at``: the model
    error's shape taken from the layer's own, its level from one probe of the whole model."""
    base = error_at(layer_curve, at)
    return layer_curve * (probed / base) if base > 0 else np.asarray(layer_curve, np.float64)


def greedy_allocation(costs: dict[str, np.ndarray], params: dict[str, int], budget: float,
                      step: float = 0.05) -> dict[str, float]:
    """TEAL-style greedy: from 0, repeatedly raise by ``step`` the sparsity of the group whose
    next step adds the least output error per weight skipped, until the parameter-weighted
    average sparsity reaches ``budget`` (the last step is cut to land on it exactly).

    ``costs[g]`` is g's error curve on ``GRID``; ``params[g]`` its weight count.
    """
    total = float(sum(params.values()))
    top = float(GRID[-1])
    if not 0 <= budget <= top:
        raise ValueError(f"budget {budget} outside [0, {top}]")
    sparsity = {g: 0.0 for g in costs}
    reached = 0.0
    while reached < budget - 1e-9:
        def price(g: str) -> float:
            s = sparsity[g]
            nxt = min(s + step, top)
            return (error_at(costs[g], nxt) - error_at(costs[g], s)) / (params[g] * (nxt - s))

        g = min((g for g in costs if sparsity[g] < top - 1e-9), key=price)
        grow = min(step, top - sparsity[g], (budget - reached) * total / params[g])
        sparsity[g] += grow
        reached += grow * params[g] / total
    return sparsity
