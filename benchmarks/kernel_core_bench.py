"""The C++ kernel core alone at decode (M=1), called through its C API: ms, GB/s and speed-up over s=0. Prints JSON.

For each shape, weight format, thread count and sparsity 0/0.5/0.9, the median time of one call, cycling through
weight copies (at least 256 MB) and 16 inputs with different live sets, so that the rows read come from DRAM, as in
a real model. Bytes read = live rows x row bytes (+ scale/zero-point bytes of the groups touched, for u8/u4; u4
params are compact, 3 bytes a group and column, as exports store them).

--live sets where the live rows lie: ``random`` (the default: |x| above its quantile, as in a model), ``block``
(the first (1-s)·K rows, one contiguous stream) or ``stride`` (every 1/(1-s)-th row, as evenly spread as rows
can be). Side by side they show what scattering the same bytes costs, which matters for short rows.

    ACTSPARSE_EXT_DIR=<build dir> python benchmarks/kernel_core_bench.py [--kernel avx2] [--quick]
        [--int8-activations] [--live random|block|stride] [--threads 1 2] [--shapes 4096x11008 ...]
        [--formats f32 u8 ...] [--output FILE]
"""
from __future__ import annotations

import sys
import time

import numpy as np

from actsparse.runtime_ext import kernels as ks
from actsparse.runtime_ext.kernels import PackedWeight

from _harness import add_kernel_args, emit, parse_kernel_args, parser, time_ms

FORMATS = ["f32", "bf16", "f16", "u8", "u4"]
SPARSITIES = [0.0, 0.5, 0.9]
G = 128


def make(fmt, K, N, rng):
    if fmt in ("f32", "f16", "bf16"):
        return {"f32": ks.pack_f32, "f16": ks.pack_f16, "bf16": ks.pack_bf16}[fmt](rng.standard_normal((K, N), np.float32))
    if fmt == "u8":
        return ks.pack_u8(rng.integers(0, 256, (K, N), np.uint8), np.full(N, 0.01), np.full(N, 128.0))
    # compact params (f16 scales, u8 zero points), as exports store NNCF's int4
    return ks.pack_u4(rng.integers(0, 16, (K, N), np.uint8), np.full((K // G, N), np.float16(0.1)),
                      np.full((K // G, N), 8.0), G, compact=True)


def bytes_read(packed, live):
    b = int(live.sum()) * packed.row_bytes
    if packed.format == "u8":
        b += 8 * packed.N
    elif packed.format == "u4":
        groups = np.unique(np.nonzero(live)[0] // packed.group_size).size
        b += (3 if packed.compact else 8) * packed.N * groups
    return b


def main():
    p = parser(__doc__)
    add_kernel_args(p, FORMATS, rounds=False)
    p.add_argument("--kernel", default=None, help="a kernel of the core's (default: the best this CPU runs)")
    p.add_argument("--int8-activations", action="store_true", help="u8/u4 decode on int8 activations")
    p.add_argument("--live", choices=("random", "block", "stride"), default="random",
                   help="where the live rows lie (default: random, as in a model)")
    args = parse_kernel_args(p)
    args.kernel = args.kernel or ks.best_kernel()
    rng = np.random.default_rng(0)
    rows = []
    t_start = time.perf_counter()
    for K, N in args.shapes:
        for fmt in args.formats:
            packed = make(fmt, K, N, rng)
            dense_bytes = K * packed.row_bytes
            # Cycle through weight copies (>= 256 MB) and 16 inputs with different live sets, so the rows
            # read come from DRAM rather than the last-level cache, as in a real model.
            copies = [packed] + [PackedWeight(**{**packed.__dict__, "data": packed.data.copy()})
                                 for _ in range(-(-256_000_000 // dense_bytes) - 1)]
            reps = 20 if args.quick else max(20, min(200, int(2e9 / dense_bytes)))
            for threads in args.threads:
                base = None
                for s in SPARSITIES:
                    xs = rng.standard_normal((16, 1, K)).astype(np.float32)
                    tau = float(np.quantile(np.abs(xs), s)) if s > 0 else -1.0  # tau < 0 keeps every channel
                    if s > 0 and args.live != "random":  # the same live rows for every input; the others 0
                        keep = (np.arange(K) < round((1 - s) * K) if args.live == "block"
                                else np.arange(K) % round(1 / (1 - s)) == 0)
                        xs[..., ~keep], tau = 0.0, 0.0
                    live = ~(np.abs(xs[0, 0]) <= tau)

                    def call(i):
                        ks.matmul(xs[i % 16], copies[i % len(copies)], None, 0.0, tau, True, threads, args.kernel,
                                  int8_activations=args.int8_activations)
                    ms = time_ms([call], rounds=1, per_round=reps)[0]
                    base = ms if s == 0 else base
                    gbps = bytes_read(packed, live) / ms / 1e6
                    rows.append(dict(K=K, N=N, format=fmt, threads=threads, sparsity=s, live=int(live.sum()),
                                     ms=round(ms, 4), gbps=round(gbps, 2), speedup=round(base / ms, 2)))
                    print(f"{K}x{N} {fmt:3s} t={threads} s={s:.1f} {ms:8.3f} ms {gbps:6.2f} GB/s x{base / ms:5.2f}",
                          file=sys.stderr)
    emit({"M": 1, "seconds": round(time.perf_counter() - t_start, 1), "results": rows}, args)


if __name__ == "__main__":
    main()
