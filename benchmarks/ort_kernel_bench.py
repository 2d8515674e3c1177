"""ActSparseMatMul in ONNX Runtime against ORT's own dense ops on the same weights, in one process. Prints JSON.

For each shape (K x N), weight format and intra-op thread count: one decode step (x is [1, 1, K]) of
- ORT's dense baseline: fp32 -> MatMul with the [K, N] initializer; int8 -> com.microsoft::MatMulNBits
  bits=8 (block 128 with the per-channel scale repeated, so the weights are identical); int4 -> MatMulNBits
  bits=4 with the same block size as ours. MatMulNBits is timed at accuracy_level 4 (int8 activations, ORT's
  default and its fastest CPU path); at level 0 (fp32 activations, about 100x slower) it only checks the
  op's exact result, and
- the custom op (libactsparse_onnxruntime.so) at sparsity 0/0.3/0.5/0.7/0.9 (threshold = that quantile of |x|).
Each model holds L such layers side by side on the same x, each with its own weights, L chosen so that a call
reads at least --min-mb of weights (by default three times this CPU's last-level cache), so every layer's
weights come from DRAM, as in a real model's decode step, and the one Python call is spread over L layers; times
are per layer (call / L). --min-mb 0: one node per model.
Sessions are timed in interleaved rounds (the noise of a shared machine falls on all alike), with thread
spinning off in every session (several pools in one process would otherwise steal each other's cores); reports median
ms per call, dense/ours time ratio, the bandwidth limit 1/(1-s), and effective GB/s of weight codes read
((1-s) of them for ours; scales and zero points not counted).

    python benchmarks/ort_kernel_bench.py [--quick] [--shapes KxN ...] [--threads 1 2]
                                          [--formats fp32 int8 int4-g32 int4-g64 int4-g128]
                                          [--min-mb MB] [--rounds R] [--output FILE]
"""
from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from actsparse.backends.onnx import session_options
from actsparse.backends.onnx.runtime import EXACT_CONFIG
from actsparse.runtime_ext import kernels as ks

from _harness import (SPARSITIES, add_kernel_args, decode_inputs, emit, layers_for, parse_kernel_args, parser,
                      time_ms)

FORMATS = ["fp32", "int8", "int4-g32", "int4-g64", "int4-g128"]
INT8_BLOCK = 128  # divides every K above


def model(nodes: list, k: int, inits: dict, domain: str | None = None) -> bytes:
    """The nodes side by side on x: each writes one of the model's outputs."""
    outputs = [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None) for node in nodes]
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              outputs, [numpy_helper.from_array(v, name) for name, v in inits.items()])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def nibbles(a: np.ndarray) -> np.ndarray:
    """Pairs along the last axis into bytes, the first of each pair in the low nibble (MatMulNBits' order)."""
    if a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], 1), np.uint8)], axis=-1)
    return (a[..., 0::2] | (a[..., 1::2] << 4)).astype(np.uint8)


def weights(fmt: str, k: int, n: int, layers: int, rng):
    """Our packed weights (one per layer), and the dense baseline's models by name (same dequantised weights)."""
    if fmt == "fp32":
        ws = [rng.standard_normal((k, n), np.float32) * 0.02 for _ in range(layers)]
        nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(layers)]
        return [ks.pack_f32(w) for w in ws], {"MatMul": model(nodes, k, {f"w{i}": w for i, w in enumerate(ws)})}
    bits, block = (8, INT8_BLOCK) if fmt == "int8" else (4, int(fmt.split("-g")[1]))
    nb = k // block
    packed, inits = [], {}
    for i in range(layers):
        q = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
        if bits == 8:  # ours is per output channel: repeat its scale and zero point over the blocks
            scale, zp = rng.uniform(0.0005, 0.001, n).astype(np.float32), rng.integers(100, 156, n).astype(np.uint8)
            packed.append(ks.pack_u8(q, scale, zp))
            scales, zps = np.repeat(scale[:, None], nb, 1), np.repeat(zp[:, None], nb, 1)
            blob = q.T.reshape(n, nb, block)
        else:
            scale = rng.uniform(0.01, 0.03, (nb, n)).astype(np.float32)
            zp = rng.integers(6, 10, (nb, n)).astype(np.uint8)
            packed.append(ks.pack_u4(q, scale, zp, block))
            scales, zps = scale.T, nibbles(zp.T)
            blob = nibbles(q.T).reshape(n, nb, block // 2)
        inits.update({f"B{i}": np.ascontiguousarray(blob), f"scales{i}": np.ascontiguousarray(scales).reshape(-1),
                      f"zp{i}": np.ascontiguousarray(zps).reshape(-1)})
    dense = {}
    for level in (0, 4):
        nodes = [helper.make_node("MatMulNBits", ["x", f"B{i}", f"scales{i}", f"zp{i}"], [f"y{i}"], domain="com.microsoft",
                                  K=k, N=n, bits=bits, block_size=block, accuracy_level=level) for i in range(layers)]
        dense[f"MatMulNBits(bits={bits},block={block},acc={level})"] = model(nodes, k, inits, "com.microsoft")
    return packed, dense


def ours(packed: list[ks.PackedWeight], tau: float) -> bytes:
    nodes, inits = [], {}
    for i, p in enumerate(packed):
        data = p.data.view(np.uint8) if p.format == "f16" else p.data
        params = [v.reshape(-1) for v in (p.scale, p.zero_point) if v is not None]
        inits[f"weight{i}"] = data
        inits[f"params{i}"] = np.concatenate(params).astype(np.float32) if params else np.zeros(0, np.float32)
        nodes.append(helper.make_node("ActSparseMatMul", ["x", f"weight{i}", f"params{i}"], [f"y{i}"],
                                      domain="ai.actsparse", weight_format=p.format, out_features=p.N,
                                      group_size=p.group_size, mode=0.0, threshold=tau, prefill="dense", has_bias=0,
                                      tile_cols=p.tile_cols))
    return model(nodes, packed[0].K, inits, "ai.actsparse")


def main() -> None:
    p = parser(__doc__)
    add_kernel_args(p, FORMATS)
    args = parse_kernel_args(p)
    rng = np.random.default_rng(0)
    rows = []
    for k, n in args.shapes:
        xs = decode_inputs(rng, k)
        taus = [0.0 if s == 0 else float(np.quantile(np.abs(np.concatenate(xs)), s)) for s in SPARSITIES]
        for fmt in args.formats:
            bits = 32 if fmt == "fp32" else 8 if fmt == "int8" else 4
            layers = layers_for(args.min_mb, k * n * bits / 8)
            packed, dense = weights(fmt, k, n, layers, rng)
            code_bytes = k * packed[0].row_bytes
            # exact, but for u4 on a kernel that multiplies its f32 activations in bf16 (avx512bf16)
            exact_tol = 1e-2 if fmt.startswith("int4") and ks.best_kernel() == "avx512bf16" else 1e-4
            sparse_models = [ours(packed, tau) for tau in taus]
            for threads in args.threads:
                # Every session has its own intra-op pool; idle workers of the session timed
                # before would spin on the cores the next one needs (measured: 2x slower).
                quiet = {"session.intra_op.allow_spinning": "0"}
                plain = session_options(threads, quiet, library=False)
                sparse_options = [session_options(threads, quiet) for _ in sparse_models]
                dense_s = [ort.InferenceSession(m, plain, providers=["CPUExecutionProvider"]) for m in dense.values()]
                ours_s = [ort.InferenceSession(m, o, providers=["CPUExecutionProvider"])
                          for m, o in zip(sparse_models, sparse_options)]
                # same weights: at s=0 (no channel pruned) ours must match every dense baseline: exactly in f32
                # (EXACT_CONFIG), and as deployed (ORT's default: int8 activations with u8/u4, as MatMulNBits at
                # accuracy level 4) within the two quantisations' difference
                exact = ort.InferenceSession(sparse_models[0], session_options(threads, {**quiet, **EXACT_CONFIG}),
                                             providers=["CPUExecutionProvider"])
                y_exact, y0 = (s.run(None, {"x": xs[0]}) for s in (exact, ours_s[0]))
                agree = {}
                for name, s in zip(dense, dense_s):
                    quantised = "acc=4" in name
                    agree[name] = max(float(np.abs(a - b).max() / np.abs(a).max())
                                      for a, b in zip(s.run(None, {"x": xs[0]}), y0 if quantised else y_exact))
                    if agree[name] > (2e-2 if quantised else exact_tol):
                        sys.exit(f"{k}x{n} {fmt}: ours at s=0 differs from {name} by {agree[name]:.3g} (relative)")
                timed = [(name, s) for name, s in zip(dense, dense_s) if "acc=0" not in name]
                calls = [lambda i, session=session: session.run(None, {"x": xs[i % len(xs)]})
                         for session in [s for _, s in timed] + ours_s]
                ms = [t / layers for t in time_ms(calls, args.rounds)]
                dense_ms = {name: t for (name, _), t in zip(timed, ms)}
                row = {"K": k, "N": n, "format": fmt, "ours_weight_format": packed[0].format, "threads": threads,
                       "layers": layers,
                       "dense_ms": dense_ms, "dense_gbps": {d: code_bytes / t / 1e6 for d, t in dense_ms.items()},
                       "max_rel_diff_at_s0": agree, "sparse": []}
                for s, t in zip(SPARSITIES, ms[len(timed):]):
                    row["sparse"].append({"sparsity": s, "ms": t, "limit": 1 / (1 - s),
                                          "gbps": code_bytes * (1 - s) / t / 1e6,
                                          "dense_over_ours": {d: dt / t for d, dt in dense_ms.items()}})
                rows.append(row)
                first = next(iter(dense_ms))
                print(f"{k}x{n} {fmt} t{threads} x{layers}: " + " ".join(f"{d} {t:.2f} ms" for d, t in dense_ms.items()) + " | " +
                      " ".join(f"s{e['sparsity']}: {e['ms']:.2f} ({e['dense_over_ours'][first]:.2f}x)"
                               for e in row["sparse"]), file=sys.stderr)
    emit({"device": "CPU", "results": rows}, args)


if __name__ == "__main__":
    main()
