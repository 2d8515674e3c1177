"""``actsparse bench``: decode ms/token, prefill ms and peak memory of an export against its dense baseline.

Each measurement runs in its own process (clean peak RSS), alternating sparse and dense so
that machine noise hits both alike; figures are medians. Both models use the runtime's
default CPU configuration, optionally with ``INFERENCE_NUM_THREADS``.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

from ._common import ActSparseError
from .backends import genai_export, get_backend
from .calibration.plan import read_plan


RUNTIMES = ("openvino", "genai")


def bench(output: str | os.PathLike, baseline: str | os.PathLike, *, prompt_tokens: int = 256,
          decode_tokens: int = 32, runs: int = 3, threads: int | None = None, runtime: str = "openvino") -> dict:
    """``runtime``: "openvino" (the model compiled as ``actsparse.load`` does) or "genai" (openvino-genai's
    ``LLMPipeline``: TTFT as prefill, TPOT as decode, from its ``PerfMetrics``)."""
    if runtime not in RUNTIMES:
        raise ActSparseError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    output, baseline = Path(output), Path(baseline)
    plan, _ = read_plan(output, with_statistics=False)
    base_plan, _ = read_plan(baseline, with_statistics=False)
    # the limit counts the weight bytes of the baseline's MatMuls, which a sparse export has fused away
    sparse_layers = sum(layer["target_sparsity"] > 0 for layer in base_plan["layers"])
    if sparse_layers:
        raise ActSparseError(f"--baseline {baseline} is a sparse export ({sparse_layers} layers pruned): give the "
                             "dense export of the same model (actsparse export MODEL OUT --sparsity 0)")
    samples: dict[str, list[dict]] = {"sparse": [], "dense": []}
    for _ in range(runs):
        for name, folder in (("sparse", output), ("dense", baseline)):
            samples[name].append(_measure_in_subprocess(folder, prompt_tokens, decode_tokens, threads, runtime))
    result = {"model": str(output), "baseline": str(baseline), "runtime": runtime, "prompt_tokens": prompt_tokens,
              "decode_tokens": decode_tokens, "runs": runs, "threads": threads}
    for name, rows in samples.items():
        result[name] = {key: rows[0][key] if isinstance(rows[0][key], str) else float(np.median([r[key] for r in rows]))
                        for key in rows[0]}
        result[name]["decode_ms_per_token_runs"] = [r["decode_ms_per_token"] for r in rows]  # the noise, per run
    result["decode_speedup"] = result["dense"]["decode_ms_per_token"] / result["sparse"]["decode_ms_per_token"]
    result["prefill_ratio"] = result["sparse"]["prefill_ms"] / result["dense"]["prefill_ms"]
    result["memory_ratio"] = result["sparse"]["peak_rss_mb"] / result["dense"]["peak_rss_mb"]
    share = sparsified_share(plan, baseline)
    result["sparsified_weight_share"] = share
    result["amdahl_limit"] = 1.0 / (1.0 - share)
    # the speed-up as a share of its limit, and the share of the possible gain (1 = the limit)
    result["of_limit"] = result["decode_speedup"] / result["amdahl_limit"]
    result["of_possible_gain"] = (result["decode_speedup"] - 1) / (result["amdahl_limit"] - 1) if share else None
    return result


def sparsified_share(plan: dict, baseline: Path) -> float:
    """f: the share of the weight bytes read per decode token that the plan's sparsity skips.

    Every MatMul reads its whole weight (codes, scales and zero points) once per token; an
    embedding table that is only gathered is not read. Bytes come from the dense model.
    """
    per_matmul = get_backend(baseline).weight_bytes(baseline)
    skipped = sum(per_matmul.get(l["node"], 0) * l["target_sparsity"] for l in plan["layers"])
    return skipped / sum(per_matmul.values())


def measure(folder: str | os.PathLike, prompt_tokens: int, decode_tokens: int, threads: int | None = None,
            runtime: str = "openvino") -> dict:
    """One measurement of the output ``folder`` in this process: prefill ms, decode ms/token (medians), the
    inference precision the runtime chose, and this process's peak RSS."""
    folder = Path(folder)
    if runtime == "genai":
        backend, plan = genai_export(folder)
        result = backend.time_genai(folder, plan, prompt_tokens, decode_tokens, threads)
    else:
        result = get_backend(folder).time_decode(folder, prompt_tokens, decode_tokens, threads)
    return {**result, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _measure_in_subprocess(folder: Path, prompt_tokens: int, decode_tokens: int, threads: int | None,
                           runtime: str) -> dict:
    cmd = [sys.executable, "-m", "actsparse.benchmark", str(folder), str(prompt_tokens), str(decode_tokens),
           str(threads or 0), runtime]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise ActSparseError(f"benchmark of {folder} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    folder, prompt, decode, threads, runtime = sys.argv[1:6]
    try:
        print(json.dumps(measure(folder, int(prompt), int(decode), int(threads) or None, runtime)))
    except ActSparseError as err:  # one line for the parent to relay, not a traceback
        sys.exit(str(err))
