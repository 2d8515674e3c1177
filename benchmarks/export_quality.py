"""Export wall time, peak memory and held-out perplexity of SCAP and TEAL on a model; prints JSON.

    python benchmarks/export_quality.py [--model smollm2-135m] [--weight-format fp32] [--work DIR] [--samples 32]
                                        [--output FILE]

The first export calibrates (timed, peak RSS measured in a child process); the other
settings re-use its statistics through --plan, so only the thresholds change.
"""
from __future__ import annotations

import json
import resource
import tempfile
from pathlib import Path

from _harness import add_work, emit, parser, run_cli

SETTINGS = [  # name, method, up, down
    ("dense", "scap", 0.0, 0.0),
    ("scap-30-50", "scap", 0.3, 0.5),
    ("teal-30-50", "teal", 0.3, 0.5),
    ("scap-40-60", "scap", 0.4, 0.6),
    ("teal-40-60", "teal", 0.4, 0.6),
]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--weight-format", default="fp32")
    add_work(p, None, False, "--out")
    p.add_argument("--samples", type=int, default=32, help="held-out samples per evaluation")
    args = p.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="actsparse-bench-")
    root = Path(args.work)
    results = {"model": args.model, "weight_format": args.weight_format, "eval_samples": args.samples,
               "eval_seq_len": 256, "runs": []}
    first = None
    for name, method, up, down in SETTINGS:
        out = root / name
        extra = ["--plan", first / "actsparse.json"] if first and up else []
        _, seconds = run_cli("export", args.model, out, "--method", method, "--sparsity-up", up,
                             "--sparsity-down", down, "--weight-format", args.weight_format, "--force", *extra)
        if up and first is None:
            first = out
            results["calibrating_export"] = {"wall_s": round(seconds, 1),
                                             "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
        ev = json.loads(run_cli("eval", out, "--json", "--samples", args.samples)[0])
        results["runs"].append({"name": name, "method": method, "up": up, "down": down, "export_s": round(seconds, 1),
                                "perplexity": ev["perplexity"], "next_token_accuracy": ev["next_token_accuracy"],
                                "tokens": ev["tokens"], "measured_sparsity": ev["sparsity"]})
    dense = results["runs"][0]["perplexity"]
    for run in results["runs"]:
        run["perplexity_vs_dense"] = round(run["perplexity"] / dense, 4)
    emit(results, args)


if __name__ == "__main__":
    main()
