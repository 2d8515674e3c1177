"""Models of deployed size: 16-bit checkpoints exported without an fp32 copy, the disk check, the memory bound."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import actsparse
import actsparse._common as common
from actsparse import ActSparseError
from actsparse.cli import main
from actsparse.exports.models import parameter_count
from actsparse.pipeline import ExportOptions, export_disk_bytes
from conftest import plan_of
from reference import ov_logits

GIB = 1 << 30
CALIB = dict(calibration_samples=4, calibration_seq_len=32)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def bf16_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama saved in bf16, as 7-8B checkpoints are."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("bf16-llama")
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(folder)
    for tokenizer_file in tiny_llama.glob("*token*"):
        shutil.copy(tokenizer_file, folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


def _matmul_names(folder: Path) -> list[str]:
    import openvino as ov

    model = ov.Core().read_model(folder / "openvino_model.xml")
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]


def test_bf16_checkpoint_exports_int4_from_its_16bit_weights(bf16_llama, texts, tmp_path, monkeypatch):
    """int4 traced from the bf16 weights equals int4 traced in fp32 (bf16 widens exactly), and the sparse
    export's bias fold still reproduces the dense model where prefill runs unpruned."""
    common_options = dict(calibration=str(texts["calibration"]), weight_format="int4", **CALIB)
    dense = actsparse.export(str(bf16_llama), tmp_path / "dense", **common_options)
    sparse = actsparse.export(str(bf16_llama), tmp_path / "sparse", sparsity={"up": 0.5, "down": 0.5},
                              mode_centering="on", **common_options)
    monkeypatch.setattr("actsparse.backends.openvino.export.loads_16bit", lambda *args: False)
    traced_fp32 = actsparse.export(str(bf16_llama), tmp_path / "fp32", **common_options)
    assert any("ov_ext::linear" in name for name in _matmul_names(dense))  # traced with 16-bit weights
    assert not any("ov_ext::linear" in name for name in _matmul_names(traced_fp32))
    plan = plan_of(sparse)
    assert plan["passes"]["masks"] == 4 and plan["passes"]["folds"] == 6  # both layers: gate+up, down
    ids = np.random.default_rng(0).integers(0, 400, (1, 24))
    reference = ov_logits(traced_fp32, ids)
    np.testing.assert_allclose(ov_logits(dense, ids), reference, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ov_logits(sparse, ids), reference, atol=1e-4, rtol=1e-4)
    stages = plan["export"]["stages"]
    assert list(stages) == ["optimum export", "compress int4", "tokenizer IRs", "calibration", "rewrite", "save"]
    assert all(s["seconds"] > 0 and s["peak_rss_gib"] > 0 for s in stages.values())


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from Linux's /proc")
def test_stage_peak_and_dropped_mapped_pages(tmp_path):
    """A stage records the peak of a transient allocation; pages of a mapped file leave the RSS while
    dropping_mapped_pages runs and read back unchanged."""
    with common.recording_stages() as stages, common.stage("spike"):
        base = common.current_rss()
        spike = np.ones(300 << 20, np.uint8)  # touched: resident
        del spike
    assert stages["spike"]["peak_rss_gib"] * GIB >= base + (250 << 20)
    data = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    (tmp_path / "weights.bin").write_bytes(data.tobytes())
    mapped = np.memmap(tmp_path / "weights.bin", mode="r")
    touched = int(mapped.sum(dtype=np.uint64))
    resident = _rss_file_bytes()
    with common.dropping_mapped_pages(tmp_path / "weights.bin", every=0.01):
        import time

        time.sleep(0.2)
        assert _rss_file_bytes() <= resident - (48 << 20)
    assert int(mapped.sum(dtype=np.uint64)) == touched == int(data.sum(dtype=np.uint64))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's; elsewhere ru_maxrss is used")
def test_a_child_reports_its_own_peak_not_its_parents():
    """A process started from a large parent (actsparse bench's measurement children) reports its own peak:
    ru_maxrss would carry the parent's 400 MB across exec."""
    ballast = np.ones(400 << 20, np.uint8)  # resident in this process when the child starts
    code = "from actsparse._common import own_peak_rss, peak_rss; print(own_peak_rss(), peak_rss())"
    own, peak = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout.split())
    assert 0 < own == peak < (200 << 20) and ballast[-1] == 1


def test_parameter_count_reads_the_safetensors_headers(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert parameter_count(tiny_llama) == sum(p.numel() for p in model.parameters())


def test_too_little_disk_is_refused_with_nothing_written(tiny_llama, tmp_path, monkeypatch, capsys):
    needed = export_disk_bytes(tiny_llama, ExportOptions(weight_format="int8"))
    monkeypatch.setattr(common, "free_bytes", lambda path: needed - 1)
    with pytest.raises(ActSparseError, match=r"not enough disk space for the export of .* needs about"):
        actsparse.export(str(tiny_llama), tmp_path / "out", weight_format="int8")
    assert main(["export", str(tiny_llama), str(tmp_path / "out"), "--weight-format", "int8"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: not enough disk space" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary one


def test_unknown_architecture_is_refused_with_the_supported_list(tiny_llama, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ActSparseError, match=r"model type 'mamba' is not supported: .*llama, mistral, qwen2"):
        actsparse.export(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _vocabulary_model(tied: bool, vocab: int = 4096, hidden: int = 64) -> "ov.Model":
    """Embeddings (Gather), two MatMuls and a head, bf16 weights read through Converts, as optimum traces them."""
    import openvino as ov
    from openvino import opset13 as ops

    rng, kept = np.random.default_rng(0), []

    def bf16(*shape, std=0.02):  # the Tensor shares the array's memory, so the array is kept
        kept.append((rng.normal(0, std, shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16))
        return ops.constant(ov.Tensor(kept[-1], list(shape), ov.Type.bf16))

    ids = ops.parameter([-1, -1], ov.Type.i64, name="ids")
    embed = bf16(vocab, hidden)
    x = ops.gather(ops.convert(embed, ov.Type.f32), ops.convert(ids, ov.Type.i32), ops.constant(np.int32(0)))
    for _ in range(2):
        x = ops.matmul(x, ops.convert(bf16(hidden, hidden, std=0.05), ov.Type.f32), False, True)
    head = embed if tied else bf16(vocab, hidden)
    model = ov.Model([ops.matmul(x, ops.convert(head, ov.Type.f32), False, True)], [ids])
    model.kept = kept
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_vocabulary_weights_compress_in_blocks_as_nncf_does(tied, weight_format):
    """Embeddings and head compressed a block of rows at a time give NNCF's own whole-tensor result: the same
    graph, constants and outputs (and NNCF still keeps the other MatMuls in int4, the head in int8)."""
    import nncf
    import openvino as ov

    from actsparse.backends.openvino.export import compress_vocabulary

    mode = nncf.CompressWeightsMode.INT8_ASYM if weight_format == "int8" else nncf.CompressWeightsMode.INT4_ASYM
    options = {} if weight_format == "int8" else {"group_size": 32, "ratio": 1.0}
    expected = nncf.compress_weights(_vocabulary_model(tied), mode=mode, **options)
    model = _vocabulary_model(tied)
    names, last = compress_vocabulary(model, min_elements=4096 * 64, block_elements=512 * 64)
    assert len(names) == 2 and last
    got = nncf.compress_weights(model, mode=mode, **options, **({"all_layers": True} if options else {}))
    assert [op.get_type_name() for op in got.get_ordered_ops()] == [op.get_type_name() for op in expected.get_ordered_ops()]

    def constants(m):
        return [(op.get_element_type(), op.data) for op in m.get_ordered_ops() if op.get_type_name() == "Constant"]

    pairs = list(zip(constants(expected), constants(got), strict=True))
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in pairs)
    assert sum(a[0] == ov.Type.u4 for a, _ in pairs) == (4 if weight_format == "int4" else 0)  # 2 codes, 2 zero points
    ids = {"ids": np.random.default_rng(1).integers(0, 4096, (1, 9))}
    core = ov.Core()
    run = [core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(ids)[0] for m in (expected, got)]
    np.testing.assert_array_equal(run[0], run[1])


@pytest.mark.slow
def test_8b_wide_export_stays_within_its_memory_bound(tmp_path):
    """Two layers of Llama-3-8B's widths (SmolLM2's 49152-token vocabulary, not 128256, to fit CI's time), bf16,
    exported to int4 with sparsity by the CLI: its peak RSS is at most 1.3 x the bf16 size + 2 GiB."""
    from scale import random_llama

    model = random_llama(tmp_path / "hf", layers=2, vocab=49152)
    bf16_bytes = 2 * parameter_count(model)
    cmd = [sys.executable, "-m", "actsparse", "export", str(model), str(tmp_path / "out"), "--weight-format", "int4",
           "--sparsity-up", "0.5", "--sparsity-down", "0.5", "--calibration-samples", "1",
           "--calibration-seq-len", "16"]
    with open(tmp_path / "stderr", "w") as stderr:  # a file: the progress bars would fill a pipe
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        status, usage = os.wait4(proc.pid, 0)[1:]  # this child's own rusage: its peak RSS
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "stderr").read_text()[-2000:]
    peak = usage.ru_maxrss * 1024
    assert peak <= 1.3 * bf16_bytes + 2 * GIB, f"peak RSS {peak / GIB:.2f} GiB for {bf16_bytes / GIB:.2f} GiB of bf16"
    plan = plan_of(tmp_path / "out")
    assert plan["passes"]["fused"] == 6 and plan["export"]["peak_rss_gib"] <= peak / GIB + 0.05
    written = sum(f.stat().st_size for f in (tmp_path / "out").iterdir())
    assert written <= export_disk_bytes(model, ExportOptions(weight_format="int4"))
