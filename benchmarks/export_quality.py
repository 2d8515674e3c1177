"""Export wall time, peak memory and held-out perplexity of SCAP and TEAL on a model; prints JSON.

    python benchmarks/export_quality.py [--model smollm2-135m] [--out DIR] [--samples 32]

The first export calibrates (timed, peak RSS measured in a child process); the other
settings re-use its statistics through --plan, so only the thresholds change.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = [  # name, method, up, down
    ("dense", "scap", 0.0, 0.0),
    ("scap-30-50", "scap", 0.3, 0.5),
    ("teal-30-50", "teal", 0.3, 0.5),
    ("scap-40-60", "scap", 0.4, 0.6),
    ("teal-40-60", "teal", 0.4, 0.6),
]


def cli(*args) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "actsparse", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"actsparse {' '.join(map(str, args))} failed: {proc.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weight-format", default="fp32")
    parser.add_argument("--out", default=None)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="actsparse-bench-"))
    results = {"model": args.model, "weight_format": args.weight_format, "eval_samples": args.samples,
               "eval_seq_len": 256, "runs": []}
    first = None
    for name, method, up, down in SETTINGS:
        out = root / name
        extra = ["--plan", first / "actsparse.json"] if first and up else []
        seconds, _ = cli("export", args.model, out, "--method", method, "--sparsity-up", up, "--sparsity-down", down,
                         "--weight-format", args.weight_format, "--force", *extra)
        if up and first is None:
            first = out
            results["calibrating_export"] = {"wall_s": round(seconds, 1),
                                             "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
        _, proc = cli("eval", out, "--json", "--samples", args.samples)
        ev = json.loads(proc.stdout)
        results["runs"].append({"name": name, "method": method, "up": up, "down": down, "export_s": round(seconds, 1),
                                "perplexity": ev["perplexity"], "next_token_accuracy": ev["next_token_accuracy"],
                                "tokens": ev["tokens"], "measured_sparsity": ev["sparsity"]})
    dense = results["runs"][0]["perplexity"]
    for run in results["runs"]:
        run["perplexity_vs_dense"] = round(run["perplexity"] / dense, 4)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
