"""One decode step of a model's MLP layers, the CPU plugin's FullyConnected against our op: what ``actsparse demo``
measures to choose a weight format and sparsity, and the layer models of ``benchmarks/kernel_bench.py``.

The layers stand side by side on random weights and inputs (the shapes and the weight format set the speed, the
values do not), each behind its own Multiply so that each is a group of its own, and one call runs them all, as
one call per token runs a model's. Run as ``python -m actsparse.backends.openvino.probe SPEC`` (SPEC: the JSON
arguments of :func:`mlp_speeds`), it prints the result as JSON: the demo times it in a process of its own.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from ...runtime_ext import register
from .calibration import find_groups
from .fuse import fuse, materialize
from .passes import apply_plan
from .runtime import prepare


def dense_model(shapes: list[tuple[int, int]], fmt: str, rng, group_size: int = 128) -> ov.Model:
    """One MatMul per ``(K, N)`` of ``shapes`` on the input of its K, weights compressed as the export compresses
    them (fp16 constant, NNCF int8 asym per channel, NNCF int4 asym in groups of ``group_size``)."""
    inputs = {k: ops.parameter([-1, -1, k], np.float32, name=f"x{k}") for k in dict.fromkeys(k for k, _ in shapes)}
    outputs = []
    for i, (k, n) in enumerate(shapes):
        h = ops.multiply(inputs[k], np.float32(1.0), name=f"__module.model.layers.{i}.mlp/aten::mul/Multiply")
        w = rng.standard_normal((n, k), np.float32) * 0.02
        weight = ops.convert(ops.constant(w.astype(np.float16)), "f32") if fmt == "fp16" else ops.constant(w)
        outputs.append(ops.matmul(h, weight, False, True, name=f"__module.model.layers.{i}.mlp.down_proj/aten::linear/MatMul"))
    model = ov.Model(outputs, list(inputs.values()))
    if fmt in ("int8", "int4"):
        import nncf  # only for these formats: it takes seconds to import

        nncf.set_log_level(logging.ERROR)  # its tables would go to stdout, which carries the JSON
        mode = nncf.CompressWeightsMode.INT8_ASYM if fmt == "int8" else nncf.CompressWeightsMode.INT4_ASYM
        with contextlib.redirect_stdout(sys.stderr):  # its progress bar too
            # all_layers: NNCF otherwise keeps the last MatMul of a model at int8
            model = nncf.compress_weights(model, mode=mode, **({"group_size": group_size, "ratio": 1.0,
                                                                "all_layers": True} if fmt == "int4" else {}))
    return model


def fused_model(model: ov.Model, taus: dict[int, float], core: ov.Core, fmt: str) -> ov.Model:
    """``model`` with every layer fused into ActSparseMatMul at mode 0, threshold ``taus[K]``."""
    model = model.clone()
    layers = [{"module": t.module, "node": t.node, "kind": t.kind, "group": g.name, "in_features": t.in_features,
               "out_features": t.out_features, "mode": 0.0, "threshold": taus[t.in_features], "target_sparsity": 0.5}
              for g in find_groups(model, {"down"}) for t in g.targets]
    plan = {"weight_format": fmt, "layers": layers}
    apply_plan(model, plan, "dense")
    assert fuse(model, plan)["fused"] == len(model.outputs) == len(layers)
    return materialize(model, core)


def fc_precision(compiled: ov.CompiledModel) -> str:
    """The runtime precision and primitive of the plugin's first FullyConnected in ``compiled``."""
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "FullyConnected":
            return f'{info["runtimePrecision"].astype(str)} ({info["primitiveType"].astype(str)})'
    return "no FullyConnected"


def mlp_speeds(hidden: int, intermediate: int, layers: int, formats: list[str], sparsities: list[list[float]],
               threads: int | None = None, group_size: int = 128, rounds: int = 5, calls: int = 4) -> dict:
    """Per weight format: ms of one decode step through ``layers`` MLPs (gate and up as one hidden x
    2·intermediate layer, down intermediate x hidden) as the plugin's FullyConnected (``dense_ms``) and as our
    op at s=0 and at each ``[up, down]`` sparsity of ``sparsities`` (``ours_ms``, keyed "up/down"), medians of
    ``rounds`` interleaved rounds of ``calls`` calls each. fp32 is compiled in f32; the others run under the
    plugin's default precision, as the exports do."""
    rng = np.random.default_rng(0)
    core = ov.Core()
    register(core)
    shapes = [(hidden, 2 * intermediate), (intermediate, hidden)] * layers
    xs = {k: rng.standard_normal((8, 1, 1, k)).astype(np.float32) for k in (hidden, intermediate)}
    settings = [[0.0, 0.0]] + [list(s) for s in sparsities]
    result = {}
    for fmt in formats:
        config = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": threads} if threads else {}),
                  **({"INFERENCE_PRECISION_HINT": "f32"} if fmt == "fp32" else {})}
        dense = dense_model(shapes, fmt, rng, group_size)
        models = [dense]
        for up, down in settings:
            taus = {hidden: float(np.quantile(np.abs(xs[hidden]), up)) if up else 0.0,
                    intermediate: float(np.quantile(np.abs(xs[intermediate]), down)) if down else 0.0}
            model = fused_model(dense, taus, core, fmt)
            prepare(core, model, "CPU", config)
            models.append(model)
        compiled = [core.compile_model(m, "CPU", config) for m in models]
        requests = [c.create_infer_request() for c in compiled]
        times = [[] for _ in requests]
        for r in range(rounds + 1):  # the first round warms up
            for request, samples in zip(requests, times):
                for i in range(calls):
                    feed = {0: xs[hidden][i % 8], 1: xs[intermediate][i % 8]}  # the parameters in shapes' order
                    start = time.perf_counter()
                    request.infer(feed)
                    if r:
                        samples.append(time.perf_counter() - start)
        dense_ms, *ours = (1e3 * float(np.median(t)) for t in times)
        result[fmt] = {"dense_ms": dense_ms, "fc_precision": fc_precision(compiled[0]),
                       "ours_ms": {f"{up:g}/{down:g}": ms for (up, down), ms in zip(settings, ours)}}
    return result


if __name__ == "__main__":
    print(json.dumps(mlp_speeds(**json.loads(sys.argv[1]))))
