"""A model of deployed size: a random-weight Llama with Llama-3-8B's layer shapes, exported and timed. Prints JSON.

Hidden 4096, intermediate 14336, 32 query / 8 KV heads, vocabulary 128256 (SmolLM2's tokenizer stands in: its
ids are a subset). The Hugging Face folder is written in bf16 one tensor at a time, so no fp32 copy of the model
is ever held. For int4 and int8 it records ``actsparse export``'s time per stage and peak RSS (its own process
and children) against the bound 1.3 x bf16 size + 2 GiB, then decode ms/token of the dense export against
sparse ones at up/gate+down 0.5 and at every projection 0.5, with prefill of a 256-token prompt
(``actsparse bench``).

    python benchmarks/scale.py [--layers 32] [--vocab 128256] [--formats int4 int8] [--work DIR]
                               [--runs 3] [--export-only] [--output FILE]
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from _harness import add_work, emit, parser, run_cli

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)
SPARSE = {"mlp0.5": ["--sparsity-up", 0.5, "--sparsity-down", 0.5],
          "all0.5": ["--targets", "all", "--sparsity", 0.5]}
GIB = 1 << 30


def random_llama(folder: Path, layers: int, vocab: int = LLAMA3_8B["vocab_size"], seed: int = 0) -> Path:
    """A Llama-3-8B-shaped Hugging Face folder with ``layers`` layers of N(0, 0.02) bf16 weights, written one
    safetensors shard per layer (embeddings and head in their own), made once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from actsparse._common import atomic_output_dir
    from actsparse.exports.models import resolve_model

    config = LlamaConfig(**{**LLAMA3_8B, "vocab_size": vocab}, num_hidden_layers=layers, torch_dtype="bfloat16",
                         tie_word_embeddings=False)
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return (torch.randn(*shape, generator=generator, dtype=torch.bfloat16) * 0.02).contiguous()

    shards = {"model-embed.safetensors": {"model.embed_tokens.weight": normal(vocab, h)}}
    shards.update({f"model-layer{n:03d}.safetensors": None for n in range(layers)})
    shards["model-head.safetensors"] = {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                        "lm_head.weight": normal(vocab, h)}
    index = {}
    with atomic_output_dir(folder) as tmp:
        for name, tensors in shards.items():
            if tensors is None:  # a layer, made only now: one layer's weights in memory at a time
                n = int(name[len("model-layer"):-len(".safetensors")])
                prefix = f"model.layers.{n}."
                tensors = {f"{prefix}{m}.weight": normal(*s) for m, s in shapes.items()}
                tensors.update({f"{prefix}{norm}.weight": torch.ones(h, dtype=torch.bfloat16)
                                for norm in ("input_layernorm", "post_attention_layernorm")})
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            index.update(dict.fromkeys(tensors, name))
            del tensors
        shards.clear()
        total = sum((tmp / n).stat().st_size for n in set(index.values()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": index}, indent=1))
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(tmp)
    return folder
