"""ActSparseMatMul against OpenVINO's own FullyConnected on the same weights, in one process. Prints JSON.

For each shape (K x N), weight format and thread count: one decode step (x is [1, 1, K]) of
- the dense MatMul, weights compressed as the export compresses them (fp16 constant, NNCF
  int8 asym per channel, NNCF int4 asym group 128), compiled by the CPU plugin, and
- the fused ActSparseMatMul at sparsity 0/0.3/0.5/0.7/0.9 (threshold = that quantile of |x|).
Each model holds L such layers side by side on the same x, each with its own weights, L chosen so that a
call reads at least --min-mb of weights (by default three times this CPU's last-level cache): every layer's
weights then come from DRAM, as in a real model's decode step, and the one Python call per step is spread
over L layers, as one call per token is over a model's. Times are per layer (call / L); they include
OpenVINO's per-node costs, which a model pays too. --min-mb 0 gives one layer per model (small shapes then
stay in the cache and the call's overhead weighs).
fp32 is compiled with INFERENCE_PRECISION_HINT f32, so both sides read f32 weights; bf16 is the fp32
model under the plugin's default precision (bf16 on CPUs with AVX512-BF16 or AMX, which rounds the
weights to bf16 at compile time) against our op with bf16 weights (export --weight-format bf16);
the other formats use the default precision too. Each row records the precision the plugin ran. The
fused models are prepared as actsparse.load and actsparse bench prepare them (actsparse.backends.openvino.prepare:
bf16 Converts around the ops where the plugin runs bf16); their u8/u4 decode multiplies f32 activations, where
the plugin's default dynamic quantisation gives its own int8/int4 FullyConnected int8 ones.
Reports median ms over many calls (models timed in interleaved rounds), the ratio against both baselines: the
plugin's FullyConnected (speedup_vs_dense; at s=0 our op's own speed) and our op at s=0 (speedup_vs_own_s0: the
skipped bytes alone), the bandwidth limit 1/(1-s), the effective GB/s of weight bytes read, and the plugin's FullyConnected precision.

    python benchmarks/kernel_bench.py [--quick] [--shapes KxN ...] [--threads 1 2] [--formats fp32 bf16 fp16 int8 int4]
                                      [--min-mb MB] [--rounds R] [--output FILE]
"""
from __future__ import annotations

import sys

import numpy as np

from actsparse.backends.openvino import prepare
from actsparse.backends.openvino.probe import dense_model, fc_precision, fused_model

from _harness import (SPARSITIES, add_kernel_args, decode_inputs, emit, layers_for, openvino_core, parse_kernel_args,
                      parser, time_ms)

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


def main() -> None:
    p = parser(__doc__)
    add_kernel_args(p, list(BYTES))
    args = parse_kernel_args(p)
    rng = np.random.default_rng(0)
    core = openvino_core()
    rows = []
    for k, n in args.shapes:
        xs = decode_inputs(rng, k)
        for fmt in args.formats:
            layers = layers_for(args.min_mb, k * n * BYTES[fmt])
            dense = dense_model([(k, n)] * layers, fmt, rng)
            fused = {s: fused_model(dense, {k: float(np.quantile(np.abs(np.concatenate(xs)), s))}, core, fmt)
                     for s in SPARSITIES}
            for threads in args.threads:
                config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
                if fmt == "fp32":
                    config["INFERENCE_PRECISION_HINT"] = "f32"
                compiled = core.compile_model(dense, "CPU", config)
                for m in fused.values():
                    prepare(core, m, "CPU", config)  # once per model: its ops take bf16 afterwards
                sparse = [core.compile_model(m, "CPU", config) for m in fused.values()]
                # same weights: at s=0 ours computes the dense product (bf16 rounding aside)
                yd, y0 = (list(c.create_infer_request().infer({0: xs[0]}).values()) for c in (compiled, sparse[0]))
                agree = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(yd, y0))
                if agree > 0.05:
                    sys.exit(f"{k}x{n} {fmt}: the fused op at s=0 differs from the dense model by {agree:.3g} (relative)")
                requests = [c.create_infer_request() for c in [compiled] + sparse]
                # warm=3: every compiled model has its own TBB arena, and OpenVINO's worker threads take a few
                # calls to move to the arena that now needs them (without them a 2-thread op runs slower)
                calls = [lambda i, r=r: r.infer({0: xs[i % len(xs)]}) for r in requests]
                dense_ms, *sparse_ms = (t / layers for t in time_ms(calls, args.rounds, warm=3))
                row = {"K": k, "N": n, "format": fmt, "threads": threads, "layers": layers, "dense_ms": dense_ms,
                       "max_rel_diff_at_s0": agree,
                       "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
                       "dense_fc_precision": fc_precision(compiled),
                       "dense_gbps": k * n * BYTES[fmt] / dense_ms / 1e6, "sparse": []}
                for s, ms in zip(fused, sparse_ms):
                    row["sparse"].append({"sparsity": s, "ms": ms, "speedup_vs_dense": dense_ms / ms,
                                          "limit": 1 / (1 - s), "gbps": k * n * (1 - s) * BYTES[fmt] / ms / 1e6})
                s0 = row["sparse"][0]["ms"]
                for entry in row["sparse"]:
                    entry["speedup_vs_own_s0"] = s0 / entry["ms"]
                rows.append(row)
                print(f"{k}x{n} {fmt} t{threads} x{layers}: dense {dense_ms:.2f} ms ({row['dense_fc_precision']}) | " +
                      " ".join(f"s{e['sparsity']}: {e['ms']:.2f} ({e['speedup_vs_dense']:.2f}x dense, "
                               f"{e['speedup_vs_own_s0']:.2f}x s0)" for e in row["sparse"]), file=sys.stderr)
    emit({"device": "CPU", "results": rows}, args)


if __name__ == "__main__":
    main()
