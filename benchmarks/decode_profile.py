"""Where an OpenVINO export's decode time goes, per node type: the CPU plugin's PERF_COUNT over decode steps
only. Prints JSON.

The plugin reports each node's average over every inference since compilation, the prompt's included, so
this takes the difference of the totals (average x inferences) before and after the decode steps. MatMul-like
nodes (FullyConnected*, our ActSparseMatMul, which the plugin runs as a `Reference` node) are split by the
projection they compute (`mlp.down_proj`, `self_attn.q_proj`, ...), read from the node's name.

    python benchmarks/decode_profile.py OUT [OUT ...] [--prompt 64] [--steps 100] [--threads 2] [--output FILE]
"""
from __future__ import annotations

import collections
import re

import numpy as np
import openvino as ov

from actsparse.backends.openvino.runtime import feed, greedy_steps, prepare, read_model

from _harness import add_threads, emit, median_ms, parser

PROJECTION = re.compile(r"\.((?:self_attn|mlp)\.\w+?_proj)\b")


def totals(request) -> dict[tuple[str, str], list[float]]:
    """{(node type, projection or ''): [summed average µs, nodes]} of the request's profile."""
    out = collections.defaultdict(lambda: [0.0, 0])
    for p in request.get_profiling_info():
        match = PROJECTION.search(p.node_name) if p.node_type.startswith(("FullyConnected", "Reference", "MatMul")) else None
        row = out[(p.node_type, match.group(1) if match else "")]
        row[0] += p.real_time.total_seconds() * 1e6
        row[1] += 1
    return out


def profile(folder: str, prompt: int, steps: int, threads: int) -> dict:
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    model = read_model(core, f"{folder}/openvino_model.xml")
    prepare(core, model, "CPU", config)  # as actsparse.load and bench compile it
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    vocab = compiled.output("logits").get_partial_shape()[-1].get_length()
    ids = np.random.default_rng(0).integers(0, vocab, (1, prompt))
    done = 0  # inferences so far
    for _ in range(2):  # the first pass warms up (the weights' first reads); the second is measured
        request.reset_state()
        request.infer(feed(names, ids))
        first, n0 = totals(request), done + 1
        wall = greedy_steps(compiled, request, ids, steps)
        done = n0 + steps
    after = totals(request)
    rows = []
    for (kind, proj), (avg, nodes) in after.items():
        us = (avg * done - first.get((kind, proj), [0.0])[0] * n0) / steps
        rows.append({"node_type": kind, "projection": proj, "nodes": nodes, "us_per_token": round(us, 1),
                     "us_per_node": round(us / nodes, 1)})
    rows.sort(key=lambda r: -r["us_per_token"])
    return {"model": folder, "threads": threads, "prompt": prompt, "steps": steps,
            "decode_ms_per_token": round(median_ms(wall), 3),
            "nodes_ms_per_token": round(sum(r["us_per_token"] for r in rows) / 1e3, 3), "rows": rows}


def main():
    p = parser(__doc__)
    p.add_argument("outputs", nargs="+", help="OpenVINO export folders (dense or sparse)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--steps", type=int, default=100, help="decode steps profiled")
    add_threads(p, 2)
    args = p.parse_args()
    emit({"results": [profile(o, args.prompt, args.steps, args.threads) for o in args.outputs]}, args)


if __name__ == "__main__":
    main()
