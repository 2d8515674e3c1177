"""Sweep of the C++ kernel core (every available ISA kernel) against numpy and the scalar kernel."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from actsparse import ActSparseError
from actsparse.runtime_ext import kernels as ks
from conftest import skip_without_extension
from reference import (DECODE_ROWS, int8_groups, int8_live, make_weight, multiplies_in_bf16, quantises_activations, torch_bf16,
                       weights_in_bf16)

try:
    KERNELS = ks.available_kernels()
except (ActSparseError, OSError) as e:  # library not built
    skip_without_extension(f"the kernel core library is not built ({e})")

FORMATS = ["f32", "f16", "bf16", "u8", "u4", "u4c"]  # u4c: u4 with compact params (reference.make_weight)
# (K, N); N > 2048 spans several stored column tiles of f32/f16/bf16 (ks.TILE_COLS), the last one partial;
# test_tile_widths covers u8/u4's wider tiles
SHAPES = [(1, 1), (7, 3), (64, 17), (130, 33), (64, 100), (7, 1), (130, 100), (33, 4500)]
U4_SHAPES = [(32, 1), (64, 17), (128, 33), (256, 100), (384, 3), (64, 4101)]  # G from GROUPS dividing K
GROUPS = [32, 64, 128]


def make_x(M, K, mode, sparsity, rng):
    """x with the requested fraction of |x - mode| <= tau (tau = 0.5); returns x, tau."""
    z = rng.uniform(0.6, 2.0, (M, K)) * rng.choice([-1.0, 1.0], (M, K))
    z[rng.random((M, K)) < sparsity] *= 0.5 / 2.0  # into [-0.5, 0.5]
    if sparsity >= 1.0:
        z = rng.uniform(-0.5, 0.5, (M, K))
    return (z + mode).astype(np.float32), 0.5


def reference(x, packed, bias, mode, tau, mask, kernel=None, rows=None, bf16_io=False):
    """float64 numpy. Where the kernel core multiplies in bf16 for a call of ``kernel`` on ``rows`` rows
    (default: x's), the masked z' and maybe the dequantised weights are rounded to bf16 first (torch's rounding)."""
    rows = rows or x.shape[0]
    z = x.astype(np.float64) - np.float32(mode)
    zp = np.where(~(np.abs(z) <= tau), z, 0.0) if mask else z
    if multiplies_in_bf16(packed.format, rows, kernel, bf16_io):
        zp = torch_bf16(zp)
    w = ks.dequantize(packed)
    w = (torch_bf16(w) if weights_in_bf16(packed.format, rows, kernel, bf16_io) else w).astype(np.float64)
    y = zp @ w + (0.0 if bias is None else bias)
    scale = np.abs(zp) @ np.abs(w) + (0.0 if bias is None else np.abs(bias))  # sum |terms| per output
    return y, scale


def check(y, ref, scale, what):
    assert y.shape == ref.shape, what
    err = np.abs(y - ref)
    tol = 1e-4 * scale + 1e-6
    assert np.all(err <= tol), f"{what}: max err {err.max():.3g}, worst ratio {np.max(err / tol):.3g}"


def cases():
    for fmt in FORMATS:
        shapes = [(K, N, G) for (K, N) in U4_SHAPES for G in GROUPS if K % G == 0] if fmt.startswith("u4") else \
                 [(K, N, 0) for (K, N) in SHAPES]
        for (K, N, G), M in itertools.product(shapes, [1, 2, DECODE_ROWS, 64]):
            yield pytest.param(fmt, K, N, G, M, id=f"{fmt}-K{K}-N{N}-G{G}-M{M}")


def test_the_format_table_comes_from_the_core():
    """kernels.formats() is the core's formats.inc: every format the packers know, with the ids the C API
    takes, and row sizes that match what numpy packs (the bytes of a [K, N] weight are K rows)."""
    table = ks.formats()
    assert sorted(table) == sorted({"f32", "f16", "bf16", "u8", "u4"})
    assert sorted(t["id"] for t in table.values()) == list(range(len(table)))
    assert dict(ks.FORMATS) == {name: t["id"] for name, t in table.items()}
    rng = np.random.default_rng(0)
    for fmt in table:
        for N in (1, 7, 130):
            packed = make_weight(fmt, 64, N, 32, rng)
            assert packed.data.nbytes == 64 * ks.row_bytes(fmt, N), (fmt, N)
            assert packed.tile_cols == ks.TILE_COLS[fmt] == table[fmt]["tile_cols"]
    assert [t["params"] for t in (table["f32"], table["u8"], table["u4"])] == ["none", "per_column", "per_group"]


def test_tile_major_layout():
    """Stored bytes: tile t (tile_cols columns, the last one narrower) holds rows 0..K-1 of its columns."""
    a = np.arange(3 * 4200, dtype=np.float32).reshape(3, 4200)
    tiled = ks.pack_f32(a).data
    expect = np.concatenate([a[:, :2048].ravel(), a[:, 2048:4096].ravel(), a[:, 4096:].ravel()])
    assert ks.TILE_COLS["f32"] == 2048 and tiled.shape == a.shape
    np.testing.assert_array_equal(tiled.ravel(), expect)
    np.testing.assert_array_equal(ks.from_tiles(tiled, "f32"), a)
    q = np.arange(2 * 8300).reshape(2, 8300) % 256
    tiled = ks.pack_u8(q, np.ones(8300), np.zeros(8300)).data
    assert ks.TILE_COLS["u8"] == 8192 and tiled.ravel()[2 * 8192] == q[0, 8192]
    q %= 16
    np.testing.assert_array_equal(ks.dequantize(ks.pack_u4(q, np.ones((1, 8300)), np.zeros((1, 8300)), 2)), q)
    np.testing.assert_array_equal(ks.dequantize(ks.pack_u4(q, np.ones((1, 8300)), np.zeros((1, 8300)), 2, 128)), q)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    w = np.concatenate([np.random.default_rng(0).standard_normal(10000) * 10.0 ** np.arange(-20, 20, 0.004),
                        [0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40]]).astype(np.float32)
    expect = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ks.to_bf16(w), expect)
    assert np.isnan(ks.dequantize(ks.pack_bf16(np.full((1, 3), np.nan, np.float32)))).all()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt,K,N,G,M", list(cases()))
def test_against_numpy_and_scalar(kernel, fmt, K, N, G, M):
    rng = np.random.default_rng(K * 1000003 + N * 101 + M + G)
    packed = make_weight(fmt, K, N, G, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    for sparsity, threads, mode, with_bias in [(0.0, 1, 0.0, True), (0.5, 2, 0.3, True), (0.5, 1, -1.2, False),
                                               (0.9, 2, 0.0, True)]:
        x, tau = make_x(M, K, mode, sparsity, rng)
        b = bias if with_bias else None
        y = ks.matmul(x, packed, b, mode, tau, True, threads, kernel)
        pairs = multiplies_in_bf16(fmt, M, kernel)
        ref, scale = reference(x, packed, b, mode, tau, True, kernel)
        what = f"{kernel} s={sparsity} t={threads} mode={mode}"
        check(y, ref, scale, what)
        if not pairs:  # the scalar kernel multiplies f32 activations
            ys = ks.matmul(x, packed, b, mode, tau, True, threads, "scalar")
            check(y, ys, scale, what + " vs scalar")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 3, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_all_pruned_gives_bias_exactly(kernel, fmt, M, threads):
    rng = np.random.default_rng(1)
    K, N = 128, 37
    packed = make_weight(fmt, K, N, 32, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    x, tau = make_x(M, K, 0.7, 1.0, rng)
    y = ks.matmul(x, packed, bias, 0.7, tau, True, threads, kernel)
    assert np.array_equal(y, np.broadcast_to(bias, (M, N)))
    y0 = ks.matmul(x, packed, None, 0.7, tau, True, threads, kernel)
    assert np.array_equal(y0, np.zeros((M, N), np.float32))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 2, 64])
def test_mask_off_is_dense(kernel, fmt, M):
    rng = np.random.default_rng(2)
    K, N = 128, 100
    packed = make_weight(fmt, K, N, 64, rng)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y = ks.matmul(x, packed, None, 0.25, 1e30, False, 2, kernel)  # huge tau would prune everything if masked
    ref, scale = reference(x, packed, None, 0.25, 1e30, False, kernel)
    check(y, ref, scale, f"{kernel} dense")
    assert np.abs(y).max() > 0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 2, 64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs_propagate(kernel, fmt, M, bad):
    rng = np.random.default_rng(3)
    K, N = 64, 33
    packed = make_weight(fmt, K, N, 32, rng)
    x, tau = make_x(M, K, 0.0, 0.5, rng)
    x[M - 1, 5] = bad
    y = ks.matmul(x, packed, None, 0.0, tau, True, 2, kernel)
    assert not np.isfinite(y[M - 1]).any(), "non-finite input must reach every output of its row"
    ref, scale = reference(x[:M - 1], packed, None, 0.0, tau, True, kernel, M)
    check(y[:M - 1], ref, scale, "other rows unaffected")


def int8_cases():
    for K, N in [(7, 3), (64, 64), (300, 130), (520, 2305), (96, 8192 + 64)]:
        yield pytest.param("u8", K, N, 0, id=f"u8-K{K}-N{N}")
    for (K, N), G in itertools.product([(64, 31), (128, 130), (384, 2305), (256, 8192 + 160)], [32, 64, 128]):
        for fmt in ("u4", "u4c") if K % G == 0 else ():
            yield pytest.param(fmt, K, N, G, id=f"{fmt}-K{K}-N{N}-G{G}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("M", [1, 2, DECODE_ROWS, DECODE_ROWS + 1, 37])
@pytest.mark.parametrize("fmt,K,N,G", list(int8_cases()))
def test_int8_activations(kernel, M, fmt, K, N, G):
    """u8/u4 with int8_activations: on a kernel with int8 dot products, exactly the product of the
    quantised activations with the dequantised weights, which differs from the f32 product. A decode
    (M <= DECODE_ROWS) quantises runs of 8 live activations (reference.int8_live), a prefill groups of 32
    channels (reference.int8_groups; u4 where 128 divides the group size), pruned (mask) or dense (no
    mask). On the other kernels, what the call computes without it. Split-N and split-K; NaN still
    propagates, and the other rows of such a call are computed as without int8 activations."""
    rng = np.random.default_rng(K * 31 + N + M + G)
    packed = make_weight(fmt, K, N, G, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    quantised = quantises_activations(fmt, M, kernel, G)
    for sparsity, split, mask in [(0.0, "n", True), (0.5, "k", True), (0.9, "", True), (0.5, "n", M > DECODE_ROWS)]:
        x, tau = make_x(M, K, 0.2, sparsity, rng)
        with ks.tuning(par_bytes=0, split=split):
            y = ks.matmul(x, packed, bias, 0.2, tau, mask, 2, kernel, int8_activations=True)
        plain, scale = reference(x, packed, bias, 0.2, tau, mask, kernel)
        what = f"{kernel} M={M} s={sparsity} split={split} mask={mask}"
        if not quantised:
            check(y, plain, scale, what)
            continue
        z = (x - np.float32(0.2)).astype(np.float32)
        z = np.where(np.abs(z) <= tau, np.float32(0), z) if mask else z
        z = int8_live(z, G) if M <= DECODE_ROWS else int8_groups(z)
        ref = z.astype(np.float64) @ ks.dequantize(packed).astype(np.float64) + bias
        check(y, ref, scale, what)
        if K >= 64:  # the quantisation is real: the product without it falls outside check's tolerance
            assert np.any(np.abs(y - plain) > 1e-4 * scale + 1e-6), "int8_activations changed nothing"
    x, tau = make_x(M, K, 0.0, 0.5, rng)
    x[M - 1, K // 2] = np.nan
    y = ks.matmul(x, packed, None, 0.0, tau, True, 2, kernel, int8_activations=True)
    assert np.isnan(y[M - 1]).all()
    ref, scale = reference(x[:M - 1], packed, None, 0.0, tau, True, kernel, M)
    check(y[:M - 1], ref, scale, "the other rows of a call with a NaN")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [2, 5, DECODE_ROWS])
def test_tokens_of_one_call_are_computed_as_alone(kernel, fmt, M):
    """Several tokens in one decode call, as continuous batching sends them: dense rows (a prompt under
    PagedAttention's layout), where a call reads each weight row once for all its tokens, and pruned ones, where
    each token keeps its own live rows. Each token gets numpy's product and what it gets alone; a NaN in one
    token reaches only that token's outputs."""
    rng = np.random.default_rng(M * 7 + len(fmt))
    K, N = 322, 2100  # rows past a group of four, columns past a vector and a stored tile
    packed = make_weight(fmt, K, N, 46 if fmt.startswith("u4") else 0, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    for mask, sparsity in ((False, 0.5), (True, 0.0), (True, 0.5)):
        x, tau = make_x(M, K, 0.2, sparsity, rng)
        x[1, 7] = np.nan
        y = ks.matmul(x, packed, bias, 0.2, tau, mask, 2, kernel)
        assert np.isnan(y[1]).all() and np.isfinite(np.delete(y, 1, axis=0)).all()
        keep = np.arange(M) != 1
        ref, scale = reference(x[keep], packed, bias, 0.2, tau, mask, kernel, M)
        check(y[keep], ref, scale, f"{kernel} {fmt} M={M} mask={mask} s={sparsity}")
        alone = np.concatenate([ks.matmul(x[i:i + 1], packed, bias, 0.2, tau, True, 2, kernel) if mask else
                                ks.matmul(x[i:i + 1], packed, bias, 0.2, tau, False, 2, kernel) for i in range(M)])
        check(y[keep], alone[keep], scale, f"{kernel} {fmt} M={M} mask={mask}: as alone")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", ["u4", "u4c"])
@pytest.mark.parametrize("N", [100, 2048, 2049, 4101])
@pytest.mark.parametrize("live", [(1, 0), (2, 31), (32, 33), (64, 65), (128, 3), (0, 128)])
def test_u4_groups_of_every_length(kernel, fmt, N, live):
    """u4 decode with an exact number of live rows in each of two groups: one row, an odd count, a group whose rows
    fit one pass in registers (32) or just miss it (33, 65), a dense group, an empty one; row slices short (up to
    2048 columns) or long, N past a 128-column block and odd. Each against numpy and the scalar kernel."""
    rng = np.random.default_rng(N + 7 * live[0] + live[1])
    K, G = 256, 128
    packed = make_weight(fmt, K, N, G, rng)
    x, tau = make_x(1, K, 0.4, 1.0, rng)  # every channel pruned, then the chosen ones made live
    for g, count in enumerate(live):
        on = g * G + rng.choice(G, count, replace=False)
        x[0, on] = 0.4 + rng.uniform(0.6, 2.0, count) * rng.choice([-1.0, 1.0], count)
    y = ks.matmul(x, packed, None, 0.4, tau, True, 1, kernel)
    ref, scale = reference(x, packed, None, 0.4, tau, True, kernel)
    check(y, ref, scale, f"{kernel} live={live}")
    if not multiplies_in_bf16(fmt, 1, kernel):
        check(y, ks.matmul(x, packed, None, 0.4, tau, True, 1, "scalar"), scale, f"{kernel} live={live} vs scalar")


def test_errors_are_reported():
    packed = make_weight("u4", 64, 8, 32, np.random.default_rng(0))
    packed.group_size = 48  # does not divide K
    with pytest.raises(ks.KernelError, match="group_size"):
        ks.matmul(np.zeros((1, 64), np.float32), packed)
    with pytest.raises(ks.KernelError, match="unknown kernel"):
        ks.matmul(np.zeros((1, 8), np.float32), ks.pack_f32(np.ones((8, 4))), kernel="nope")
    assert ks.best_kernel() in KERNELS and KERNELS[0] == "scalar"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("split", ["n", "k", ""])
@pytest.mark.parametrize("prefetch", ["l1", "l2"])
@pytest.mark.parametrize("threads", [2, 5])
def test_large_tiled_and_threaded_paths(kernel, fmt, split, prefetch, threads):
    """Shapes spanning several column tiles, K blocks and N blocks, with threading forced on. Five threads
    take split-K's parallel reduce (two: the last task sums the partials)."""
    rng = np.random.default_rng(4)
    K, N = (512, 2305) if fmt.startswith("u4") else (520, 2305)
    packed = make_weight(fmt, K, N, 128, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    for M, sparsity in [(1, 0.0), (1, 0.9), (3, 0.5), (37, 0.5)]:
        x, tau = make_x(M, K, 0.1, sparsity, rng)
        with ks.tuning(par_bytes=0, split=split, prefetch=prefetch):
            y = ks.matmul(x, packed, bias, 0.1, tau, True, threads, kernel)
        ref, scale = reference(x, packed, bias, 0.1, tau, True, kernel)
        check(y, ref, scale, f"{kernel} {fmt} split={split} prefetch={prefetch} t={threads} M={M} s={sparsity}")


def test_tuning_reaches_decode():
    """The knobs are live: split-K sums the same products in another order than split-N (bitwise
    different f32 results), and the old values come back after the block."""
    rng = np.random.default_rng(5)
    packed = make_weight("f32", 4096, 64, 0, rng)
    x, tau = make_x(1, 4096, 0.0, 0.0, rng)
    before = ks.get_tuning()
    with ks.tuning(par_bytes=0, split="n"):
        y_n = ks.matmul(x, packed, None, 0.0, tau, True, 2)
    with ks.tuning(par_bytes=0, split="k"):
        y_k = ks.matmul(x, packed, None, 0.0, tau, True, 2)
    assert np.allclose(y_n, y_k, rtol=1e-4, atol=1e-4) and not np.array_equal(y_n, y_k)
    assert ks.get_tuning() == before
    with pytest.raises(ks.KernelError, match="split must be"):
        ks.set_tuning(split="x")
    assert ks.get_tuning() == before


def bf16_bits(a) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounded to nearest even the way torch rounds."""
    return (torch_bf16(a).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 3, 37])
@pytest.mark.parametrize("K", [256, 131])
def test_bf16_activations_in_and_out(kernel, fmt, M, K):
    """bf16 x and y (OpenVINO's bf16 graphs): the product of the widened x, rounded to nearest even; a
    prefill multiplies in bf16 then, whatever the weight format. N spans several prefill N blocks and two
    threads, so every unit's rounding pass is covered."""
    rng = np.random.default_rng(6)
    N = 2100  # odd K: the last bf16 pair of a prefill has one row
    packed = make_weight(fmt, K, N, 64 if K % 64 == 0 else K, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    x, tau = make_x(M, K, 0.2, 0.5, rng)
    x[M - 1, 7] = np.nan
    xb = bf16_bits(x)
    xw = (xb.astype(np.uint32) << 16).view(np.float32)
    y = ks.matmul(xb, packed, bias, 0.2, tau, True, 2, kernel)
    assert y.dtype == np.uint16 and y.shape == (M, N)
    if M <= DECODE_ROWS or fmt == "bf16" or not multiplies_in_bf16(fmt, M, kernel, True):  # the f32 call computes the same
        yf = ks.matmul(xw, packed, bias, 0.2, tau, True, 2, kernel)
        np.testing.assert_array_equal(y[:M - 1], bf16_bits(yf[:M - 1]))
    widened = (y.astype(np.uint32) << 16).view(np.float32)
    assert np.isnan(widened[M - 1]).all(), "a NaN input must stay NaN through the bf16 rounding"
    ref, scale = reference(xw[:M - 1], packed, bias, 0.2, tau, True, kernel, M, bf16_io=True)
    # rounding to bf16 moves a value by at most half an ulp, 2^-8 of its magnitude
    check(widened[:M - 1], ref, scale + np.abs(ref) * 2.0 ** -8 / 1e-4, "against numpy")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tile_cols", [128, ks.LEGACY_TILE_COLS, 8192])
def test_tile_widths(kernel, fmt, tile_cols):
    """Any stored tile width (a power of two from 128 to 8192; exports use TILE_COLS, older ones 2048) with N
    spanning several tiles, decode split both ways and prefill; a width the core cannot read is refused."""
    rng = np.random.default_rng(7)
    K, N = 128, 8300
    packed = make_weight(fmt, K, N, 64, rng, tile_cols)
    assert packed.tile_cols == tile_cols
    bias = rng.standard_normal(N).astype(np.float32)
    for M, split in [(1, "n"), (1, "k"), (3, ""), (9, "")]:
        x, tau = make_x(M, K, 0.1, 0.5, rng)
        with ks.tuning(par_bytes=0, split=split):
            y = ks.matmul(x, packed, bias, 0.1, tau, True, 2, kernel)
        ref, scale = reference(x, packed, bias, 0.1, tau, True, kernel)
        check(y, ref, scale, f"{kernel} {fmt} tile_cols={tile_cols} M={M} split={split}")
    for bad in (100, 384, 16384):
        packed.tile_cols = bad
        with pytest.raises(ks.KernelError, match="tile_cols"):
            ks.matmul(x, packed, bias, 0.1, tau, True, 2, kernel)


def _anon_huge_kb(lo: int, hi: int) -> int:
    """AnonHugePages (kB) of this process's mappings that overlap [lo, hi)."""
    total, overlaps = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(v, 16) for v in head.split("-"))
                overlaps = a < hi and lo < b
            elif head == "AnonHugePages:" and overlaps:
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_to_huge_pages_keeps_address_and_bytes(tmp_path):
    """What each op does to its weights on its first call, here to a file mapping as ONNX Runtime makes of
    external data: the same bytes at the same address, still writable (the memory may go back to an
    allocator), and on 2 MB pages where the kernel grants them."""
    data = np.random.default_rng(0).integers(0, 256, 9 << 20, dtype=np.uint8)  # holds >= 3 aligned 2 MB pages
    data.tofile(tmp_path / "w.bin")
    a = np.memmap(tmp_path / "w.bin", np.uint8, mode="c")
    address = a.ctypes.data
    lo, hi = -(-address // (2 << 20)) * (2 << 20), (address + a.nbytes) // (2 << 20) * (2 << 20)
    ks.to_huge_pages(a)
    assert a.ctypes.data == address and np.array_equal(a, data)
    a[::4096] ^= 1
    assert np.array_equal(a[::4096], data[::4096] ^ 1)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert _anon_huge_kb(lo, hi) >= (hi - lo) // 1024
