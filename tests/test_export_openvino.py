"""The whole export on tiny random models, against the HF torch model with plan hooks."""
import numpy as np
import openvino as ov
import pytest

import actsparse
from actsparse.backends.openvino.runtime import extension_problem, read_model
from actsparse.runtime_ext import OP_TYPE
from conftest import plan_of, skip_without_extension
from reference import ov_logits, torch_logits, torch_model_with_plan

CALIB = {"calibration_samples": 16, "calibration_seq_len": 64}


def _heldout_ids(folder, texts, n=48):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(texts["evaluation"].read_text()[:2000])["input_ids"]
    return np.array([ids[:n]], np.int64)


def _op_types(folder):
    model = ov.Core().read_model(folder / "openvino_model.xml")
    return sorted(op.get_type_name() for op in model.get_ordered_ops())


def _constant_offsets(xml):
    from xml.etree import ElementTree

    return [int(data.get("offset")) for data in ElementTree.parse(xml).iter("data") if data.get("offset") is not None]


def test_save_ir_aligns_every_constant_and_keeps_its_values(tmp_path):
    """Constants of odd sizes (a 4-byte scalar first, one of them shared) land on 64-byte offsets, and the
    model reads back the same values: ov.save_model alone packs them back to back."""
    from openvino import opset13 as ops

    from actsparse.backends.openvino.export import save_ir

    rng = np.random.default_rng(0)
    x = ops.parameter([2, 7], np.float32, name="x")
    shared = rng.standard_normal((7, 7)).astype(np.float32)
    y = ops.multiply(x, np.float32(3.0))
    for w in (shared, rng.standard_normal((7, 7)).astype(np.float16).astype(np.float32), shared):
        y = ops.add(ops.matmul(y, ops.constant(w), False, False), ops.convert(ops.constant(rng.integers(0, 9, 7).astype(np.int8)), "f32"))
    model = ov.Model([y], [x])
    ov.save_model(model, tmp_path / "plain.xml", compress_to_fp16=False)
    assert any(o % 64 for o in _constant_offsets(tmp_path / "plain.xml"))  # what the alignment is for
    save_ir(model, tmp_path / "aligned.xml")
    offsets = _constant_offsets(tmp_path / "aligned.xml")
    assert len(offsets) == len(_constant_offsets(tmp_path / "plain.xml")) and all(o % 64 == 0 for o in offsets)
    core = ov.Core()
    values = [sorted((c.get_friendly_name(), c.get_data().tobytes()) for c in m.get_ordered_ops()
                     if c.get_type_name() == "Constant")
              for m in (core.read_model(tmp_path / "plain.xml"), core.read_model(tmp_path / "aligned.xml"))]
    assert values[0] == values[1]
    xv = rng.standard_normal((2, 7)).astype(np.float32)
    outs = [core.compile_model(tmp_path / f"{n}.xml", "CPU").create_infer_request().infer({0: xv})[0] for n in ("plain", "aligned")]
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.fixture(scope="module")
def llama_exports(tiny_llama, texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-exports")
    common = dict(calibration=str(texts["calibration"]), **CALIB)
    return {
        "dense": actsparse.export(str(tiny_llama), root / "dense", sparsity={"sparsity": 0}, **common),
        "sparse": actsparse.export(str(tiny_llama), root / "sparse", sparsity={"up": 0.3, "down": 0.5},
                                   prefill="sparse", **common),
    }


def test_sparse_export_matches_torch_reference(tiny_llama, texts, llama_exports):
    folder = llama_exports["sparse"]
    plan = plan_of(folder)
    assert {l["kind"] for l in plan["layers"]} == {"gate", "up", "down"}
    assert {k: plan["passes"][k] for k in ("masks", "shifts", "folds")} == {"masks": 4, "shifts": 0, "folds": 0}
    ids = _heldout_ids(tiny_llama, texts)
    expected = torch_logits(torch_model_with_plan(tiny_llama, plan), ids)
    dense = torch_logits(torch_model_with_plan(tiny_llama, {"layers": []}), ids)
    got = ov_logits(folder, ids)
    assert np.abs(expected - dense).max() > 1e-3  # the pruning does change the logits
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-3)


def test_exported_constants_are_aligned(llama_exports):
    for folder in llama_exports.values():
        offsets = _constant_offsets(folder / "openvino_model.xml")
        assert offsets and all(o % 64 == 0 for o in offsets), folder


def test_zero_sparsity_is_the_plain_dense_model(tiny_llama, texts, llama_exports, tmp_path):
    from actsparse.backends.openvino.export import export_openvino

    plain = tmp_path / "plain"
    export_openvino(tiny_llama, plain)
    dense = llama_exports["dense"]
    assert _op_types(dense) == _op_types(plain)  # no inserted node
    assert all(l["threshold"] == 0 and l["target_sparsity"] == 0 for l in plan_of(dense)["layers"])
    ids = _heldout_ids(tiny_llama, texts)
    np.testing.assert_allclose(ov_logits(dense, ids), torch_logits(torch_model_with_plan(tiny_llama, {"layers": []}), ids),
                               atol=2e-4, rtol=1e-3)


def test_plan_without_sparsity_reapplies_its_own(tiny_llama, llama_exports, tmp_path):
    old = plan_of(llama_exports["sparse"])
    out = actsparse.export(str(tiny_llama), tmp_path / "again", plan=llama_exports["sparse"] / "actsparse.json",
                           sparsity={"sparsity": None, "up": None}, prefill="sparse", calibration="/nonexistent")
    assert [(l["threshold"], l["target_sparsity"]) for l in plan_of(out)["layers"]] == \
        [(l["threshold"], l["target_sparsity"]) for l in old["layers"]]


def test_plan_reapplies_a_new_sparsity_without_calibrating(tiny_llama, llama_exports, tmp_path):
    old = plan_of(llama_exports["sparse"])
    out = actsparse.export(str(tiny_llama), tmp_path / "replan", sparsity={"up": 0.6, "down": 0.2},
                           plan=llama_exports["sparse"] / "actsparse.json", calibration="/nonexistent")
    new = plan_of(out)
    assert new["calibration"] == old["calibration"]
    for before, after in zip(old["layers"], new["layers"]):
        target = 0.6 if after["kind"] in ("gate", "up") else 0.2
        assert after["target_sparsity"] == target
        assert after["calibrated_sparsity"] == pytest.approx(target, abs=1e-3)
        assert (after["threshold"] > before["threshold"]) == (target > before["target_sparsity"])


@pytest.mark.parametrize("weight_format", ["fp32", "fp16", "int8", "int4"])
def test_bias_fold_is_exact_with_a_nonzero_mode(tiny_gelu, texts, tmp_path, weight_format):
    """GELU FFN, centring on: prefill runs unpruned, so the fold must reproduce the dense model exactly."""
    common = dict(calibration=str(texts["calibration"]), weight_format=weight_format, **CALIB)
    dense = actsparse.export(str(tiny_gelu), tmp_path / "dense", **common)
    sparse = actsparse.export(str(tiny_gelu), tmp_path / "sparse", sparsity={"down": 0.5},
                              mode_centering="on", **common)
    plan = plan_of(sparse)
    weight_type = {"fp32": "f32", "fp16": "f16", "int8": "u8", "int4": "u4"}[weight_format]
    dense_ir = ov.Core().read_model(dense / "openvino_model.xml")
    assert weight_type in {op.get_output_element_type(0).get_type_name() for op in dense_ir.get_ordered_ops()
                           if op.get_type_name() == "Constant"}  # the export really compressed the weights
    modes = [l["mode"] for l in plan["layers"] if l["kind"] == "down"]
    assert len(modes) == 2 and all(m < -0.05 for m in modes)  # the negative lobe of GELU
    assert {k: plan["passes"][k] for k in ("masks", "shifts", "folds")} == {"masks": 2, "shifts": 2, "folds": 2}
    ids = _heldout_ids(tiny_gelu, texts)
    np.testing.assert_allclose(ov_logits(sparse, ids), ov_logits(dense, ids), atol=1e-4, rtol=1e-4)
    if weight_format == "fp32":  # and pruning every token follows the torch reference
        expected = torch_logits(torch_model_with_plan(tiny_gelu, plan), ids)
        np.testing.assert_allclose(ov_logits(sparse, ids, prefill_sparse=True), expected, atol=2e-4, rtol=1e-3)
    skip_without_extension(extension_problem())  # the checks above hold for the unfused pattern too
    fused = [op.get_attributes()["weight_format"] for op in read_model(ov.Core(), sparse / "openvino_model.xml")
             .get_ordered_ops() if op.get_type_name() == OP_TYPE]
    assert fused == [weight_type] * 2


def test_bf16_export_fuses_bf16_weights(tiny_gelu, texts, tmp_path):
    """--weight-format bf16: the IR stays fp32, the fused ops hold bf16 weights (same plan, close logits)."""
    skip_without_extension(extension_problem())
    fp32 = actsparse.export(str(tiny_gelu), tmp_path / "fp32", sparsity={"down": 0.5}, mode_centering="on",
                            calibration=str(texts["calibration"]), **CALIB)
    bf16 = actsparse.export(str(tiny_gelu), tmp_path / "bf16", plan=fp32 / "actsparse.json", weight_format="bf16")
    assert plan_of(bf16)["weight_format"] == "bf16"
    assert [l["threshold"] for l in plan_of(bf16)["layers"]] == [l["threshold"] for l in plan_of(fp32)["layers"]]
    ops = [op for op in read_model(ov.Core(), bf16 / "openvino_model.xml").get_ordered_ops() if op.get_type_name() == OP_TYPE]
    assert [op.get_attributes()["weight_format"] for op in ops] == ["bf16"] * 2
    for op in ops:  # two bytes a weight: [K, N] of the down projection
        k, n = op.get_input_partial_shape(0)[-1].get_length(), op.get_attributes()["out_features"]
        assert op.input_value(1).get_node().get_byte_size() == 2 * k * n
    ids = _heldout_ids(tiny_gelu, texts)
    got, expected = ov_logits(bf16, ids), ov_logits(fp32, ids)
    assert 0 < np.abs(got - expected).max() < 2e-2 * np.abs(expected).max()


def test_auto_centering_centres_the_gelu_model(tiny_gelu, texts, tmp_path):
    out = actsparse.export(str(tiny_gelu), tmp_path / "auto", sparsity={"down": 0.5},
                           calibration=str(texts["calibration"]), **CALIB)
    assert all(l["mode"] < -0.05 for l in plan_of(out)["layers"] if l["kind"] == "down")
    teal = actsparse.export(str(tiny_gelu), tmp_path / "teal", sparsity={"down": 0.5}, method="teal",
                            calibration=str(texts["calibration"]), **CALIB)
    assert all(l["mode"] == 0 for l in plan_of(teal)["layers"])


def test_eval_reports_perplexity_and_measured_sparsity(tiny_llama, texts, llama_exports):
    dense = actsparse.evaluate(llama_exports["dense"], text=str(texts["evaluation"]), samples=4, seq_len=64)
    sparse = actsparse.evaluate(llama_exports["sparse"], text=str(texts["evaluation"]), samples=4, seq_len=64)
    assert dense["tokens"] == sparse["tokens"] == 4 * 63
    assert dense["sparsity"] == {}
    assert sparse["sparsity"]["up"] == pytest.approx(0.3, abs=0.05)
    assert sparse["sparsity"]["down"] == pytest.approx(0.5, abs=0.05)
    # perplexity from the torch model on the same windows
    import torch
    from transformers import AutoTokenizer

    from actsparse.calibration.text import read_documents, token_chunks

    chunks = token_chunks(AutoTokenizer.from_pretrained(tiny_llama), read_documents(str(texts["evaluation"])), 4, 64)
    logits = torch.tensor(torch_logits(torch_model_with_plan(tiny_llama, plan_of(llama_exports["sparse"])), chunks))
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            torch.tensor(chunks[:, 1:]).reshape(-1))
    assert sparse["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-3)


def test_load_returns_an_optimum_model_that_generates(tiny_llama, llama_exports):
    from optimum.intel import OVModelForCausalLM
    from transformers import AutoTokenizer

    model = actsparse.load(llama_exports["sparse"])
    assert isinstance(model, OVModelForCausalLM)
    tok = AutoTokenizer.from_pretrained(llama_exports["sparse"])
    out = model.generate(**tok("The city", return_tensors="pt"), max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == len(tok("The city")["input_ids"]) + 5


def test_bench_times_both_exports_and_counts_the_skipped_weight_bytes(tiny_llama, llama_exports):
    """fp32 IR: every Linear's weight is 4 bytes a parameter, so the skipped share follows from the torch model."""
    import torch
    from transformers import AutoModelForCausalLM

    from actsparse.benchmark import bench

    linears = [m for m in AutoModelForCausalLM.from_pretrained(tiny_llama).modules() if isinstance(m, torch.nn.Linear)]
    skipped = sum(l["in_features"] * l["out_features"] * l["target_sparsity"]
                  for l in plan_of(llama_exports["sparse"])["layers"])
    result = bench(llama_exports["sparse"], llama_exports["dense"], prompt_tokens=8, decode_tokens=2, runs=1)
    assert result["sparsified_weight_share"] == pytest.approx(skipped / sum(m.weight.numel() for m in linears))
    for name in ("sparse", "dense"):
        assert result[name]["decode_ms_per_token"] > 0 and result[name]["prefill_ms"] > 0
        assert result[name]["peak_rss_mb"] > 0 and result[name]["inference_precision"] in ("f32", "bf16")
    assert result["decode_speedup"] == pytest.approx(
        result["dense"]["decode_ms_per_token"] / result["sparse"]["decode_ms_per_token"])


def _tokenizer_irs_match(folder, text: str, ids: np.ndarray) -> None:
    """The export's tokenizer IRs encode ``text`` and decode each row of ``ids`` as the HF tokenizer does."""
    import openvino_tokenizers  # noqa: F401  (registers the tokenizer ops with OpenVINO)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    core = ov.Core()
    tokenize = core.compile_model(folder / "openvino_tokenizer.xml", "CPU")
    detokenize = core.compile_model(folder / "openvino_detokenizer.xml", "CPU")
    assert list(tokenize([text])["input_ids"][0]) == hf(text)["input_ids"]
    decoded = detokenize(ids)["string_output"]
    assert list(decoded) == [hf.decode(row, skip_special_tokens=True) for row in ids]


def test_decoder_export_writes_tokenizer_irs_that_match_hf(tiny_llama, texts, tmp_path):
    out = actsparse.export(str(tiny_llama), tmp_path / "out")
    ids = np.random.default_rng(0).integers(0, 400, (16, 12))
    _tokenizer_irs_match(out, texts["evaluation"].read_text()[:500], ids)


def test_plain_byte_level_decoder_only_where_the_extra_steps_change_nothing(tiny_llama):
    from tokenizers import decoders
    from transformers import AutoTokenizer

    from actsparse.backends.openvino.export import plain_byte_level_decoder

    def with_decoder(decoder, extra_tokens=()):
        tok = AutoTokenizer.from_pretrained(tiny_llama)
        tok.add_tokens(list(extra_tokens))
        tok.backend_tokenizer.decoder = decoder
        return tok

    noop_steps = [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "), decoders.ByteLevel()]
    tok = with_decoder(decoders.Sequence(noop_steps))
    assert plain_byte_level_decoder(tok) and type(tok.backend_tokenizer.decoder).__name__ == "ByteLevel"
    assert not plain_byte_level_decoder(with_decoder(decoders.Sequence(noop_steps), ["<0x41>"]))  # byte tokens
    assert not plain_byte_level_decoder(with_decoder(decoders.Sequence(noop_steps), ["▁city"]))
    other = [decoders.Replace("a", "b"), decoders.ByteLevel()]
    assert not plain_byte_level_decoder(with_decoder(decoders.Sequence(other)))
    assert not plain_byte_level_decoder(with_decoder(decoders.ByteLevel()))  # nothing to do
