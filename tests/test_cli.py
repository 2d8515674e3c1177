"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing half-written."""
import json
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import run_cli


def _fails(proc, message):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert message in errors[0]
    return errors[0]


def _no_leftovers(parent, name):
    assert not (parent / name).exists()
    assert not list(parent.glob(f".{name}.*")), "a temporary folder was left behind"


def test_missing_model_folder(tmp_path):
    proc = run_cli("export", tmp_path / "no-such-model", tmp_path / "out")
    assert proc.stderr.count("\n") == 1  # nothing but the error line
    _fails(proc, "does not exist")
    _no_leftovers(tmp_path, "out")


def test_corrupt_model_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    _fails(run_cli("export", tmp_path / "model", tmp_path / "out"), "corrupt")
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    _fails(run_cli("export", tmp_path / "model", tmp_path / "out"), "no model weights")
    _no_leftovers(tmp_path, "out")


def test_unknown_builtin_name(tmp_path):
    _fails(run_cli("export", "smollm9-1t", tmp_path / "out"), "unknown built-in model 'smollm9-1t'")


@pytest.mark.parametrize("flag,value", [("--format", "tflite"), ("--weight-format", "int3"), ("--method", "magic")])
def test_unknown_choice(tmp_path, flag, value):
    proc = run_cli("export", "smollm2-135m", tmp_path / "out", flag, value)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    _fails(proc, f"invalid choice: '{value}'")


@pytest.mark.parametrize("value", ["1.0", "-0.1", "abc"])
def test_sparsity_outside_range(tmp_path, value):
    proc = run_cli("export", "smollm2-135m", tmp_path / "out", "--sparsity-down", value)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    _fails(proc, "--sparsity-down")


def test_sparsity_outside_range_in_python():
    import actsparse

    with pytest.raises(actsparse.ActSparseError, match=r"\[0, 1\)"):
        actsparse.export("smollm2-135m", "unused", sparsity={"up": 1.5})


def test_corrupt_plan(tiny_llama, tmp_path):
    plan = tmp_path / "actsparse.json"
    plan.write_text("{\"format_version\": 1, \"layers\": [{\"module\": 3}]}")
    _fails(run_cli("export", tiny_llama, tmp_path / "out", "--plan", plan), "invalid")
    plan.write_text("garbage")
    _fails(run_cli("export", tiny_llama, tmp_path / "out", "--plan", plan), "not valid JSON")
    _no_leftovers(tmp_path, "out")


def test_mismatched_plan(tiny_llama, tiny_gelu, texts, tmp_path):
    gelu = tmp_path / "gelu"
    proc = run_cli("export", tiny_gelu, gelu, "--sparsity", "0.5", "--calibration", texts["calibration"],
                   "--calibration-samples", "4", "--calibration-seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    _fails(run_cli("export", tiny_llama, tmp_path / "out", "--sparsity", "0.5", "--plan", gelu / "actsparse.json"),
           "does not match")
    _no_leftovers(tmp_path, "out")


def test_empty_calibration_text_leaves_nothing(tiny_llama, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    _fails(run_cli("export", tiny_llama, tmp_path / "out", "--sparsity", "0.5", "--calibration", empty), "is empty")
    _no_leftovers(tmp_path, "out")


def test_eval_on_a_folder_that_is_not_an_export(tiny_llama, tmp_path):
    _fails(run_cli("eval", tiny_llama), "no actsparse plan")
    _fails(run_cli("eval", tmp_path / "missing"), "not a folder")


def test_existing_output_survives_without_force(tiny_llama, texts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _fails(run_cli("export", tiny_llama, out), "already exists")
    assert (out / "precious.txt").read_text() == "keep me"
    # and --force on a run that fails keeps the old folder too
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(run_cli("export", tiny_llama, out, "--force", "--sparsity", "0.3", "--calibration", empty), "is empty")
    assert (out / "precious.txt").read_text() == "keep me"
    # --force on a run that succeeds replaces it
    proc = run_cli("export", tiny_llama, out, "--force", "--sparsity", "0.3", "--calibration", texts["calibration"],
                   "--calibration-samples", "4", "--calibration-seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "precious.txt").exists()
    assert json.loads((out / "actsparse.json").read_text())["layers"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_optimum_cli_export_actsparse(tiny_llama, texts, tmp_path):
    import subprocess

    cli = shutil.which("optimum-cli") or "optimum-cli"
    help_text = subprocess.run([cli, "export", "actsparse", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0, help_text.stderr
    assert "--sparsity-down" in help_text.stdout and "-m MODEL" in help_text.stdout
    proc = subprocess.run([cli, "export", "actsparse", "-m", str(tiny_llama), str(tmp_path / "out"), "--sparsity", "0.4",
                           "--calibration", str(texts["calibration"]), "--calibration-samples", "4",
                           "--calibration-seq-len", "32"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((tmp_path / "out" / "actsparse.json").read_text())
    assert {l["target_sparsity"] for l in plan["layers"]} == {0.4}
    bad = subprocess.run([cli, "export", "actsparse", "-m", "nope-model", str(tmp_path / "bad")], capture_output=True,
                         text=True)
    _fails(bad, "unknown built-in model")


def test_demo_says_whether_the_sparse_model_gains():
    """The demo's verdict line compares the speed-up with the spread of the dense runs, and says where a loss lies."""
    from actsparse.demo import verdict

    def speed(ratio, dense_runs):
        return {"decode_speedup": ratio, "amdahl_limit": 1.4, "dense": {"decode_ms_per_token_runs": dense_runs},
                "decode_speedup_vs_s0": 1.25, "s0_vs_dense": ratio / 1.25}

    assert verdict(speed(1.2, [10.0, 10.2, 10.1])).startswith("the sparse model decodes faster here: 1.20x, 50 %")
    assert "no faster than dense here (1.03x, within the 10 %" in verdict(speed(1.03, [10.0, 11.0, 10.5]))
    slower = verdict(speed(0.8, [10.0, 10.1, 10.0]))
    assert "slower than dense here (0.80x)" in slower
    assert "gave 1.25x over our op at s=0, which itself decodes 0.64x the dense export's speed" in slower


def _probe(dense_ms: float, **ours_ms: float) -> dict:
    """A probe result of one format: the plugin's ms and ours at s=0, up/gate 0.3 + down 0.5 and 0.4 + 0.6."""
    keys = {"s0": "0/0", "light": "0.3/0.5", "heavy": "0.4/0.6"}
    return {"dense_ms": dense_ms, "fc_precision": "x", "ours_ms": {keys[k]: v for k, v in ours_ms.items()}}


def test_demo_picks_the_lightest_sparsity_predicted_to_gain_in_its_best_format():
    from actsparse.demo import MIN_GAIN, choose

    speeds = {"bf16": _probe(10.0, s0=12.0, light=8.0, heavy=6.0), "int8": _probe(5.0, s0=5.0, light=3.5, heavy=3.0)}
    # half the bytes in the MLP: bf16 light 1/(0.5 + 0.5 * 0.8) = 1.111, int8 light 1/(0.5 + 0.35) = 1.176
    choice = choose(speeds, 0.5)
    assert choice["gains"] and choice["weight_format"] == "int8" and choice["sparsity"] == {"up": 0.3, "down": 0.5}
    assert choice["predicted"] == pytest.approx(1 / 0.85) and choice["predicted"] > MIN_GAIN
    assert choice["reason"].startswith("int8 at up/gate 0.3 + down 0.5: our op ran the MLP layers 1.43x")
    # int8 no longer gains lightly; bf16 light 1.111 does, before any heavier setting
    speeds["int8"] = _probe(5.0, s0=6.0, light=5.5, heavy=2.0)
    assert (choose(speeds, 0.5)["weight_format"], choose(speeds, 0.5)["sparsity"]["up"]) == ("bf16", 0.3)
    # bf16 light 1/(0.5 + 0.5 * 0.85) = 1.081 falls short of MIN_GAIN: the heavier sparsity in its best format
    # (int8 2.5x beats bf16 1.67x)
    speeds["bf16"] = _probe(10.0, s0=12.0, light=8.5, heavy=6.0)
    heavy = choose(speeds, 0.5)
    assert (heavy["weight_format"], heavy["sparsity"], heavy["gains"]) == ("int8", {"up": 0.4, "down": 0.6}, True)


def test_demo_says_when_no_setting_is_predicted_to_gain():
    from actsparse.demo import choose

    speeds = {"bf16": _probe(10.0, s0=14.0, light=13.0, heavy=11.0), "int8": _probe(5.0, s0=6.0, light=5.6, heavy=5.2)}
    choice = choose(speeds, 0.6)
    assert not choice["gains"] and choice["predicted"] < 1
    assert (choice["weight_format"], choice["sparsity"]["up"]) == ("int8", 0.4)  # the closest: 5.0 / 5.2
    assert "no format and sparsity tried is predicted to gain 10 % on this machine" in choice["reason"]


def test_demo_mlp_share_counts_every_linear_of_smollm2():
    """SmolLM2-135M: 30 layers of 576 x 1536 MLPs and 9/3-head attention, a tied 49152-token head."""
    from actsparse.demo import mlp_share

    config = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": 49152}
    mlp, attention, head = 30 * 3 * 576 * 1536, 30 * (2 * 576 * 576 + 2 * 576 * 192), 49152 * 576
    assert mlp_share(config) == pytest.approx(mlp / (mlp + attention + head))


def test_sigterm_leaves_no_temporary_folder(tmp_path):
    """A command stopped by SIGTERM unwinds as on Ctrl-C: one line on stderr, exit 130, and the folder it was
    writing is removed, not left half-written beside its output."""
    script = (f"import time\nfrom argparse import Namespace\nfrom actsparse._common import atomic_output_dir\n"
              f"from actsparse.cli import guarded\n"
              f"def work(args):\n    with atomic_output_dir({str(tmp_path / 'out')!r}):\n"
              f"        print('writing', flush=True)\n        time.sleep(60)\n"
              f"raise SystemExit(guarded(work, Namespace()))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    assert [p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()] == [True]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip() == "actsparse: interrupted"
    assert list(tmp_path.iterdir()) == []
