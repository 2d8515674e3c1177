"""Writes benchmarks/results/README.md from the JSON files beside it: one section per file, each with
the date, CPU and command that produced it. Standard library only; the output is deterministic.

    python benchmarks/report.py          # rewrite benchmarks/results/README.md
    python benchmarks/report.py --check  # exit 1 if README.md is not what the JSON files give
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNTIMES = {"openvino": "OpenVINO", "genai": "openvino-genai", "onnx": "ONNX Runtime"}
SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.9)


class ReportError(Exception):
    pass


def median(values) -> float:
    return statistics.median(list(values))


def metadata(name: str, data) -> dict:
    """date, cpu and command of a results file: top-level fields, or those of its ``machine`` record."""
    if not isinstance(data, dict):
        raise ReportError(f"{name}: the top level must be an object with date, cpu and command")
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    found = {key: data.get(key, machine.get(key)) for key in ("date", "cpu", "command")}
    missing = [key for key, value in found.items() if not value]
    if missing:
        raise ReportError(f"{name}: no {', '.join(missing)} (add them as top-level fields)")
    return found


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def x(value: float) -> str:
    return f"{value:.2f}×"


# Kernel benchmarks: one decode step of one layer, ours at several sparsities against the runtime's dense op.

def dense_side(row: dict) -> tuple[str, float, float]:
    """(dense op, ms, GB/s): OpenVINO rows hold numbers, ONNX Runtime rows one entry per timed baseline."""
    if isinstance(row["dense_ms"], dict):
        op = next(iter(row["dense_ms"]))
        return op, row["dense_ms"][op], row["dense_gbps"][op]
    return row.get("dense_fc_precision", "dense"), row["dense_ms"], row["dense_gbps"]


def speedups(row: dict) -> dict[float, float]:
    """{sparsity: dense time / our time}, as the benchmark recorded it (a median over its runs) where it did."""
    op, dense_ms, _ = dense_side(row)
    return {s["sparsity"]: s.get("speedup_vs_dense") or s.get("dense_over_ours", {}).get(op) or dense_ms / s["ms"]
            for s in row["sparse"]}


def at(row: dict, sparsity: float) -> dict:
    return next(s for s in row["sparse"] if abs(s["sparsity"] - sparsity) < 1e-9)


def own_speedups(row: dict) -> dict[float, float]:
    """{sparsity: our time at s=0 ÷ our time}: the gain of the skipped bytes alone."""
    return {s["sparsity"]: at(row, 0.0)["ms"] / s["ms"] for s in row["sparse"]}


def kernel_section(data: dict) -> list[str]:
    rows = data["results"]
    sizes = sorted({r["K"] * r["N"] for r in rows}, reverse=True)
    large = set(sizes[:2])
    out = ["Speed-up against the dense op (its time ÷ ours), median over the shapes; \"large\" is the median over "
           "the two largest. The s=0 column is our op against the dense op on the same weights; \"vs our s=0\" is "
           "our time at s=0 ÷ ours at that sparsity (the skipped bytes alone), median over the shapes. GB/s count "
           "the weight bytes read (all for dense, the live rows for ours), median over the large shapes.", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["format"], r["threads"]), []).append(r)
    summary = []
    for (fmt, threads), rs in groups.items():
        big = [r for r in rs if r["K"] * r["N"] in large]
        summary.append([fmt, str(threads), dense_side(rs[0])[0], str(len(rs))]
                       + [x(median(speedups(r)[s] for r in rs)) for s in SPARSITIES]
                       + [x(median(speedups(r)[s] for r in big)) for s in (0.0, 0.5, 0.9)]
                       + [x(median(own_speedups(r)[s] for r in rs)) for s in (0.5, 0.9)]
                       + [f"{median(dense_side(r)[2] for r in big):.0f}",
                          " / ".join(f"{median(at(r, s)['gbps'] for r in big):.0f}" for s in (0.0, 0.5, 0.9))])
    out += table(["format", "threads", "dense op", "shapes"] + [f"s={s:g}" for s in SPARSITIES]
                 + ["large: s=0", "s=0.5", "s=0.9", "vs our s=0: s=0.5", "s=0.9", "dense GB/s",
                    "ours GB/s at s=0 / 0.5 / 0.9"], summary)
    out += ["", "Per shape: ms per layer, dense and ours at each sparsity (speed-up in brackets).", ""]
    detail = []
    for r in rows:
        sp = speedups(r)
        detail.append([f"{r['K']}×{r['N']}", r["format"], str(r["threads"]), str(r["layers"]),
                       f"{dense_side(r)[1]:.3f}"] + [f"{at(r, s)['ms']:.3f} ({x(sp[s])})" for s in SPARSITIES])
    return out + table(["K×N", "format", "threads", "layers", "dense ms"] + [f"s={s:g}" for s in SPARSITIES], detail)


# End-to-end runs of `actsparse bench`: rows grouped by their note (one run of the benchmark), rounds merged.

def e2e_section(data: dict) -> list[str]:
    runs: dict[str, list[dict]] = {}
    for r in data["results"]:
        runs.setdefault(r.get("note", ""), []).append(r)
    out = []
    for note, rows in runs.items():
        commands = sorted({r["command"] for r in rows if r.get("command")})
        out += [f"**{note}**" if note else "", ""] + [f"- `{c}`" for c in commands] + [""]
        cells: dict[tuple, list[dict]] = {}
        for r in rows:
            plan = f"all {r['sparsity']:g}" if r.get("targets") == "all" else f"{r['up']:g} / {r['down']:g}"
            cells.setdefault((r["model_name"], r["runtime"], r["weight_format"], plan), []).append(r)
        lines = []
        for (model, runtime, weights, plan), rs in cells.items():
            def m(*path):
                values = []
                for r in rs:
                    for key in path:
                        r = r[key]
                    values.append(r)
                return median(values)
            speed = f"{m('decode_speedup'):.3f}×"
            if len(rs) > 1:
                speed += " (" + ", ".join(f"{r['decode_speedup']:.3f}" for r in rs) + ")"
            # our op at s=0, where the run timed it (bench before it did not)
            zero = (f"{m('s0', 'decode_ms_per_token'):.2f}", f"{m('decode_speedup_vs_s0'):.3f}×",
                    f"{100 * m('of_limit_vs_s0'):.0f} %") if all("s0" in r for r in rs) else ("—",) * 3
            lines.append([model, RUNTIMES.get(runtime, runtime), weights, plan,
                          f"{m('dense', 'decode_ms_per_token'):.2f}", zero[0], f"{m('sparse', 'decode_ms_per_token'):.2f}",
                          speed, zero[1], f"{m('amdahl_limit'):.3f}×", f"{100 * m('of_limit'):.0f} %", zero[2],
                          f"{m('dense', 'prefill_ms'):.0f} → {m('sparse', 'prefill_ms'):.0f} ({x(m('prefill_ratio'))})",
                          f"{m('dense', 'peak_rss_mb'):.0f} → {m('sparse', 'peak_rss_mb'):.0f} "
                          f"({x(m('memory_ratio'))})"])
        out += table(["model", "runtime", "weights", "up / down (or all)", "dense ms/token", "our s=0 ms/token",
                      "sparse ms/token", "speed-up vs dense (rounds)", "vs our s=0", "limit", "of limit",
                      "of limit vs s=0", "prefill ms dense → sparse",
                      "peak RSS MB dense → sparse"], lines) + [""]
    return out[:-1]


# Quality sweep of benchmarks/quality.py.

def quality_section(data: dict) -> list[str]:
    ev, cal = data["eval"], data["calibration"]
    out = [f"Calibration: {cal['samples']} × {cal['seq_len']} tokens of {cal['text']}; evaluation: "
           f"{ev['samples']} × {ev['seq_len']} tokens of {ev['text']}, every token pruned."]
    order = ["scap", "teal", "cats"]
    for name, r in data["models"].items():
        encoder = "mean_cosine" in r["dense"]
        dense = "cosine 1.0" if encoder else f"perplexity {r['dense']['perplexity']:.2f}"
        rows = sorted(r["rows"], key=lambda row: (order.index(row["method"]), row["allocation"],
                                                  row["centering"] == "off", row["ffn_sparsity"]))
        body = [[row["method"], row["allocation"], f"{row['centering']} ({row['centred_layers']} layers centred)",
                 f"{row['ffn_sparsity']:.2f} / {row['ffn_sparsity_measured']:.3f}",
                 f"{row['mean_cosine']:.4f} / {row['min_cosine']:.4f}" if encoder
                 else f"{row['perplexity']:.2f} ({row['perplexity'] / r['dense']['perplexity']:.3f}×)"] for row in rows]
        out += ["", f"**{name}** (dense {dense})", ""]
        if r.get("eval"):
            out += [f"Evaluation: {r['eval']['samples']} × {r['eval']['seq_len']} tokens of {r['eval']['text']}.", ""]
        out += table(["method", "allocation", "centring", "FFN sparsity (planned / measured)",
                      "mean / min cosine" if encoder else "perplexity (× dense)"], body)
        out += [f"\n{method} refused: {reason}" for method, reason in r.get("refused", {}).items()]
        if r.get("note"):
            out += ["", f"Note: {r['note']}."]
        if r.get("sensitivity"):
            out += ["", "Calibration sensitivity (scap uniform, FFN sparsity 0.4):", ""]
            out += table(["calibration samples × tokens", "perplexity (× dense)", "FFN sparsity measured"],
                         [[f"{s['calibration_samples']} × {s['calibration_seq_len']}",
                           f"{s['perplexity']:.2f} ({s['perplexity_ratio']:.3f}×)",
                           f"{s['ffn_sparsity_measured']:.3f}"] for s in r["sensitivity"]])
    return out


# openvino-genai: batched decode (genai_batch.py) and the three ways to run one export (op_routes.py).

def batch_section(data: dict) -> list[str]:
    return table(["sequences", "dense tokens/s", "sparse tokens/s", "sparse ÷ dense"],
                 [[str(r["sequences"]), f"{r['dense_tokens_per_s']:.1f}", f"{r['sparse_tokens_per_s']:.1f}",
                   x(r["speedup"])] for r in data["table"]])


def routes_section(data: dict) -> list[str]:
    out = [f"Export `{data['export']}`, inference precision {data['inference_precision']}, "
           f"{data['converts_inserted']} ops put between bf16 Converts by actsparse.load and genai.", ""]
    return out + table(["route", "decode ms/token (TPOT)", "prefill ms (TTFT)"],
                       [[name, f"{r['decode_ms_per_token']:.2f}", f"{r['prefill_ms']:.1f}"] for name, r in data["routes"].items()])


def gpu_kernel_section(data: dict) -> list[str]:
    """runtime_ext/gpu's OpenCL kernel, one decode row: device time, GB/s of the live rows' weights, s = 0.5 and
    0.9 against s = 0 in the same run."""
    devices = "; ".join(f"{d['name']} ({d['platform']})" for d in data["devices"])
    load = data.get("load_average_start_end")
    out = [f"OpenCL devices: {devices}." + (f" Load average (1 min) at start and end: {load[0]:.1f}, {load[1]:.1f}."
                                           if load else ""), ""]
    rows = []
    for r in data["results"]:
        s0, s5, s9 = (at(r, s) for s in (0.0, 0.5, 0.9))
        rows.append([r["device"], r["shape"], r["format"], f"{s0['ms']:.2f}", f"{s0['gbps']:.2f}",
                     f"{s5['gbps']:.2f}", x(s5["speedup_vs_s0"]), f"{s9['gbps']:.2f}", x(s9["speedup_vs_s0"])])
    return out + table(["device", "K×N", "format", "s=0 ms", "s=0 GB/s", "s=0.5 GB/s", "s=0.5 speed-up", "s=0.9 GB/s",
                        "s=0.9 speed-up"], rows)


def scale_section(data: dict) -> list[str]:
    """scale.py: a random model of Llama-3-8B's layer shapes; each export's time and peak RSS against the bound
    1.3 x its bf16 size + 2 GiB, then decode and a 256-token prefill, sparse against dense."""
    m = data["model"]
    out = [f"{m['layers']} layers, vocabulary {m['vocab']}, {m['parameters'] / 1e9:.2f} B parameters "
           f"({m['bf16_gib']:.2f} GiB in bf16); peak RSS bound {data['memory_bound_gib']:.2f} GiB.", ""]
    def stages(e: dict) -> str:
        return ", ".join(f"{name} {st['seconds']:.0f} s / {st['peak_rss_gib']:.1f}" for name, st in e["stages"].items()
                         if st["seconds"] >= 1)

    out += table(["weights", "sparsity", "export s", "peak RSS GiB", "within bound", "size GiB",
                  "stages (s / peak GiB)"],
                 [[e["weight_format"], e["sparsity"] + (f" (plan of {e['plan_of']})" if "plan_of" in e else ""),
                   f"{e['seconds']:.0f}", f"{e['peak_rss_gib']:.2f}", "yes" if e["within_bound"] else "no",
                   f"{e['size_gib']:.2f}", stages(e)] for e in data["exports"]])
    if data["decode"]:
        out += [""] + table(["weights", "sparsity", "dense ms/token", "our s=0 ms/token", "sparse ms/token",
                             "speed-up vs dense", "vs our s=0", "limit", "prefill (× dense)"],
                            [[r["weight_format"], r["sparsity"], f"{r['dense']['decode_ms_per_token']:.1f}",
                              f"{r['s0']['decode_ms_per_token']:.1f}" if "s0" in r else "—",
                              f"{r['sparse']['decode_ms_per_token']:.1f}", x(r["decode_speedup"]),
                              x(r["decode_speedup_vs_s0"]) if "s0" in r else "—",
                              x(r["amdahl_limit"]), x(r["prefill_ratio"])] for r in data["decode"]])
    return out


def call_cost_section(data: dict) -> list[str]:
    """op_call_cost.py: µs per layer in a chain, the chain's own Add and mean subtracted; per library folder where
    it compared builds."""
    load = data["load_average_start_end"]
    out = [f"Load average (1 min) at start and end: {load[0]:.1f}, {load[1]:.1f}.", ""]
    builds = data.get("builds") or {"this": data["results"]}
    rows = [[folder, f"{r['K']}×{r['N']}", r["format"], str(r["threads"]), f"{r['us']['fc']:.1f}",
             f"{r['us']['fc_tiny']:.1f}", f"{r['us']['ours']:.1f}", f"{r['us']['ours_tiny']:.1f}", x(r["ours_over_fc"]),
             x(r["ours_over_fc_tiny"])] for folder, results in builds.items() for r in results]
    return out + table(["build", "K×N", "format", "threads", "FC µs", "FC K×16 µs", "ours +inf µs",
                        "ours K×16 µs", "ours ÷ FC", "ours ÷ FC K×16"], rows)


def mlp_section(data: dict) -> list[str]:
    """mlp_bench.py: decode ms/token of one ActSparseMLP a layer against two ActSparseMatMuls, and their fixed cost
    per layer (threshold +inf against no MLP at all), in one process."""
    rows = []
    for r in data["results"]:
        ms, fixed = r["decode_ms_per_token"], r["fixed_cost_us"]
        rows.append([Path(r["model"]).name, str(r["layers"]), f"{ms['dense']:.2f}", f"{ms['two_ops']:.2f}",
                     f"{ms['one_op']:.2f}", x(r["speedup"]["two_ops_over_dense"]), x(r["speedup"]["one_op_over_dense"]),
                     x(r["speedup"]["one_op_over_two_ops"]), f"{fixed['two_ops_per_layer']:.1f}",
                     f"{fixed['one_op_per_layer']:.1f}",
                     f"{r['prefill_ms']['one_op'] / r['prefill_ms']['dense']:.2f}×"])
    return table(["export", "layers", "dense ms", "two ops ms", "one op ms", "two ops × dense", "one op × dense",
                  "one op × two", "two ops fixed µs/layer", "one op fixed µs/layer", "prefill one op ÷ dense"], rows)


def greedy_probe_section(data: dict) -> list[str]:
    """greedy_probe.py: greedy allocation by the full model-error probe against the scaled one, their cost,
    and the perplexity ratio (× dense) of the allocations they give; uniform for reference."""
    cal = data["calibration"]
    out = [f"Calibration: {cal['samples']} × {cal['seq_len']} tokens of {cal['text']} ({cal['weight_format']}); "
           f"perplexity × dense, every token pruned, MLP targets at the FFN budget. \"wiki eval\" is the held-out "
           "split's first windows (where quality.py and the allocation choices were measured); \"wiki held-out "
           "rest\" its later windows and \"lee news\" gensim's Lee corpus, text no choice was made on."]
    for name, r in data["models"].items():
        probes = r["probe"]
        cost = "; ".join(f"{probe}: {p['forward_passes']} forward passes of {p['tokens_per_pass']} tokens, "
                         + ("not run" if p.get("not_run") else f"{p['seconds']:.0f} s" if p["seconds"] is not None
                            else "time not measured here") for probe, p in probes.items())
        out += ["", f"**{name}** ({r['groups']} groups; {cost})", ""]
        texts = list(r["dense_perplexity"])
        body = [[f"{row['budget']:.2f}", label] + [f"{row[label][t]:.3f}×" if t in row[label] else "—" for t in texts]
                + [row[label].get("kept", "—")] for row in r["rows"] for label in ("uniform", "full", "scaled")
                if label in row]
        out += table(["budget", "allocation"] + texts + ["greedy kept"], body)
        if r.get("exponents"):
            out += ["", f"Greedy by the scaled curves at {data['settings']['exponent_budget']:.2f} with the objective's "
                    "exponent p (sum of curve^p; exports use p = 2):", ""]
            out += table(["p"] + texts, [[f"{e['exponent']:g}"] + [f"{e[t]:.3f}×" for t in texts]
                                         for e in r["exponents"]])
        if all("scaled_vs_full" in row for row in r["rows"]):
            out += ["", "Scaled ÷ full on wiki eval: " + ", ".join(f"{row['budget']:.2f}: {row['scaled_vs_full']:.4f}"
                                                                  for row in r["rows"]) + "."]
    return out


def section(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{path.name}: {err}") from None
    meta = metadata(path.name, data)
    commands = meta["command"] if isinstance(meta["command"], list) else [meta["command"]]
    out = [f"## {path.stem}", "", f"- Data: [`{path.name}`]({path.name})", f"- Date: {meta['date']}",
           f"- CPU: {meta['cpu']}"] + [f"- Command: `{c}`" for c in commands]
    if data.get("note"):
        out.append(f"- Note: {data['note']}")
    out.append("")
    rows = data.get("results")
    try:
        if data.get("benchmark") == "genai_batch":
            return out + batch_section(data)
        if data.get("benchmark") == "op_routes":
            return out + routes_section(data)
        if data.get("benchmark") == "op_call_cost":
            return out + call_cost_section(data)
        if data.get("benchmark") == "gpu_kernel":
            return out + gpu_kernel_section(data)
        if data.get("benchmark") == "mlp_bench":
            return out + mlp_section(data)
        if data.get("benchmark") == "greedy_probe":
            return out + greedy_probe_section(data)
        if "memory_bound_gib" in data:
            return out + scale_section(data)
        if "models" in data:
            return out + quality_section(data)
        if rows and "sparse" in rows[0] and "dense_ms" in rows[0]:
            return out + kernel_section(data)
        if rows and "decode_speedup" in rows[0]:
            return out + e2e_section(data)
    except (KeyError, TypeError, ValueError, StopIteration) as err:
        raise ReportError(f"{path.name}: unexpected layout ({type(err).__name__}: {err})") from None
    raise ReportError(f"{path.name}: unknown layout (expected kernel, end-to-end or quality results)")


def render(folder: Path = RESULTS) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` from the JSON files in this folder; do not edit by hand. "
             "Speed-ups are dense time ÷ sparse time, taken within one run (dense and sparse alternate).", ""]
    for path in sorted(folder.glob("*.json")):
        lines += section(path) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale, write nothing")
    args = parser.parse_args(argv)
    target = RESULTS / "README.md"
    try:
        text = render()
    except ReportError as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 1
    if args.check:
        if not target.is_file() or target.read_text() != text:
            print(f"report: {target} is stale: run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
