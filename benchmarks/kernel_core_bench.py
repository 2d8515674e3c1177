"""Self-check benchmark of the C++ kernel core at decode (M=1). Prints JSON.

Bytes read = live rows x row bytes (+ scale/zero-point bytes of the groups touched, for u8/u4; u4 params are
compact, 3 bytes a group and column, as exports store them).
Usage: ACTSPARSE_EXT_DIR=<build dir> python benchmarks/kernel_core_bench.py [--kernel avx2] [--quick]
       [--int8-activations] [--threads 1,2] [--shapes 4096x11008,...] [--formats f32,u8,...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from actsparse.runtime_ext import kernels as ks
from actsparse.runtime_ext.kernels import PackedWeight

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096), (2048, 5632)]
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


def timeit(fn, reps):
    for _ in range(3):
        fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return float(np.median(t))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x11008,4096x4096")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--int8-activations", action="store_true", help="u8/u4 decode on int8 activations")
    ap.add_argument("--threads", default="1,2", help="e.g. 1,4,8,16")
    args = ap.parse_args()
    kernel = args.kernel or ks.best_kernel()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rng = np.random.default_rng(0)
    rows = []
    t_start = time.perf_counter()
    for K, N in shapes:
        for fmt in args.formats.split(","):
            packed = make(fmt, K, N, rng)
            dense_bytes = K * packed.row_bytes
            # Cycle through weight copies (>= 256 MB) and 16 inputs with different live sets, so the rows
            # read come from DRAM rather than the last-level cache (32 MB here), as in a real model.
            copies = [packed] + [PackedWeight(**{**packed.__dict__, "data": packed.data.copy()})
                                 for _ in range(-(-256_000_000 // dense_bytes) - 1)]
            reps = 20 if args.quick else max(20, min(200, int(2e9 / dense_bytes)))
            for threads in map(int, args.threads.split(",")):
                base = None
                for s in SPARSITIES:
                    xs = rng.standard_normal((16, 1, K)).astype(np.float32)
                    tau = float(np.quantile(np.abs(xs), s)) if s > 0 else -1.0  # tau < 0 keeps every channel
                    live = ~(np.abs(xs[0, 0]) <= tau)
                    it = iter(range(1 << 30))

                    def call():
                        i = next(it)
                        ks.matmul(xs[i % 16], copies[i % len(copies)], None, 0.0, tau, True, threads, kernel,
                                  int8_activations=args.int8_activations)
                    t = timeit(call, reps)
                    base = t if s == 0 else base
                    nbytes = bytes_read(packed, live)
                    rows.append(dict(K=K, N=N, format=fmt, threads=threads, sparsity=s,
                                     live=int(live.sum()), ms=round(t * 1e3, 4),
                                     gbps=round(nbytes / t / 1e9, 2), speedup=round(base / t, 2)))
                    print(f"{K}x{N} {fmt:3s} t={threads} s={s:.1f} {t*1e3:8.3f} ms "
                          f"{nbytes / t / 1e9:6.2f} GB/s x{base / t:5.2f}", file=sys.stderr)
    print(json.dumps(dict(kernel=kernel, tuning=ks.get_tuning(), M=1, int8_activations=args.int8_activations, seconds=round(time.perf_counter() - t_start, 1), results=rows),
                     indent=1))


if __name__ == "__main__":
    main()
