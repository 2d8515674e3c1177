"""Plan file round trip and validation; calibration text sources."""
import json

import numpy as np
import pytest

from actsparse import ActSparseError
from actsparse.calibration.plan import build_plan, plan_groups, read_plan, write_plan
from actsparse.calibration.stats import StreamingHistogram
from actsparse.calibration.targets import Group, Target, kind_of
from actsparse.calibration.text import WIKI, read_documents, token_chunks


def _groups():
    up = Group("norm:0", [Target("model.layers.0.mlp.gate_proj", "g", "gate", 8, 16),
                          Target("model.layers.0.mlp.up_proj", "u", "up", 8, 16)])
    down = Group("act:0", [Target("model.layers.0.mlp.down_proj", "d", "down", 16, 8)])
    return [up, down]


def test_plan_round_trip_and_replan(tmp_path):
    rng = np.random.default_rng(0)
    hists = {"norm:0": StreamingHistogram(), "act:0": StreamingHistogram()}
    hists["norm:0"].update(rng.normal(size=10_000))
    hists["act:0"].update(rng.laplace(size=10_000))
    plan = build_plan(_groups(), hists, {"up": 0.3, "down": 0.5})
    write_plan(tmp_path, plan, hists)
    loaded, loaded_hists = read_plan(tmp_path)
    assert loaded == json.loads(json.dumps(plan))
    assert [g.name for g in plan_groups(loaded)] == ["norm:0", "act:0"]
    for name in hists:
        np.testing.assert_array_equal(loaded_hists[name].counts, hists[name].counts)
    gate, up, down = loaded["layers"]
    assert gate["threshold"] == up["threshold"]  # one mask per shared input
    assert down["calibrated_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert np.mean(np.abs(rng.laplace(size=100_000)) <= down["threshold"]) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("content,message", [
    ("[]", "not a JSON object"),
    ('{"format_version": 2, "layers": []}', "format_version"),
    ('{"format_version": 1}', "'layers'"),
    ('{"format_version": 1, "layers": [{"module": "m"}]}', "'node'"),
])
def test_invalid_plans_are_refused(tmp_path, content, message):
    (tmp_path / "actsparse.json").write_text(content)
    with pytest.raises(ActSparseError, match=message):
        read_plan(tmp_path)


def test_missing_statistics_are_reported(tmp_path):
    hists = {"norm:0": StreamingHistogram(), "act:0": StreamingHistogram()}
    write_plan(tmp_path, build_plan(_groups(), hists, {}), hists)
    (tmp_path / "actsparse_stats.npz").write_bytes(b"broken")
    with pytest.raises(ActSparseError, match="statistics"):
        read_plan(tmp_path)


def test_kinds_from_module_names():
    assert kind_of("model.layers.3.mlp.gate_proj") == "gate"
    assert kind_of("transformer.h.0.mlp.c_proj") == "down"
    assert kind_of("transformer.h.0.attn.c_proj") == "o"
    assert kind_of("encoder.layer.0.attention.output.dense") == "o"
    assert kind_of("encoder.layer.0.output.dense") == "down"
    assert kind_of("lm_head") is None


def test_text_file_folder_and_empty(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second document")
    assert read_documents(str(tmp_path / "a.txt")) == ["first document"]
    assert read_documents(str(tmp_path)) == ["first document", "second document"]
    (tmp_path / "empty.txt").write_text("\n ")
    with pytest.raises(ActSparseError, match="empty"):
        read_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(ActSparseError, match="does not exist"):
        read_documents(str(tmp_path / "nope.txt"))


def test_token_chunks_are_consecutive_windows(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    docs = ["the city of the river " * 40, "a king and an army " * 40]
    chunks = token_chunks(tok, docs, samples=3, seq_len=32)
    stream = tok(docs[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert chunks.shape == (3, 32)
    assert chunks.ravel().tolist() == (stream + tok(docs[1], add_special_tokens=False)["input_ids"])[:96]
    with pytest.raises(ActSparseError, match="fewer than one sample"):
        token_chunks(tok, ["tiny"], samples=2, seq_len=64)


def test_builtin_wiki_splits_are_disjoint_articles():
    calibration, evaluation = read_documents(WIKI, "calibration"), read_documents(WIKI, "evaluation")
    assert len(calibration) > 50 and len(evaluation) > 10
    assert sum(map(len, calibration)) > 2_000_000
    assert not set(calibration) & set(evaluation)
    markup = sum(doc.count("{{") + doc.count("[[") + doc.count("<ref") for doc in evaluation)
    assert markup < 10  # templates and links are stripped (a few malformed ones survive)
