"""A model of deployed size: a random-weight Llama with Llama-3-8B's layer shapes, exported and timed. Prints JSON.

Hidden 4096, intermediate 14336, 32 query / 8 KV heads, vocabulary 128256 (SmolLM2's tokenizer stands in: its
ids are a subset). The Hugging Face folder is written in bf16 one tensor at a time, so no fp32 copy of the model
is ever held. For int4 and int8 it records ``actsparse export``'s time per stage and peak RSS (its own process
and children) against the bound 1.3 x bf16 size + 2 GiB, then decode ms/token of the dense export against
sparse ones at up/gate+down 0.5 and at every projection 0.5, with prefill of a 256-token prompt
(``actsparse bench``).

    python benchmarks/scale.py [--layers 32] [--vocab 128256] [--formats int4 int8] [--sparse mlp0.5 all0.5]
                               [--work DIR] [--calibration-samples 16] [--runs 3] [--export-only [FORMAT ...]] [--plan-of FORMAT]
                               [--output FILE]
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
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
        return torch.randn(*shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)

    def layer(n: int) -> dict:
        tensors = {f"model.layers.{n}.{m}.weight": normal(*shape) for m, shape in shapes.items()}
        return tensors | {f"model.layers.{n}.{norm}.weight": torch.ones(h, dtype=torch.bfloat16)
                          for norm in ("input_layernorm", "post_attention_layernorm")}

    # each shard is made only when written: one shard's weights in memory at a time
    shards = {"model-embed.safetensors": lambda: {"model.embed_tokens.weight": normal(vocab, h)}}
    shards |= {f"model-layer{n:03d}.safetensors": lambda n=n: layer(n) for n in range(layers)}
    shards["model-head.safetensors"] = lambda: {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                                "lm_head.weight": normal(vocab, h)}
    index = {}
    with atomic_output_dir(folder) as tmp:
        for name, make in shards.items():
            tensors = make()
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            index.update(dict.fromkeys(tensors, name))
            del tensors
        total = sum((tmp / n).stat().st_size for n in set(index.values()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": index}, indent=1))
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(tmp)
    return folder


def export_measured(model: Path, out: Path, *options) -> dict:
    """``actsparse export MODEL OUT OPTIONS`` in a child process: wall seconds, its peak RSS (its own rusage) and
    the stages it recorded; made once, then read back."""
    if not (out / "actsparse.json").is_file():
        cmd = [sys.executable, "-m", "actsparse", "export", str(model), str(out), *map(str, options)]
        start = time.perf_counter()
        with tempfile.TemporaryFile("w+") as stderr:  # a file: the progress bars would fill a pipe
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
            status, usage = os.wait4(proc.pid, 0)[1:]
            if os.waitstatus_to_exitcode(status):
                stderr.seek(0)
                sys.exit(f"{shlex.join(cmd)} failed: {(stderr.read().strip().splitlines() or ['?'])[-1]}")
        measured = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}
        (out / "measured.json").write_text(json.dumps(measured))
    plan = json.loads((out / "actsparse.json").read_text())
    return {**json.loads((out / "measured.json").read_text()), "stages": plan["export"]["stages"],
            "passes": plan["passes"]}


def main() -> None:
    p = parser(__doc__)
    add_work(p, "scale-work", reuse=True)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-3-8B: 32)")
    p.add_argument("--vocab", type=int, default=LLAMA3_8B["vocab_size"], help="vocabulary (Llama-3-8B: 128256)")
    p.add_argument("--formats", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    p.add_argument("--sparse", nargs="+", default=list(SPARSE), choices=list(SPARSE),
                   help="sparse exports beside the dense one: up/gate+down at 0.5, every projection at 0.5")
    p.add_argument("--calibration-samples", type=int, default=16)
    p.add_argument("--runs", type=int, default=3, help="alternating dense/sparse runs of actsparse bench")
    p.add_argument("--export-only", nargs="*", metavar="FORMAT",
                   help="make and measure the exports, time no decoding (of these formats; none named: of any)")
    p.add_argument("--plan-of", choices=["int4", "int8"],
                   help="sparse exports take the plan and statistics of this format's (--plan): no calibration")
    args = p.parse_args()
    from actsparse.exports.models import parameter_count

    work = Path(args.work)
    model = random_llama(work / f"llama3-8b-shape-{args.layers}l-v{args.vocab}", args.layers, args.vocab)
    params = parameter_count(model)
    bound = 1.3 * 2 * params / GIB + 2
    exports, speed = [], []
    for fmt in args.formats:
        folders = {name: work / f"{model.name}-{fmt}-{name}" for name in ["dense", *args.sparse]}
        for name, folder in folders.items():
            options = ["--sparsity", 0] if name == "dense" else [*SPARSE[name], "--calibration-samples",
                                                                 args.calibration_samples]
            if args.plan_of and name != "dense" and fmt != args.plan_of:
                options = ["--plan", work / f"{model.name}-{args.plan_of}-{name}" / "actsparse.json"]
            measured = export_measured(model, folder, "--weight-format", fmt, *options)
            if "--plan" in options:
                measured["plan_of"] = f"{args.plan_of} {name}"
            exports.append({"weight_format": fmt, "sparsity": name, **measured,
                            "within_bound": measured["peak_rss_gib"] <= bound,
                            "size_gib": round(sum(f.stat().st_size for f in folder.iterdir()) / GIB, 3)})
            print(f"export {fmt} {name}: {measured['seconds']:.0f} s, peak RSS {measured['peak_rss_gib']:.2f} GiB "
                  f"(bound {bound:.2f})", file=sys.stderr)
        for name in args.sparse:
            if args.export_only is not None and (not args.export_only or fmt in args.export_only):
                continue
            result = json.loads(run_cli("bench", folders[name], "--baseline", folders["dense"], "--json",
                                        "--runs", args.runs)[0])
            result.update(weight_format=fmt, sparsity=name)
            speed.append(result)
            print(f"{fmt} {name}: decode {result['dense']['decode_ms_per_token']:.1f} -> "
                  f"{result['sparse']['decode_ms_per_token']:.1f} ms/token = {result['decode_speedup']:.3f}x, "
                  f"prefill {result['prefill_ratio']:.2f}x", file=sys.stderr)
    emit({"model": {"layers": args.layers, "vocab": args.vocab, "parameters": params, "bf16_gib": 2 * params / GIB,
                    **{k: v for k, v in LLAMA3_8B.items() if k != "vocab_size"}},
          "memory_bound_gib": bound, "exports": exports, "decode": speed}, args)


if __name__ == "__main__":
    main()
