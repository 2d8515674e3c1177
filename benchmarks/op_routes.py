"""One export, three ways to run it, under the plugin's default CPU configuration: a plain
``core.compile_model`` of the IR with the extension, ``actsparse.load``'s compilation (each op between bf16
Converts where the device runs bf16), and openvino-genai's ``LLMPipeline`` (``actsparse.genai_pipeline``, which
does the same through a copy of the IR text). Prints JSON: decode ms/token and prefill ms (genai: TPOT and TTFT
from its PerfMetrics), medians over alternating rounds in one process. tests/test_genai.py checks that the
three give the same tokens.

    python benchmarks/op_routes.py OUTPUT [--prompt-tokens 256] [--decode-tokens 32] [--rounds 7] [--output FILE]
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from _harness import emit, openvino_core, parser


def main() -> None:
    p = parser(__doc__)
    p.add_argument("export", help="an actsparse OpenVINO export (fused)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()

    import openvino as ov
    import openvino_genai

    import actsparse
    from actsparse.backends.openvino.runtime import feed, greedy_steps, prepare, read_model

    core = openvino_core()
    xml = f"{args.export}/openvino_model.xml"
    plain = core.compile_model(read_model(core, xml), "CPU")
    model = read_model(core, xml)
    converts = prepare(core, model)
    load = core.compile_model(model, "CPU")
    pipe = actsparse.genai_pipeline(args.export)
    vocab = plain.output("logits").get_partial_shape()[-1].get_length()
    rng = np.random.default_rng(0)
    gen = openvino_genai.GenerationConfig()
    gen.max_new_tokens = gen.min_new_tokens = args.decode_tokens

    def run_compiled(compiled, ids):
        request = compiled.create_infer_request()
        names = [i.get_any_name() for i in compiled.inputs]
        start = time.perf_counter()
        request.infer(feed(names, ids))
        prefill = time.perf_counter() - start
        steps = greedy_steps(compiled, request, ids, args.decode_tokens)
        return 1e3 * prefill, 1e3 * statistics.median(steps)

    def run_genai(ids):
        metrics = pipe.generate(ov.Tensor(ids.astype(np.int64)), gen).perf_metrics
        return metrics.get_ttft().mean, metrics.get_tpot().mean

    routes = {"core.compile_model": lambda ids: run_compiled(plain, ids), "actsparse.load": lambda ids: run_compiled(load, ids),
              "openvino-genai": run_genai}
    samples = {name: [] for name in routes}
    for rnd in range(args.rounds + 1):  # the first round warms up
        # a new prompt each round (genai's prefix cache would skip a repeated one), the same for every route
        ids = rng.integers(0, vocab, (1, args.prompt_tokens))
        for name, run in routes.items():
            result = run(ids)
            if rnd:
                samples[name].append(result)
    table = {name: {"prefill_ms": statistics.median(r[0] for r in rs), "decode_ms_per_token": statistics.median(r[1] for r in rs),
                    "decode_runs": [round(r[1], 3) for r in rs]} for name, rs in samples.items()}
    emit({"benchmark": "op_routes", "export": args.export, "converts_inserted": converts,
          "inference_precision": plain.get_property("INFERENCE_PRECISION_HINT").to_string(), "routes": table}, args)


if __name__ == "__main__":
    main()
