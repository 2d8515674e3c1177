"""``actsparse.export``: export, calibrate, plan and rewrite, written atomically into OUTPUT."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from ._common import ActSparseError, atomic_output_dir
from .calibration.plan import CENTERING, METHODS, build_plan, check_sparsity, read_plan, write_plan
from .calibration.targets import SPARSITY_KIND, SPARSITY_KINDS, TARGET_KINDS
from .exports.openvino import IR_NAME, WEIGHT_FORMATS

log = logging.getLogger("actsparse")
FORMATS = ("openvino",)


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
                     prefill: str, calibration_samples: int, calibration_seq_len: int) -> None:
    for value, known, what in ((format, FORMATS, "format"), (weight_format, WEIGHT_FORMATS, "weight format"),
                               (targets, tuple(TARGET_KINDS), "targets"), (method, METHODS, "method"),
                               (mode_centering, CENTERING, "mode centering"), (prefill, ("dense", "sparse"), "prefill")):
        if value not in known:
            raise ActSparseError(f"unknown {what} {value!r} (known: {', '.join(known)})")
    if calibration_samples < 1 or calibration_seq_len < 2:
        raise ActSparseError("calibration needs at least 1 sample of at least 2 tokens")


def export(model: str, output: str | os.PathLike, *, format: str = "openvino", weight_format: str = "fp32",
           sparsity: dict[str, float] | None = None, targets: str = "mlp", method: str = "scap",
           mode_centering: str = "auto", calibration: str = "builtin:wiki", calibration_samples: int = 64,
           calibration_seq_len: int = 256, plan: str | os.PathLike | None = None, prefill: str = "dense",
           fuse: bool = True, force: bool = False) -> Path:
    """Export ``model`` with activation sparsity into ``output`` and return that folder.

    ``sparsity`` maps kinds (up, down, qkv, o) to target sparsities; a missing kind is 0.
    With ``plan``, thresholds are re-derived from the histograms saved beside that plan, at
    ``sparsity`` or, when none is given, at the plan's own sparsities.
    """
    import openvino as ov

    from .calibration.openvino_backend import collect_statistics, find_groups
    from .exports.models import resolve_model
    from .exports.openvino import export_openvino, save_ir_over
    from .passes.openvino import apply_plan
    from .passes.openvino_fuse import fuse as fuse_pattern
    from .runtime_ext import extension_problem

    validate_options(format=format, weight_format=weight_format, targets=targets, method=method,
                     mode_centering=mode_centering, prefill=prefill, calibration_samples=calibration_samples,
                     calibration_seq_len=calibration_seq_len)
    old_plan = read_plan(plan) if plan is not None else None
    if old_plan is not None and all(v is None for v in (sparsity or {}).values()):
        # no sparsity given: re-apply the plan's own, e.g. to export it in another weight format
        sparsity = {SPARSITY_KIND[l["kind"]]: l["target_sparsity"] for l in old_plan[0]["layers"]}
    sparsity = resolve_sparsity(**(sparsity or {}))
    output = Path(output)
    if output.exists() and not force:
        raise ActSparseError(f"output folder {output} already exists (use --force to overwrite)")
    hf_dir = resolve_model(model)
    needs_stats = any(sparsity[k] > 0 for k in TARGET_KINDS[targets])

    with atomic_output_dir(output, force) as tmp, tqdm(total=4, desc="export", unit="step") as steps:
        steps.set_postfix_str(f"optimum {weight_format}")
        ir = export_openvino(hf_dir, tmp, weight_format)
        steps.update()
        core = ov.Core()
        groups = find_groups(core.read_model(ir), TARGET_KINDS[targets])
        if not groups:
            raise ActSparseError(f"found no {targets} projections to prune in {model}")
        steps.set_postfix_str("calibration")
        calib_info = {}
        if old_plan is not None:
            histograms = _histograms_for(old_plan, groups, needs_stats)
            calib_info = old_plan[0].get("calibration", {})
        elif needs_stats:
            from transformers import AutoTokenizer

            from .calibration.text import read_documents, token_chunks

            docs = read_documents(calibration, "calibration")
            chunks = token_chunks(AutoTokenizer.from_pretrained(tmp), docs, calibration_samples, calibration_seq_len)
            if len(chunks) < calibration_samples:
                log.warning("calibration text gives %d samples of %d tokens, fewer than %d asked",
                            len(chunks), calibration_seq_len, calibration_samples)
            histograms = collect_statistics(core.read_model(ir), groups, chunks, core)
            calib_info = {"source": calibration, "samples": int(len(chunks)), "seq_len": calibration_seq_len}
        else:
            histograms = {}
        steps.update()

        steps.set_postfix_str("rewrite")
        new_plan = _plan(groups, histograms, sparsity, method=method, centering=mode_centering, targets=targets,
                         prefill=prefill, source_model=str(model), calibration=calib_info)
        ov_model = core.read_model(ir)
        counts = apply_plan(ov_model, new_plan, prefill)
        if fuse and counts["masks"]:
            problem = extension_problem()
            if problem:
                log.warning("writing the unfused reference pattern (runs on stock OpenVINO, not faster): %s", problem)
            else:
                counts.update(fuse_pattern(ov_model, new_plan))
        new_plan["weight_format"] = weight_format
        new_plan["passes"] = counts
        steps.update()

        steps.set_postfix_str("save")
        save_ir_over(ov_model, ir)
        write_plan(tmp, new_plan, histograms)
        steps.update()
    return output


def _plan(groups, histograms, sparsity, **kwargs) -> dict:
    if not histograms:  # dense export: record the layers, prune none
        from .calibration.stats import StreamingHistogram

        empty = {g.name: StreamingHistogram(bins=2) for g in groups}
        plan = build_plan(groups, empty, {}, **kwargs)
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
