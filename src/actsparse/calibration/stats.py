"""Streaming activation statistics: one fixed-bin histogram per pruned input tensor.

Bins are uniform in ``u = asinh(x / scale)``: linear (absolute resolution ~``scale``) near zero,
logarithmic (relative resolution ~0.25 %) for large values. Memory is ``bins`` counters
whatever the number of calibration tokens, and the histogram answers every question the
method asks: the mode ``m``, the threshold ``τ = quantile(|x − m|, s)``, the sparsity a
threshold gives, and the pruned energy ``E[(x − m)² · 1{|x − m| ≤ τ}]``.
"""
from __future__ import annotations

import numpy as np

BINS = 16384
SCALE = 1e-4
LIMIT = 1e5  # values beyond ±LIMIT land in the outermost bins


class StreamingHistogram:
    def __init__(self, bins: int = BINS, scale: float = SCALE, limit: float = LIMIT,
                 counts: np.ndarray | None = None):
        self.bins, self.scale, self.limit = bins, scale, limit
        self.u_max = float(np.arcsinh(limit / scale))
        self.counts = np.zeros(bins, np.int64) if counts is None else np.asarray(counts, np.int64)
        if self.counts.shape != (bins,):
            raise ValueError(f"expected {bins} counts, got {self.counts.shape}")
        u_edges = np.linspace(-self.u_max, self.u_max, bins + 1)
        self.edges = scale * np.sinh(u_edges)  # bin edges in x

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).ravel()
        x = x[np.isfinite(x)]
        u = np.arcsinh(x / np.float32(self.scale))
        idx = ((u + self.u_max) * (self.bins / (2 * self.u_max))).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def cdf(self, v) -> np.ndarray:
        """Fraction of values ≤ v, linear inside each bin."""
        v = np.clip(np.asarray(v, np.float64), self.edges[0], self.edges[-1])
        cum = np.concatenate([[0], np.cumsum(self.counts)]) / max(self.total, 1)
        return np.interp(v, self.edges, cum)

    def quantile(self, q: float) -> float:
        cum = np.concatenate([[0], np.cumsum(self.counts)]) / max(self.total, 1)
        return float(np.interp(q, cum, self.edges))

    def sparsity(self, center: float, tau: float) -> float:
        """Fraction of values with ``|x − center| ≤ tau``: what the mask would zero."""
        return float(self.cdf(center + tau) - self.cdf(center - tau))

    def threshold(self, center: float, sparsity: float) -> float:
        """``τ`` with ``P(|x − center| ≤ τ) = sparsity`` (bisection on the interpolated CDF)."""
        if sparsity <= 0 or self.total == 0:
            return 0.0
        lo, hi = 0.0, float(max(abs(self.edges[0] - center), abs(self.edges[-1] - center)))
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.sparsity(center, mid) < sparsity else (lo, mid)
        return hi

    def pruned_energy(self, center: float, tau: float) -> float:
        """``E[(x − center)² · 1{|x − center| ≤ tau}]``: the input error the mask introduces."""
        a, b = center - tau, center + tau
        inner = self.edges[(self.edges > a) & (self.edges < b)]
        points = np.concatenate([[a], inner, [b]])
        mass = np.diff(self.cdf(points))
        mid = 0.5 * (points[1:] + points[:-1])
        return float(np.sum(mass * (mid - center) ** 2))

    def mode(self, grid: int = 2048) -> float:
        """Peak of a Gaussian-smoothed density between the 1st and 99th percentiles.

        Falls back to the median when the density has no clear peak (flat to within 2 %).
        """
        if self.total == 0:
            return 0.0
        lo, hi = self.quantile(0.01), self.quantile(0.99)
        if not hi > lo:
            return float(lo)
        x = np.linspace(lo, hi, grid + 1)
        density = np.diff(self.cdf(x))
        # Silverman's bandwidth from a robust spread, at least two grid cells.
        iqr = self.quantile(0.75) - self.quantile(0.25)
        h = max(0.9 * (iqr / 1.349) * self.total ** -0.2, 2 * (hi - lo) / grid)
        offsets = np.arange(-4 * h, 4 * h + 1e-12, (hi - lo) / grid)
        kernel = np.exp(-0.5 * (offsets / h) ** 2)
        smooth = np.convolve(density, kernel / kernel.sum(), mode="same")
        if smooth.max() <= 1.02 * np.median(smooth):
            return self.quantile(0.5)
        centers = 0.5 * (x[1:] + x[:-1])
        return float(centers[int(np.argmax(smooth))])
