"""openvino-genai pipelines over exports: the same greedy tokens as actsparse.load, batching, clear errors."""
import numpy as np
import openvino_genai
import pytest

import actsparse
from actsparse import ActSparseError
from actsparse.backends.openvino.graph import EXACT_CONFIG
from actsparse.backends.openvino.runtime import extension_problem
from conftest import skip_without_extension

skip_without_extension(extension_problem())
PROMPTS = ["the cat sat on", "a river runs", "one two three four five six"]


@pytest.fixture(scope="module")
def exports(tiny_llama, texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    common = dict(calibration=str(texts["calibration"]), calibration_samples=8, calibration_seq_len=64)
    dense = actsparse.export(str(tiny_llama), root / "dense", **common)
    sparse = actsparse.export(str(tiny_llama), root / "fp32", sparsity={"up": 0.5, "down": 0.5}, **common)
    int8 = actsparse.export(str(tiny_llama), root / "int8", weight_format="int8", plan=sparse / "actsparse.json", **common)
    pruned = actsparse.export(str(tiny_llama), root / "pruned", prefill="sparse", plan=sparse / "actsparse.json", **common)
    return {"dense": dense, "fp32": sparse, "int8": int8, "pruned": pruned}


def greedy(tokens: int) -> openvino_genai.GenerationConfig:
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = tokens  # a random model may emit its EOS early
    config.apply_chat_template = False
    return config


def genai_tokens(pipe, prompt: str, tokens: int) -> tuple[np.ndarray, list[int]]:
    """The prompt's ids (from the export's tokenizer IR) and the greedy tokens ``pipe`` generates after them."""
    inputs = pipe.get_tokenizer().encode(prompt)
    return np.array(inputs.input_ids.data), list(pipe.generate(inputs, greedy(tokens)).tokens[0])


def load_tokens(model, ids: np.ndarray, tokens: int) -> list[int]:
    import torch

    out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.int64),
                         max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
@pytest.mark.parametrize("attention", ["PA", "SDPA"])
def test_llm_pipeline_gives_the_tokens_of_load(exports, fmt, attention):
    """PagedAttention (genai's default) hands the op a prompt as rows of [tokens, 1, K]; it must stay dense there
    as in actsparse.load's stateful graph, or the tokens part after a few steps."""
    pipe = actsparse.genai_pipeline(exports[fmt], ATTENTION_BACKEND=attention, **EXACT_CONFIG)
    model = actsparse.load(exports[fmt], ov_config=dict(EXACT_CONFIG))
    for prompt in PROMPTS:
        ids, got = genai_tokens(pipe, prompt, 16)
        assert len(got) == 16 and ids.shape[1] > 1
        assert got == load_tokens(model, ids, 16), prompt


def test_sparse_decode_is_pruned_through_genai(exports):
    """The op runs inside genai (not a dense fallback): the sparse export's tokens differ from the dense one's."""
    dense = actsparse.genai_pipeline(exports["dense"], **EXACT_CONFIG)
    sparse = actsparse.genai_pipeline(exports["fp32"], **EXACT_CONFIG)
    differ = [genai_tokens(dense, p, 16)[1] != genai_tokens(sparse, p, 16)[1] for p in PROMPTS]
    assert any(differ)


def test_continuous_batching_concurrent_requests(exports):
    """Several requests in one ContinuousBatchingPipeline. Under PagedAttention a step of several rows cannot be
    told from a prompt, so the op computes it dense: alone, each request gets the sparse export's answer; together,
    the dense model's (which is what a dense export gives concurrently too)."""
    concurrent = {}
    for name in ("dense", "fp32"):
        pipe = actsparse.genai_batching_pipeline(exports[name], **EXACT_CONFIG)
        results = pipe.generate(PROMPTS, [greedy(12)] * len(PROMPTS))
        concurrent[name] = [r.m_generation_ids[0] for r in results]
        alone = [pipe.generate([p], [greedy(12)])[0].m_generation_ids[0] for p in PROMPTS]
        if name == "dense":
            assert concurrent[name] == alone
        else:
            single = actsparse.genai_pipeline(exports[name], **EXACT_CONFIG)
            assert alone == [str(single.generate(p, greedy(12))) for p in PROMPTS]
    assert concurrent["fp32"] == concurrent["dense"]


def test_continuous_batching_prunes_every_row_of_a_sparse_prefill_export(exports):
    """With prefill="sparse" each row is pruned on its own, so concurrent requests get the answers they get alone,
    and those are the sparse model's, not the dense one's."""
    pipe = actsparse.genai_batching_pipeline(exports["pruned"], **EXACT_CONFIG)
    concurrent = [r.m_generation_ids[0] for r in pipe.generate(PROMPTS, [greedy(12)] * len(PROMPTS))]
    alone = [pipe.generate([p], [greedy(12)])[0].m_generation_ids[0] for p in PROMPTS]
    assert concurrent == alone
    dense = actsparse.genai_batching_pipeline(exports["dense"], **EXACT_CONFIG)
    assert concurrent != [r.m_generation_ids[0] for r in dense.generate(PROMPTS, [greedy(12)] * len(PROMPTS))]


def test_refusals_are_one_line(exports, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("openvino_model.xml", "openvino_model.bin", "actsparse.json", "config.json"):
        (bare / name).write_bytes((exports["fp32"] / name).read_bytes())
    with pytest.raises(ActSparseError, match="no openvino_tokenizer.xml"):
        actsparse.genai_pipeline(bare)
    with pytest.raises(ActSparseError, match="cannot load .* on NOSUCH"):
        actsparse.genai_pipeline(exports["fp32"], "NOSUCH")


def test_tokenizer_ir_round_trip(exports):
    tok = openvino_genai.Tokenizer(str(exports["fp32"]))
    ids = tok.encode(PROMPTS[0]).input_ids.data
    assert tok.decode(np.asarray(ids)[0].tolist()) == PROMPTS[0]


def test_ir_text_edit_matches_the_model_edit(exports):
    """genai reads the IR file itself, so the bf16 Converts that actsparse.load puts around each op where the
    device runs bf16 are put into a copy of the IR text instead: the same graph, the same logits."""
    import openvino as ov

    from actsparse.backends.openvino.runtime import bf16_activations, bf16_activations_ir, feed, read_model
    from actsparse.runtime_ext import MLP_TYPE, register

    folder = exports["int8"]
    core = ov.Core()
    register(core)
    reference = read_model(core, folder / "openvino_model.xml")
    assert bf16_activations(reference) == 2  # one ActSparseMLP a layer
    edited = core.read_model(bf16_activations_ir((folder / "openvino_model.xml").read_text()),
                             ov.Tensor(np.fromfile(folder / "openvino_model.bin", np.uint8)))
    for model in (edited, reference):
        op_inputs = [op.input_value(0).get_node() for op in model.get_ordered_ops() if op.get_type_name() == MLP_TYPE]
        assert [(n.get_type_name(), n.get_output_element_type(0).to_string()) for n in op_inputs] == [("Convert", "bf16")] * 2
    ids = np.arange(3, 23, dtype=np.int64)[None]
    logits = []
    for model in (edited, reference):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        logits.append(compiled.create_infer_request().infer(feed([i.get_any_name() for i in compiled.inputs], ids))["logits"])
    np.testing.assert_array_equal(logits[0], logits[1])


def test_default_config_gives_the_tokens_of_load(exports):
    """Under the plugin's defaults (bf16 on CPUs with AVX512-BF16 or AMX), genai and actsparse.load compile the
    same graph: with genai's stateful path, the same tokens."""
    pipe = actsparse.genai_pipeline(exports["int8"], ATTENTION_BACKEND="SDPA")
    model = actsparse.load(exports["int8"])
    for prompt in PROMPTS:
        ids, got = genai_tokens(pipe, prompt, 16)
        assert got == load_tokens(model, ids, 16), prompt


def test_bench_through_genai(exports):
    """actsparse bench --runtime genai: TTFT and TPOT of both exports from genai's PerfMetrics, the ratio of the two."""
    import json

    from conftest import run_cli

    proc = run_cli("bench", exports["fp32"], "--baseline", exports["dense"], "--runtime", "genai", "--runs", "1",
                   "--prompt-tokens", "8", "--decode-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["runtime"] == "genai"
    for name in ("sparse", "dense"):
        assert result[name]["decode_ms_per_token"] > 0 and result[name]["prefill_ms"] > 0
        assert result[name]["runtime"] == "openvino-genai"
    assert result["decode_speedup"] == pytest.approx(
        result["dense"]["decode_ms_per_token"] / result["sparse"]["decode_ms_per_token"])


def run_chat_sample(folder, turns: list[str], tokens: int):
    import subprocess
    import sys
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "samples" / "genai_chat.py"
    return subprocess.run([sys.executable, str(sample), str(folder), "--max-new-tokens", str(tokens)],
                          input="\n".join(turns) + "\n\n", capture_output=True, text=True, timeout=300)


def test_chat_sample_needs_a_chat_template(exports):
    proc = run_chat_sample(exports["fp32"], ["hello"], 4)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].endswith("this model was not made for chat")
