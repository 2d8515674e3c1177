"""The kernel core's decode knobs: every value keeps the op's results within its contract; the tuning file
round-trips, is keyed by CPU model and kernel, is ignored with a warning when corrupt, and loses to the
environment; the tuner picks what its timer says is fastest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actsparse import ActSparseError
from actsparse.runtime_ext import kernels as ks
from conftest import run_cli, skip_without_extension
from reference import make_weight

try:
    KERNELS = ks.available_kernels()
except (ActSparseError, OSError) as e:  # library not built
    skip_without_extension(f"the kernel core library is not built ({e})")

from actsparse.runtime_ext import tuning  # noqa: E402
from test_kernels import check, make_x, reference  # noqa: E402

KNOBS = ("par_bytes", "split", "prefetch", "decode_max_rows", "union_pct")
SERIAL = tuning.NEVER


@pytest.mark.parametrize("fmt", ["f32", "bf16", "u8", "u4"])
def test_every_setting_keeps_the_contract(fmt):
    """One, three and twelve tokens, pruned and dense, under each knob value: numpy's product (rounded as the
    path the call takes rounds). The prefetch target and split-N threading only change memory traffic and
    which thread computes a column, so they give the serial call's output bitwise."""
    rng = np.random.default_rng(len(fmt))
    K, N = 322, 2100  # past a stored tile of f32/bf16 columns; u4 groups of 46
    packed = make_weight(fmt, K, N, 46 if fmt == "u4" else 0, rng)
    bias = rng.standard_normal(N).astype(np.float32)
    settings = [dict(prefetch=p, par_bytes=b, split=s) for p in ("l1", "l2") for b, s in ((SERIAL, ""), (0, "n"))]
    settings += [dict(par_bytes=0, split="k"), dict(decode_max_rows=1), dict(decode_max_rows=4),
                 dict(decode_max_rows=64), dict(union_pct=0), dict(union_pct=10000)]
    for M, sparsity in ((1, 0.5), (3, 0.0), (3, 0.5), (12, 0.5)):
        x, tau = make_x(M, K, 0.1, sparsity, rng)
        outputs = []
        for setting in settings:
            with ks.tuning(**setting):
                y = ks.matmul(x, packed, bias, 0.1, tau, True, 2)
                ref, scale = reference(x, packed, bias, 0.1, tau, True)  # reads decode_max_rows as set
            check(y, ref, scale, f"{fmt} M={M} s={sparsity} {setting}")
            outputs.append(y)
        for y in outputs[1:4]:
            assert np.array_equal(y, outputs[0]), f"{fmt} M={M}: prefetch or split-N changed the bits"


def test_decode_max_rows_and_union_pct_reach_the_call():
    """decode_max_rows = 4 sends 12 rows to the GEMM, which computes each row as a 17-row GEMM does; union_pct = 0
    keeps a list per token, so each token gets exactly what it gets alone."""
    rng = np.random.default_rng(7)
    packed = make_weight("bf16", 256, 300, 0, rng)
    x, tau = make_x(12, 256, 0.0, 0.0, rng)
    with ks.tuning(decode_max_rows=4):
        y = ks.matmul(x, packed, None, 0.0, tau, True, 1)
    with ks.tuning(decode_max_rows=16):
        gemm = ks.matmul(np.concatenate([x, x[:5]]), packed, None, 0.0, tau, True, 1)[:12]
    assert np.array_equal(y, gemm)
    with ks.tuning(union_pct=0, decode_max_rows=16):
        y = ks.matmul(x[:3], packed, None, 0.0, tau, False, 1)
        alone = np.concatenate([ks.matmul(x[i:i + 1], packed, None, 0.0, tau, False, 1) for i in range(3)])
    assert np.array_equal(y, alone)
    for bad in (dict(decode_max_rows=0), dict(union_pct=-1), dict(par_bytes=-1)):
        with pytest.raises(ks.KernelError, match="must be"):
            ks.set_tuning(**bad)


# The tuning file, read by a fresh process (the core reads it once, when the library loads)

def core_in(cache: Path, code: str = "", **env) -> tuple[dict, str]:
    """tuning_report() of a new process with $ACTSPARSE_CACHE = cache, the knobs' variables unset but for ``env``,
    after running ``code`` (with ``ks`` and ``tuning`` imported) and a matmul; and its stderr."""
    script = ("import json, numpy as np\nfrom actsparse.runtime_ext import kernels as ks, tuning\n" + code +
              "\nks.matmul(np.ones((2, 64), np.float32), ks.pack_f32(np.ones((64, 8))))"
              "\nprint(json.dumps(ks.tuning_report()))")
    base = {k: v for k, v in os.environ.items() if k not in {f"ACTSPARSE_{n.upper()}" for n in KNOBS}}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**base, "ACTSPARSE_CACHE": str(cache), **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


CHOSEN = {"prefetch": "l2", "split": "n", "par_bytes": 12345, "decode_max_rows": 7, "union_pct": 111}


def written(cache: Path) -> Path:
    report, _ = core_in(cache, f"tuning.write({CHOSEN!r}, 3)")
    return Path(report["file"])


def test_file_round_trips(tmp_path):
    path = written(tmp_path)
    assert path.parent == tmp_path / "tuning" and [p.name for p in path.parent.iterdir()] == [path.name]
    report, err = core_in(tmp_path)
    assert report["file_used"] and report["threads_measured"] == 3 and "actsparse" not in err
    assert {k: v["value"] for k, v in report["knobs"].items()} == CHOSEN
    assert {v["source"] for v in report["knobs"].values()} == {"file"}
    assert all(v["fallback"] != v["value"] for v in report["knobs"].values())


def test_file_is_keyed_by_cpu_model_and_kernel(tmp_path):
    path = written(tmp_path)
    report, _ = core_in(tmp_path)
    assert report["cpu"] in path.read_text() and f"_{report['kernel']}_v" in path.name
    cpuinfo = Path("/proc/cpuinfo").read_text().split("\n\n")[0] if Path("/proc/cpuinfo").exists() else ""
    info = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in cpuinfo.splitlines() if ":" in l)}
    if {"model name", "cpu family", "model"} <= info.keys():  # one generic name covers several generations on VMs
        assert report["cpu"] == f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    others = [k for k in KERNELS if k != report["kernel"]]
    if others:  # another kernel looks for its own file
        other, err = core_in(tmp_path, ACTSPARSE_KERNEL=others[0])
        assert other["file"] != report["file"] and not other["file_used"] and not err
    path.write_text(path.read_text().replace(f"cpu={report['cpu']}", "cpu=Some Other CPU 9000"))
    report, err = core_in(tmp_path)
    assert not report["file_used"] and "written for cpu Some Other CPU 9000" in report["file_ignored"]
    assert {k: v["value"] for k, v in report["knobs"].items()} == {k: v["fallback"] for k, v in report["knobs"].items()}
    assert err.count("actsparse: ignoring the tuning file") == 1


@pytest.mark.parametrize("damage", ["binary", "bad value", "out of range", "unknown key", "no key", "no equals"])
def test_corrupt_file_is_ignored_with_a_warning(tmp_path, damage):
    path = written(tmp_path)
    text = path.read_text()
    path.write_bytes({"binary": b"\x00\xff\xfe garbage \x80\n",
                      "bad value": text.replace("par_bytes=12345", "par_bytes=12k").encode(),
                      "out of range": text.replace("decode_max_rows=7", "decode_max_rows=0").encode(),
                      "unknown key": (text + "rows_per_pass=8\n").encode(),
                      "no key": text.replace("version=", "# version=").encode(),
                      "no equals": (text + "prefetch l1\n").encode()}[damage])
    report, err = core_in(tmp_path)
    assert not report["file_used"] and report["file_ignored"]
    assert {k: (v["value"], v["source"]) for k, v in report["knobs"].items()} == \
           {k: (v["fallback"], "rule" if k == "prefetch" else "default") for k, v in report["knobs"].items()}
    assert err.strip().splitlines() == [f"actsparse: ignoring the tuning file {path}: {report['file_ignored']}"]


def test_environment_wins(tmp_path):
    written(tmp_path)
    report, err = core_in(tmp_path, ACTSPARSE_SPLIT="k", ACTSPARSE_UNION_PCT="250", ACTSPARSE_DECODE_MAX_ROWS="many")
    knobs = report["knobs"]
    assert (knobs["split"]["value"], knobs["split"]["source"]) == ("k", "env")
    assert (knobs["union_pct"]["value"], knobs["union_pct"]["source"]) == (250, "env")
    assert (knobs["decode_max_rows"]["value"], knobs["decode_max_rows"]["source"]) == (7, "file")  # bad: warned
    assert err.strip().splitlines() == ["actsparse: ignoring $ACTSPARSE_DECODE_MAX_ROWS: decode_max_rows must be an "
                                        "integer, got 'many'"]


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_runtime_libraries_read_the_file(tmp_path, runtime):
    """The OpenVINO and ONNX Runtime libraries hold their own copy of the core, which reads the file as they load:
    a corrupt one gets its warning from them too."""
    from actsparse.runtime_ext import onnxruntime_library, openvino_extension

    try:
        (openvino_extension if runtime == "openvino" else onnxruntime_library)()
    except ActSparseError as e:
        skip_without_extension(str(e))
    path = written(tmp_path)
    path.write_text(path.read_text() + "rows_per_pass=8\n")
    load = ("import openvino as ov\nfrom actsparse.runtime_ext import register\nregister(ov.Core())" if runtime == "openvino"
            else "import onnxruntime as ort\nfrom actsparse.runtime_ext import register_library\n"
                 "register_library(ort.SessionOptions())")
    proc = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ACTSPARSE_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert f"actsparse: ignoring the tuning file {path}: unknown key rows_per_pass" in proc.stderr


# The tuner's choices, from a fake timer

def fake_timer(seconds):
    """A timer that gives each trial seconds(candidate, size) and runs nothing."""
    return lambda trials: [seconds(t.label, t.size) for t in trials]


def test_tuner_picks_what_the_timer_makes_fastest():
    def seconds(label, size):
        return {"l2/n": 0.5, "parallel": 0.5 if size >= 64 << 10 else 1.5, "decode": 1.0 if size <= 24 else 3.0,
                "gemm": 2.0, "shared": 1.0 if size <= 1.5 else 3.0, "apart": 2.0, "tuned": 0.9}.get(label, 1.0)

    result = tuning.measure(2, fake_timer(seconds), llc_bytes=1 << 20)
    assert result["tuning"] == {"prefetch": "l2", "split": "n", "par_bytes": 64 << 10, "decode_max_rows": 24,
                                "union_pct": 150}
    assert {e["candidate"] for e in result["measured"]["prefetch/split"]} == {"l1/", "l1/n", "l2/", "l2/n"}


def test_tuner_keeps_the_rule_within_noise():
    """Another prefetch/split must beat the rule by MARGIN, and parallel decode serial by as much; decode that never
    wins keeps one row, a shared pass that never wins is off."""
    rule = {k: v["fallback"] for k, v in ks.tuning_report()["knobs"].items()}
    rule_label = f"{rule['prefetch']}/{rule['split']}"

    def seconds(label, size):
        return {rule_label: 1.0, "parallel": 0.99, "serial": 1.0, "decode": 2.0, "gemm": 1.0, "shared": 2.0,
                "apart": 1.0, "tuned": 0.9, "rules": 1.0}.get(label, 0.98)

    result = tuning.measure(2, fake_timer(seconds), llc_bytes=1 << 20)
    assert result["tuning"] == {"prefetch": rule["prefetch"], "split": rule["split"], "par_bytes": 2 << 20,
                                "decode_max_rows": 1, "union_pct": 0}
    one = tuning.measure(1, fake_timer(seconds), llc_bytes=1 << 20)
    assert set(one["tuning"]) == {"prefetch", "split", "decode_max_rows", "union_pct"} and one["measured"]["par_bytes"] == []


def test_the_rules_stay_where_the_chosen_values_lose_together():
    """Knobs that each win alone are written only if together they beat the rules overall and lose on no format."""
    rule = {k: v["fallback"] for k, v in ks.tuning_report()["knobs"].items()}

    def seconds(slow_format):
        def timer(trials):
            return [{"l2/n": 0.5, "parallel": 0.5, "decode": 1.0, "shared": 1.0, "rules": 1.0,
                     "tuned": 1.2 if t.fmt.startswith(slow_format) else 0.8}.get(t.label, 2.0) for t in trials]
        return timer

    lost = tuning.measure(2, seconds("u4"), llc_bytes=1 << 20)
    assert lost["check"]["kept"] == "rules" and lost["tuning"] == {k: rule[k] for k in lost["tuning"]}
    won = tuning.measure(2, seconds("none"), llc_bytes=1 << 20)
    assert won["check"]["kept"] == "tuned" and won["tuning"]["prefetch"] == "l2" and won["tuning"]["split"] == "n"


def test_tune_command(tmp_path):
    """actsparse tune times the knobs, prints the result as JSON and writes the file the core then reads."""
    proc = run_cli("tune", "--quick", env={"ACTSPARSE_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "timing prefetch/split" in proc.stderr and result["threads"] == tuning.usable_cpus()
    report, _ = core_in(tmp_path)
    assert report["file"] == result["file"] and report["file_used"]
    assert {k: report["knobs"][k]["value"] for k in result["tuning"]} == result["tuning"]
    bad = run_cli("tune", "--threads", "0")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a positive integer" in bad.stderr
    (tmp_path / "plain").write_text("")
    bad = run_cli("tune", env={"ACTSPARSE_CACHE": str(tmp_path / "plain")})
    assert bad.returncode == 1 and bad.stderr.startswith("actsparse: error: cannot create the folder of the tuning file")
    assert bad.stderr.count("\n") == 1
