"""``actsparse demo``: the embedded default model end to end, with a summary a person can read."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from . import load
from ._common import ActSparseError
from .backends import get_backend
from .benchmark import bench
from .evaluation import evaluate
from .exports.models import DEFAULT_MODEL
from .pipeline import export

DEMO_SPARSITY = {"up": 0.3, "down": 0.5}
PROMPT = "The capital of France is"


def demo(output: str | None = None, force: bool = False, model: str = DEFAULT_MODEL, eval_samples: int = 16) -> dict:
    if output is not None and Path(output).exists() and not force:
        raise ActSparseError(f"output folder {output} already exists (use --force to overwrite)")
    # where OpenVINO runs the dense model in bf16, fused weights in f32 would read twice its bytes
    weight_format = "bf16" if get_backend("openvino").capabilities.fp32_runs_in_bf16 else "fp32"
    with tempfile.TemporaryDirectory(prefix="actsparse-demo-") as scratch:
        root = Path(output) if output is not None else Path(scratch)
        runs = {}
        for name, sparsity in (("dense", {}), ("sparse", DEMO_SPARSITY)):
            print(f"[{name}] exporting {model} with sparsity {sparsity or 0}, weight format {weight_format}")
            start = time.perf_counter()
            folder = export(model, root / name, sparsity=sparsity, weight_format=weight_format, force=force)
            seconds = time.perf_counter() - start
            print(f"[{name}] evaluating on held-out Wikipedia text")
            runs[name] = {"folder": folder, "export_s": seconds, **evaluate(folder, samples=eval_samples)}
        text = generate(runs["sparse"]["folder"], PROMPT)
        print("[bench] timing decode, sparse against dense")
        speed = bench(runs["sparse"]["folder"], runs["dense"]["folder"], runs=3, decode_tokens=16)

    dense, sparse = runs["dense"], runs["sparse"]
    print()
    print(f"actsparse demo: {model}, SCAP at up/gate {DEMO_SPARSITY['up']} + down {DEMO_SPARSITY['down']}")
    print(f"  {'':8s}{'perplexity':>12s}{'next-token acc':>16s}{'sparsity up':>13s}{'sparsity down':>15s}{'export s':>10s}")
    for name, r in runs.items():
        s = r["sparsity"]
        print(f"  {name:8s}{r['perplexity']:12.3f}{r['next_token_accuracy']:16.4f}"
              f"{s.get('up', 0):13.3f}{s.get('down', 0):15.3f}{r['export_s']:10.1f}")
    print(f"  perplexity cost: {sparse['perplexity'] / dense['perplexity']:.3f}x dense "
          f"on {sparse['tokens']} held-out tokens, every token pruned")
    print(f"  decode: {speed['dense']['decode_ms_per_token']:.1f} -> {speed['sparse']['decode_ms_per_token']:.1f} "
          f"ms/token = {speed['decode_speedup']:.2f}x dense (medians of 3 alternating runs; limit "
          f"{speed['amdahl_limit']:.2f}x at this sparsity)")
    print(f"  {verdict(speed)}")
    print(f"  OpenVINO ran both in {speed['dense']['inference_precision']} "
          f"(weight format {weight_format}: {'fused weights in bf16' if weight_format == 'bf16' else 'f32 weights'})")
    print(f"  sparse model says: {PROMPT!r} -> {text!r}")
    if output is not None:
        print(f"  exports kept in {root}/dense and {root}/sparse")
    return {"dense": dense, "sparse": sparse, "generated": text, "bench": speed}


def verdict(speed: dict) -> str:
    """Whether the sparse model decodes faster than dense on this machine, against the spread of the runs."""
    dense = speed["dense"]["decode_ms_per_token_runs"]
    noise = (max(dense) - min(dense)) / min(dense) if len(dense) > 1 else 0.0
    ratio, limit = speed["decode_speedup"], speed["amdahl_limit"]
    if ratio > 1 + noise:
        return (f"the sparse model decodes faster here: {ratio:.2f}x, {100 * (ratio - 1) / (limit - 1):.0f} % of the "
                f"gain its skipped weight bytes allow")
    where = (f"slower than dense here ({ratio:.2f}x)" if ratio < 1 - noise else
             f"no faster than dense here ({ratio:.2f}x, within the {100 * noise:.0f} % the dense runs varied by)")
    return (f"the sparse model is {where}: on a model this small each op call's fixed cost in the runtime "
            f"outweighs the skipped bytes; larger models gain (README: Results)")


def generate(folder: Path, prompt: str, max_new_tokens: int = 24) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load(folder)
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
