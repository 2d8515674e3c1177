"""The fixed cost of one ActSparseMatMul call inside OpenVINO, against the plugin's own FullyConnected. Prints JSON.

Each model is a chain of L layers on x [1, 1, K] (the input declared [?, ?, K], as exports declare it):
x <- x + mean(layer(x)), so every layer is one call on the output of the one before. The layer is
- ``fc``: the plugin's FullyConnected (a MatMul against constant weights, compressed as the export compresses
  them; benchmarks/kernel_bench.py describes the formats; int4 in groups of 64 where 128 does not divide K),
- ``ours``: our op on the same weights at threshold +inf, so every channel is pruned and the op reads no weight
  row: what remains is the cost of calling it,
- ``fc_tiny`` and ``ours_tiny``: the same with K x 16 weights, a call with (nearly) no work: the plugin's own
  fixed cost per FullyConnected, and ours,
- ``none``: no layer, only the chain's Add and mean (subtracted from the others to give the layer's own cost).
Times are medians of interleaved rounds, per layer (call / L): ``raw_us`` with the chain, ``us`` without it
(raw minus none). On the net times, ``ours_over_fc`` is ours ÷ fc and ``ours_over_fc_tiny`` ours ÷ fc_tiny: our
op's fixed cost against the plugin's on the same shape and against its fixed cost (issue 23's target: at most 1.5).

With ``--ext-dirs NAME=DIR ...`` the same measurement runs in child processes, one per library folder
(ACTSPARSE_EXT_DIR), alternating between the folders for ``--repeats`` rounds: two builds of the op side by side.
Each figure is then the median over that build's children, under ``builds[NAME]``.

    python benchmarks/op_call_cost.py [--shapes 576x3072 1536x576 2048x5632] [--formats bf16 int8 int4]
                                      [--layers 30] [--max-mb 600] [--threads 1] [--rounds 12]
                                      [--ext-dirs NAME=DIR ... [--repeats 3]] [--output FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from actsparse.backends.openvino import prepare
from actsparse.backends.openvino.probe import dense_model, fc_precision, fused_model

from _harness import add_threads, decode_inputs, emit, openvino_core, parser, shape, time_ms

DEFAULT_SHAPES = [(576, 3072), (1536, 576), (2048, 5632)]  # SmolLM2-135M gate+up and down, TinyLlama's MLP
FORMATS = ["fp32", "bf16", "fp16", "int8", "int4"]
VARIANTS = ["none", "fc", "ours", "fc_tiny", "ours_tiny"]
TINY_N = 16


def chain(model):
    """The side-by-side layers of ``probe.dense_model`` (or ``fused_model``) rewired into a chain: layer i reads x_i,
    and x_{i+1} = x_i + mean(layer_i(x_i)). Returns the model whose output is x_L."""
    (param,) = model.get_parameters()
    x = param.output(0)
    for result in model.get_results():
        y = result.input_value(0)
        first = y.get_node()  # the layer's first node, the one that reads the parameter (its Multiply)
        while first.input_value(0).get_node().get_friendly_name() != param.get_friendly_name():
            first = first.input_value(0).get_node()
        first.input(0).replace_source_output(x)
        x = ops.add(x, ops.reduce_mean(y, np.int64(-1), keep_dims=True)).output(0)
    return ov.Model([x], [param])


def empty_chain(k: int, layers: int):
    param = ops.parameter([-1, -1, k], np.float32, name=f"x{k}")
    x = param.output(0)
    for _ in range(layers):
        x = ops.add(x, ops.reduce_mean(ops.multiply(x, np.float32(1.0)), np.int64(-1), keep_dims=True)).output(0)
    return ov.Model([x], [param])


def measure(args) -> list[dict]:
    rng = np.random.default_rng(0)
    core = openvino_core()
    rows = []
    for k, n in args.shapes:
        xs = decode_inputs(rng, k)
        layers = max(1, min(args.layers, int(args.max_mb * 1e6 // (4 * k * n))))
        for fmt in args.formats:
            group = 128 if k % 128 == 0 else 64  # int4: SmolLM2's K=576 has no groups of 128
            dense, tiny = (dense_model([(k, width)] * layers, fmt, rng, group) for width in (n, TINY_N))
            ours, ours_tiny = (chain(fused_model(m, {k: float("inf")}, core, fmt)) for m in (dense, tiny))
            models = {"none": empty_chain(k, layers), "fc": chain(dense), "ours": ours, "fc_tiny": chain(tiny),
                      "ours_tiny": ours_tiny}
            for threads in args.threads:
                config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                          **({"INFERENCE_PRECISION_HINT": "f32"} if fmt == "fp32" else {})}
                for name in ("ours", "ours_tiny"):
                    prepare(core, models[name], "CPU", config)
                compiled = {name: core.compile_model(m, "CPU", config) for name, m in models.items()}
                requests = [compiled[name].create_infer_request() for name in VARIANTS]
                # every channel pruned: each layer adds only its bias-free mean 0, so x passes through unchanged
                y = requests[2].infer({0: xs[0]})[0]
                if not np.allclose(y, xs[0], rtol=1e-2, atol=1e-2):
                    sys.exit(f"{k}x{n} {fmt}: the op at threshold +inf changed x "
                             f"(max diff {np.abs(y - xs[0]).max():.3g})")
                calls = [lambda i, r=r: r.infer({0: xs[i % len(xs)]}) for r in requests]
                raw = dict(zip(VARIANTS, (1e3 * ms / layers for ms in time_ms(calls, args.rounds, warm=3))))
                rows.append({"K": k, "N": n, "format": fmt, "threads": threads, "layers": layers,
                             "fc_precision": fc_precision(compiled["fc"]), "raw_us": raw,
                             "us": {name: raw[name] - raw["none"] for name in VARIANTS[1:]}})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    for row in rows:
        row["ours_over_fc"] = row["us"]["ours"] / row["us"]["fc"]
        row["ours_over_fc_tiny"] = row["us"]["ours"] / row["us"]["fc_tiny"]
    return rows


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """Per row, the median of each time over runs (children) of one build."""
    out = []
    for rows in zip(*runs):
        row = {key: value for key, value in rows[0].items() if key not in ("raw_us", "us")}
        for key in ("raw_us", "us"):
            row[key] = {name: float(np.median([r[key][name] for r in rows])) for name in rows[0][key]}
        out.append(row)
    return summarise(out)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--shapes", nargs="+", type=shape, default=DEFAULT_SHAPES, metavar="KxN")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=["bf16", "int8", "int4"])
    p.add_argument("--layers", type=int, default=30, help="layers in the chain (default 30)")
    p.add_argument("--max-mb", type=float, default=600,
                   help="fewer layers where their f32 weights, before compression, would pass this (default 600)")
    add_threads(p, [1])
    p.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds (default 12)")
    p.add_argument("--ext-dirs", nargs="+", metavar="NAME=DIR", help="library folders to compare in child processes")
    p.add_argument("--repeats", type=int, default=3, help="children per folder with --ext-dirs (default 3)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layers < 1 or args.rounds < 1 or args.repeats < 1:
        p.error("--layers, --rounds and --repeats must be at least 1")
    folders = dict(d.split("=", 1) for d in args.ext_dirs or [] if "=" in d)
    if len(folders) != len(args.ext_dirs or []):
        p.error("--ext-dirs: each is NAME=DIR, e.g. main=/tmp/build/lib")
    if args.child:
        print(json.dumps(measure(args)))
        return
    load = [os.getloadavg()[0]]
    if not args.ext_dirs:
        result = {"results": summarise(measure(args))}
    else:
        child = [sys.executable, __file__, "--child", "--layers", str(args.layers), "--max-mb", str(args.max_mb),
                 "--rounds", str(args.rounds),
                 "--threads", *map(str, args.threads), "--formats", *args.formats,
                 "--shapes", *(f"{k}x{n}" for k, n in args.shapes)]
        runs = {name: [] for name in folders}
        for _ in range(args.repeats):
            for name, folder in folders.items():
                proc = subprocess.run(child, env={**os.environ, "ACTSPARSE_EXT_DIR": folder}, capture_output=True,
                                      text=True)
                if proc.returncode:
                    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    sys.exit(f"op_call_cost: the child for {folder} failed: {last}")
                runs[name].append(json.loads(proc.stdout))
        result = {"folders": folders, "builds": {name: median_rows(r) for name, r in runs.items()}}
    load.append(os.getloadavg()[0])
    emit({"benchmark": "op_call_cost", "load_average_start_end": load, **result}, args)


if __name__ == "__main__":
    main()
