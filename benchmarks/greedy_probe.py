"""Greedy allocation's model-error probe, full against scaled: probe wall time and the perplexity ratio
(vs dense, held-out builtin:wiki) of the allocation each gives, per model and FFN budget.

    python benchmarks/greedy_probe.py [--models smollm2-135m qwen2.5-0.5b] [--budgets 0.3 0.4 0.5]
                                      [--work DIR] [--output FILE]

Each model is exported once (bf16) and calibrated once (16 samples x 256 tokens, as an export with
``--weight-format bf16 --calibration-samples 16`` does); the full probe's curves and wall time are
kept in ``--work`` and reused by later runs, since on Qwen2.5-0.5B it takes most of an hour.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from _harness import add_work, emit, parser

CALIBRATION = (16, 256)


class Probed:
    """One exported model with its calibration statistics."""

    def __init__(self, name: str, work: Path):
        from transformers import AutoTokenizer

        from actsparse.backends import get_backend
        from actsparse.calibration.targets import TARGET_KINDS
        from actsparse.calibration.text import read_documents, token_chunks
        from actsparse.exports.models import resolve_model
        from actsparse.pipeline import measure_statistics

        self.folder = work / name
        self.backend = get_backend("openvino")
        self.ir = self.folder / "openvino_model.xml"
        if not self.ir.is_file():
            self.backend.export(resolve_model(name), self.folder, "bf16")
        self.groups = self.backend.find_groups(self.backend.read(self.ir), TARGET_KINDS["mlp"])
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.chunks = token_chunks(self.tokenizer, read_documents("builtin:wiki", "calibration"), *CALIBRATION)
        cache = self.folder / "statistics.pkl"  # a private cache of this benchmark's own runs
        if not cache.is_file():
            statistics = measure_statistics(self.backend, self.ir, self.groups, self.chunks, {})
            cache.with_suffix(".partial").write_bytes(pickle.dumps(statistics))
            cache.with_suffix(".partial").replace(cache)
        self.statistics = pickle.loads(cache.read_bytes())

    def probe(self, probe: str) -> tuple[dict[str, np.ndarray], float]:
        """The model curves of ``probe`` (full or scaled) and its wall seconds, measured once and kept
        beside the export."""
        from actsparse.pipeline import model_error_curves

        cache = self.folder / f"{probe}_probe.npz"
        if not cache.is_file():
            start = time.perf_counter()
            curves = model_error_curves(self.backend, self.ir, self.groups, self.chunks, {}, self.statistics, "auto",
                                        probe)
            seconds = time.perf_counter() - start
            partial = cache.with_name(f"{probe}_probe.partial.npz")
            np.savez(partial, __seconds__=np.array(seconds), **curves)
            partial.replace(cache)
        with np.load(cache) as data:
            return {k: data[k] for k in data.files if k != "__seconds__"}, float(data["__seconds__"])

    def saved_full(self, export: Path) -> tuple[dict[str, np.ndarray], None]:
        """The full probe's curves saved in an earlier export of this model with these statistics."""
        from actsparse.calibration.plan import MODEL_CURVE, read_curves

        layer = read_curves(export)
        if set(layer) != set(self.statistics.curves) or any(not np.allclose(layer[k], c)
                                                             for k, c in self.statistics.curves.items()):
            sys.exit(f"{export} was calibrated otherwise than here: its layer error curves differ")
        return read_curves(export, MODEL_CURVE), None

    def plan(self, budget: float, model_curves: dict[str, np.ndarray] | None) -> dict:
        """Greedy at ``budget`` by ``model_curves``; uniform without them."""
        from actsparse.calibration.plan import build_plan

        return build_plan(self.groups, self.statistics.histograms, {"up": budget, "down": budget},
                          curves=self.statistics.curves, allocation="greedy" if model_curves else "uniform",
                          model_curves=model_curves)

    def perplexity(self, plan: dict | None, text: str, chunks: np.ndarray) -> float:
        """Perplexity on ``chunks`` with every token pruned by ``plan`` (None: dense), kept beside the
        export by text and plan, so that a later run evaluates only what is new."""
        import openvino as ov

        from actsparse.backends.openvino import evaluate_model
        from actsparse.evaluation import score
        from actsparse.pipeline import ExportOptions, Statistics, make_plan

        plan = plan or make_plan(self.groups, Statistics(), {}, ExportOptions())
        settings = json.dumps([(l["mode"], l["threshold"], l["target_sparsity"]) for l in plan["layers"]])
        key = f"{text} {len(chunks)}x{chunks.shape[1]} " + hashlib.sha1(settings.encode()).hexdigest()
        cache = self.folder / "perplexities.json"
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if key not in known:
            model = self.backend.read(self.ir)
            self.backend.apply_plan(model, plan, "sparse")
            known[key] = score(evaluate_model(ov.Core(), model, plan, chunks), plan)["perplexity"]
            cache.with_suffix(".partial").write_text(json.dumps(known, indent=1))
            cache.with_suffix(".partial").replace(cache)
        return known[key]


def texts(tokenizer, samples: int, seq_len: int) -> dict[str, np.ndarray]:
    """The evaluation texts: the first ``samples`` windows of builtin:wiki's held-out split (on which
    quality.py and the allocation choices were measured), the windows after them (held-out articles no
    choice looked at), and the Lee news corpus in gensim's wheel (another source altogether)."""
    from actsparse._common import cache_dir, fetch_wheel_member
    from actsparse.calibration.text import _WIKI_WHEEL, read_documents, token_chunks

    wiki = token_chunks(tokenizer, read_documents("builtin:wiki", "evaluation"), 3 * samples, seq_len)
    lee = fetch_wheel_member(_WIKI_WHEEL, "gensim/test/test_data/lee_background.cor",
                             cache_dir("text") / "lee_background.cor")
    news = token_chunks(tokenizer, lee.read_text(encoding="utf-8").splitlines(), samples, seq_len)
    return {"wiki eval": wiki[:samples], "wiki held-out rest": wiki[samples:], "lee news": news}


def run_model(name: str, work: Path, args) -> dict:
    from actsparse.pipeline import model_probe_cost

    model = Probed(name, work)
    scaled, scaled_s = model.probe("scaled")
    full, full_s = None, None
    if name in args.full_curves:
        full, full_s = model.saved_full(Path(args.full_curves[name]))
    elif name not in args.without_full:
        full, full_s = model.probe("full")
    evals = texts(model.tokenizer, args.samples, args.seq_len)
    if name not in args.held_out:
        evals = {"wiki eval": evals["wiki eval"]}
    dense = {text: model.perplexity(None, text, chunks) for text, chunks in evals.items()}
    rows = {budget: {"budget": budget} for budget in args.budgets}
    allocations = {"uniform": None, **({"full": full} if full else {}), "scaled": scaled}
    for text, chunks in evals.items():  # the wiki eval split first: the comparison of the probes
        for budget, row in rows.items():
            # held-out texts check what an export ships (scaled) against uniform
            for label in allocations if text == "wiki eval" else ("uniform", "scaled"):
                curves = allocations[label]
                plan = model.plan(budget, curves)
                row.setdefault(label, {})[text] = round(model.perplexity(plan, text, chunks) / dense[text], 4)
                if curves is not None:
                    row[label]["kept"] = plan["kept"]
            print(json.dumps({"model": name, "text": text, **row}), flush=True)
    exponents = []
    for p in args.exponents if name in args.held_out else ():
        # plan.allocate minimises the sum of squared curves: curve ** (p / 2) makes that exponent p
        plan = model.plan(args.exponent_budget, {k: c ** (p / 2) for k, c in scaled.items()})
        exponents.append({"exponent": p, "kept": plan["kept"], **{
            text: round(model.perplexity(plan, text, chunks) / dense[text], 4) for text, chunks in evals.items()}})
    for row in rows.values() if full else ():
        row["scaled_vs_full"] = round(row["scaled"]["wiki eval"] / row["full"]["wiki eval"], 4)
    cost = {probe: model_probe_cost(probe, len(model.groups), model.chunks) for probe in ("full", "scaled")}
    return {"groups": len(model.groups), "dense_perplexity": {k: round(v, 3) for k, v in dense.items()},
            "eval_windows": {k: len(v) for k, v in evals.items()},
            "probe": {"full": {**cost["full"], "seconds": full_s and round(full_s, 1),
                               **({"curves_from": args.full_curves[name]} if name in args.full_curves else {}),
                               **({"not_run": True} if full is None else {})},
                      "scaled": {**cost["scaled"], "seconds": round(scaled_s, 1)}},
            "rows": list(rows.values()), **({"exponents": exponents} if exponents else {})}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.4, 0.5])
    p.add_argument("--samples", type=int, default=32, help="windows per evaluation text")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--held-out", nargs="*", default=["smollm2-135m"],
                   help="models whose uniform and scaled allocations are also evaluated on the held-out texts")
    p.add_argument("--full-curves", nargs="*", default=[], metavar="MODEL=EXPORT",
                   help="take MODEL's full-probe curves from an earlier greedy export with --greedy-probe full "
                        "calibrated as here (its layer curves must be these; its probe time is not known)")
    p.add_argument("--exponents", nargs="*", type=float, default=[1, 2, 3],
                   help="objective exponents greedy is checked with (scaled curves, --held-out models)")
    p.add_argument("--exponent-budget", type=float, default=0.4)
    p.add_argument("--without-full", nargs="*", default=[], metavar="MODEL",
                   help="models whose full probe is not run (it takes about an hour of one core on Qwen2.5-0.5B)")
    add_work(p, "/tmp/actsparse-greedy-probe", reuse=True)
    args = p.parse_args()
    args.full_curves = dict(item.split("=", 1) for item in args.full_curves)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    emit({"benchmark": "greedy_probe", "calibration": {"text": "builtin:wiki (calibration split)", "samples": CALIBRATION[0],
                          "seq_len": CALIBRATION[1], "weight_format": "bf16"},
          "models": {name: run_model(name, work, args) for name in args.models}}, args, args.output)


if __name__ == "__main__":
    main()
