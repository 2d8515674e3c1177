"""``actsparse bench``: decode ms/token, prefill ms and peak memory of an export against two baselines.

The baselines: the dense export (the runtime's own layers), and our op at s=0 (:func:`export_at_zero`: the
same layers fused as in the export, in the same weight format, at threshold 0), which tells the op's own
speed apart from the bytes that sparsity skips. Each measurement runs in its own process (clean peak RSS),
alternating the three models so that machine noise hits all alike; figures are medians. Every model uses
the runtime's default CPU configuration, optionally with ``INFERENCE_NUM_THREADS``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ._common import ActSparseError, atomic_output_dir, own_peak_rss
from .backends import genai_export, get_backend
from .calibration.plan import PLAN_FILE, STATS_FILE, read_plan
from .pipeline import ExportOptions, Statistics, rewrite, save


RUNTIMES = ("openvino", "genai")


def bench(output: str | os.PathLike, baseline: str | os.PathLike, *, prompt_tokens: int = 256,
          decode_tokens: int = 32, runs: int = 3, threads: int | None = None, runtime: str = "openvino") -> dict:
    """Decode and prefill of the export ``output`` (key "sparse"), of ``baseline`` ("dense", the dense export in the
    same weight format) and of our op at s=0 ("s0", made by :func:`export_at_zero` in a temporary folder beside
    ``output``), with the ratios between them. ``runtime``: "openvino" (the model compiled as ``actsparse.load``
    does) or "genai" (openvino-genai's ``LLMPipeline``: TTFT as prefill, TPOT as decode, from its ``PerfMetrics``)."""
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
    if plan.get("weight_format") != base_plan.get("weight_format"):
        raise ActSparseError(f"--baseline {baseline} has weight format {base_plan.get('weight_format')}, the export "
                             f"{plan.get('weight_format')}: give the dense export in the same weight format")
    samples: dict[str, list[dict]] = {"sparse": [], "s0": [], "dense": []}
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.s0-", dir=output.parent) as scratch:
        at_zero = export_at_zero(output, baseline, Path(scratch) / "s0")
        for _ in range(runs):
            for name, folder in (("sparse", output), ("s0", at_zero), ("dense", baseline)):
                samples[name].append(_measure_in_subprocess(folder, prompt_tokens, decode_tokens, threads, runtime))
    result = {"model": str(output), "baseline": str(baseline), "runtime": runtime, "prompt_tokens": prompt_tokens,
              "decode_tokens": decode_tokens, "runs": runs, "threads": threads}
    for name, rows in samples.items():
        result[name] = {key: rows[0][key] if isinstance(rows[0][key], str) else float(np.median([r[key] for r in rows]))
                        for key in rows[0]}
        result[name]["decode_ms_per_token_runs"] = [r["decode_ms_per_token"] for r in rows]  # the noise, per run
    dense, zero, sparse = (result[name] for name in ("dense", "s0", "sparse"))
    result["decode_speedup"] = dense["decode_ms_per_token"] / sparse["decode_ms_per_token"]
    result["decode_speedup_vs_s0"] = zero["decode_ms_per_token"] / sparse["decode_ms_per_token"]
    result["s0_vs_dense"] = dense["decode_ms_per_token"] / zero["decode_ms_per_token"]  # the op's own speed
    result["prefill_ratio"] = sparse["prefill_ms"] / dense["prefill_ms"]
    result["prefill_ratio_vs_s0"] = sparse["prefill_ms"] / zero["prefill_ms"]
    result["memory_ratio"] = sparse["peak_rss_mb"] / dense["peak_rss_mb"]
    share = sparsified_share(plan, baseline)
    result["sparsified_weight_share"] = share
    result["amdahl_limit"] = 1.0 / (1.0 - share)
    # the speed-up as a share of its limit, and the share of the possible gain (1 = the limit)
    result["of_limit"] = result["decode_speedup"] / result["amdahl_limit"]
    result["of_possible_gain"] = (result["decode_speedup"] - 1) / (result["amdahl_limit"] - 1) if share else None
    result["of_limit_vs_s0"] = result["decode_speedup_vs_s0"] / result["amdahl_limit"]
    return result


def export_at_zero(output: str | os.PathLike, dense: str | os.PathLike, folder: str | os.PathLike,
                   force: bool = False) -> Path:
    """Our op at s=0: the ``dense`` export with the layers that the export at ``output`` prunes rewritten as
    it rewrote them (fused where it is, same weight format and prefill), at mode 0 and threshold 0, written
    into ``folder``. ``|x| <= 0`` drops only exact zeros, which add nothing, so it computes the dense model's
    function with the export's op and weight layout. Its plan records sparsity 0 for every layer."""
    output, dense = Path(output), Path(dense)
    plan, _ = read_plan(output, with_statistics=False)
    backend = get_backend(dense)
    if get_backend(output) is not backend:
        raise ActSparseError(f"{output} and {dense} are exports in different formats")
    if not any(layer["target_sparsity"] > 0 for layer in plan["layers"]):
        raise ActSparseError(f"{output} prunes no layer: there is nothing to rewrite at sparsity 0")
    # the rewrite inserts a mask only where the sparsity is above 0, so the layers keep theirs until it is done
    zero = {**plan, "statistics": None, "calibration": {}, "zero_sparsity_of": str(output),
            "layers": [{**layer, "mode": 0.0, "threshold": 0.0} for layer in plan["layers"]]}
    options = ExportOptions(format=backend.format.name, weight_format=plan.get("weight_format", "fp32"),
                            prefill=plan.get("prefill", "dense"), fuse=bool(plan.get("passes", {}).get("fused")))
    model_file = Path(backend.format.model_file)
    with atomic_output_dir(folder, force) as tmp:
        shutil.copytree(dense, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(f"{model_file.stem}.*", PLAN_FILE, STATS_FILE))
        graph = rewrite(backend, dense / model_file, zero, options)
        zero["layers"] = [{**layer, "target_sparsity": 0.0, "calibrated_sparsity": 0.0} for layer in zero["layers"]]
        save(backend, graph, tmp / model_file, zero, Statistics())
    return Path(folder)


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
    return {**result, "peak_rss_mb": own_peak_rss() / 2**20}


def _measure_in_subprocess(folder: Path, prompt_tokens: int, decode_tokens: int, threads: int | None,
                           runtime: str) -> dict:
    return run_json("actsparse.benchmark", folder, prompt_tokens, decode_tokens, threads or 0, runtime,
                    what=f"benchmark of {folder}")


def run_json(module: str, *args, what: str) -> dict:
    """``python -m module ARGS`` in a process of its own: the JSON of its last stdout line, or one
    :class:`ActSparseError` line (``what`` failed: its last error line)."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise ActSparseError(f"{what} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    folder, prompt, decode, threads, runtime = sys.argv[1:6]
    try:
        print(json.dumps(measure(folder, int(prompt), int(decode), int(threads) or None, runtime)))
    except ActSparseError as err:  # one line for the parent to relay, not a traceback
        sys.exit(str(err))
