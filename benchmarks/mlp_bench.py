"""One op per MLP against two, inside a real OpenVINO export, in one process. Prints JSON.

OUT is an export whose MLPs are ActSparseMLP ops (what `actsparse export` writes); DENSE the dense export of the
same model and weight format. Every variant is compiled once, then each round decodes STEPS greedy tokens after the
same PROMPT-token prompt in each variant, the order reversed every other round; a variant's figure is the median
over rounds of its rounds' median ms/token:
- ``dense``: DENSE;
- ``one_op``: OUT as it is; ``two_ops``: OUT with each ActSparseMLP split back into its two ActSparseMatMuls and
  the activation between them (``mlp.split_mlp``: the export as it was before ActSparseMLP);
- ``one_op_inf``, ``two_ops_inf``: the same at threshold +inf, every channel pruned: what the ops cost beyond the
  weight rows they read;
- ``no_mlp``: OUT with each MLP's output replaced by its input, the rest of the model alone.
So ``(one_op_inf - no_mlp) / layers`` is an ActSparseMLP call's fixed cost and ``(two_ops_inf - no_mlp) / layers``
that of a layer's two calls, in the model (medians' difference).

    python benchmarks/mlp_bench.py OUT --dense DENSE [--prompt 256] [--steps 64] [--rounds 9] [--threads 2]
                                   [--output FILE]
"""
from __future__ import annotations

import time

import numpy as np
import openvino as ov

from actsparse.backends.openvino.mlp import split_mlp
from actsparse.backends.openvino.runtime import feed, greedy_steps, prepare, read_model
from actsparse.runtime_ext import MLP_TYPE, PROJECTIONS

from _harness import add_threads, emit, parser


def variant(core: ov.Core, xml: str, split: bool = False, threshold: float | None = None, no_mlp: bool = False):
    model = read_model(core, xml)
    if split:
        split_mlp(model)
    for op in model.get_ordered_ops():
        if no_mlp and op.get_type_name() == MLP_TYPE:
            op.output(0).replace(op.input_value(0))
        for prefix in PROJECTIONS.get(op.get_type_name(), ()) if threshold is not None else ():
            op.set_attribute(f"{prefix}threshold", threshold)
    model.validate_nodes_and_infer_types()
    return model


def main():
    p = parser(__doc__)
    p.add_argument("out", help="an export with ActSparseMLP ops")
    p.add_argument("--dense", required=True, help="the dense export of the same model and weight format")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--steps", type=int, default=64, help="decode steps a round")
    p.add_argument("--rounds", type=int, default=9)
    add_threads(p, 2)
    args = p.parse_args()
    core, config = ov.Core(), {"INFERENCE_NUM_THREADS": args.threads}
    xml = f"{args.out}/openvino_model.xml"
    models = {"dense": read_model(core, f"{args.dense}/openvino_model.xml"), "one_op": variant(core, xml),
              "two_ops": variant(core, xml, split=True), "one_op_inf": variant(core, xml, threshold=float("inf")),
              "two_ops_inf": variant(core, xml, split=True, threshold=float("inf")),
              "no_mlp": variant(core, xml, no_mlp=True)}
    layers = sum(op.get_type_name() == MLP_TYPE for op in models["one_op"].get_ordered_ops())
    if not layers:
        raise SystemExit(f"mlp_bench: {args.out} has no {MLP_TYPE} op")
    compiled = {}
    for name, model in models.items():
        prepare(core, model, "CPU", config)  # as actsparse.load and bench compile it
        compiled[name] = core.compile_model(model, "CPU", config)
    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    names = [i.get_any_name() for i in compiled["dense"].inputs]
    vocab = compiled["dense"].output("logits").get_partial_shape()[-1].get_length()
    ids = np.random.default_rng(0).integers(0, vocab, (1, args.prompt))
    decode, prefill = {n: [] for n in models}, {n: [] for n in models}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in list(models)[:: 1 if round_ % 2 else -1]:
            request = requests[name]
            request.reset_state()
            start = time.perf_counter()
            request.infer(feed(names, ids))
            first = time.perf_counter() - start
            steps = greedy_steps(compiled[name], request, ids, args.steps)
            if round_:
                decode[name].append(1e3 * float(np.median(steps)))
                prefill[name].append(1e3 * first)
    ms = {n: round(float(np.median(v)), 3) for n, v in decode.items()}
    emit({"benchmark": "mlp_bench", "results": [{
          "model": args.out, "dense": args.dense, "layers": layers, "decode_ms_per_token": ms,
          "prefill_ms": {n: round(float(np.median(v)), 1) for n, v in prefill.items()},
          "rounds_ms_per_token": {n: [round(x, 3) for x in v] for n, v in decode.items()},
          "rounds_prefill_ms": {n: [round(x, 1) for x in v] for n, v in prefill.items()},
          "speedup": {"one_op_over_two_ops": round(ms["two_ops"] / ms["one_op"], 3),
                      "one_op_over_dense": round(ms["dense"] / ms["one_op"], 3),
                      "two_ops_over_dense": round(ms["dense"] / ms["two_ops"], 3)},
          "fixed_cost_us": {"one_op_per_layer": round(1e3 * (ms["one_op_inf"] - ms["no_mlp"]) / layers, 1),
                            "two_ops_per_layer": round(1e3 * (ms["two_ops_inf"] - ms["no_mlp"]) / layers, 1)},
          "dense_mlp_ms_per_token": round(ms["dense"] - ms["no_mlp"], 3)}]}, args)


if __name__ == "__main__":
    main()
