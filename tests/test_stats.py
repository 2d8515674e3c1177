"""Streaming histograms against numpy on the full sample."""
import tracemalloc

import numpy as np
import pytest

from actsparse.calibration.plan import choose_mode
from actsparse.calibration.stats import StreamingHistogram


def _gelu(rng, n=400_000):
    """GELU of N(−0.5, 1) pre-activations: the density piles up at GELU's minimum, −0.17."""
    from scipy.special import erf

    pre = rng.normal(-0.5, 1.0, n)
    return pre * 0.5 * (1 + erf(pre / np.sqrt(2)))


def _hist(x, chunk=50_000):
    h = StreamingHistogram()
    for i in range(0, len(x), chunk):
        h.update(x[i:i + chunk])
    return h


@pytest.mark.parametrize("dist", ["normal", "laplace", "heavy"])
@pytest.mark.parametrize("center", [0.0, -0.17])
def test_threshold_matches_numpy_quantile(dist, center):
    rng = np.random.default_rng(0)
    x = {"normal": lambda: rng.normal(0.3, 1.0, 400_000),
         "laplace": lambda: rng.laplace(0.0, 0.05, 400_000),
         "heavy": lambda: rng.standard_t(2, 400_000) * 3}[dist]().astype(np.float32)
    h = _hist(x)
    for s in (0.1, 0.3, 0.5, 0.7, 0.9):
        tau = h.threshold(center, s)
        expected = np.quantile(np.abs(x - center), s)
        assert tau == pytest.approx(expected, rel=5e-3, abs=1e-5)
        assert h.sparsity(center, tau) == pytest.approx(s, abs=1e-6)
        assert np.mean(np.abs(x - center) <= tau) == pytest.approx(s, abs=2e-3)


def test_pruned_energy_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(0.1, 0.5, 300_000).astype(np.float32)
    h = _hist(x)
    for center, tau in ((0.0, 0.2), (0.1, 0.4), (-0.3, 1.0)):
        z = x - center
        expected = np.mean(np.where(np.abs(z) <= tau, z * z, 0.0))
        assert h.pruned_energy(center, tau) == pytest.approx(expected, rel=1e-2)


def test_mode_finds_the_peak_not_the_mean():
    rng = np.random.default_rng(2)
    gamma = rng.gamma(3.0, 1.0, 400_000)  # mode 2, mean 3, median ~2.67
    assert _hist(gamma).mode() == pytest.approx(2.0, abs=0.1)
    assert _hist(_gelu(rng)).mode() == pytest.approx(-0.17, abs=0.03)


def test_mode_falls_back_to_median_when_flat():
    x = np.random.default_rng(3).uniform(-1.0, 3.0, 400_000)
    assert _hist(x).mode() == pytest.approx(np.median(x), abs=0.02)


def test_auto_centering_only_where_it_lowers_pruned_energy():
    rng = np.random.default_rng(4)
    symmetric = _hist(rng.laplace(0.0, 0.1, 300_000))
    assert choose_mode(symmetric, 0.5, "auto") == 0.0
    x = _gelu(rng)
    gelu = _hist(x)
    # the centre at s: the middle of the shortest window holding half the values (numpy, on the samples)
    xs, k = np.sort(x), len(x) // 2
    start = int(np.argmin(xs[k:] - xs[:-k]))
    assert choose_mode(gelu, 0.5, "auto") == pytest.approx(0.5 * (xs[start] + xs[start + k]), abs=0.005)
    assert -0.17 < choose_mode(gelu, 0.5, "auto") < -0.05  # inside GELU's negative lobe
    assert choose_mode(gelu, 0.5, "on") == choose_mode(gelu, 0.5, "auto")
    assert choose_mode(gelu, 0.5, "off") == 0.0


def test_memory_is_bounded_by_bins_not_tokens():
    """Ten times more calibration tokens: the same state size and the same peak memory."""
    rng = np.random.default_rng(5)
    chunk = rng.normal(size=(64, 1536)).astype(np.float32)  # one sample's worth of a down_proj input

    def stream(n_chunks):
        h = StreamingHistogram()
        tracemalloc.start()
        for _ in range(n_chunks):
            h.update(chunk)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return h, peak

    small, peak_small = stream(10)
    large, peak_large = stream(100)
    assert large.total == 10 * small.total
    assert large.counts.nbytes == small.counts.nbytes
    assert peak_large < 1.2 * peak_small + 64 * 1024
