"""Corrupted fused models: each must end in one clean exception, the same one-line message from ONNX Runtime and
OpenVINO, never a crash by signal, a hang or a read out of bounds (the ASan run in .ci/run checks that last).

Every case runs in its own process with a timeout, so a crash fails its test instead of killing pytest. A model
is one ActSparseMatMul node, written as ONNX (run by ONNX Runtime, and by OpenVINO through its ONNX frontend) and
as OpenVINO IR (XML written here, so every attribute and constant can be corrupted as a file on disk could be).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actsparse import ActSparseError, runtime_ext
from actsparse.runtime_ext import kernels as ks
from conftest import skip_without_extension
from reference import make_weight

try:
    LIB_DIR = Path(runtime_ext.openvino_extension()).parent
    assert Path(runtime_ext.onnxruntime_library()).parent == LIB_DIR  # the worker takes one folder
except ActSparseError as err:
    skip_without_extension(str(err))

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

K, N = 64, 40
TIMEOUT_S = 120
# Under AddressSanitizer (.ci/run) OpenVINO cannot compile a model: its TBB opens libtbbbind with RTLD_DEEPBIND,
# which the sanitizer refuses. Reading a model (where every corrupted one here is refused) still works.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")

# Runs one model in one runtime per argument ("ort:FILE", "ov:FILE"), printing a JSON line per run: the error's
# text, or the outputs for a decode and a prefill input.
WORKER = r"""
import json, sys
import numpy as np
lib_dir, K = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
xs = [rng.standard_normal((1, t, K)).astype(np.float32) for t in (1, 5)]

def ort_run(path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # each tensor its own allocation, so AddressSanitizer sees its ends
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # f32 activations
    options.register_custom_ops_library(lib_dir + "/libactsparse_onnxruntime.so")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [session.run(None, {"x": x})[0] for x in xs]

def ov_run(path):
    import ctypes
    import openvino as ov
    ctypes.CDLL(lib_dir + "/libactsparse_openvino.so")  # held open past the Core (see runtime_ext.register)
    core = ov.Core()
    core.add_extension(lib_dir + "/libactsparse_openvino.so")
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0", "INFERENCE_NUM_THREADS": "1"})
    request = compiled.create_infer_request()
    return [np.array(request.infer({0: x})[compiled.output(0)]) for x in xs]

for arg in sys.argv[3:]:
    runtime, path = arg.split(":", 1)
    try:
        ys = (ort_run if runtime == "ort" else ov_run)(path)
        out = {"y": [y.tolist() for y in ys]}
    except Exception as err:
        out = {"error": str(err)}
    print(json.dumps({"run": arg, **out}), flush=True)
"""


def base(fmt: str, G: int = 0, bias: bool = True, seed: int = 0) -> dict:
    """A valid one-node model's parts: attributes, weight and params arrays, x's last dimension, and the packed
    weight and bias for the numpy reference."""
    rng = np.random.default_rng(seed)
    packed = make_weight(fmt, K, N, G, rng, 128)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    weight = packed.data.view(np.uint8) if fmt in ("f16", "bf16") else packed.data
    params = [p.reshape(-1).astype(np.float32) for p in (b, packed.scale, packed.zero_point) if p is not None]
    attrs = {"weight_format": fmt, "out_features": N, "group_size": packed.group_size, "mode": 0.1,
             "threshold": 0.5, "prefill": "sparse", "has_bias": int(bias), "tile_cols": 128}
    return {"attrs": attrs, "weight": weight, "params": np.concatenate(params) if params else np.zeros(0, np.float32),
            "K": K, "packed": packed, "bias": b}


def compact_u4(parts: dict) -> dict:
    """The u4 params as the compact bytes [bias f32 | scale f16 | zero point u8] (OpenVINO IR only)."""
    p = parts["packed"]
    scale, zp = ks.compact_u4_params(p.scale, p.zero_point)
    parts["params"] = np.concatenate([parts["bias"].view(np.uint8), scale.ravel().view(np.uint8), zp.ravel()])
    return parts


def write_onnx(parts: dict, path) -> None:
    node = helper.make_node("ActSparseMatMul", ["x", "weight", "params"], ["y"], domain="ai.actsparse",
                            **parts["attrs"])
    graph = helper.make_graph(
        [node], "corrupt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", parts["K"]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(parts["weight"], "weight"), numpy_helper.from_array(parts["params"], "params")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.actsparse", 1)])
    path.write_bytes(model.SerializeToString())


IR_TYPES = {np.dtype(np.float32): ("f32", "FP32"), np.dtype(np.uint8): ("u8", "U8"), np.dtype(np.int64): ("i64", "I64")}


def write_ir(parts: dict, path, const_sizes: dict | None = None) -> None:
    """OpenVINO IR v11 of the node. const_sizes overrides a constant's byte size in the XML (a truncated .bin)."""
    def dims(shape):
        return "".join(f"<dim>{d}</dim>" for d in shape)

    def port(pid, shape, precision="FP32"):
        return f'<port id="{pid}" precision="{precision}">{dims(shape)}</port>'

    blob, layers = b"", []
    x_shape = [-1, -1, parts["K"]]
    layers.append(f'<layer id="0" name="x" type="Parameter" version="opset1"><data shape="?,?,{parts["K"]}" '
                  f'element_type="f32"/><output>{port(0, x_shape)}</output></layer>')
    inputs = [port(0, x_shape)]
    for lid, name in ((1, "weight"), (2, "params")):
        a = np.ascontiguousarray(parts[name])
        etype, precision = IR_TYPES[a.dtype]
        size = (const_sizes or {}).get(name, a.nbytes)
        layers.append(f'<layer id="{lid}" name="{name}" type="Const" version="opset1"><data element_type="{etype}" '
                      f'shape="{",".join(map(str, a.shape))}" offset="{len(blob)}" size="{size}"/>'
                      f'<output>{port(0, a.shape, precision)}</output></layer>')
        inputs.append(port(lid, a.shape, precision))
        blob += a.tobytes()
    attrs = " ".join(f'{k}="{str(v).lower() if isinstance(v, bool) else v}"' for k, v in parts["attrs"].items())
    attrs = attrs.replace('has_bias="1"', 'has_bias="true"').replace('has_bias="0"', 'has_bias="false"')
    layers.append(f'<layer id="3" name="op" type="ActSparseMatMul" version="actsparse"><data {attrs}/>'
                  f'<input>{"".join(inputs)}</input><output>{port(3, [-1, -1, -1])}</output></layer>')
    layers.append(f'<layer id="4" name="y" type="Result" version="opset1"><input>{port(0, [-1, -1, -1])}</input></layer>')
    edges = "".join(f'<edge from-layer="{i}" from-port="0" to-layer="3" to-port="{i}"/>' for i in range(3))
    edges += '<edge from-layer="3" from-port="3" to-layer="4" to-port="0"/>'
    path.write_text(f'<?xml version="1.0"?><net name="corrupt" version="11"><layers>{"".join(layers)}</layers>'
                    f'<edges>{edges}</edges></net>')
    path.with_suffix(".bin").write_bytes(blob)


def run(tmp_path, parts: dict, runtimes=("ort", "ov-onnx", "ov-ir"), const_sizes=None) -> dict:
    """Each runtime's result for the model: {"error": text} or {"y": [decode y, prefill y]}."""
    args = []
    if "ort" in runtimes or "ov-onnx" in runtimes:
        write_onnx(parts, tmp_path / "model.onnx")
    if "ov-ir" in runtimes:
        write_ir(parts, tmp_path / "model.xml", const_sizes)
    files = {"ort": f"ort:{tmp_path}/model.onnx", "ov-onnx": f"ov:{tmp_path}/model.onnx", "ov-ir": f"ov:{tmp_path}/model.xml"}
    args = [files[r] for r in runtimes]
    try:
        proc = subprocess.run([sys.executable, "-c", WORKER, str(LIB_DIR), str(parts["K"]), *args],
                              capture_output=True, text=True, timeout=TIMEOUT_S, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: no result within {TIMEOUT_S} s")
    results = {json.loads(line)["run"]: json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")}
    if proc.returncode != 0 or len(results) != len(args):
        signal = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        pytest.fail(f"crashed ({signal}) after {list(results)}:\n{proc.stderr[-3000:]}")
    return {r: results[files[r]] for r in runtimes}


def contract_line(text: str) -> str | None:
    """The contract's one line within a runtime's error text."""
    m = re.search(r"ActSparseMatMul: [^\n]*", text)
    return m.group(0).strip() if m else None


def corrupt(fmt, G=0, bias=True, compact=False, **changes):
    """A base model with attributes (keys of base's attrs) or arrays (weight=fn, params=fn, K=int) changed."""
    def make():
        parts = base(fmt, G, bias)
        if compact:
            compact_u4(parts)
        for key, value in changes.items():
            if key in ("weight", "params"):
                parts[key] = value(parts[key])
            elif key == "K":
                parts["K"] = value
            else:
                parts["attrs"][key] = value
        return parts
    return make


# (model, expected contract line as a regex); the same line from every runtime
CASES = {
    "weight-cut-to-a-quarter-u4": (corrupt("u4", 32, weight=lambda w: w[: w.shape[0] // 4]),
                                   r"weight has 320 bytes, expected 1280 for K=64, N=40, weight_format u4"),
    "weight-one-element-short-f32": (corrupt("f32", weight=lambda w: w.ravel()[:-1]), r"weight has 10236 bytes, expected 10240"),
    "weight-longer-u8": (corrupt("u8", K, weight=lambda w: np.concatenate([w.ravel(), w.ravel()[:7]])),
                         r"weight has 2567 bytes, expected 2560"),
    "weight-one-byte-f16": (corrupt("f16", weight=lambda w: w.ravel()[:1]), r"weight has 1 bytes, expected 5120"),
    "weight-f32-for-f16-bytes": (corrupt("f16", weight=lambda w: w.view(np.float32)),
                                 r"weight of weight_format f16 must be u8, got f32"),
    "weight-u8-for-f32": (corrupt("f32", weight=lambda w: w.view(np.uint8)), r"weight of weight_format f32 must be f32, got u8"),
    "params-one-short-u8": (corrupt("u8", K, params=lambda p: p[:-1]), r"params has 476 bytes, expected 480"),
    "params-one-value-u4": (corrupt("u4", 32, params=lambda p: p[:1]), r"params has 4 bytes, expected 800"),
    "params-longer-f32": (corrupt("f32", params=lambda p: np.concatenate([p, p])), r"params has 320 bytes, expected 160"),
    "has-bias-without-bias-u8": (corrupt("u8", K, bias=False, has_bias=1), r"params has 320 bytes, expected 480"),
    "group-size-0-u4": (corrupt("u4", 32, group_size=0), r"group_size must be >= 1 for weight_format u4, got 0"),
    "group-size-minus-1-u4": (corrupt("u4", 32, group_size=-1), r"group_size must be >= 1 for weight_format u4, got -1"),
    "group-size-not-dividing-K-u4": (corrupt("u4", 32, group_size=24), r"group_size 24 does not divide K=64"),
    "group-size-huge-u4": (corrupt("u4", 32, group_size=2**40), r"group_size 1099511627776 does not divide K=64"),
    "group-size-for-f32": (corrupt("f32", group_size=5), r"group_size must be 0 for weight_format f32, got 5"),
    "group-size-not-K-u8": (corrupt("u8", K, group_size=32), r"group_size must be 0 or K for weight_format u8, got 32"),
    "out-features-0": (corrupt("f32", out_features=0), r"out_features must be from 1 to 2147483647, got 0"),
    "out-features-negative": (corrupt("u8", K, out_features=-3), r"out_features must be from 1 to 2147483647, got -3"),
    "out-features-huge": (corrupt("u4", 32, out_features=2**40), r"out_features must be from 1 to 2147483647, got 1099511627776"),
    "out-features-one-more-f32": (corrupt("f32", out_features=N + 1), r"params has 160 bytes, expected 164 for N=41"),
    "out-features-one-less-u4": (corrupt("u4", 32, out_features=N - 1), r"weight has 1280 bytes, expected 1280|params has"),
    "x-narrower-than-weight-f16": (corrupt("f16", K=32), r"weight has 5120 bytes, expected 2560 for K=32, N=40"),
    "x-wider-than-weight-u4": (corrupt("u4", 32, K=128), r"params has 800 bytes, expected 1440 for N=40"),
    "threshold-nan": (corrupt("u4", 32, threshold=float("nan")), r"threshold must be finite or \+inf, got -?nan"),
    "threshold-minus-inf": (corrupt("f32", threshold=float("-inf")), r"threshold must be finite or \+inf, got -inf"),
    "mode-nan": (corrupt("u8", K, mode=float("nan")), r"mode must be finite, got -?nan"),
    "mode-inf": (corrupt("bf16", mode=float("inf")), r"mode must be finite, got inf"),
    "format-unknown": (corrupt("u8", K, weight_format="u2"), r"unknown weight_format 'u2' \(f32, f16, u8, u4 or bf16\)"),
    "format-empty": (corrupt("f32", weight_format=""), r"unknown weight_format ''"),
    "format-upper-case": (corrupt("f32", weight_format="F32"), r"unknown weight_format 'F32'"),
    "format-u8-for-u4-data": (corrupt("u4", 32, weight_format="u8"), r"params has 800 bytes, expected 480"),
    "format-f32-for-u8-data": (corrupt("u8", K, weight_format="f32", group_size=0, params=lambda p: p[:N]),
                                              r"weight of weight_format f32 must be f32, got u8"),
    "tile-cols-0": (corrupt("f32", tile_cols=0), r"tile_cols must be a power of two from 128 to 8192, got 0"),
    "tile-cols-not-power-of-two": (corrupt("u8", K, tile_cols=100), r"tile_cols must be a power of two from 128 to 8192, got 100"),
    "tile-cols-too-wide": (corrupt("u4", 32, tile_cols=16384), r"tile_cols must be a power of two from 128 to 8192, got 16384"),
    "tile-cols-negative": (corrupt("f16", tile_cols=-128), r"tile_cols must be a power of two from 128 to 8192, got -128"),
    "tile-cols-huge": (corrupt("bf16", tile_cols=2**62), r"tile_cols must be a power of two from 128 to 8192, got 4611686018427387904"),
    "prefill-unknown": (corrupt("f32", prefill="maybe"), r"prefill must be dense or sparse, got 'maybe'"),
}
# out_features N - 1 for u4 keeps ceil(N/2) weight bytes per row, so params are what disagree
CASES["out-features-one-less-u4"] = (CASES["out-features-one-less-u4"][0], r"params has 800 bytes, expected 780")


@pytest.mark.parametrize("case", list(CASES))
def test_both_runtimes_refuse_with_the_same_line(tmp_path, case):
    make, expect = CASES[case]
    results = run(tmp_path, make())
    lines = {}
    for runtime, result in results.items():
        assert "error" in result, f"{runtime} ran the corrupted model ({case}) without a word"
        lines[runtime] = contract_line(result["error"])
        assert lines[runtime] is not None, f"{runtime}: no contract line in {result['error']!r}"
        assert re.search(expect, lines[runtime]), f"{runtime}: {lines[runtime]!r} does not say {expect!r}"
    assert len(set(lines.values())) == 1, f"the runtimes differ: {lines}"


# OpenVINO IR only: compact u4 params (u8 bytes) and constants cut short on disk
IR_CASES = {
    "compact-params-one-byte-short": (corrupt("u4", 32, compact=True, params=lambda p: p[:-1]),
                                      r"params has 399 bytes, expected 400 .*\(compact\)"),
    "compact-params-for-f16": (corrupt("f16", params=lambda p: p.view(np.uint8)),
                               r"params must be f32 for weight_format f16, got u8"),
    "params-i64": (corrupt("f32", params=lambda p: p.astype(np.int64)),
                   r"params must be f32 for weight_format f32, got another type"),
}


@pytest.mark.parametrize("case", list(IR_CASES))
def test_openvino_ir_refuses(tmp_path, case):
    make, expect = IR_CASES[case]
    result = run(tmp_path, make(), ("ov-ir",))["ov-ir"]
    assert "error" in result, f"OpenVINO ran the corrupted IR ({case}) without a word"
    assert re.search(expect, contract_line(result["error"]) or ""), result["error"]


@pytest.mark.parametrize("name", ["weight", "params"])
def test_openvino_ir_with_a_truncated_bin_is_refused(tmp_path, name):
    """A constant whose declared size is larger than the .bin holds: OpenVINO's reader refuses it."""
    parts = base("u4", 32)
    result = run(tmp_path, parts, ("ov-ir",), {name: 1 << 30})["ov-ir"]
    assert "error" in result, "OpenVINO read past the end of the .bin without a word"


def reference(parts: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy: the masked product plus bias, and the sum of |terms| (the scale of rounding errors)."""
    mode, tau = parts["attrs"]["mode"], parts["attrs"]["threshold"]
    z = x.astype(np.float64) - np.float32(mode)
    z = np.where(~(np.abs(z) <= tau), z, 0.0)
    w = ks.dequantize(parts["packed"]).astype(np.float64)
    return z @ w + parts["bias"], np.abs(z) @ np.abs(w) + np.abs(parts["bias"])


@pytest.mark.parametrize("fmt,G,compact", [("f32", 0, False), ("f16", 0, False), ("bf16", 0, False), ("u8", K, False),
                                           ("u4", 32, False), ("u4", 32, True)])
def test_the_uncorrupted_models_run_and_match_numpy(tmp_path, fmt, G, compact):
    """The harness's control: the same models before corruption run in every runtime and compute the method."""
    parts = corrupt(fmt, G, compact=compact)()
    runtimes = ("ov-ir",) if compact else ("ort", "ov-onnx", "ov-ir")
    if UNDER_ASAN:
        runtimes = tuple(r for r in runtimes if r == "ort")
        if not runtimes:
            pytest.skip("OpenVINO cannot compile a model under AddressSanitizer (RTLD_DEEPBIND)")
    rng = np.random.default_rng(0)  # the worker's inputs
    xs = [rng.standard_normal((1, t, K)).astype(np.float32) for t in (1, 5)]
    for runtime, result in run(tmp_path, parts, runtimes).items():
        assert "y" in result, f"{runtime}: {result.get('error')}"
        for x, y in zip(xs, result["y"]):
            ref, scale = reference(parts, x)
            err = np.abs(np.asarray(y) - ref)
            assert np.all(err <= 1e-2 * scale + 1e-5), f"{runtime} {fmt} x{x.shape}: max err {err.max():.3g}"
