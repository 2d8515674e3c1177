"""What the benchmarks share: the interleaved timer, the common arguments, running the ``actsparse`` CLI,
and the record of the machine and settings that every JSON result carries."""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from actsparse import ActSparseError
from actsparse.runtime_ext import kernels as ks

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096), (2048, 5632)]  # K x N: Llama-7B MLP and attention, TinyLlama MLP
SPARSITIES = [0.0, 0.3, 0.5, 0.7, 0.9]
ISA_FLAGS = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"]
# Timing

def median_ms(seconds: Sequence[float]) -> float:
    """The median of timings in seconds, in ms."""
    return 1e3 * float(np.median(seconds))


def time_ms(calls: Sequence[Callable[[int], object]], rounds: int, per_round: int = 5, warm: int = 0) -> list[float]:
    """Median ms of each call, interleaved so that the noise of a shared machine falls on all alike: every
    round runs each call in turn, ``warm`` untimed times, then ``per_round`` timed times. ``call(i)`` makes
    the i-th call and picks its input by i; each call first runs three times untimed."""
    for call in calls:
        for i in range(3):
            call(i)
    times = [[] for _ in calls]
    for r in range(rounds):
        for call, samples in zip(calls, times):
            for i in range(warm):
                call(i)
            for i in range(r * per_round, (r + 1) * per_round):
                start = time.perf_counter()
                call(i)
                samples.append(time.perf_counter() - start)
    return [median_ms(t) for t in times]


def decode_inputs(rng: np.random.Generator, k: int, count: int = 16) -> list[np.ndarray]:
    """``count`` decode-step inputs x [1, 1, K], the same for every model timed on them."""
    return [rng.standard_normal((1, 1, k)).astype(np.float32) for _ in range(count)]


def openvino_core():
    """An OpenVINO Core with our op registered (imported here: not every benchmark needs OpenVINO)."""
    import openvino as ov

    from actsparse.runtime_ext import register

    core = ov.Core()
    register(core)
    return core


def layers_for(min_mb: float, layer_bytes: float) -> int:
    """Layers side by side that make one call read at least ``min_mb`` MB of weights (at least one)."""
    return max(1, int(np.ceil(min_mb * 1e6 / layer_bytes)))


# Arguments

class _Listed(argparse.Action):
    """A list option that takes ``--x a b`` as well as ``--x a,b``."""
    convert = str

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, [self.convert(v) for value in values for v in value.split(",") if v])
        except ValueError as err:
            parser.error(f"{option_string}: {err}")


class Ints(_Listed):
    convert = int


def shape(text: str) -> tuple[int, int]:
    try:
        k, n = map(int, text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is KxN, e.g. 4096x11008, got {text!r}") from None
    return k, n


def parser(doc: str, output: bool = True) -> argparse.ArgumentParser:
    """The benchmark's parser: its docstring (what it measures) as the description, and --output."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if output:
        p.add_argument("--output", type=Path, help="also write the JSON result to this file")
    return p


def add_threads(p: argparse.ArgumentParser, default) -> None:
    if isinstance(default, list):
        p.add_argument("--threads", nargs="+", action=Ints, default=default, help="thread counts, e.g. 1 2 or 1,2")
    else:
        p.add_argument("--threads", type=int, default=default,
                       help=f"inference threads (default: {default or 'as the runtime chooses'})")


def add_kernel_args(p: argparse.ArgumentParser, formats: list[str], rounds: bool = True) -> None:
    """Shapes, formats, threads, --quick and (with ``rounds``) the DRAM-sized layer stack of the kernel benchmarks."""
    p.add_argument("--shapes", nargs="+", type=shape, default=None, metavar="KxN",
                   help=f"weight shapes (default {' '.join(f'{k}x{n}' for k, n in SHAPES)}; --quick: the first)")
    p.add_argument("--formats", nargs="+", action=_Listed, default=formats, help=f"of {' '.join(formats)}")
    add_threads(p, [1, 2])
    p.add_argument("--quick", action="store_true", help="one shape, fewer timed calls")
    if rounds:
        p.add_argument("--min-mb", type=float, default=3 * ks.last_level_cache_mb(),
                       help="weights per model: enough layers to read this many MB per call, so that they come "
                            "from DRAM (0: one layer; default: three times the last-level cache)")
        p.add_argument("--rounds", type=int, help="interleaved timing rounds (default 12, 6 with --quick)")


def parse_kernel_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed arguments with the defaults --quick implies filled in, as the result records them."""
    args = p.parse_args()
    if args.shapes is None:
        args.shapes = SHAPES[:1] if args.quick else SHAPES
    if unknown := [f for f in args.formats if f not in p.get_default("formats")]:
        p.error(f"--formats: unknown {' '.join(unknown)} (choose from {' '.join(p.get_default('formats'))})")
    if getattr(args, "rounds", 0) is None:
        args.rounds = 6 if args.quick else 12
    return args


def add_work(p: argparse.ArgumentParser, default: str | None, reuse: bool, *aliases: str) -> None:
    p.add_argument("--work", *aliases, default=default,
                   help="folder for the exports" + (", which later runs reuse" if reuse else ", remade each run")
                        + ("" if default else " (default: a new temporary folder)"))


# Running the CLI

def run_cli(*args) -> tuple[str, float]:
    """``python -m actsparse ARGS``: its stdout and wall seconds; exits with its last error line if it fails."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "actsparse", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"actsparse {' '.join(map(str, args))} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout, time.perf_counter() - start


# The record

def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo, with ``cores``: the distinct physical cores."""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        blocks = [dict(line.split(":", 1) for line in block.splitlines() if ":" in line) for block in text.split("\n\n")]
        blocks = [{k.strip(): v.strip() for k, v in b.items()} for b in blocks if b]
        cores = {(b["physical id"], b["core id"]) for b in blocks if "physical id" in b and "core id" in b}
        return {**blocks[0], **({"cores": str(len(cores))} if cores else {})} if blocks else {}
    return {}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name(info: dict[str, str]) -> str:
    """The model name, with family and model: VMs often show only a generic one ("AMD EPYC")."""
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def machine() -> dict:
    """The facts of this machine that set a benchmark's figures: CPU, cores, caches, ISA, library versions, date."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": _cpu_name(info),
            "logical_cpus": os.cpu_count(), "physical_cores": int(info["cores"]) if "cores" in info else None,
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "caches_kb": {name: size >> 10 for name, size in ks.cache_sizes().items()}, "isa": {flag: flag in flags for flag in ISA_FLAGS},
            "os": platform.platform(),
            "versions": {name: _version(name) for name in ("openvino", "onnxruntime", "onnx", "nncf", "numpy")}
                        | {"python": platform.python_version()}}


def core_settings() -> dict:
    """The kernel and decode knobs the C++ core uses here: each knob's value and where it came from ("env", "file":
    the tuning file ``actsparse tune`` writes, "rule", "default", or "set_tuning" by the benchmark itself), and that
    file. The OpenVINO and ONNX Runtime libraries hold their own copies of the core, which read the same file and
    environment when they load."""
    try:
        report = ks.tuning_report()
        return {"kernel": ks.best_kernel(), "kernels": ks.available_kernels(),
                "tuning": {k: v["value"] for k, v in report["knobs"].items()},
                "tuning_source": {k: v["source"] for k, v in report["knobs"].items()},
                "tuning_file": {k: report[k] for k in ("file", "file_used", "file_ignored", "threads_measured")},
                "tile_cols": dict(ks.TILE_COLS),
                "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ACTSPARSE_")}}
    except (OSError, ks.KernelError, ActSparseError) as err:
        return {"unavailable": str(err)}


def emit(result: dict, args: argparse.Namespace, path: Path | None = None) -> None:
    """Print the result as JSON with the command, machine and settings first, and write it to ``path`` or
    --output if given."""
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    record = {"command": shlex.join(["python", *sys.argv]), "machine": machine(),
              "settings": {**settings, "core": core_settings()}, **result}
    text = json.dumps(record, indent=1, default=str)
    print(text)
    for target in {path, getattr(args, "output", None)} - {None}:
        Path(target).write_text(text + "\n")
