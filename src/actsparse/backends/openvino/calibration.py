"""Calibration on OpenVINO: find target MatMuls in an ``ov.Model`` and probe their inputs."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import openvino as ov
from openvino import opset13 as ops
from tqdm.auto import tqdm

from ..._common import ActSparseError
from ...calibration.stats import SAMPLE_ROWS, RowSampler, StreamingHistogram
from ...calibration.targets import Group, Target, group_targets, kind_of
from .graph import EXACT_CONFIG, tensor_name, tensors_by_name, weight_refusal, weight_shape
from .passes import insert_mask, weight_rowsums
from .runtime import feed, run_chunks

log = logging.getLogger("actsparse")

# Node names from OpenVINO's PyTorch frontend: "__module.model.layers.0.mlp.down_proj/aten::linear/MatMul", or
# ".../ov_ext::linear/MatMul" where a 16-bit checkpoint is traced with its 16-bit weights.
_MODULE_RE = re.compile(r"^__module\.(?P<module>[\w.]+?)/(?:aten::(?:linear|addmm|matmul|mm)|ov_ext::linear)/MatMul")


def find_groups(model: ov.Model, kinds: set[str]) -> list[Group]:
    """Target MatMuls of ``model`` whose sparsity kind is in ``kinds``, grouped by input tensor."""
    found = []
    for op in model.get_ordered_ops():
        match = _MODULE_RE.match(op.get_friendly_name()) if op.get_type_name() == "MatMul" else None
        kind = kind_of(match["module"]) if match else None
        if kind is None:
            continue
        reason = weight_refusal(op) or (None if not op.get_attributes()["transpose_a"] else "input is transposed")
        if reason:
            log.warning("not pruning %s: %s", match["module"], reason)
            continue
        k, n = weight_shape(op)
        found.append((tensor_name(op.input_value(0)), Target(match["module"], op.get_friendly_name(), kind, k, n)))
    return group_targets(found, kinds)


def cats_sources(model: ov.Model, groups: list[Group]) -> dict[str, str]:
    """For CATS: the SiLU(gate) tensor whose magnitude masks each down-projection group's input.

    The down input of a SiLU-gated MLP is ``Multiply(Swish(gate), up)``; anything else (a GELU
    MLP, say) is refused.
    """
    by_name = tensors_by_name(model)
    sources = {}
    for group in groups:
        if group.sparsity_kind != "down":
            continue
        product = by_name[group.name].get_node()
        swish = [v for v in product.input_values() if v.get_node().get_type_name() == "Swish"]
        if product.get_type_name() != "Multiply" or len(swish) != 1:
            raise ActSparseError(f"--method cats needs a SiLU-gated MLP (down_proj input = SiLU(gate)·up); "
                                 f"the input of {group.targets[0].module} is computed by "
                                 f"{product.get_type_name()}")
        sources[group.name] = tensor_name(swish[0])
    return sources


def collect_statistics(model: ov.Model | str | Path, groups: list[Group], chunks: np.ndarray,
                       core: ov.Core | None = None, sample_rows: int = SAMPLE_ROWS
                       ) -> tuple[dict[str, StreamingHistogram], dict[str, np.ndarray]]:
    """Stream every group's input tensor over ``chunks`` into one histogram per group, and keep
    ``sample_rows`` token rows of it (``[rows, K]``) for output-error estimates.

    The probes are extra outputs of the exported graph itself; a given ``model`` is modified.
    """
    core = core or ov.Core()
    model = model if isinstance(model, ov.Model) else core.read_model(model)
    by_name = tensors_by_name(model)
    first = len(model.outputs)
    model.add_outputs([by_name[g.name] for g in groups])
    compiled = core.compile_model(model, "CPU", EXACT_CONFIG)
    histograms = {g.name: StreamingHistogram() for g in groups}
    sampler = RowSampler(sample_rows, len(chunks))
    for _, request in run_chunks(compiled, chunks, "calibrating"):
        for i, group in enumerate(groups):
            x = request.get_output_tensor(first + i).data
            histograms[group.name].update(x)
            sampler.update(group.name, x)
    return histograms, sampler.samples()


def dense_weight(model: ov.Model, target: Target) -> np.ndarray:
    """The target MatMul's weight as f32 ``[K, N]``, decompressed (for output-error estimates)."""
    node = next(op for op in model.get_ordered_ops() if op.get_friendly_name() == target.node)
    weight = next(o for o in node.input_value(1).get_node().outputs())
    const = ov.Model([ops.result(weight)], [], "weight")  # the decompression subgraph alone
    value = ov.Core().compile_model(const, "CPU", EXACT_CONFIG)({})[0]
    return np.ascontiguousarray(value.T if node.get_attributes()["transpose_b"] else value, np.float32)


def model_error_curves(path: str | Path, groups: list[Group], chunks: np.ndarray, settings, grid: np.ndarray,
                       sources: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """The model's own output error when one group alone is pruned, at each sparsity of ``grid``.

    ``settings(group, s) -> (m, τ)``. Each group's m and τ become inputs of one compiled graph
    (τ < 0 keeps every channel), so the whole table costs one compilation and
    ``len(groups) · len(grid) · len(chunks)`` inferences. The error is the KL divergence of the
    next-token distribution from the dense one (decoders), or 1 − cosine of the mean-pooled
    embeddings (encoders), averaged over ``chunks``.
    """
    sources = sources or {}
    core = ov.Core()
    model = core.read_model(path)
    by_name, nodes = tensors_by_name(model), {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    matmuls = [nodes[t.node] for g in groups for t in g.targets]
    rowsums = dict(zip((id(mm) for mm in matmuls), weight_rowsums(matmuls)))
    knobs = []
    for i, group in enumerate(groups):
        m, tau = (ops.parameter([], ov.Type.f32, name=f"actsparse_{name}_{i}") for name in ("m", "tau"))
        for knob in (m, tau):
            knob.output(0).get_tensor().set_names({knob.get_friendly_name()})
        group_matmuls = [nodes[t.node] for t in group.targets]
        bias = {id(mm): ops.multiply(m, ops.constant(rowsums[id(mm)].astype(np.float32))) for mm in group_matmuls}
        insert_mask(by_name[group.name], group_matmuls, m, tau, bias, by_name.get(sources.get(group.name)),
                    name=f"actsparse.probe{i}")
        knobs.append((m, tau))
    model.add_parameters([p for pair in knobs for p in pair])
    model.validate_nodes_and_infer_types()
    compiled = core.compile_model(model, "CPU", EXACT_CONFIG)
    decoder = any("logits" in o.get_names() for o in compiled.outputs)
    output = compiled.output("logits" if decoder else "last_hidden_state")
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs if not i.get_any_name().startswith("actsparse_")]
    knob_values = {f"actsparse_{n}_{i}": np.float32(0 if n == "m" else -1) for i in range(len(groups)) for n in ("m", "tau")}

    def outputs() -> list[np.ndarray]:
        result = []
        for row in chunks:
            request.reset_state()
            y = request.infer({**feed(names, row[None]), **knob_values})[output][0]
            if decoder:  # log-probabilities (f32: a probe's KL is far above its rounding, ~1e-8)
                y = y - y.max(axis=-1, keepdims=True)
                y = y - np.log(np.exp(y).sum(axis=-1, keepdims=True))
            else:
                y = y.mean(axis=0, dtype=np.float64)
            result.append(y)
        return result

    dense = outputs()
    # KL(dense ‖ pruned) per token = Σ p·log p − Σ p·log q: the first term and p are computed once
    probs = [np.exp(d) for d in dense] if decoder else []
    entropy = [np.einsum("ij,ij->i", p, d, dtype=np.float64) for p, d in zip(probs, dense)]

    def distance(i: int, y: np.ndarray) -> float:
        if decoder:  # mean over tokens
            return float(np.mean(entropy[i] - np.einsum("ij,ij->i", probs[i], y, dtype=np.float64)))
        return float(1 - dense[i] @ y / (np.linalg.norm(dense[i]) * np.linalg.norm(y)))

    curves = {}
    with tqdm(total=len(groups) * len(grid), desc="model error", unit="probe", leave=False) as bar:
        for i, group in enumerate(groups):
            curve = np.zeros(len(grid))
            for j, s in enumerate(grid):
                if s > 0:
                    m, tau = settings(group, float(s))
                    knob_values.update({f"actsparse_m_{i}": np.float32(m), f"actsparse_tau_{i}": np.float32(tau)})
                    curve[j] = np.mean([distance(k, y) for k, y in enumerate(outputs())])
                bar.update()
            knob_values.update({f"actsparse_m_{i}": np.float32(0), f"actsparse_tau_{i}": np.float32(-1)})
            curves[group.name] = curve
    return curves
