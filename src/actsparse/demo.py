"""``actsparse demo``: the embedded default model end to end, at settings measured to gain on this machine, with a
summary a person can read.

Before exporting, a probe (``backends.openvino.probe``, in a process of its own) times one decode step through
the model's MLP layers, on random weights of the model's shapes, as the CPU plugin's FullyConnected and as our op
at s=0 and at each candidate sparsity, for each candidate weight format. :func:`choose` turns those times into a
predicted speed-up of the model and picks the lightest sparsity predicted to gain, in its best format. The
exports are then timed end to end against the dense export and our op at s=0 (``actsparse bench``).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from . import load
from ._common import ActSparseError
from .backends import get_backend
from .benchmark import bench, run_json
from .evaluation import evaluate
from .exports.models import DEFAULT_MODEL, hf_config, resolve_model
from .pipeline import export

# candidates, the lightest (best quality) first: pruning up/gate inputs costs more quality per byte than down inputs
SPARSITIES = ({"up": 0.3, "down": 0.5}, {"up": 0.4, "down": 0.6})
MIN_GAIN = 1.10  # a smaller predicted gain does not stand out of the spread of the bench's runs on a busy machine
CALIBRATION_SAMPLES = 16
PROMPT = "The capital of France is"


def demo(output: str | None = None, force: bool = False, model: str = DEFAULT_MODEL, eval_samples: int = 16,
         weight_format: str | None = None) -> dict:
    """``weight_format``: export in this format at the heaviest candidate sparsity instead of probing."""
    if output is not None and Path(output).exists() and not force:
        raise ActSparseError(f"output folder {output} already exists (use --force to overwrite)")
    hf_dir = resolve_model(model)
    if weight_format is None:
        # where OpenVINO runs the dense model in bf16, fused weights in f32 would read twice its bytes
        floats = "bf16" if get_backend("openvino").capabilities.fp32_runs_in_bf16 else "fp32"
        print(f"[probe] timing {model}'s MLP layers in {floats} and int8: the plugin's own against our op")
        config = llama_shape(hf_dir)
        speeds = run_json("actsparse.backends.openvino.probe", json.dumps(
            {"hidden": config["hidden_size"], "intermediate": config["intermediate_size"],
             "layers": config["num_hidden_layers"], "formats": [floats, "int8"],
             "sparsities": [[s["up"], s["down"]] for s in SPARSITIES]}), what="the demo's probe")
        choice = choose(speeds, mlp_share(config))
    else:
        speeds, choice = {}, {"weight_format": weight_format, "sparsity": SPARSITIES[-1], "gains": None,
                              "reason": f"--weight-format {weight_format} given: no probe"}
    weight_format, sparsity = choice["weight_format"], choice["sparsity"]
    print(f"[choice] {choice['reason']}")
    with tempfile.TemporaryDirectory(prefix="actsparse-demo-") as scratch:
        root = Path(output) if output is not None else Path(scratch)
        runs = {}
        for name, s in (("dense", {}), ("sparse", sparsity)):
            print(f"[{name}] exporting {model} with sparsity {s or 0}, weight format {weight_format}")
            start = time.perf_counter()
            folder = export(model, root / name, sparsity=s, weight_format=weight_format, force=force,
                            calibration_samples=CALIBRATION_SAMPLES)
            seconds = time.perf_counter() - start
            print(f"[{name}] evaluating on held-out Wikipedia text")
            runs[name] = {"folder": folder, "export_s": seconds, **evaluate(folder, samples=eval_samples)}
        text = generate(runs["sparse"]["folder"], PROMPT)
        print("[bench] timing decode: sparse, our op at s=0 and dense, alternating")
        speed = bench(runs["sparse"]["folder"], runs["dense"]["folder"], runs=3, prompt_tokens=64, decode_tokens=16)

    dense, sparse = runs["dense"], runs["sparse"]
    print()
    print(f"actsparse demo: {model}, SCAP at up/gate {sparsity['up']} + down {sparsity['down']}, "
          f"weight format {weight_format}")
    print(f"  chosen: {choice['reason']}")
    for fmt, r in speeds.items():
        print(f"    probe {fmt:5s} ({r['fc_precision']}): plugin {r['dense_ms']:.2f} ms, ours " +
              ", ".join(f"{'s=0' if key == '0/0' else key} {ms:.2f} ({r['dense_ms'] / ms:.2f}x)"
                        for key, ms in r["ours_ms"].items()))
    print(f"  {'':8s}{'perplexity':>12s}{'next-token acc':>16s}{'sparsity up':>13s}{'sparsity down':>15s}{'export s':>10s}")
    for name, r in runs.items():
        s = r["sparsity"]
        print(f"  {name:8s}{r['perplexity']:12.3f}{r['next_token_accuracy']:16.4f}"
              f"{s.get('up', 0):13.3f}{s.get('down', 0):15.3f}{r['export_s']:10.1f}")
    print(f"  quality cost: perplexity {sparse['perplexity'] / dense['perplexity']:.3f}x dense "
          f"on {sparse['tokens']} held-out tokens, every token pruned")
    print(f"  decode: dense {speed['dense']['decode_ms_per_token']:.1f}, our op at s=0 "
          f"{speed['s0']['decode_ms_per_token']:.1f}, sparse {speed['sparse']['decode_ms_per_token']:.1f} ms/token "
          f"(medians of 3 alternating runs): {speed['decode_speedup']:.2f}x dense, {speed['decode_speedup_vs_s0']:.2f}x "
          f"our s=0; byte limit {speed['amdahl_limit']:.2f}x at this sparsity")
    print(f"  {verdict(speed)}")
    print(f"  OpenVINO ran the models in {speed['dense']['inference_precision']}")
    print(f"  sparse model says: {PROMPT!r} -> {text!r}")
    if output is not None:
        print(f"  exports kept in {root}/dense and {root}/sparse")
    return {"choice": choice, "probe": speeds, "dense": dense, "sparse": sparse, "generated": text, "bench": speed}


def llama_shape(hf_dir: Path) -> dict:
    """The config of a model whose MLP the probe can mimic (gate, up and down projections)."""
    config = hf_config(hf_dir)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if config.get("model_type") not in ("llama", "mistral", "qwen2") or not all(k in config for k in keys):
        raise ActSparseError(f"the demo's probe needs a Llama-shaped model, not {config.get('model_type')!r}: "
                             "give --weight-format")
    return config


def mlp_share(config: dict) -> float:
    """The share of the weights read per decode token that the MLPs hold (attention and the LM head the rest)."""
    h, i, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv = h // heads * config.get("num_key_value_heads", heads)
    mlp, attention = 3 * h * i, 2 * h * h + 2 * h * kv
    return config["num_hidden_layers"] * mlp / (config["num_hidden_layers"] * (mlp + attention) + config["vocab_size"] * h)


def choose(speeds: dict, share: float) -> dict:
    """The weight format and sparsity to demonstrate, from the probe's ``speeds`` (:func:`mlp_speeds` of
    ``backends.openvino.probe``) and the MLPs' ``share`` of the weight bytes: the lightest sparsity of
    SPARSITIES at which a format is predicted to gain at least MIN_GAIN, in its best format, else the best
    setting of all. ``gains`` says which; ``reason`` says it in a sentence."""
    options = []
    for rank, sparsity in enumerate(SPARSITIES):
        key = f"{sparsity['up']:g}/{sparsity['down']:g}"
        for fmt, r in speeds.items():
            layers = r["dense_ms"] / r["ours_ms"][key]
            options.append({"weight_format": fmt, "sparsity": sparsity, "rank": rank, "layer_speedup": layers,
                            "predicted": 1 / (1 - share + share / layers), "s0": r["dense_ms"] / r["ours_ms"]["0/0"]})
    gaining = [o for o in options if o["predicted"] >= MIN_GAIN]
    best = (min(gaining, key=lambda o: (o["rank"], -o["predicted"])) if gaining
            else max(options, key=lambda o: o["predicted"]))
    s = best["sparsity"]
    why = (f"{best['weight_format']} at up/gate {s['up']} + down {s['down']}: our op ran the MLP layers "
           f"{best['layer_speedup']:.2f}x the plugin's speed (at s=0 {best['s0']:.2f}x), so the model, "
           f"{100 * share:.0f} % of whose weight bytes are MLP, should decode {best['predicted']:.2f}x dense")
    why += (f": the lightest sparsity predicted to gain {100 * (MIN_GAIN - 1):.0f} % here" if gaining else
            f": no format and sparsity tried is predicted to gain {100 * (MIN_GAIN - 1):.0f} % on this machine; "
            "this is the closest")
    return {**best, "gains": bool(gaining), "reason": why}


def verdict(speed: dict) -> str:
    """Whether the sparse model decodes faster than dense on this machine, against the spread of the runs, and
    where a gain was lost: in our op itself (s=0 against dense) or in the skipped bytes (sparse against s=0)."""
    dense = speed["dense"]["decode_ms_per_token_runs"]
    noise = (max(dense) - min(dense)) / min(dense) if len(dense) > 1 else 0.0
    ratio, limit = speed["decode_speedup"], speed["amdahl_limit"]
    if ratio > 1 + noise:
        return (f"the sparse model decodes faster here: {ratio:.2f}x, {100 * (ratio - 1) / (limit - 1):.0f} % of the "
                f"gain its skipped weight bytes allow")
    where = (f"slower than dense here ({ratio:.2f}x)" if ratio < 1 - noise else
             f"no faster than dense here ({ratio:.2f}x, within the {100 * noise:.0f} % the dense runs varied by)")
    return (f"the sparse model is {where}: the skipped bytes gave {speed['decode_speedup_vs_s0']:.2f}x over our op at "
            f"s=0, which itself decodes {speed['s0_vs_dense']:.2f}x the dense export's speed")


def generate(folder: Path, prompt: str, max_new_tokens: int = 24) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load(folder)
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
