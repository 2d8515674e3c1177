"""``actsparse.export``: export, calibrate, plan and rewrite, written atomically into OUTPUT.

:func:`export` is the flow: :class:`ExportOptions` checks the options, then the backend exports the
model and the steps below run in order: :func:`find_targets`, :func:`calibrate`, :func:`make_plan`,
:func:`rewrite`, :func:`save`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ._common import ActSparseError, atomic_output_dir, check_free_space, recording_stages, stage
from .backends import FORMATS, WEIGHT_FORMATS, Backend, get_backend
from .calibration.error import (GREEDY_PROBES, GRID, MODEL_GRID, MODEL_PROBE, SCALED_PROBE_AT, error_curves,
                                scaled_curve)
from .calibration.plan import (ALLOCATIONS, CENTERING, METHODS, MODEL_CURVE, build_plan, check_sparsity,
                               choose_mode, layer_costs, read_curves, read_plan, write_plan)
from .calibration.stats import SAMPLE_ROWS, StreamingHistogram
from .calibration.targets import SPARSITY_KIND, SPARSITY_KINDS, TARGET_KINDS, Group
from .calibration.text import read_documents, token_chunks
from .exports.models import check_supported, loads_16bit, parameter_count, resolve_model

log = logging.getLogger("actsparse")
PREFILL = ("dense", "sparse")


@dataclass
class ExportOptions:
    """The options of :func:`export`, checked when made: the first bad one raises one :class:`ActSparseError`.

    ``sparsity`` maps kinds (up, down, qkv, o; ``sparsity`` for every kind) to target sparsities, and is
    then resolved to every kind (a missing one is 0). With ``allocation="greedy"`` they set a
    parameter-weighted budget that is spread by output error, the model's own probed by ``greedy_probe``
    (:func:`model_error_curves`). With ``plan``, the statistics saved beside
    that earlier plan are re-used, at ``sparsity`` or, when none is given, at the plan's own per-layer
    sparsities (``fixed``) and allocation.
    """

    format: str = "openvino"
    weight_format: str = "fp32"
    sparsity: dict[str, float | None] | None = None
    targets: str = "mlp"
    method: str = "scap"
    mode_centering: str = "auto"
    allocation: str = "uniform"
    greedy_probe: str = "scaled"
    calibration: str = "builtin:wiki"
    calibration_samples: int = 64
    calibration_seq_len: int = 256
    plan: str | os.PathLike | None = None
    prefill: str = "dense"
    fuse: bool = True
    force: bool = False
    previous: tuple[dict, dict[str, StreamingHistogram]] | None = field(default=None, init=False, repr=False)
    fixed: dict[str, float] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self._check_choices()
        if self.plan is not None:
            self.previous = read_plan(self.plan)
            self._reuse_plan()
        self.sparsity = resolve_sparsity(**(self.sparsity or {}))
        if self.method == "cats" and self.sparsity["up"] > 0:
            log.warning("--method cats prunes only the down projections; ignoring the up sparsity %s",
                        self.sparsity["up"])
            self.sparsity["up"] = 0.0

    def _check_choices(self) -> None:
        for value, known, what in ((self.format, tuple(FORMATS), "format"),
                                   (self.weight_format, WEIGHT_FORMATS, "weight format"),
                                   (self.targets, tuple(TARGET_KINDS), "targets"), (self.method, METHODS, "method"),
                                   (self.allocation, ALLOCATIONS, "allocation"),
                                   (self.greedy_probe, GREEDY_PROBES, "greedy probe"),
                                   (self.mode_centering, CENTERING, "mode centering"), (self.prefill, PREFILL, "prefill")):
            if value not in known:
                raise ActSparseError(f"unknown {what} {value!r} (known: {', '.join(known)})")
        FORMATS[self.format].check_weight_format(self.weight_format)  # before any work: ONNX knows fewer
        if self.method == "cats" and (self.allocation != "uniform" or self.targets != "mlp"):
            raise ActSparseError("--method cats prunes the down projections only: use --allocation uniform --targets mlp")
        if self.calibration_samples < 1 or self.calibration_seq_len < 2:
            raise ActSparseError("calibration needs at least 1 sample of at least 2 tokens")

    def _reuse_plan(self) -> None:
        plan = self.previous[0]
        if (plan.get("method") == "cats") != (self.method == "cats"):
            raise ActSparseError(f"the --plan was calibrated for --method {plan.get('method')}, whose statistics "
                                 f"do not serve --method {self.method}")
        if any(v is not None for v in (self.sparsity or {}).values()):
            return
        # no sparsity given: re-apply the plan's own, e.g. to export it in another weight format
        self.fixed = {l["module"]: l["target_sparsity"] for l in plan["layers"]}
        self.allocation = plan.get("allocation", "uniform")
        self.sparsity = {}
        for layer in plan["layers"]:
            kind = SPARSITY_KIND[layer["kind"]]
            self.sparsity[kind] = max(self.sparsity.get(kind, 0.0), layer["target_sparsity"])

    @property
    def kinds(self) -> set[str]:
        """The group kinds that ``targets`` prunes."""
        return TARGET_KINDS[self.targets]

    @property
    def needs_statistics(self) -> bool:
        return any(self.sparsity[k] > 0 for k in self.kinds)

    @property
    def centring(self) -> str:
        """The mode centring calibration estimates for (teal and cats never centre)."""
        return "off" if self.method in ("teal", "cats") else self.mode_centering


def resolve_sparsity(sparsity: float | None = None, **per_kind: float | None) -> dict[str, float]:
    """Per-kind sparsity: ``sparsity`` for every kind, overridden by ``up``/``down``/``qkv``/``o``."""
    unknown = set(per_kind) - set(SPARSITY_KINDS)
    if unknown:
        raise ActSparseError(f"unknown sparsity kind {sorted(unknown)[0]!r} (known: {', '.join(SPARSITY_KINDS)})")
    result = {kind: per_kind.get(kind) if per_kind.get(kind) is not None else (sparsity or 0.0)
              for kind in SPARSITY_KINDS}
    check_sparsity(result)
    return result


@dataclass
class Statistics:
    """What calibration measured, per group name: input histograms, layer and model output-error curves,
    and the plan's ``calibration`` record (source, samples, ...). Empty for a dense export."""

    histograms: dict[str, StreamingHistogram] = field(default_factory=dict)
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    model_curves: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def export(model: str, output: str | os.PathLike, **options) -> Path:
    """Export ``model`` with activation sparsity into ``output`` and return that folder.

    ``options`` are the fields of :class:`ExportOptions`. The folder appears only once complete;
    with ``force`` it replaces an existing one.
    """
    options = ExportOptions(**options)
    output = Path(output)
    if output.exists() and not options.force:
        raise ActSparseError(f"output folder {output} already exists (use --force to overwrite)")
    hf_dir = resolve_model(model)
    check_supported(hf_dir)
    backend = get_backend(options.format)
    if options.method == "cats" and not backend.capabilities.cats:  # before the export, which takes a while
        raise ActSparseError(f"--method cats is not available with --format {options.format}")
    if (options.weight_format == "fp32" and options.fuse and any(options.sparsity.values())
            and backend.capabilities.fp32_runs_in_bf16):
        log.warning("the runtime runs fp32 models in bf16 on this CPU, so the dense model reads bf16 weights; "
                    "fused fp32 weights read twice as many bytes: --weight-format bf16 matches it")
    check_free_space(output.parent, export_disk_bytes(hf_dir, options), f"the export of {model}")
    with atomic_output_dir(output, options.force) as tmp, recording_stages() as stages, \
            tqdm(total=4, desc="export", unit="step") as steps:
        steps.set_postfix_str(f"optimum {options.weight_format}")
        path = backend.export(hf_dir, tmp, options.weight_format)
        steps.update()
        steps.set_postfix_str("calibration")
        with stage("calibration"):
            groups, sources = find_targets(backend, path, options, model)
            statistics = calibrate(backend, path, groups, sources, options)
        steps.update()
        steps.set_postfix_str("rewrite")
        with stage("rewrite"):
            plan = make_plan(groups, statistics, sources, options, str(model))
            graph = rewrite(backend, path, plan, options)
        steps.update()
        steps.set_postfix_str("save")
        with stage("save"):
            backend.save(graph, path)
            del graph
        plan["export"] = {"stages": stages, "peak_rss_gib": max(s["peak_rss_gib"] for s in stages.values())}
        write_plan(path.parent, plan, statistics.histograms, statistics.curves, statistics.model_curves)
        steps.update()
    log.info("export: %.0f s, peak RSS %.2f GiB", sum(s["seconds"] for s in stages.values()),
             plan["export"]["peak_rss_gib"])
    return output


def find_targets(backend: Backend, path: Path, options: ExportOptions, model: str = "the model"
                 ) -> tuple[list[Group], dict[str, str]]:
    """The groups of MatMuls to prune in the model at ``path``, and (cats) the tensor masking each down group."""
    graph = backend.read(path)
    groups = backend.find_groups(graph, options.kinds)
    if not groups:
        raise ActSparseError(f"found no {options.targets} projections to prune in {model}")
    return groups, backend.cats_sources(graph, groups) if options.method == "cats" else {}


def calibrate(backend: Backend, path: Path, groups: list[Group], sources: dict[str, str],
              options: ExportOptions) -> Statistics:
    """The statistics the plan needs: those of ``options.plan`` when given, else measured on the
    calibration text with the tokenizer exported beside ``path``; none for a dense export."""
    if options.previous is not None:
        return statistics_of_plan(options.previous, options.plan, groups, options.needs_statistics)
    if not options.needs_statistics:
        return Statistics()
    from transformers import AutoTokenizer

    docs = read_documents(options.calibration, "calibration")
    chunks = token_chunks(AutoTokenizer.from_pretrained(path.parent), docs, options.calibration_samples,
                          options.calibration_seq_len)
    if len(chunks) < options.calibration_samples:
        log.warning("calibration text gives %d samples of %d tokens, fewer than %d asked",
                    len(chunks), options.calibration_seq_len, options.calibration_samples)
    statistics = measure_statistics(backend, path, groups, chunks, sources,
                                    options.centring if options.allocation == "greedy" else None, options.greedy_probe)
    statistics.info.update({"source": options.calibration, "samples": int(len(chunks)),
                            "seq_len": options.calibration_seq_len, "error_rows": min(SAMPLE_ROWS, int(chunks.size))})
    return statistics


def statistics_of_plan(previous: tuple[dict, dict[str, StreamingHistogram]], path: str | os.PathLike,
                       groups: list[Group], needs_statistics: bool) -> Statistics:
    """The statistics saved beside the plan at ``path`` (read as ``previous``), for ``groups`` of this model."""
    plan, histograms = previous
    if needs_statistics and not histograms:
        raise ActSparseError("the --plan has no statistics (it is a dense export); calibrate instead")
    planned = {(l["module"], l["in_features"], l["out_features"]) for l in plan["layers"]}
    for group in groups:
        for t in group.targets:
            if (t.module, t.in_features, t.out_features) not in planned:
                raise ActSparseError(f"the --plan does not match this model: it has no layer {t.module} "
                                     f"of {t.in_features}x{t.out_features}")
    if not histograms:
        return Statistics(info=plan.get("calibration", {}))
    group_of = {l["module"]: l["group"] for l in plan["layers"]}
    names = {g.name: group_of[g.targets[0].module] for g in groups}

    def by_group(saved: dict) -> dict:
        return {group: saved[name] for group, name in names.items() if name in saved}

    return Statistics(by_group(histograms), by_group(read_curves(path)), by_group(read_curves(path, MODEL_CURVE)),
                      plan.get("calibration", {}))


def measure_statistics(backend: Backend, path: Path, groups: list[Group], chunks: np.ndarray,
                       sources: dict[str, str], model_error_for: str | None = None, probe: str = "scaled"
                       ) -> Statistics:
    """Histograms and layer output-error curves (calibration.error) of every group over ``chunks``, and, with
    centring ``model_error_for`` where the backend can probe the model, its model output-error curves by
    ``probe`` (:func:`model_error_curves`), recorded in ``info["model_probe"]``. A group masked by another
    tensor (cats) gets that tensor's histogram."""
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
    statistics = Statistics(histograms, curves)
    if model_error_for is not None and backend.capabilities.model_error_probes:
        start = time.perf_counter()
        statistics.model_curves = model_error_curves(backend, path, groups, chunks, sources, statistics,
                                                     model_error_for, probe)
        statistics.info["model_probe"] = {"probe": probe, **model_probe_cost(probe, len(groups), chunks),
                                          "seconds": round(time.perf_counter() - start, 1)}
    return statistics


def model_error_curves(backend: Backend, path: Path, groups: list[Group], chunks: np.ndarray,
                       sources: dict[str, str], statistics: Statistics, centering: str, probe: str = "scaled"
                       ) -> dict[str, np.ndarray]:
    """The model's output error with one group pruned at a time, along GRID (calibration.error), each group
    centred as ``centering`` decides, probed on the first MODEL_PROBE samples and tokens of ``chunks``.

    ``full`` probes every sparsity of MODEL_GRID; ``scaled`` probes SCALED_PROBE_AT alone and scales
    each group's layer error curve (``statistics.curves``) to meet it there, ``len(MODEL_GRID) - 1``
    times fewer forward passes."""
    def settings(group, s):
        hist = statistics.histograms[group.name]
        m = choose_mode(hist, s, centering, statistics.curves[group.name])
        return m, hist.threshold(m, s)

    samples, tokens = MODEL_PROBE
    grid = MODEL_GRID if probe == "full" else np.array([SCALED_PROBE_AT])
    coarse = backend.model_error_curves(path, groups, chunks[:samples, :tokens], settings, grid, sources)
    if probe == "full":
        return {name: np.interp(GRID, MODEL_GRID, c) for name, c in coarse.items()}
    layer = layer_costs(statistics.curves, centering)
    return {name: scaled_curve(layer[name], float(c[0]), SCALED_PROBE_AT) for name, c in coarse.items()}


def model_probe_cost(probe: str, groups: int, chunks: np.ndarray) -> dict:
    """The probe's size: forward passes (a dense one per sample, then one per sample, group and
    probed sparsity) of how many tokens."""
    samples, tokens = MODEL_PROBE
    samples, tokens = min(samples, len(chunks)), min(tokens, chunks.shape[1])
    sparsities = int(np.count_nonzero(MODEL_GRID)) if probe == "full" else 1
    return {"sparsities": sparsities, "forward_passes": samples * (1 + groups * sparsities), "tokens_per_pass": tokens}


def make_plan(groups: list[Group], statistics: Statistics, sources: dict[str, str], options: ExportOptions,
              source_model: str = "") -> dict:
    """The plan: a mode and threshold per group at its sparsity; with no statistics (a dense export) the
    layers are recorded and none is pruned."""
    common = dict(method=options.method, centering=options.mode_centering, targets=options.targets,
                  prefill=options.prefill, source_model=source_model, calibration=statistics.info)
    if not statistics.histograms:
        empty = {g.name: StreamingHistogram(bins=2) for g in groups}
        plan = build_plan(groups, empty, {}, **common)
        plan["statistics"] = None
    else:
        plan = build_plan(groups, statistics.histograms, options.sparsity, **common, curves=statistics.curves,
                          allocation=options.allocation, fixed=options.fixed, mask_sources=sources,
                          model_curves=statistics.model_curves)
    plan["weight_format"] = options.weight_format  # the fusion reads it (bf16: fused weights in bf16)
    return plan


def rewrite(backend: Backend, path: Path, plan: dict, options: ExportOptions):
    """The model at ``path`` with the plan's shift, mask and folded bias inserted, fused into ActSparseMatMul
    ops where asked and the backend can here; what each pass did goes to ``plan["passes"]``."""
    graph = backend.read(path)
    counts = backend.apply_plan(graph, plan, options.prefill)
    if options.fuse and counts["masks"]:
        problem = backend.capabilities.fusion_problem
        if problem:
            log.warning("writing the unfused reference pattern (runs on the stock runtime, not faster): %s", problem)
        else:
            counts.update(backend.fuse(graph, plan))
    plan["passes"] = counts
    return graph


def save(backend: Backend, graph, path: Path, plan: dict, statistics: Statistics) -> None:
    """Write ``graph`` over the model at ``path``, and the plan with its statistics beside it."""
    backend.save(graph, path)
    write_plan(path.parent, plan, statistics.histograms, statistics.curves, statistics.model_curves)


# Bytes a parameter takes in the final model, by weight format: bf16 fuses only the pruned MatMuls (the
# others stay fp32); int4 keeps the embeddings and the head in int8, as NNCF does, and adds group scales.
FINAL_BYTES = {"fp32": 4, "bf16": 4, "fp16": 2, "int8": 1, "int4": 0.75}


def export_disk_bytes(hf_dir: Path, options: ExportOptions) -> int:
    """About the most disk the export fills at once: the model as optimum writes it (fp32, or 16-bit where
    :func:`loads_16bit`), beside two copies of the compressed or rewritten model while each is saved over
    the last."""
    exported = 2 if options.format == "openvino" and loads_16bit(hf_dir, options.weight_format) else 4
    return int(parameter_count(hf_dir) * (exported + 2 * FINAL_BYTES[options.weight_format]))
