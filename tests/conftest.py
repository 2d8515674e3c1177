"""Shared fixtures: tiny random models with a real tokenizer, and their exports."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

WORDS = ("the of and to in is was for on as by with he that at from his it an were are which this be or "
         "city river state music school league army church film album station island county war king "
         "north south east west first second large small early late new old people year years time").split()


def _sentences(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, rng.integers(8, 20))).capitalize() + "." for _ in range(n))


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> dict[str, Path]:
    """A calibration text and a disjoint held-out text (different random sentences)."""
    root = tmp_path_factory.mktemp("text")
    (root / "calib.txt").write_text(_sentences(0, 600))
    (root / "heldout.txt").write_text(_sentences(1, 200))
    return {"calibration": root / "calib.txt", "evaluation": root / "heldout.txt"}


def _tokenizer(folder: Path, text: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, texts) -> Path:
    """A 2-layer Llama (SiLU-gated MLP, GQA) with random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = _tokenizer(folder, texts["calibration"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gelu(tmp_path_factory, texts) -> Path:
    """A 2-layer GPT-2 (plain-GELU FFN with biases) whose down-proj input sits on GELU's negative lobe."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gelu")
    tok = _tokenizer(folder, texts["calibration"])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                        activation_function="gelu", eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for block in model.transformer.h:  # N(−0.5, 1) pre-activations: GELU output piles up at −0.17
            block.mlp.c_fc.weight.normal_(0, 0.125)  # unit-variance pre-activations
            block.mlp.c_fc.bias.fill_(-0.5)
    model.save_pretrained(folder)
    return folder


def skip_without_extension(problem: str | None):
    """Skip a module whose library is missing, except where ACTSPARSE_REQUIRE_EXTENSION is set (CI)."""
    if problem is None:
        return
    if os.environ.get("ACTSPARSE_REQUIRE_EXTENSION"):
        raise RuntimeError(f"ACTSPARSE_REQUIRE_EXTENSION is set but {problem}")
    pytest.skip(problem, allow_module_level=True)


def run_cli(*args: str, env: dict | None = None):
    """Run ``python -m actsparse ARGS`` and return the completed process."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "actsparse", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


def plan_of(folder: Path) -> dict:
    return json.loads((folder / "actsparse.json").read_text())
