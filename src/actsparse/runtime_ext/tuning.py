"""``actsparse tune``: times the C++ core's decode knobs on this CPU and writes the tuning file that every copy of
the core (this library, the OpenVINO and ONNX Runtime extensions) reads when it loads (docs/op.md, "Tuning").

Each knob is chosen from candidates timed in alternating rounds (medians) on random weights of bf16, u8 and u4
(f32 activations, as exports compute), summed over the formats, with the thread count inference uses. Each call
reads the next of the layers that fill twice the last-level cache, so that weights come from DRAM as in a
model's decode step:

- prefetch and split: one token at sparsity 0.5, 4096 x 11008 and 11008 x 4096 (split only with more than one
  thread);
- par_bytes: serial against parallel decode of one token, 16 KiB to 1 MiB of live rows; the smallest size
  from which parallel wins at every larger one;
- decode_max_rows: decode against the GEMM at 4 to 32 rows, 2048 x 5632; the largest count up to which decode
  wins at every count;
- union_pct: four tokens in one pass over their union against one pass each, the union 1 to 2 times their
  mean list (bf16 and u8: u4 never shares a pass); the largest ratio up to which the shared pass wins at
  every ratio.

A change from the rule (prefetch, split) or towards more threads (par_bytes) must win by MARGIN, formats
weighing alike. Last, the chosen values together are timed against the rules on one and four tokens in every
format; the file gets the rules' values unless the chosen ones win overall and lose nowhere by MARGIN.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .._common import ActSparseError
from . import kernels as ks

FORMATS = ("bf16", "u8", "u4")
STREAM_SHAPES = [(4096, 11008), (11008, 4096)]  # K x N
PAR_BYTES = [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20]
DECODE_ROWS = [4, 8, 12, 16, 24, 32]
UNION_RATIOS = [1.0, 1.125, 1.25, 1.5, 1.75, 2.0]
NEVER = 1 << 62  # par_bytes no call reaches
MARGIN = 0.05  # a choice that costs a thread hand-off, or overrides the rule, must win by this fraction


@dataclass
class Trial:
    """One timed configuration: ``call(i)`` under the knob values ``setting`` (candidate ``label``), on a
    workload of ``size`` (live bytes, rows or union ratio) and weight format ``fmt``."""
    label: str
    setting: dict
    size: float
    fmt: str
    call: Callable[[int], object]


Timer = Callable[[Sequence[Trial]], Sequence[float]]


def interleaved(rounds: int, per_round: int) -> Timer:
    """A timer: the median seconds of each trial, every round running each trial in turn ``per_round`` times,
    so that a shared machine's noise falls on all alike."""
    def timer(trials: Sequence[Trial]) -> list[float]:
        samples = [[] for _ in trials]
        for r in range(rounds + 1):  # round 0 warms up
            for trial, times in zip(trials, samples):
                with ks.tuning(**trial.setting):
                    for i in range(per_round):
                        start = time.perf_counter()
                        trial.call(r * per_round + i)
                        if r:
                            times.append(time.perf_counter() - start)
        return [float(np.median(t)) for t in samples]
    return timer


def _summed(trials: Sequence[Trial], times: Sequence[float]) -> dict:
    """Seconds per (label, size), summed over the formats (and shapes)."""
    total: dict = {}
    for t, s in zip(trials, times):
        total[t.label, t.size] = total.get((t.label, t.size), 0.0) + s
    return total


def _ratios(trials: Sequence[Trial], times: Sequence[float], base: str) -> dict:
    """Each (label, size)'s time ÷ base's on every workload (format and shape), so that a fast format's small
    times count as much as a slow one's."""
    t = {(tr.label, tr.size, tr.fmt): s for tr, s in zip(trials, times)}
    out: dict = {}
    for (label, size, fmt), s in t.items():
        out.setdefault((label, size), []).append(s / t[base, size, fmt])
    return out


def _geomean(values: Sequence[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def boundary(sizes: Sequence, wins: Sequence[bool], none):
    """The last of ``sizes`` up to which ``wins`` holds at every one (``none`` where it fails at the first)."""
    best = none
    for size, win in zip(sizes, wins):
        if not win:
            break
        best = size
    return best


def _wins(trials, times, sizes, a: str, b: str, margin: float = 0.0) -> list[bool]:
    """At each size, whether candidate ``a`` took less than 1 - ``margin`` times ``b``'s time (summed over the
    formats)."""
    total = _summed(trials, times)
    return [total[a, s] < (1 - margin) * total[b, s] for s in sizes]


# Workloads: weights come from DRAM, as in a model's decode step, each call reading the next of the layers that
# fill a pool of twice the last-level cache

def weight_pool(fmt: str, nbytes: int, rng) -> np.ndarray:
    """nbytes of random weight bytes of format fmt (bf16: normal values, no NaN or subnormal)."""
    if fmt == "bf16":
        return ks.to_bf16(rng.standard_normal(nbytes // 2, np.float32)).view(np.uint8)
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


def layers_in(fmt: str, K: int, N: int, pool: np.ndarray) -> list[ks.PackedWeight]:
    """K x N weights laid side by side in pool (at least one), sharing their scales and zero points."""
    rb = ks.row_bytes(fmt, N)
    G = min(128, K) if fmt == "u4" else K if fmt == "u8" else 0
    scale = {"u8": np.full(N, 0.01, np.float32), "u4": np.full((K // max(G, 1), N), 2.0 ** -7, np.float16)}.get(fmt)
    zp = {"u8": np.full(N, 128.0, np.float32), "u4": np.full((K // max(G, 1), N), 8, np.uint8)}.get(fmt)
    if pool.size < K * rb:
        pool = np.resize(pool, K * rb)
    dtype = np.uint16 if fmt == "bf16" else np.uint8
    return [ks.PackedWeight(fmt, K, N, G, pool[o:o + K * rb].view(dtype).reshape(K, -1), scale, zp)
            for o in range(0, pool.size - K * rb + 1, K * rb)]


def tokens(M: int, K: int, live: Sequence[np.ndarray], rng) -> np.ndarray:
    """M rows whose channels in ``live[i]`` are out of the threshold 0.5 (|x| in [1, 2]) and the rest inside."""
    x = rng.uniform(-0.4, 0.4, (M, K)).astype(np.float32)
    for i, rows in enumerate(live):
        x[i, rows] = rng.uniform(1.0, 2.0, rows.size) * rng.choice([-1.0, 1.0], rows.size)
    return x


def _half(M: int, K: int, rng) -> np.ndarray:
    """M tokens at sparsity 0.5, each its own random half of the channels live."""
    return tokens(M, K, [rng.permutation(K)[:K // 2] for _ in range(M)], rng)


def cycling_call(ws: Sequence[ks.PackedWeight], xs: Sequence[np.ndarray], threads: int):
    """call(i): the matmul of xs[i % len(xs)] with layer i, f32 activations as exports leave them."""
    return lambda i: ks.matmul(xs[i % len(xs)], ws[i % len(ws)], None, 0.0, 0.5, True, threads)


def stream_trials(threads: int, rng, pools: dict) -> list[Trial]:
    """prefetch (and split, with threads): one token at sparsity 0.5 on Llama's MLP shapes (split-N's cut
    falls inside a stored tile there, as in most models)."""
    splits = ["", "n"] if threads > 1 else [""]
    trials = []
    for fmt in FORMATS:
        for K, N in STREAM_SHAPES:
            call = cycling_call(layers_in(fmt, K, N, pools[fmt]), [_half(1, K, rng) for _ in range(4)], threads)
            trials += [Trial(f"{p}/{s}", {"prefetch": p, "split": s}, 0, f"{fmt} {K}x{N}", call)
                       for p in ("l1", "l2") for s in splits]
    return trials


def par_trials(threads: int, rng, pools: dict) -> list[Trial]:
    """par_bytes: parallel against serial decode of one token with each size's live bytes."""
    trials, N = [], 1024
    for fmt in FORMATS:
        for size in PAR_BYTES:
            K = max(32, 2 * size // ks.row_bytes(fmt, N))  # half the rows live
            call = cycling_call(layers_in(fmt, K, N, pools[fmt]), [_half(1, K, rng) for _ in range(4)], threads)
            trials += [Trial(label, {"par_bytes": v}, size, fmt, call) for label, v in (("parallel", 0), ("serial", NEVER))]
    return trials


def rows_trials(threads: int, rng, pools: dict) -> list[Trial]:
    """decode_max_rows: decode against the GEMM at each row count."""
    K, N, trials = 2048, 5632, []
    for fmt in FORMATS:
        layers = layers_in(fmt, K, N, pools[fmt])
        for rows in DECODE_ROWS:
            call = cycling_call(layers, [_half(rows, K, rng) for _ in range(2)], threads)
            trials += [Trial(label, {"decode_max_rows": v}, rows, fmt, call)
                       for label, v in (("decode", rows), ("gemm", rows - 1))]
    return trials


def union_trials(threads: int, rng, pools: dict) -> list[Trial]:
    """union_pct: four tokens of K/2 live rows each whose union is each ratio times that, in one shared pass
    (union_pct high) against one pass each (0). Tokens share K/2 - P rows and each has P of its own."""
    K, N, M, L, trials = 2048, 5632, 4, 1024, []
    for fmt in ("bf16", "u8"):
        layers = layers_in(fmt, K, N, pools[fmt])
        for ratio in UNION_RATIOS:
            P = int(round(L * (ratio - 1) / (M - 1)))
            order = rng.permutation(K)
            live = [np.concatenate([order[:L - P], order[L - P + i * P:L - P + (i + 1) * P]]) for i in range(M)]
            call = cycling_call(layers, [tokens(M, K, live, rng)], threads)
            trials += [Trial(label, {"union_pct": v}, ratio, fmt, call) for label, v in (("shared", 10000), ("apart", 0))]
    return trials


def check_trials(threads: int, rng, pools: dict, rules: dict, chosen: dict) -> list[Trial]:
    """The rules against the chosen values together, on one and on four tokens at sparsity 0.5 in every format."""
    K, N, trials = 4096, 11008, []
    for fmt in FORMATS:
        layers = layers_in(fmt, K, N, pools[fmt])
        for M in (1, 4):
            call = cycling_call(layers, [_half(M, K, rng) for _ in range(2)], threads)
            trials += [Trial(label, setting, 0, f"{fmt} M={M}", call)
                       for label, setting in (("rules", rules), ("tuned", {**rules, **chosen}))]
    return trials


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measure(threads: Optional[int] = None, timer: Optional[Timer] = None, quick: bool = False,
            progress: Callable[[str], None] = lambda line: None, llc_bytes: Optional[int] = None) -> dict:
    """Times the candidates of every knob on this CPU and returns the chosen values (``tuning``), the seconds
    per candidate (``measured``) and the thread count. ``timer`` decides how trials are timed (tests pass
    a fake one); by default alternating rounds, fewer with ``quick``. The layers of each format fill twice
    ``llc_bytes`` (default: the last-level cache)."""
    threads = threads or usable_cpus()
    rounds = 3 if quick else 7
    rng = np.random.default_rng(0)
    llc = llc_bytes or max(ks.cache_sizes().values(), default=32 << 20)
    pools = {fmt: weight_pool(fmt, 2 * llc, rng) for fmt in FORMATS}
    steps = [("prefetch/split", lambda: stream_trials(threads, rng, pools), interleaved(2 * rounds, 2)),
             ("par_bytes", lambda: par_trials(threads, rng, pools) if threads > 1 else [], interleaved(2 * rounds, 8)),
             ("decode_max_rows", lambda: rows_trials(threads, rng, pools), interleaved(rounds, 1)),
             ("union_pct", lambda: union_trials(threads, rng, pools), interleaved(3 * rounds, 1))]
    fallback = {k: v["fallback"] for k, v in ks.tuning_report()["knobs"].items()}
    chosen, measured = {}, {}
    for name, make, default_timer in steps:
        progress(f"timing {name} on {threads} thread(s)")
        trials = make()
        with ks.tuning(**{**fallback, **chosen}):  # each step under the rules and the values chosen before it
            times = list((timer or default_timer)(trials)) if trials else []
        measured[name] = [{"candidate": t.label, "size": t.size, "format": t.fmt, "ms": round(1e3 * s, 4)}
                          for t, s in zip(trials, times)]
        if not trials:
            continue
        if name == "prefetch/split":
            rule = next(t.label for t in trials if all(fallback[k] == v for k, v in t.setting.items()))
            relative = {label: _geomean(r) for (label, _), r in _ratios(trials, times, rule).items()}
            best = min(relative, key=relative.get)
            chosen.update(next(t.setting for t in trials if t.label == (best if relative[best] < 1 - MARGIN else rule)))
        elif name == "par_bytes":
            sizes = PAR_BYTES[::-1]
            chosen["par_bytes"] = boundary(sizes, _wins(trials, times, sizes, "parallel", "serial", MARGIN),
                                           2 * PAR_BYTES[-1])
        elif name == "decode_max_rows":
            chosen["decode_max_rows"] = boundary(DECODE_ROWS, _wins(trials, times, DECODE_ROWS, "decode", "gemm"), 1)
        else:
            ratio = boundary(UNION_RATIOS, _wins(trials, times, UNION_RATIOS, "shared", "apart"), 0.0)
            chosen["union_pct"] = int(round(100 * ratio))
    # Each knob was timed alone; kept together only if they beat the rules on decode in every format.
    progress(f"checking the chosen values against the rules on {threads} thread(s)")
    trials = check_trials(threads, rng, pools, fallback, chosen)
    times = list((timer or interleaved(2 * rounds, 2))(trials))
    measured["check"] = [{"candidate": t.label, "size": t.size, "format": t.fmt, "ms": round(1e3 * s, 4)}
                         for t, s in zip(trials, times)]
    ratios = _ratios(trials, times, "rules")["tuned", 0]
    kept = _geomean(ratios) < 1 and max(ratios) < 1 + MARGIN
    return {"tuning": chosen if kept else {k: fallback[k] for k in chosen}, "threads": threads, "measured": measured,
            "check": {"tuned_vs_rules": round(1 / _geomean(ratios), 3), "kept": "tuned" if kept else "rules"}}


def _folder_for(file: Optional[str]) -> Path:
    """The tuning file's path, its folder created (ActSparseError where it cannot be)."""
    if not file:
        raise ActSparseError("no cache folder for the tuning file: set $ACTSPARSE_CACHE or $HOME")
    try:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ActSparseError(f"cannot create the folder of the tuning file {file}: {err}") from None
    return Path(file)


def write(chosen: dict, threads: int) -> Path:
    """Write the knobs in ``chosen`` to this CPU's tuning file (:func:`kernels.tuning_report`'s ``file``),
    atomically, for every copy of the core that loads from now on; return its path."""
    report = ks.tuning_report()
    path = _folder_for(report["file"])
    lines = ["# written by `actsparse tune`; delete it to go back to the rules (docs/op.md, Tuning)",
             f"cpu={report['cpu']}", f"kernel={report['kernel']}", f"version={report['version']}", f"threads={threads}",
             *(f"{k}={v}" for k, v in chosen.items())]
    temp = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            temp = f.name
            f.write("\n".join(lines) + "\n")
        os.replace(temp, path)
    except OSError as err:
        if temp:
            Path(temp).unlink(missing_ok=True)
        raise ActSparseError(f"cannot write the tuning file {path}: {err}") from None
    return path


def tune(threads: Optional[int] = None, quick: bool = False, progress: Callable[[str], None] = lambda line: None) -> dict:
    """measure, write the file, and apply the values in this process but where an environment variable sets the
    knob; returns the file, the chosen values, the knobs the environment overrides, the seconds taken and the
    timings."""
    start = time.perf_counter()
    _folder_for(ks.tuning_report()["file"])  # before seconds of timing
    result = measure(threads, quick=quick, progress=progress)
    path = write(result["tuning"], result["threads"])
    env = [k for k, v in ks.tuning_report()["knobs"].items() if v["source"] == "env"]
    ks.set_tuning(**{k: v for k, v in result["tuning"].items() if k not in env})
    return {"file": str(path), "tuning": result["tuning"], "threads": result["threads"], "overridden_by_env": env,
            "seconds": round(time.perf_counter() - start, 1), "check": result["check"], "measured": result["measured"]}
