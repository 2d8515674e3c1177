"""The C++ core's decode under the rules' settings (no tuning file, no environment) against the settings it loaded
here (the tuning file `actsparse tune` wrote, or ACTSPARSE_* variables), in one process, alternating. Prints JSON.

For each shape, weight format, thread count, row count and sparsity: the median ms of one call under each setting,
each call reading the next of the layers that fill --min-mb (weights from DRAM, as in a model's decode step), and
tuned ÷ rules. Rows > 1 are tokens with independent live rows.

    ACTSPARSE_EXT_DIR=<build dir> python benchmarks/tuning_bench.py [--quick] [--rows 1 4] [--threads 1 2] [--output FILE]
"""
from __future__ import annotations

import sys

import numpy as np

from actsparse.runtime_ext import kernels as ks
from actsparse.runtime_ext import tuning

from _harness import Ints, add_kernel_args, emit, parse_kernel_args, parser

SPARSITIES = [0.0, 0.5, 0.9]


def main() -> None:
    p = parser(__doc__)
    add_kernel_args(p, list(tuning.FORMATS))
    p.add_argument("--rows", nargs="+", action=Ints, default=[1, 4], help="tokens per call")
    args = parse_kernel_args(p)
    report = ks.tuning_report()["knobs"]
    settings = {"rules": {k: v["fallback"] for k, v in report.items()}, "tuned": {k: v["value"] for k, v in report.items()}}
    rng = np.random.default_rng(0)
    results = []
    for fmt in args.formats:
        pool = tuning.weight_pool(fmt, max(1, int(args.min_mb * 1e6)), rng)
        for K, N in args.shapes:
            layers = tuning.layers_in(fmt, K, N, pool)
            for threads in args.threads:
                for rows in args.rows:
                    for s in SPARSITIES:
                        live = [rng.permutation(K)[:round((1 - s) * K)] for _ in range(rows)]
                        call = tuning.cycling_call(layers, [tuning.tokens(rows, K, live, rng)], threads)
                        trials = [tuning.Trial(name, setting, s, fmt, call) for name, setting in settings.items()]
                        rules, tuned = tuning.interleaved(args.rounds, 5 if args.quick else 10)(trials)
                        results.append({"format": fmt, "K": K, "N": N, "threads": threads, "rows": rows, "sparsity": s,
                                        "layers": len(layers), "rules_ms": 1e3 * rules, "tuned_ms": 1e3 * tuned,
                                        "tuned_vs_rules": rules / tuned})
                        print(f"{K}x{N} {fmt} t{threads} M{rows} s{s}: rules {1e3 * rules:.3f} ms, tuned "
                              f"{1e3 * tuned:.3f} ms ({rules / tuned:.2f}x)", file=sys.stderr)
    emit({"settings_compared": settings, "results": results}, args)


if __name__ == "__main__":
    main()
