"""ActSparseMLP's activation in the C++ core (core/activation.cpp) against numpy in float64."""
import math

import numpy as np
import pytest

from actsparse._common import ActSparseError
from actsparse.runtime_ext import kernels as ks
from conftest import skip_without_extension

try:
    ks.available_kernels()
except (OSError, ActSparseError) as err:
    skip_without_extension(str(err))

RNG = np.random.default_rng(3)
REFERENCE = {
    "silu": lambda v: v / (1 + np.exp(-v)),
    "gelu_erf": lambda v: 0.5 * v * (1 + np.vectorize(math.erf)(v / np.sqrt(2))),
    "gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3))),
}
# around 0, the polynomials' ranges and past exp's clamp (±87/88), and every lane of a vector
EDGES = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 9.0, -9.0, 20.0, -20.0, 87.0, -87.0, 88.5, -88.5, 100.0,
         -100.0, 1e30, -1e30]


def _bf16(a) -> np.ndarray:
    import torch

    return torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _expected(h, activation, gate):
    h = h.astype(np.float64)
    half = h.shape[1] // 2
    act = REFERENCE[activation]
    with np.errstate(over="ignore", invalid="ignore"):
        if gate == "none":
            return act(h)
        return act(h[:, :half]) * h[:, half:] if gate == "first" else h[:, :half] * act(h[:, half:])


@pytest.mark.parametrize("activation", ks.ACTIVATIONS)
@pytest.mark.parametrize("gate", ks.GATES)
def test_f32_matches_numpy(activation, gate):
    values = np.concatenate([EDGES, RNG.normal(scale=4, size=1012)]).astype(np.float32)
    h = np.stack([values, RNG.normal(scale=4, size=values.size).astype(np.float32)])  # edges in the gate half
    got = ks.activate(h, activation, gate).astype(np.float64)
    expected = _expected(h, activation, gate)
    half = h.shape[1] // 2
    size = np.abs(h if gate == "none" else h[:, :half] * h[:, half:]).astype(np.float64)
    # a few float32 ulps of the result; erf's polynomial adds up to 1.5e-7 of |x| (times the other half's value)
    assert (np.abs(got - expected) <= 3e-6 * np.abs(expected) + 1e-7 * size + 1e-35).all()


@pytest.mark.parametrize("activation", ks.ACTIVATIONS)
def test_bf16_in_and_out(activation):
    """bf16 h is widened, the activation computed in f32, the result rounded to nearest even bf16."""
    h = _bf16(RNG.normal(scale=3, size=(3, 2 * 515)))
    got = _widen(ks.activate(h, activation, "first")).astype(np.float64)
    expected = _expected(_widen(h), activation, "first")
    # one bf16 rounding (2^-8 relative), where f32 and float64 may round to neighbouring bf16 values; below 1e-6,
    # where 1 + tanh cancels in float64 too, absolute
    np.testing.assert_allclose(got, expected, rtol=2 ** -8, atol=1e-6)
    exact = _widen(_bf16(ks.activate(_widen(h), activation, "first")))  # f32 result, then rounded like torch
    np.testing.assert_array_equal(got, exact)  # the core rounds to nearest even, as torch does


def test_round_bf16_gives_bf16_values_and_nan_stays_nan():
    h = RNG.normal(size=(2, 64)).astype(np.float32)
    h[0, 3], h[1, 40] = np.nan, np.nan  # a gate value, then an up value
    a = ks.activate(h, "silu", "first", round_bf16=True)
    assert np.isnan(a[0, 3]) and np.isnan(a[1, 8]) and np.isfinite(np.delete(a.ravel(), [3, 32 + 8])).all()
    assert not (a.view(np.uint32) & 0xFFFF)[np.isfinite(a)].any()
    np.testing.assert_allclose(a[np.isfinite(a)], _widen(_bf16(ks.activate(h, "silu", "first")))[np.isfinite(a)])


def test_rows_over_threads_equal_one_thread():
    h = RNG.normal(size=(67, 4096)).astype(np.float32)  # 4 rows a task, the last task short
    np.testing.assert_array_equal(ks.activate(h, "gelu_tanh", "second", threads=2), ks.activate(h, "gelu_tanh", "second"))


def test_a_gate_needs_an_even_width():
    with pytest.raises(ks.KernelError, match="a gated intermediate needs an even width"):
        ks.activate(np.zeros((1, 7), np.float32), "silu", "first")
