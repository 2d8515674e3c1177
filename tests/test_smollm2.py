"""End to end on the embedded default, SmolLM2-135M (real weights, real Wikipedia text)."""
import numpy as np
import pytest

import actsparse
from conftest import plan_of, run_cli
from reference import assert_close_through_flips, ov_logits, torch_logits, torch_model_with_plan

pytestmark = pytest.mark.slow
TARGETS = {"up": 0.3, "down": 0.5}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    proc = run_cli("export", "smollm2-135m", root / "sparse", "--sparsity-up", "0.3", "--sparsity-down", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dense = actsparse.export("smollm2-135m", root / "dense")
    int8 = actsparse.export("smollm2-135m", root / "int8", weight_format="int8", plan=root / "sparse" / "actsparse.json")
    return {"sparse": root / "sparse", "dense": dense, "int8": int8}


def test_heldout_sparsity_and_quality(exports):
    plan = plan_of(exports["sparse"])
    assert plan["calibration"] == {"source": "builtin:wiki", "samples": 64, "seq_len": 256, "error_rows": 512}
    assert len(plan["layers"]) == 90 and all(l["mode"] == 0 for l in plan["layers"])  # SiLU-gated: no centring
    sparse = actsparse.evaluate(exports["sparse"], samples=8)
    dense = actsparse.evaluate(exports["dense"], samples=8)
    for kind, target in TARGETS.items():
        assert sparse["sparsity"][kind] == pytest.approx(target, abs=0.05)
    for layer in plan["layers"]:
        assert sparse["layers"][layer["module"]] == pytest.approx(layer["target_sparsity"], abs=0.05)
    assert dense["perplexity"] < 60  # a real language model on real text
    assert 1.0 < sparse["perplexity"] / dense["perplexity"] < 1.25


def test_matches_torch_reference_on_heldout_text(exports):
    from transformers import AutoTokenizer

    from actsparse.calibration.text import WIKI, read_documents
    from actsparse.exports.models import resolve_model

    tok = AutoTokenizer.from_pretrained(exports["sparse"])
    ids = np.array([tok(read_documents(WIKI, "evaluation")[0])["input_ids"][:64]], np.int64)
    hf = resolve_model("smollm2-135m")
    expected = torch_logits(torch_model_with_plan(hf, plan_of(exports["sparse"])), ids)
    got = ov_logits(exports["sparse"], ids, prefill_sparse=True)
    assert_close_through_flips(got, expected)  # 60 masks x 64 tokens: a few inputs sit within rounding of τ
    dense = ov_logits(exports["sparse"], ids)  # prefill dense: the exact dense model
    np.testing.assert_allclose(dense, torch_logits(torch_model_with_plan(hf, {"layers": []}), ids), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("weight_format", ["fp32", "int8"])
def test_fused_matches_unfused(exports, weight_format, tmp_path):
    """The default export is fused; the same plan unfused is the reference, dense and pruned prefill."""
    plan = exports["sparse"] / "actsparse.json"
    fused = exports["sparse" if weight_format == "fp32" else weight_format]
    unfused = actsparse.export("smollm2-135m", tmp_path / "unfused", weight_format=weight_format, plan=plan, fuse=False)
    assert plan_of(fused)["passes"]["fused"] == 90
    ids = np.arange(1000, 1032, dtype=np.int64)[None]
    np.testing.assert_allclose(ov_logits(fused, ids), ov_logits(unfused, ids), atol=2e-3, rtol=1e-3)
    assert_close_through_flips(ov_logits(fused, ids, prefill_sparse=True), ov_logits(unfused, ids, prefill_sparse=True))


def test_load_and_generate(exports):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exports["sparse"])
    model = actsparse.load(exports["sparse"])
    inputs = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def test_tokenizer_irs_match_hf(exports):
    """SmolLM2's decoder wraps ByteLevel in steps openvino-tokenizers cannot convert; the export's IRs still
    encode and decode as the HF tokenizer does."""
    from test_export_openvino import _tokenizer_irs_match

    from actsparse.calibration.text import WIKI, read_documents

    ids = np.random.default_rng(0).integers(0, 49152, (32, 24))
    _tokenizer_irs_match(exports["sparse"], read_documents(WIKI, "evaluation")[0][:2000], ids)


@pytest.mark.parametrize("name", ["sparse", "int8"])
def test_genai_gives_the_greedy_tokens_of_load(exports, name):
    """openvino-genai's LLMPipeline and actsparse.load under the exact config. With genai's stateful SDPA path the
    graphs compute alike and all tokens match. PagedAttention rounds attention differently, so a channel near τ
    flips after some tokens (the sparse model is chaotic, see README); its first tokens must still match, which
    a pruned prompt (as before PagedAttention's layout was recognised) did not: it changed the first token."""
    from test_genai import genai_tokens, load_tokens

    from actsparse.backends.openvino.graph import EXACT_CONFIG

    model = actsparse.load(exports[name], ov_config=dict(EXACT_CONFIG))
    for attention, exact in (("SDPA", 24), ("PA", 4)):
        pipe = actsparse.genai_pipeline(exports[name], ATTENTION_BACKEND=attention, **EXACT_CONFIG)
        for prompt in ("The capital of France is", "Photosynthesis is the process by which"):
            ids, got = genai_tokens(pipe, prompt, 24)
            assert got[:exact] == load_tokens(model, ids, 24)[:exact], (attention, prompt)


def test_chat_sample_streams_the_answers(exports):
    """samples/genai_chat.py on SmolLM2 (it has a chat template): each streamed turn is the pipeline's answer to
    the conversation so far."""
    import openvino_genai
    from test_genai import run_chat_sample

    turns = ["What is the capital of France?", "And of Italy?"]
    proc = run_chat_sample(exports["sparse"], turns, 12)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pipe = actsparse.genai_pipeline(exports["sparse"])
    config = pipe.get_generation_config()
    config.max_new_tokens = 12
    history, expected = openvino_genai.ChatHistory(), []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        expected.append(str(pipe.generate(history, config)))
        history.append({"role": "assistant", "content": expected[-1]})
    assert [part.strip() for part in proc.stdout.split("> ")[1:3]] == [text.strip() for text in expected]
