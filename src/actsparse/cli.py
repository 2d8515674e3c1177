"""The ``actsparse`` command: thin argument parsing over the public functions."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from ._common import ActSparseError
from .backends import FORMATS, WEIGHT_FORMATS
from .benchmark import RUNTIMES, bench
from .calibration.error import GREEDY_PROBES
from .calibration.plan import ALLOCATIONS, CENTERING, METHODS
from .demo import demo
from .evaluation import evaluate
from .pipeline import PREFILL, export
from .runtime_ext import tuning
from .serve import run as serve

PROG = "actsparse"


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"sparsity {value} is outside [0, 1)")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def add_export_arguments(parser: argparse.ArgumentParser, model_flag: bool = False) -> None:
    """Arguments of ``actsparse export``; ``model_flag`` takes MODEL as ``-m`` (optimum-cli's style)."""
    if model_flag:
        parser.add_argument("-m", "--model", required=True, help="Hugging Face folder, .gguf file or built-in name")
    else:
        parser.add_argument("model", help="Hugging Face folder, .gguf file or built-in name (smollm2-135m)")
    parser.add_argument("output", help="output folder (must not exist unless --force)")
    fmt = parser.add_argument_group("format")
    fmt.add_argument("--format", default="openvino", choices=tuple(FORMATS))
    fmt.add_argument("--weight-format", default="fp32", choices=WEIGHT_FORMATS)
    sp = parser.add_argument_group("sparsity")
    sp.add_argument("--sparsity", type=_sparsity, default=None, help="target sparsity of every kind")
    for kind, what in (("up", "gate/up inputs"), ("down", "down_proj input"), ("qkv", "q/k/v input"),
                       ("o", "o_proj input")):
        sp.add_argument(f"--sparsity-{kind}", type=_sparsity, default=None, help=f"target sparsity of the {what}")
    sp.add_argument("--targets", default="mlp", choices=("mlp", "all"))
    sp.add_argument("--method", default="scap", choices=METHODS)
    sp.add_argument("--mode-centering", default="auto", choices=CENTERING,
                    help="auto: centre on the mode only where it lowers the layer's output error")
    sp.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                    help="greedy: spread the parameter-weighted sparsity budget over layers by output error")
    sp.add_argument("--greedy-probe", default="scaled", choices=GREEDY_PROBES,
                    help="greedy's model-error probe: scaled (one sparsity per layer, default) or full (nine)")
    sp.add_argument("--prefill", default="dense", choices=PREFILL,
                    help="dense: prune only one-token decode steps (default)")
    cal = parser.add_argument_group("calibration")
    cal.add_argument("--calibration", default="builtin:wiki", help=".txt file, folder of .txt, or builtin:wiki")
    cal.add_argument("--calibration-samples", type=_positive, default=64)
    cal.add_argument("--calibration-seq-len", type=_positive, default=256)
    cal.add_argument("--plan", default=None, help="re-use the statistics of an earlier actsparse.json")
    parser.add_argument("--no-fuse", action="store_true", help="keep the unfused reference pattern")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")


def run_export(args: argparse.Namespace) -> int:
    sparsity = {"sparsity": args.sparsity, "up": args.sparsity_up, "down": args.sparsity_down,
                "qkv": args.sparsity_qkv, "o": args.sparsity_o}
    out = export(args.model, args.output, format=args.format, weight_format=args.weight_format,
                 sparsity=sparsity, targets=args.targets, method=args.method,
                 mode_centering=args.mode_centering, allocation=args.allocation, greedy_probe=args.greedy_probe,
                 calibration=args.calibration, calibration_samples=args.calibration_samples,
                 calibration_seq_len=args.calibration_seq_len, plan=args.plan, prefill=args.prefill,
                 fuse=not args.no_fuse, force=args.force)
    print(f"wrote {out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    result = evaluate(args.output, text=args.text, samples=args.samples, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(result))
    else:
        quality = (f"perplexity {result['perplexity']:.3f}   next-token accuracy {result['next_token_accuracy']:.4f}"
                   if "perplexity" in result else
                   f"embedding cosine mean {result['mean_cosine']:.4f}   min {result['min_cosine']:.4f}")
        print(f"{quality}   ({result['tokens']} tokens of {result['text']})")
        for kind, s in result["sparsity"].items():
            print(f"measured sparsity {kind:5s} {s:.3f}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    result = bench(args.output, args.baseline, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                   runs=args.runs, threads=args.threads, runtime=args.runtime)
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("dense", "s0", "sparse"):
            r = result[name]
            decode, prefill = ("TPOT", "TTFT") if args.runtime == "genai" else ("decode", "prefill")
            print(f"{name:6s} {decode} {r['decode_ms_per_token']:7.2f} ms/token   {prefill}({args.prompt_tokens}) "
                  f"{r['prefill_ms']:8.1f} ms   peak RSS {r['peak_rss_mb']:7.0f} MB   {r['inference_precision']}")
        print(f"decode speed-up {result['decode_speedup']:.3f}x dense, {result['decode_speedup_vs_s0']:.3f}x our op "
              f"at s=0 (Amdahl limit {result['amdahl_limit']:.3f}x; s0 is {result['s0_vs_dense']:.3f}x dense), "
              f"prefill {result['prefill_ratio']:.3f}x dense, memory {result['memory_ratio']:.3f}x dense")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    demo(args.output, force=args.force, weight_format=args.weight_format)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = json.loads(args.config) if args.config else {}
    except json.JSONDecodeError as err:
        raise ActSparseError(f"--config is not JSON: {err}") from None
    if not isinstance(config, dict):
        raise ActSparseError("--config must be a JSON object of device properties")
    serve(args.output, args.replicas, host=args.host, port=args.port, address=args.address, device=args.device,
          max_tokens_limit=args.max_new_tokens_limit, model=args.model_name, cpus_per_replica=args.cpus_per_replica,
          config=config)
    return 0


def run_tune(args: argparse.Namespace) -> int:
    result = tuning.tune(args.threads, args.quick, progress=lambda line: print(line, file=sys.stderr))
    print(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Activation sparsity (SCAP) for OpenVINO LLM decoding.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("export", help="export a model with calibrated activation sparsity")
    add_export_arguments(p)
    p.set_defaults(func=run_export)
    p = sub.add_parser("eval", help="quality (perplexity, or embedding cosine for encoders) and measured sparsity "
                                    "of an export (every token pruned)")
    p.add_argument("output", help="folder written by actsparse export")
    p.add_argument("--text", default="builtin:wiki", help=".txt file, folder of .txt, or builtin:wiki (held-out split)")
    p.add_argument("--samples", type=_positive, default=32)
    p.add_argument("--seq-len", type=_positive, default=256)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_eval)
    p = sub.add_parser("bench", help="decode and prefill speed against the dense export and our op at s=0 (medians)")
    p.add_argument("output", help="folder written by actsparse export")
    p.add_argument("--baseline", required=True, help="the dense export (--sparsity 0) of the same model")
    p.add_argument("--prompt-tokens", type=_positive, default=256)
    p.add_argument("--decode-tokens", type=_positive, default=32)
    p.add_argument("--runs", type=_positive, default=3, help="processes per model, alternating")
    p.add_argument("--threads", type=_positive, default=None, help="INFERENCE_NUM_THREADS")
    p.add_argument("--runtime", choices=RUNTIMES, default="openvino",
                   help="openvino: compiled as actsparse.load does; genai: openvino-genai's LLMPipeline (TTFT, TPOT)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_bench)
    p = sub.add_parser("demo", help="export, evaluate and run the embedded default model end to end")
    p.add_argument("--output", default=None, help="keep the two exports here (default: a temporary folder)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--weight-format", default=None, choices=WEIGHT_FORMATS,
                   help="export in this format at up/gate 0.4 + down 0.6 (default: the format and sparsity a short "
                        "probe of the model's layers predicts to gain most lightly on this machine)")
    p.set_defaults(func=run_demo)
    p = sub.add_parser("serve", help="serve an OpenVINO export over HTTP (OpenAI-style /v1/completions) with "
                                     "Ray Serve replicas of openvino-genai; needs actsparse[serve]")
    p.add_argument("output", help="folder written by actsparse export (the same path on every Ray node)")
    p.add_argument("--replicas", type=_positive, default=1, help="pipelines, each serving one request at a time")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default: loopback only)")
    p.add_argument("--port", type=_positive, default=8000)
    p.add_argument("--device", default="CPU")
    p.add_argument("--max-new-tokens-limit", type=_positive, default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--model-name", default=None, help="the model's name in requests (default: the folder's name)")
    p.add_argument("--cpus-per-replica", type=float, default=1, help="CPUs Ray reserves for each replica")
    p.add_argument("--config", default=None, help='device properties as JSON, e.g. \'{"INFERENCE_NUM_THREADS": 4}\'')
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto': the one started with ray start); default: a local instance")
    p.set_defaults(func=run_serve)
    p = sub.add_parser("tune", help="time the op's decode settings on this CPU (a few seconds) and write them to the "
                                    "cache folder, where the op reads them in every runtime")
    p.add_argument("--threads", type=_positive, default=None, help="the thread count inference uses (default: "
                                                                   "every CPU this process may run on)")
    p.add_argument("--quick", action="store_true", help="fewer timing rounds")
    p.set_defaults(func=run_tune)
    return parser


def guarded(func, args, verbose: bool = False) -> int:
    """Run ``func(args)``; known failures become one stderr line and exit 1."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    # SIGTERM (a scheduler's stop, kill) unwinds like Ctrl-C, so temporary folders are removed on the way out
    if threading.current_thread() is threading.main_thread():  # where Python lets a handler be set
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return func(args)
    except ActSparseError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if verbose or os.environ.get("ACTSPARSE_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(err).__name__}: {err} (run with -v for the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(args.func, args, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
