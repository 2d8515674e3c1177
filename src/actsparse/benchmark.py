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
import time
from pathlib import Path

import numpy as np

from ._common import ActSparseError
from .calibration.plan import read_plan

def bench(output: str | os.PathLike, baseline: str | os.PathLike, *, prompt_tokens: int = 256,
          decode_tokens: int = 32, runs: int = 3, threads: int | None = None) -> dict:
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
            samples[name].append(_measure(folder, prompt_tokens, decode_tokens, threads))
    result = {"model": str(output), "baseline": str(baseline), "prompt_tokens": prompt_tokens,
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
    embedding table that is only gathered is not read. Bytes come from the dense IR.
    """
    per_matmul = _weight_bytes(baseline)
    skipped = sum(per_matmul.get(l["node"], 0) * l["target_sparsity"] for l in plan["layers"])
    return skipped / sum(per_matmul.values())


def _weight_bytes(baseline: Path) -> dict[str, int]:
    if (baseline / "model.onnx").is_file():
        from .calibration.onnx_backend import matmul_weight_bytes

        return matmul_weight_bytes(baseline / "model.onnx")
    import openvino as ov

    from .calibration.openvino_backend import weight_constants

    per_matmul = {}
    for op in ov.Core().read_model(baseline / "openvino_model.xml").get_ordered_ops():
        constants = weight_constants(op) if op.get_type_name() == "MatMul" else "not a MatMul"
        if not isinstance(constants, str):  # attention's activation MatMuls have no constant weight
            per_matmul[op.get_friendly_name()] = sum(c.get_byte_size() for c in constants)
    return per_matmul


def _measure(folder: Path, prompt_tokens: int, decode_tokens: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "actsparse.benchmark", str(folder), str(prompt_tokens), str(decode_tokens),
           str(threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise ActSparseError(f"benchmark of {folder} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def greedy_steps(compiled, request, ids, steps: int) -> list[float]:
    """``steps`` greedy one-token decode steps on an OpenVINO request that has just taken the prompt ``ids``
    (``[1, seq]``); the seconds each took."""
    from .calibration.openvino_backend import feed

    names = [i.get_any_name() for i in compiled.inputs]
    token, times = ids[:, -1:], []
    for pos in range(ids.shape[1], ids.shape[1] + steps):
        inputs = {**feed(names, token), "position_ids": np.array([[pos]], np.int64),
                  "attention_mask": np.ones((1, pos + 1), np.int64)}
        start = time.perf_counter()
        logits = request.infer(inputs)[compiled.output("logits")]
        times.append(time.perf_counter() - start)
        token = logits[:, -1:].argmax(-1).astype(np.int64)
    return times


def _worker(folder: Path, prompt_tokens: int, decode_tokens: int, threads: int) -> dict:
    if (folder / "model.onnx").is_file():
        import onnx

        from .calibration.onnx_backend import time_decode

        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        # ORT's defaults: int8 weights (behind DequantizeLinear, which MatMulNBits absorbs) meet int8 activations
        int8 = any(node.op_type == "DequantizeLinear" for node in graph.node)
        return {**time_decode(folder, prompt_tokens, decode_tokens, threads or None),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "inference_precision": "f32, int8 activations at int8 weights" if int8 else "f32"}
    import openvino as ov

    from .calibration.openvino_backend import feed
    from .runtime_ext import compile_model, read_model

    core = ov.Core()
    compiled = compile_model(core, read_model(core, folder / "openvino_model.xml"), "CPU",
                             {"INFERENCE_NUM_THREADS": threads} if threads else {})
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    vocab = compiled.output("logits").get_partial_shape()[-1].get_length()
    ids = np.random.default_rng(0).integers(0, vocab, (1, prompt_tokens))
    prefill, steps = [], []
    for rep in range(3):  # the first repetition warms up
        request.reset_state()
        start = time.perf_counter()
        request.infer(feed(names, ids))
        prefill.append(time.perf_counter() - start)
        decode = greedy_steps(compiled, request, ids, decode_tokens)
        if rep:
            steps += decode
    return {"prefill_ms": 1e3 * float(np.median(prefill[1:])), "decode_ms_per_token": 1e3 * float(np.median(steps)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            # the plugin's choice for this CPU: f32, or bf16 where it has AVX512-BF16/AMX (weights rounded too)
            "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string()}


if __name__ == "__main__":
    folder, prompt, decode, threads = sys.argv[1:5]
    try:
        print(json.dumps(_worker(Path(folder), int(prompt), int(decode), int(threads))))
    except ActSparseError as err:  # one line for the parent to relay, not a traceback
        sys.exit(str(err))
