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
SAMPLE_ROWS = 512  # token rows kept per tensor for output-error estimates


class RowSampler:
    """Keeps about ``rows`` token rows of each named tensor, spread evenly over ``chunks`` chunks
    (the same seeded positions for every tensor, so samples of one layer's inputs line up)."""

    def __init__(self, rows: int, chunks: int, seed: int = 0):
        self.per_chunk = -(-rows // max(chunks, 1)) if rows else 0
        self.rows, self.rng = rows, np.random.default_rng(seed)
        self.positions: list[np.ndarray] = []  # rows taken from each chunk, drawn once for every name
        self.parts: dict[str, list[np.ndarray]] = {}

    def update(self, name: str, x: np.ndarray) -> None:
        if not self.per_chunk:
            return
        x = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
        parts = self.parts.setdefault(name, [])
        if len(self.positions) <= len(parts):
            self.positions.append(np.sort(self.rng.choice(len(x), min(self.per_chunk, len(x)), replace=False)))
        parts.append(x[self.positions[len(parts)]])

    def samples(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts)[:self.rows] for name, parts in self.parts.items()}


class StreamingHistogram:
    def __init__(self, bins: int = BINS, scale: float = SCALE, limit: float = LIMIT,
                 counts: np.ndarray | None = None):
        self.bins, self.scale, self.limit = bins, scale, limit
        self.u_max = float(np.arcsinh(limit / scale))
        self.counts = np.zeros(bins, np.int64) if counts is None else np.asarray(counts, np.int64)
        if self.counts.shape != (bins,):
            raise ValueError(f"expected {bins} counts, got {self.counts.shape}")
        self._cum = None
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
        self._cum = None

    def _cumulative(self) -> np.ndarray:
        """The CDF at the bin edges, kept until the next update."""
        if self._cum is None:
            self._cum = np.concatenate([[0], np.cumsum(self.counts)]) / max(self.total, 1)
        return self._cum

    def cdf(self, v) -> np.ndarray:
        """Fraction of values ≤ v, linear inside each bin."""
        v = np.clip(np.asarray(v, np.float64), self.edges[0], self.edges[-1])
        return np.interp(v, self.edges, self._cumulative())

    def quantile(self, q: float) -> float:
        return float(np.interp(q, self._cumulative(), self.edges))

    def sparsity(self, center: float, tau) -> float:
        """Fraction of values with ``|x − center| ≤ tau``: what the mask would zero."""
        share = self.cdf(center + np.asarray(tau)) - self.cdf(center - np.asarray(tau))
        return float(share) if np.ndim(share) == 0 else share

    def threshold(self, center: float, sparsity) -> float:
        """``τ`` with ``P(|x − center| ≤ τ) = sparsity`` (bisection on the interpolated CDF);
        ``sparsity`` may be an array, answered in one vectorised bisection."""
        target = np.asarray(sparsity, np.float64)
        if self.total == 0:
            return 0.0 if target.ndim == 0 else np.zeros_like(target)
        lo = np.zeros_like(target)
        hi = np.full_like(target, max(abs(self.edges[0] - center), abs(self.edges[-1] - center)))
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            below = np.asarray(self.sparsity(center, mid)) < target
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        hi = np.where(target <= 0, 0.0, hi)
        return float(hi) if hi.ndim == 0 else hi

    def pruned_energy(self, center: float, tau: float) -> float:
        """``E[(x − center)² · 1{|x − center| ≤ tau}]``: the input error the mask introduces."""
        a, b = center - tau, center + tau
        inner = self.edges[(self.edges > a) & (self.edges < b)]
        points = np.concatenate([[a], inner, [b]])
        mass = np.diff(self.cdf(points))
        mid = 0.5 * (points[1:] + points[:-1])
        return float(np.sum(mass * (mid - center) ** 2))

    def centre(self, mass: float) -> float:
        """Midpoint of the shortest interval that holds ``mass`` of the values: the centre whose
        window |x − c| ≤ τ prunes that share with the smallest τ. It is the mode as mass → 0; for
        a skewed peak (GELU's, bounded below by −0.17) it sits inside the pruned bulk, not on its edge."""
        if self.total == 0 or mass <= 0:
            return self.mode()
        cum = self._cumulative()
        start = np.linspace(0.0, 1.0 - mass, 4001)
        lo, hi = np.interp(start, cum, self.edges), np.interp(start + mass, cum, self.edges)
        best = int(np.argmin(hi - lo))
        return float(0.5 * (lo[best] + hi[best]))

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
