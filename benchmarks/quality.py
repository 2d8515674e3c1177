"""Sparsity-quality sweep: method × allocation × sparsity on real models; prints JSON, writes a
Markdown table and a PNG plot (one Pareto curve per method and allocation).

    python benchmarks/quality.py [--models smollm2-135m minilm-l6 qwen2.5-0.5b] [--out benchmarks/results]
                                 [--samples 32] [--settings scap-greedy ...] [--merge quality.json] [--sensitivity]

Each model is exported once (fp32) and calibrated once; every setting is then planned from the
same statistics and evaluated in memory on the held-out split of builtin:wiki, every token
pruned (the unfused reference pattern: the quality, not the speed, is measured here).

The x axis is the FFN sparsity weighted by parameters: the share of MLP weights (gate, up and
down; MiniLM: down only) a decode step does not read. scap/teal prune the gate/up input (both matrices) and the
down input; cats thresholds |SiLU(gate)| and skips the matching up columns and down rows, so
its down sparsity s counts for (up + down) · s. Decoders report perplexity; encoders (MiniLM,
down-projection only) the mean and minimum cosine of mean-pooled embeddings to the dense model.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from _harness import emit, parser

SWEEP = {  # model -> (sparsity kinds swept, weighted sparsities, settings: (method, allocation, centering))
    "smollm2-135m": ("mlp", [0.2, 0.3, 0.4, 0.5, 0.6],
                     [("scap", "uniform", "auto"), ("scap", "greedy", "auto"), ("teal", "uniform", "off"),
                      ("cats", "uniform", "off")]),
    "qwen2.5-0.5b": ("mlp", [0.3, 0.4, 0.5],
                     [("scap", "uniform", "auto"), ("scap", "greedy", "auto"), ("cats", "uniform", "off")]),
    "minilm-l6": ("down", [0.5, 0.6, 0.7, 0.8],
                  [("scap", "uniform", "auto"), ("scap", "uniform", "off"), ("scap", "greedy", "auto"),
                   ("cats", "uniform", "off")]),
}


def main() -> None:
    p = parser(__doc__, output=False)
    p.add_argument("--models", nargs="+", default=list(SWEEP), choices=list(SWEEP))
    p.add_argument("--out", default="benchmarks/results", help="folder for quality.json/.md/.png")
    p.add_argument("--samples", type=int, default=32, help="held-out samples per evaluation")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calibration-samples", type=int, default=64)
    p.add_argument("--calibration-seq-len", type=int, default=256)
    p.add_argument("--settings", nargs="+", default=None, metavar="METHOD-ALLOCATION",
                   help="run only these settings (e.g. scap-greedy); with --merge, keep the other rows")
    p.add_argument("--merge", default=None, help="an earlier quality.json whose rows of other settings are kept")
    p.add_argument("--sensitivity", action="store_true",
                   help="also re-calibrate smollm2-135m with 16/64 samples of 128/256 tokens (scap 0.4)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"eval": {"text": "builtin:wiki (held-out split)", "samples": args.samples, "seq_len": args.seq_len},
               "calibration": {"text": "builtin:wiki (calibration split)", "samples": args.calibration_samples,
                               "seq_len": args.calibration_seq_len}, "models": {}}
    earlier = json.loads(Path(args.merge).read_text())["models"] if args.merge else {}
    results["models"].update((name, entry) for name, entry in earlier.items() if name not in args.models)
    with tempfile.TemporaryDirectory(prefix="actsparse-quality-") as work:
        for name in args.models:
            results["models"][name] = sweep_model(name, Path(work), args)
            if name in earlier:
                ran = {(r["method"], r["allocation"], r["centering"]) for r in results["models"][name]["rows"]}
                swept = set(SWEEP[name][2])
                kept = [r for r in earlier[name]["rows"] if (r["method"], r["allocation"], r["centering"]) in swept - ran]
                results["models"][name]["rows"] = kept + results["models"][name]["rows"]
            if args.sensitivity and name == "smollm2-135m":
                results["models"][name]["sensitivity"] = sensitivity(name, Path(work), args)
    results["models"] = {name: results["models"][name] for name in SWEEP if name in results["models"]}
    emit(results, args, out / "quality.json")
    (out / "quality.md").write_text(table(results))
    plot(results, out / "quality.png")


class Model:
    """One exported, calibrated model: plans are built and evaluated against its statistics."""

    def __init__(self, name: str, work: Path, samples: int, seq_len: int, kinds: str = "mlp"):
        import openvino as ov
        from transformers import AutoTokenizer

        from actsparse.backends import get_backend
        from actsparse.calibration.targets import TARGET_KINDS
        from actsparse.calibration.text import read_documents, token_chunks
        from actsparse.exports.models import resolve_model

        self.folder = work / name
        self.folder.mkdir(parents=True)
        self.core, self.backend = ov.Core(), get_backend("openvino")
        self.ir = self.backend.export(resolve_model(name), self.folder, "fp32")
        self.groups = self.backend.find_groups(self.backend.read(self.ir), TARGET_KINDS.get(kinds, {kinds}))
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.chunks = token_chunks(self.tokenizer, read_documents("builtin:wiki", "calibration"), samples, seq_len)
        self.stats = {}

    def calibrate(self, cats: bool, greedy_centring: str | None):
        """Statistics once per mask kind, and (for greedy allocation) model error curves once per centring."""
        from actsparse.pipeline import measure_statistics, model_error_curves

        if cats not in self.stats:
            sources = self.backend.cats_sources(self.backend.read(self.ir), self.groups) if cats else {}
            self.stats[cats] = (measure_statistics(self.backend, self.ir, self.groups, self.chunks, sources), sources, {})
        statistics, sources, model_curves = self.stats[cats]
        if greedy_centring is not None and greedy_centring not in model_curves:
            # the full probe: quality.json's greedy rows were measured with it (greedy_probe.py compares the two)
            model_curves[greedy_centring] = model_error_curves(self.backend, self.ir, self.groups, self.chunks, sources,
                                                               statistics, greedy_centring, probe="full")
        return statistics.histograms, statistics.curves, model_curves.get(greedy_centring, {}), sources

    def evaluate(self, method: str, allocation: str, centering: str, sparsity: dict, args) -> dict:
        from actsparse.backends.openvino import evaluate_model
        from actsparse.calibration.plan import build_plan, group_params
        from actsparse.calibration.text import read_documents, token_chunks
        from actsparse.evaluation import score

        if any(sparsity.values()):
            histograms, curves, model_curves, sources = self.calibrate(method == "cats",
                                                                       centering if allocation == "greedy" else None)
            plan = build_plan(self.groups, histograms, sparsity, method=method, centering=centering, curves=curves,
                              allocation=allocation, mask_sources=sources, model_curves=model_curves)
        else:  # the dense baseline needs no calibration
            from actsparse.pipeline import ExportOptions, Statistics, make_plan

            plan, sources = make_plan(self.groups, Statistics(), {}, ExportOptions()), {}
        model = self.backend.read(self.ir)
        self.backend.apply_plan(model, plan, "sparse")
        start = time.perf_counter()
        chunks = token_chunks(self.tokenizer, read_documents("builtin:wiki", "evaluation"), args.samples, args.seq_len)
        result = score(evaluate_model(self.core, model, plan, chunks), plan)
        # parameter-weighted FFN sparsity, planned and measured (cats also skips the matching up columns)
        total = sum(group_params(g) for g in self.groups)
        by_group = {l["group"]: l for l in plan["layers"]}
        measured = {l["module"]: result["layers"].get(l["module"], 0.0) for l in plan["layers"]}

        def weighted(value) -> float:
            skipped = 0.0
            for g in self.groups:
                s = value(g)
                skipped += s * group_params(g)
                if g.name in sources:  # the up_proj of the same layer
                    skipped += s * next(t.in_features * t.out_features for h in self.groups if h is not g
                                        for t in h.targets if t.kind == "up" and t.module.rsplit(".", 1)[0] ==
                                        g.targets[0].module.rsplit(".", 1)[0])
            return skipped / total

        quality = {k: result[k] for k in ("perplexity", "next_token_accuracy", "mean_cosine", "min_cosine") if k in result}
        return {"method": method, "allocation": allocation, "centering": centering,
                "sparsity_flags": {k: v for k, v in sparsity.items() if v},
                "ffn_sparsity": round(weighted(lambda g: by_group[g.name]["target_sparsity"]), 4),
                "ffn_sparsity_measured": round(weighted(lambda g: measured[g.targets[0].module]), 4),
                "centred_layers": sum(1 for g in self.groups if by_group[g.name]["mode"] != 0),
                **({"allocation_record": {k: plan[k] for k in ("budget", "objective", "kept", "objective_of")}}
                   if allocation == "greedy" else {}),
                **quality, "eval_s": round(time.perf_counter() - start, 1)}


def flags(kinds: str, target: float, method: str) -> dict:
    if kinds == "down":
        return {"down": target}
    if method == "cats":  # (up + down) · s = target · (gate + up + down): s = 1.5 · target
        return {"down": min(round(1.5 * target, 4), 0.95)}
    return {"up": target, "down": target}


def sweep_model(name: str, work: Path, args) -> dict:
    kinds, targets, settings = SWEEP[name]
    start = time.perf_counter()
    model = Model(name, work, args.calibration_samples, args.calibration_seq_len, kinds)
    dense = model.evaluate("scap", "uniform", "off", {}, args)
    rows, refused = [], {}
    for method, allocation, centering in settings:
        if args.settings and f"{method}-{allocation}" not in args.settings:
            continue
        for target in targets:
            try:
                row = model.evaluate(method, allocation, centering, flags(kinds, target, method), args)
            except Exception as err:  # cats on a GELU model: recorded, not fatal
                refused[method] = str(err)
                break
            if "perplexity" in row:
                row["perplexity_ratio"] = round(row["perplexity"] / dense["perplexity"], 4)
            rows.append(row)
            print(json.dumps({"model": name, **row}), flush=True)
    return {"dense": dense, "rows": rows, "refused": refused, "seconds": round(time.perf_counter() - start)}


def sensitivity(name: str, work: Path, args) -> list[dict]:
    """scap-uniform at 0.4 re-calibrated with fewer/shorter samples: how stable is the plan?"""
    out = []
    for samples, seq_len in ((16, 128), (16, 256), (64, 128), (64, 256)):
        model = Model(name, work / f"s{samples}-{seq_len}", samples, seq_len)
        dense = model.evaluate("scap", "uniform", "off", {}, args)
        row = model.evaluate("scap", "uniform", "auto", flags("mlp", 0.4, "scap"), args)
        out.append({"calibration_samples": samples, "calibration_seq_len": seq_len, "perplexity": row["perplexity"],
                    "perplexity_ratio": round(row["perplexity"] / dense["perplexity"], 4),
                    "ffn_sparsity_measured": row["ffn_sparsity_measured"]})
        print(json.dumps({"model": name, "sensitivity": out[-1]}), flush=True)
    return out


def table(results: dict) -> str:
    lines = []
    for name, r in results["models"].items():
        encoder = "mean_cosine" in r["dense"]
        lines += [f"\n**{name}** (dense " + (f"perplexity {r['dense']['perplexity']:.2f})" if not encoder
                                              else "cosine 1.0)"), "",
                  "| method | allocation | centring | FFN sparsity (planned / measured) | "
                  + ("mean / min cosine |" if encoder else "perplexity (× dense) |"),
                  "|---|---|---|---|---|"]
        for row in sorted(r["rows"], key=lambda row: (["scap", "teal", "cats"].index(row["method"]), row["allocation"],
                                                      row["centering"] == "off", row["ffn_sparsity"])):
            quality = (f"{row['mean_cosine']:.4f} / {row['min_cosine']:.4f}" if encoder
                       else f"{row['perplexity']:.2f} ({row['perplexity_ratio']:.3f}×)")
            lines.append(f"| {row['method']} | {row['allocation']} | {row['centering']} "
                         f"({row['centred_layers']} layers centred) | {row['ffn_sparsity']:.2f} / "
                         f"{row['ffn_sparsity_measured']:.3f} | {quality} |")
        for method, reason in r["refused"].items():
            lines.append(f"\n{method} refused: {reason}")
        if r.get("note"):
            lines.append(f"\nNote: {r['note']}.")
        if r.get("sensitivity"):
            lines += ["", "Calibration sensitivity (scap uniform, FFN sparsity 0.4):", "",
                      "| calibration samples × tokens | perplexity (× dense) | FFN sparsity measured |", "|---|---|---|"]
            lines += [f"| {x['calibration_samples']} × {x['calibration_seq_len']} | {x['perplexity']:.2f} "
                      f"({x['perplexity_ratio']:.3f}×) | {x['ffn_sparsity_measured']:.3f} |" for x in r["sensitivity"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # an optional dependency (the bench extra): the JSON and table are written already
        print(f"{path} not drawn: matplotlib is not installed (pip install '.[bench]')", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], models.items()):
        encoder = "mean_cosine" in r["dense"]
        lines: dict[str, list] = {}
        for row in r["rows"]:
            label = f"{row['method']}-{row['allocation']}" + ("" if row["centering"] != "off" or row["method"] != "scap"
                                                              else " (no centring)")
            y = 1 - row["mean_cosine"] if encoder else row["perplexity_ratio"]
            lines.setdefault(label, []).append((row["ffn_sparsity_measured"], y))
        for label, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("FFN sparsity, parameter-weighted (measured)")
        ax.set_ylabel("1 − mean cosine to dense" if encoder else "perplexity / dense (log)")
        if not encoder:  # cats runs away at high sparsity
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
