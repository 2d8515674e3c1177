"""``actsparse.export``: export, calibrate, plan and rewrite, written atomically into OUTPUT."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

from tqdm.auto import tqdm

from ._common import ActSparseError, atomic_output_dir
from .calibration.plan import (ALLOCATIONS, CENTERING, METHODS, MODEL_CURVE, build_plan, check_sparsity, read_curves,
                               read_plan, write_plan)
from .calibration.stats import SAMPLE_ROWS
from .calibration.targets import SPARSITY_KIND, SPARSITY_KINDS, TARGET_KINDS
from .exports.openvino import WEIGHT_FORMATS

log = logging.getLogger("actsparse")
FORMATS = ("openvino", "onnx")


def resolve_sparsity(sparsity: float | None = None, **per_kind: float | None) -> dict[str, float]:
    """Per-kind sparsity: ``sparsity`` for every kind, overridden by ``up``/``down``/``qkv``/``o``."""
    unknown = set(per_kind) - set(SPARSITY_KINDS)
    if unknown:
        raise ActSparseError(f"unknown sparsity kind {sorted(unknown)[0]!r} (known: {', '.join(SPARSITY_KINDS)})")
    result = {kind: per_kind.get(kind) if per_kind.get(kind) is not None else (sparsity or 0.0)
              for kind in SPARSITY_KINDS}
    check_sparsity(result)
    return result


def validate_options(*, format: str, weight_format: str, targets: str, method: str, mode_centering: str,
                     prefill: str, calibration_samples: int, calibration_seq_len: int,
                     allocation: str = "uniform") -> None:
    for value, known, what in ((format, FORMATS, "format"), (weight_format, WEIGHT_FORMATS, "weight format"),
                               (targets, tuple(TARGET_KINDS), "targets"), (method, METHODS, "method"),
                               (allocation, ALLOCATIONS, "allocation"),
                               (mode_centering, CENTERING, "mode centering"), (prefill, ("dense", "sparse"), "prefill")):
        if value not in known:
            raise ActSparseError(f"unknown {what} {value!r} (known: {', '.join(known)})")
    if format == "onnx":  # before any work: the ONNX path knows fewer weight formats
        from .exports.onnx import check_weight_format

        check_weight_format(weight_format)
    if method == "cats" and (allocation != "uniform" or targets != "mlp"):
        raise ActSparseError("--method cats prunes the down projections only: use --allocation uniform --targets mlp")
    if calibration_samples < 1 or calibration_seq_len < 2:
        raise ActSparseError("calibration needs at least 1 sample of at least 2 tokens")


def export(model: str, output: str | os.PathLike, *, format: str = "openvino", weight_format: str = "fp32",
           sparsity: dict[str, float] | None = None, targets: str = "mlp", method: str = "scap",
           mode_centering: str = "auto", allocation: str = "uniform", calibration: str = "builtin:wiki",
           calibration_samples: int = 64, calibration_seq_len: int = 256, plan: str | os.PathLike | None = None,
           prefill: str = "dense", fuse: bool = True, force: bool = False) -> Path:
    """Export ``model`` with activation sparsity into ``output`` and return that folder.

    ``sparsity`` maps kinds (up, down, qkv, o) to target sparsities; a missing kind is 0. With
    ``allocation="greedy"`` they set a parameter-weighted budget that is spread by output error.
    With ``plan``, thresholds are re-derived from the statistics saved beside that plan, at
    ``sparsity`` or, when none is given, at the plan's own per-layer sparsities.
    """
    from .exports.models import resolve_model

    validate_options(format=format, weight_format=weight_format, targets=targets, method=method,
                     mode_centering=mode_centering, prefill=prefill, calibration_samples=calibration_samples,
                     calibration_seq_len=calibration_seq_len, allocation=allocation)
    old_plan = read_plan(plan) if plan is not None else None
    fixed = None
    if old_plan is not None and all(v is None for v in (sparsity or {}).values()):
        # no sparsity given: re-apply the plan's own, e.g. to export it in another weight format
        fixed = {l["module"]: l["target_sparsity"] for l in old_plan[0]["layers"]}
        allocation = old_plan[0].get("allocation", "uniform")
        sparsity = {}
        for layer in old_plan[0]["layers"]:
            kind = SPARSITY_KIND[layer["kind"]]
            sparsity[kind] = max(sparsity.get(kind, 0.0), layer["target_sparsity"])
    sparsity = resolve_sparsity(**(sparsity or {}))
    if old_plan is not None and (old_plan[0].get("method") == "cats") != (method == "cats"):
        raise ActSparseError(f"the --plan was calibrated for --method {old_plan[0].get('method')}, whose statistics "
                             f"do not serve --method {method}")
    if format == "openvino" and weight_format == "fp32" and fuse and any(sparsity.values()):
        from .exports.openvino import cpu_runs_bf16

        if cpu_runs_bf16():
            log.warning("OpenVINO runs fp32 models in bf16 on this CPU, so the dense model reads bf16 weights; "
                        "fused fp32 weights read twice as many bytes: --weight-format bf16 matches it")
    if method == "cats" and sparsity["up"] > 0:
        log.warning("--method cats prunes only the down projections; ignoring the up sparsity %s", sparsity["up"])
        sparsity["up"] = 0.0
    output = Path(output)
    if output.exists() and not force:
        raise ActSparseError(f"output folder {output} already exists (use --force to overwrite)")
    hf_dir = resolve_model(model)
    needs_stats = any(sparsity[k] > 0 for k in TARGET_KINDS[targets])

    backend = _backend(format)
    with atomic_output_dir(output, force) as tmp, tqdm(total=4, desc="export", unit="step") as steps:
        steps.set_postfix_str(f"optimum {weight_format}")
        path = backend.export(hf_dir, tmp, weight_format)
        steps.update()
        graph = backend.read(path)
        groups = backend.find_groups(graph, TARGET_KINDS[targets])
        if not groups:
            raise ActSparseError(f"found no {targets} projections to prune in {model}")
        sources = {}  # cats: down group -> the SiLU(gate) tensor that masks it
        if method == "cats":
            if not hasattr(backend, "cats_sources"):
                raise ActSparseError(f"--method cats is not available with --format {format}")
            sources = backend.cats_sources(graph, groups)
        del graph
        steps.set_postfix_str("calibration")
        calib_info, curves, model_curves = {}, {}, {}
        if old_plan is not None:
            histograms = _histograms_for(old_plan, groups, needs_stats)
            calib_info = old_plan[0].get("calibration", {})
            saved = read_curves(plan) if histograms else {}
            names = {l["module"]: l["group"] for l in old_plan[0]["layers"]}
            saved_model = read_curves(plan, MODEL_CURVE) if histograms else {}
            curves = {g.name: saved[names[g.targets[0].module]] for g in groups if names[g.targets[0].module] in saved}
            model_curves = {g.name: saved_model[names[g.targets[0].module]] for g in groups
                            if names[g.targets[0].module] in saved_model}
        elif needs_stats:
            from transformers import AutoTokenizer

            from .calibration.text import read_documents, token_chunks

            docs = read_documents(calibration, "calibration")
            chunks = token_chunks(AutoTokenizer.from_pretrained(tmp), docs, calibration_samples, calibration_seq_len)
            if len(chunks) < calibration_samples:
                log.warning("calibration text gives %d samples of %d tokens, fewer than %d asked",
                            len(chunks), calibration_seq_len, calibration_samples)
            centring = "off" if method in ("teal", "cats") else mode_centering
            histograms, curves, model_curves = _calibrate(backend, path, groups, chunks, sources,
                                                          centring if allocation == "greedy" else None)
            calib_info = {"source": calibration, "samples": int(len(chunks)), "seq_len": calibration_seq_len,
                          "error_rows": min(SAMPLE_ROWS, int(chunks.size))}
        else:
            histograms = {}
        steps.update()

        steps.set_postfix_str("rewrite")
        new_plan = _plan(groups, histograms, sparsity, method=method, centering=mode_centering, targets=targets,
                         prefill=prefill, source_model=str(model), calibration=calib_info, curves=curves,
                         allocation=allocation, fixed=fixed, mask_sources=sources, model_curves=model_curves)
        new_plan["weight_format"] = weight_format  # the fusion reads it (bf16: fused weights in bf16)
        model_graph = backend.read(path)
        counts = backend.apply_plan(model_graph, new_plan, prefill)
        if fuse and counts["masks"]:
            problem = backend.extension_problem()
            if problem:
                log.warning("writing the unfused reference pattern (runs on the stock runtime, not faster): %s",
                            problem)
            else:
                counts.update(backend.fuse(model_graph, new_plan))
        new_plan["passes"] = counts
        steps.update()

        steps.set_postfix_str("save")
        backend.save(model_graph, path)
        write_plan(tmp, new_plan, histograms, curves, model_curves)
        steps.update()
    return output


def _backend(format: str) -> SimpleNamespace:
    """The runtime-specific steps of an export; everything else in :func:`export` is shared.

    export(hf_dir, folder, weight_format) -> model path; read(path) -> graph;
    find_groups(graph, kinds) -> groups; collect_statistics(path, groups, chunks) -> (histograms, samples),
    samples being ``[rows, K]`` token rows of each group's input; dense_weight(graph, target) -> f32 [K, N];
    apply_plan(graph, plan, prefill) -> counts; extension_problem() -> reason or None;
    fuse(graph, plan) -> counts; save(graph, path).
    """
    if format == "openvino":
        import openvino as ov

        from .calibration import openvino_backend as cal
        from .exports.openvino import export_openvino, save_ir_over
        from .passes.openvino import apply_plan
        from .passes.openvino_fuse import fuse
        from .runtime_ext import extension_problem

        return SimpleNamespace(export=export_openvino, read=lambda path: ov.Core().read_model(path),
                               find_groups=cal.find_groups, collect_statistics=cal.collect_statistics,
                               dense_weight=cal.dense_weight, cats_sources=cal.cats_sources,
                               model_error_curves=cal.model_error_curves,
                               apply_plan=apply_plan, extension_problem=extension_problem, fuse=fuse,
                               save=save_ir_over)
    if format == "onnx":
        from .calibration import onnx_backend as cal
        from .exports.onnx import export_onnx, read_onnx, save_onnx
        from .passes.onnx import apply_plan, fuse
        from .runtime_ext import onnxruntime_problem

        return SimpleNamespace(export=export_onnx, read=read_onnx, find_groups=cal.find_groups,
                               collect_statistics=cal.collect_statistics, dense_weight=cal.dense_weight,
                               apply_plan=apply_plan, extension_problem=onnxruntime_problem, fuse=fuse,
                               save=save_onnx)
    raise ActSparseError(f"unknown format {format!r} (known: {', '.join(FORMATS)})")


def _calibrate(backend, path, groups, chunks, sources, model_error_for: str | None = None) -> tuple[dict, dict, dict]:
    """Histograms, layer output-error curves and (for greedy allocation, with centring
    ``model_error_for``) model output-error curves of every group (calibration.error).
    A group masked by another tensor (cats) gets that tensor's histogram."""
    import numpy as np

    from .calibration.error import error_curves
    from .calibration.targets import Group

    probes = groups + [Group(source) for source in sources.values()]
    raw, samples = backend.collect_statistics(path, probes, chunks)
    histograms = {g.name: raw[sources.get(g.name, g.name)] for g in groups}
    graph = backend.read(path)
    curves = {}
    for group in tqdm(groups, desc="layer error", unit="layer", leave=False):
        weight = np.concatenate([backend.dense_weight(graph, t) for t in group.targets], axis=1)
        source = sources.get(group.name)
        curves[group.name] = error_curves(histograms[group.name], samples[group.name], weight, centred=not source,
                                          mask_rows=samples[source] if source else None)
    model_curves = ({} if model_error_for is None else
                    _model_curves(backend, path, groups, chunks, sources, histograms, curves, model_error_for))
    return histograms, curves, model_curves


def _model_curves(backend, path, groups, chunks, sources, histograms, curves, centering: str) -> dict:
    """The model's output error with one group pruned at a time, along GRID (calibration.error),
    each group centred as ``centering`` decides; empty where the backend cannot probe the model."""
    import numpy as np

    from .calibration.error import GRID, MODEL_GRID, MODEL_PROBE
    from .calibration.plan import choose_mode

    if not hasattr(backend, "model_error_curves"):
        return {}

    def settings(group, s):
        hist = histograms[group.name]
        m = choose_mode(hist, s, centering, curves[group.name])
        return m, hist.threshold(m, s)

    samples, tokens = MODEL_PROBE
    coarse = backend.model_error_curves(path, groups, chunks[:samples, :tokens], settings, MODEL_GRID, sources)
    return {name: np.interp(GRID, MODEL_GRID, c) for name, c in coarse.items()}


def _plan(groups, histograms, sparsity, **kwargs) -> dict:
    if not histograms:  # dense export: record the layers, prune none
        from .calibration.stats import StreamingHistogram

        empty = {g.name: StreamingHistogram(bins=2) for g in groups}
        plan = build_plan(groups, empty, {}, **{**kwargs, "allocation": "uniform", "fixed": None})
        plan["statistics"] = None
        return plan
    return build_plan(groups, histograms, sparsity, **kwargs)


def _histograms_for(old_plan, groups, needs_stats):
    plan, histograms = old_plan
    if needs_stats and not histograms:
        raise ActSparseError("the --plan has no statistics (it is a dense export); calibrate instead")
    planned = {(l["module"], l["in_features"], l["out_features"]) for l in plan["layers"]}
    for group in groups:
        for t in group.targets:
            if (t.module, t.in_features, t.out_features) not in planned:
                raise ActSparseError(f"the --plan does not match this model: it has no layer {t.module} "
                                     f"of {t.in_features}x{t.out_features}")
    names = {l["module"]: l["group"] for l in plan["layers"]}
    return {g.name: histograms[names[g.targets[0].module]] for g in groups} if histograms else {}
