"""The GPU plugin's ActSparseMatMul kernel (runtime_ext/gpu) on every OpenCL device pyopencl finds: one decode
step (one row) per weight format and shape, at sparsity 0, 0.5 and 0.9, built with the macros the plugin would
define for the node. Reports the kernel's device time (OpenCL profiling, median of alternating rounds), the
effective GB/s (weight bytes of the live rows / time) and each sparsity's speed-up over s = 0 in the same run.

    python benchmarks/gpu_kernel_bench.py --output benchmarks/results/gpu_kernel.json
"""
from __future__ import annotations

import os
import sys

import numpy as np

import _harness
from actsparse.runtime_ext import gpu
from actsparse.runtime_ext import kernels as ks

FORMATS = ["f32", "f16", "bf16", "u8", "u4"]
SPARSITIES = [0.0, 0.5, 0.9]


def packed_weight(fmt: str, K: int, N: int, rng) -> ks.PackedWeight:
    """Random weights as an export packs them (u4: NNCF's group 128 with compact params)."""
    if fmt in ("f32", "f16", "bf16"):
        return getattr(ks, f"pack_{fmt}")(rng.standard_normal((K, N), np.float32))
    if fmt == "u8":
        return ks.pack_u8(rng.integers(0, 256, (K, N)), rng.uniform(0.001, 0.01, N), np.full(N, 128, np.float32))
    groups = K // 128
    return ks.pack_u4(rng.integers(0, 16, (K, N)), np.full((groups, N), np.float16(0.01), np.float32),
                      np.full((groups, N), 8, np.float32), 128, compact=True)


def bench(runner, fmt: str, K: int, N: int, rounds: int, rng) -> dict:
    packed = packed_weight(fmt, K, N, rng)
    x = rng.standard_normal((1, 1, K)).astype(np.float32)
    calls, live = [], []
    for s in SPARSITIES:  # |x| <= tau prunes the s-quantile of the channels (mode 0)
        tau = float(gpu.attribute_text(float(np.quantile(np.abs(x), s)) if s else 0.0))  # as the kernel gets it
        live.append(float(np.mean(~(np.abs(x) <= np.float32(tau)))))
        attrs, weight, params = gpu.node(packed, None, 0.0, tau, "dense")
        calls.append(runner.prepare(attrs, [x, weight, params], (1, 1, N), np.float32))
    for call in calls:
        call()
    seconds = [[] for _ in calls]
    for _ in range(rounds):
        for call, samples in zip(calls, seconds):
            samples.append(call()[1])
    ms = [1e3 * float(np.median(t)) for t in seconds]
    weight_bytes = packed.data.nbytes
    return {"device": runner.device.name, "shape": f"{K}x{N}", "format": fmt, "rows": 1, "weight_bytes": weight_bytes,
            "sparse": [{"sparsity": s, "live_fraction": f, "ms": t, "gbps": f * weight_bytes / t / 1e6,
                        "speedup_vs_s0": ms[0] / t} for s, f, t in zip(SPARSITIES, live, ms)]}


def cl_type(device) -> str:
    import pyopencl as cl

    return cl.device_type.to_string(device.type)


def main() -> None:
    p = _harness.parser(__doc__)
    p.add_argument("--shapes", nargs="+", type=_harness.shape, default=[(2048, 5632), (4096, 11008)], metavar="KxN")
    p.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    p.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (median)")
    args = p.parse_args()
    try:
        usable, problems = gpu.devices()
    except ImportError:
        sys.exit("gpu_kernel_bench: pyopencl is not installed (pip install actsparse[test])")
    if not usable:
        sys.exit("gpu_kernel_bench: no OpenCL device builds kernels here: " + "; ".join(problems or ["none found"]))
    rng = np.random.default_rng(0)
    results, devices, load = [], [], [os.getloadavg()[0]]
    for device in usable:
        runner = gpu.Runner(device)
        devices.append({"name": device.name, "version": device.version, "driver": device.driver_version,
                        "platform": device.platform.version.strip(), "type": cl_type(device),
                        "compute_units": device.max_compute_units})
        for K, N in args.shapes:
            for fmt in args.formats:
                results.append(bench(runner, fmt, K, N, args.rounds, rng))
                print(f"{device.name} {K}x{N} {fmt}: " + ", ".join(
                    f"s={s['sparsity']} {s['ms']:.2f} ms {s['gbps']:.1f} GB/s" for s in results[-1]["sparse"]),
                    file=sys.stderr)
    load.append(os.getloadavg()[0])
    _harness.emit({"benchmark": "gpu_kernel", "devices": devices, "unusable_devices": problems,
                   "load_average_start_end": load,  # a CPU device shares the cores with whatever else runs
                   "note": "OpenCL devices only (a CPU device's figures are not a GPU's); no Intel GPU has run "
                           "these kernels yet", "results": results}, args)


if __name__ == "__main__":
    main()
