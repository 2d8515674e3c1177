"""End-to-end decode: an actsparse export against the dense export and against our op at s=0 (the same weights
fused at threshold 0), from the same alternating runs of ``actsparse bench``. Prints JSON.

Models: SmolLM2-135M (built in) and a TinyLlama-shaped model with random weights (hidden 2048,
intermediate 5632, 8 layers, 32 query / 4 KV heads, SmolLM2's tokenizer) by default; any other
MODEL that ``actsparse export`` takes, e.g. the built-in ``qwen2.5-0.5b``. Each export is made
once into --work and reused.

    python benchmarks/e2e_bench.py [--work DIR] [--models smollm2-135m tinyllama-8l qwen2.5-0.5b]
                                   [--runtimes openvino onnx] [--formats fp32 int8]
                                   [--up 0.5 --down 0.5 | --targets all --sparsity 0.5] [--threads 2] [--runs 3]
                                   [--export-only] [--output FILE]

``--runtimes openvino onnx`` puts OpenVINO and ONNX Runtime side by side on the same model,
weights and sparsity (each against its own dense export in the same runtime); ``genai`` times the OpenVINO
exports through openvino-genai.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from _harness import add_threads, add_work, emit, parser, run_cli


def tinyllama(folder: Path) -> Path:
    """A TinyLlama-shaped Llama with random weights (the shapes set the speed; the values do not)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from actsparse.exports.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    p = parser(__doc__)
    add_work(p, "e2e-work", reuse=True)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "tinyllama-8l"])
    p.add_argument("--runtimes", nargs="+", default=["openvino"], choices=["openvino", "genai", "onnx"],
                   help="genai: the OpenVINO exports through openvino-genai's LLMPipeline (TTFT as prefill, TPOT as decode)")
    p.add_argument("--formats", nargs="+", default=["fp32", "int8"], help="export --weight-format values")
    p.add_argument("--up", type=float, default=0.5, help="--sparsity-up of the sparse export")
    p.add_argument("--down", type=float, default=0.5, help="--sparsity-down of the sparse export")
    p.add_argument("--targets", default="mlp", choices=["mlp", "all"],
                   help="all: every projection of the sparse export at --sparsity (export --targets all)")
    p.add_argument("--sparsity", type=float, default=0.5, help="with --targets all: the sparsity of every projection")
    add_threads(p, None)
    p.add_argument("--runs", type=int, default=3, help="alternating sparse/s=0/dense runs of actsparse bench")
    p.add_argument("--export-only", action="store_true", help="make the exports, measure nothing")
    args = p.parse_args()
    work = Path(args.work)
    results = []
    for name in args.models:
        model = str(tinyllama(work / "tinyllama-8l-hf")) if name == "tinyllama-8l" else name
        for runtime, fmt in itertools.product(args.runtimes, args.formats):
            export_format = "openvino" if runtime == "genai" else runtime
            stem = f"{name}-{export_format}-{fmt}"
            plan = (["--targets", "all", "--sparsity", args.sparsity] if args.targets == "all"
                    else ["--sparsity-up", args.up, "--sparsity-down", args.down])
            label = f"all{args.sparsity}" if args.targets == "all" else f"up{args.up}-down{args.down}"
            dense, sparse = work / f"{stem}-dense", work / f"{stem}-{label}"
            if not dense.exists():
                run_cli("export", model, dense, "--format", export_format, "--weight-format", fmt, "--sparsity", 0)
            if not sparse.exists():
                run_cli("export", model, sparse, "--format", export_format, "--weight-format", fmt, *plan,
                        "--calibration-samples", 16)
            if args.export_only:
                continue
            extra = (["--threads", args.threads] if args.threads else []) + (["--runtime", "genai"] if runtime == "genai" else [])
            result = json.loads(run_cli("bench", sparse, "--baseline", dense, "--json", "--runs", args.runs, *extra)[0])
            result.update(model_name=name, runtime=runtime, weight_format=fmt, targets=args.targets,
                          **({"sparsity": args.sparsity} if args.targets == "all" else {"up": args.up, "down": args.down}))
            results.append(result)
            print(f"{name} {runtime} {fmt}: decode dense {result['dense']['decode_ms_per_token']:.2f}, our s=0 "
                  f"{result['s0']['decode_ms_per_token']:.2f} -> {result['sparse']['decode_ms_per_token']:.2f} "
                  f"ms/token = {result['decode_speedup']:.3f}x dense, {result['decode_speedup_vs_s0']:.3f}x s=0 "
                  f"(limit {result['amdahl_limit']:.3f}x), prefill {result['prefill_ratio']:.2f}x, "
                  f"memory {result['memory_ratio']:.2f}x", file=sys.stderr)
    emit({"results": results}, args)


if __name__ == "__main__":
    main()
