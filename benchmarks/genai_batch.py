"""Batched decode through openvino-genai's ContinuousBatchingPipeline (OpenVINO Model Server's engine): decode
tokens/s over all sequences at 1, 2, 4 and 8 concurrent sequences, a sparse export against its dense baseline.
Prints JSON.

Decode throughput is B·(T−1) / (t_T − t_1): t_T is the wall time to generate T tokens for B prompts at once, t_1
for one token, so the prompts' prefill cancels. Each run loads each model in its own process, sparse and dense
alternating; figures are medians over runs. Under PagedAttention a step of several rows reaches the op as one
[rows, 1, K] input, which it computes as the export's prefill says (dense by default): see the README.

    python benchmarks/genai_batch.py [--work DIR] [--model smollm2-135m] [--format int8] [--up 0.5 --down 0.5]
                                     [--batches 1 2 4 8] [--new-tokens 32] [--runs 3] [--threads 2] [--output FILE]
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import Ints, add_threads, add_work, emit, parser, run_cli


def measure(folder: str, batches: list[int], new_tokens: int, threads: int | None) -> dict:
    """In this process: decode tokens/s of ``folder`` at each batch size (one pipeline for all)."""
    import openvino_genai

    import actsparse
    from actsparse.calibration.text import WIKI, read_documents

    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    pipe = actsparse.genai_batching_pipeline(folder, **config)
    docs = [d for d in read_documents(WIKI, "evaluation") if len(d) > 400]
    prompts = [d[:300] for d in docs[:max(batches)]]  # about 64 tokens each, distinct

    def wall(batch: int, tokens: int) -> float:
        gen = openvino_genai.GenerationConfig()
        gen.max_new_tokens = gen.min_new_tokens = tokens
        gen.apply_chat_template = False
        start = time.perf_counter()
        pipe.generate(prompts[:batch], [gen] * batch)
        return time.perf_counter() - start

    wall(max(batches), 2)  # warm-up: compiles every shape path once
    return {str(b): b * (new_tokens - 1) / max(1e-9, wall(b, new_tokens) - wall(b, 1)) for b in batches}


def main() -> None:
    p = parser(__doc__)
    add_work(p, None, reuse=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--format", default="int8")
    p.add_argument("--up", type=float, default=0.5)
    p.add_argument("--down", type=float, default=0.5)
    p.add_argument("--batches", nargs="+", action=Ints, default=[1, 2, 4, 8], help="concurrent sequences")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    add_threads(p, 2)
    args = p.parse_args()
    work = Path(args.work) if args.work else Path(__import__("tempfile").mkdtemp(prefix="genai-batch-"))
    tag = f"{args.model}-{args.format}"
    folders = {"dense": work / f"{tag}-dense", "sparse": work / f"{tag}-up{args.up}-down{args.down}"}
    if not folders["dense"].is_dir():
        run_cli("export", args.model, folders["dense"], "--weight-format", args.format, "--sparsity", "0")
    if not folders["sparse"].is_dir():
        run_cli("export", args.model, folders["sparse"], "--weight-format", args.format, "--sparsity-up", args.up,
                "--sparsity-down", args.down)
    samples: dict[str, list[dict]] = {"dense": [], "sparse": []}
    for _ in range(args.runs):
        for name in ("sparse", "dense"):
            code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from genai_batch import measure; "
                    "print(json.dumps(measure(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), "
                    "int(sys.argv[5]) or None)))")
            proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(folders[name]),
                                   json.dumps(args.batches), str(args.new_tokens), str(args.threads or 0)],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            samples[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    table = []
    for b in map(str, args.batches):
        dense = statistics.median(s[b] for s in samples["dense"])
        sparse = statistics.median(s[b] for s in samples["sparse"])
        table.append({"sequences": int(b), "dense_tokens_per_s": dense, "sparse_tokens_per_s": sparse,
                      "speedup": sparse / dense, "runs": {k: [s[b] for s in v] for k, v in samples.items()}})
    emit({"benchmark": "genai_batch", "models": {k: str(v) for k, v in folders.items()}, "table": table}, args)


if __name__ == "__main__":
    main()
