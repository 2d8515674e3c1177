"""Running models in OpenVINO: the op's extension, compilation as the plugin would run the op, decoding."""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Iterator
from xml.etree import ElementTree

import numpy as np
import openvino as ov
from openvino import opset13 as ops
from tqdm.auto import tqdm

from ..._common import ActSparseError
from ...runtime_ext import OPENVINO_OPSET, PROJECTIONS, gpu_config, register
from ...runtime_ext.kernels import formats
from .mlp import split_mlp


def extension_problem() -> str | None:
    """Why the OpenVINO extension cannot be used here, or None."""
    try:
        register(ov.Core())
    except ActSparseError as err:
        return str(err)
    return None


def read_model(core, xml):
    """``core.read_model(xml)``, registering the extension first when the IR uses the op."""
    if f'version="{OPENVINO_OPSET}"' in Path(xml).read_text(errors="replace"):  # a layer of the ops' opset
        register(core)
    return core.read_model(xml)


def runs_in_bf16(core, device: str = "CPU", config: dict | None = None) -> bool:
    """Whether ``device`` will run a graph compiled with ``config`` in bf16 (the CPU plugin's default
    where the CPU has AVX512-BF16 or AMX)."""
    config = config or {}
    if str(config.get("EXECUTION_MODE_HINT", "")).upper().endswith("ACCURACY"):
        return False
    try:
        hint = config.get("INFERENCE_PRECISION_HINT") or core.get_property(device, "INFERENCE_PRECISION_HINT")
    except RuntimeError:  # a device without the property (or none at all): not ours to change
        return False
    return (hint.to_string() if hasattr(hint, "to_string") else str(hint)) == "bf16"


def bf16_io(op):
    """Put one f32 ActSparseMatMul between Convert(bf16) and Convert(f32); return the f32 output that now
    feeds its consumers. A bf16 export's ops take and return bf16 this way (fuse.py). In a graph the device
    runs in bf16, the values there are bf16 anyway: the Converts change nothing but let the plugin drop the
    bf16<->f32 Reorders it puts around a custom op (one per call each: 1.2 ms of 9.5 per token on SmolLM2's
    60 ops, Zen 5)."""
    consumers = list(op.output(0).get_target_inputs())
    op.input(0).replace_source_output(ops.convert(op.input_value(0), "bf16").output(0))
    op.validate_and_infer_types()
    back = ops.convert(op.output(0), "f32").output(0)
    for consumer in consumers:
        consumer.replace_source_output(back)
    return back


def bf16_activations(model) -> int:
    """:func:`bf16_io` for every op of ours (ActSparseMatMul, ActSparseMLP) that takes f32, in place; return how many. Only
    for a device that runs the graph in bf16 (see :func:`runs_in_bf16`): elsewhere it rounds x and y."""
    wrapped = [bf16_io(op) for op in model.get_ordered_ops()
               if op.get_type_name() in PROJECTIONS and op.get_input_element_type(0).to_string() == "f32"]
    if wrapped:
        model.validate_nodes_and_infer_types()
    return len(wrapped)


def prepare(core, model, device: str = "CPU", config: dict | None = None) -> int:
    """Ready ``model`` for ``core.compile_model(model, device, config)``, in place: :func:`bf16_activations` where
    the device runs the graph in bf16, nothing elsewhere; return how many ops were put between Converts. For a GPU,
    each ActSparseMLP first becomes its two ActSparseMatMuls again (``fuse.split_mlp``): the GPU plugin's kernel is
    ActSparseMatMul's."""
    if "GPU" in device.upper():
        split_mlp(model)
    return bf16_activations(model) if runs_in_bf16(core, device, config) else 0


def bf16_activations_ir(xml: str) -> str:
    """:func:`bf16_activations` on the text of an IR, for runtimes that read the file themselves (openvino-genai):
    the weights file stays as it is."""
    root = ElementTree.fromstring(xml)
    layers, edges = root.find("layers"), root.find("edges")
    next_id = max(int(layer.get("id")) for layer in layers) + 1

    def convert(name: str, to: str, dims: list, in_precision: str, out_precision: str) -> ElementTree.Element:
        nonlocal next_id
        layer = ElementTree.SubElement(layers, "layer", id=str(next_id), name=name, type="Convert", version="opset1")
        next_id += 1
        ElementTree.SubElement(layer, "data", destination_type=to)
        for tag, port, precision in (("input", "0", in_precision), ("output", "1", out_precision)):
            element = ElementTree.SubElement(ElementTree.SubElement(layer, tag), "port", id=port, precision=precision)
            for dim in dims:
                ElementTree.SubElement(element, "dim").text = dim.text
        return layer

    for op in [layer for layer in layers if layer.get("type") in PROJECTIONS]:
        x_port, y_port = op.find("input/port[@id='0']"), op.find("output/port")
        if x_port.get("precision") != "FP32":
            continue
        into = convert(op.get("name") + "/bf16_in", "bf16", list(x_port), "FP32", "BF16")
        out = convert(op.get("name") + "/f32_out", "f32", list(y_port), "BF16", "FP32")
        x_port.set("precision", "BF16")
        y_port.set("precision", "BF16")
        for edge in list(edges):
            if edge.get("to-layer") == op.get("id") and edge.get("to-port") == "0":
                edge.set("to-layer", into.get("id"))
            elif edge.get("from-layer") == op.get("id"):
                edge.set("from-layer", out.get("id"))
                edge.set("from-port", "1")
        ElementTree.SubElement(edges, "edge", {"from-layer": into.get("id"), "from-port": "1",
                                               "to-layer": op.get("id"), "to-port": "0"})
        ElementTree.SubElement(edges, "edge", {"from-layer": op.get("id"), "from-port": y_port.get("id"),
                                               "to-layer": out.get("id"), "to-port": "0"})
    return ElementTree.tostring(root, encoding="unicode")


def int8_activations(model, on: bool) -> int:
    """Set the ``int8_activations`` attribute of every u8/u4-weight projection of ``model`` (an ActSparseMatMul, or
    either half of an ActSparseMLP), in place; return how many. Opt-in, before compiling: the ops then quantise their
    activations to int8 (decode and prompt), as the CPU plugin's dynamic quantisation does for its own int8/int4
    FullyConnected. Exports leave it off, so that every route (core.compile_model, actsparse.load, openvino-genai)
    computes alike."""
    projections = [(op, p) for op in model.get_ordered_ops() for p in PROJECTIONS.get(op.get_type_name(), ())]
    quantised = {name for name, f in formats().items() if f["params"] != "none"} if projections else set()
    projections = [(op, p) for op, p in projections if op.get_attributes().get(f"{p}weight_format") in quantised]
    for op, p in projections:
        op.set_attribute(f"{p}int8_activations", bool(on))
    return len(projections)


@functools.lru_cache(maxsize=1)
def cpu_runs_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs fp32 models in bf16 by default on this machine."""
    return runs_in_bf16(ov.Core())


def feed(model_inputs: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of an optimum-exported graph for a ``[batch, seq]`` block of token ids, from position 0."""
    batch, seq = ids.shape
    values = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
              "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), ids.shape).copy(),
              "beam_idx": np.arange(batch, dtype=np.int32)}
    missing = [name for name in model_inputs if name not in values]
    if missing:
        raise ValueError(f"do not know how to feed model inputs {missing}")
    return {name: values[name] for name in model_inputs}


def run_chunks(compiled: ov.CompiledModel, chunks: np.ndarray, desc: str) -> Iterator[tuple[np.ndarray, ov.InferRequest]]:
    """Run each ``[seq]`` row of ``chunks`` as its own sequence (state reset), yielding it and the request."""
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    for row in tqdm(chunks, desc=desc, unit="sample", leave=False):
        request.reset_state()
        request.infer(feed(names, row[None]))
        yield row, request


def greedy_steps(compiled, request, ids, steps: int) -> list[float]:
    """``steps`` greedy one-token decode steps on an OpenVINO request that has just taken the prompt ``ids``
    (``[1, seq]``); the seconds each took."""
    names = [i.get_any_name() for i in compiled.inputs]
    token, times = ids[:, -1:], []
    for pos in range(ids.shape[1], ids.shape[1] + steps):
        inputs = {**feed(names, token), "position_ids": np.array([[pos]], np.int64),
                  "attention_mask": np.ones((1, pos + 1), np.int64)}
        start = time.perf_counter()
        logits = request.infer(inputs)[compiled.output("logits")]
        times.append(time.perf_counter() - start)
        token = logits[:, -1:].argmax(-1).astype(np.int64)
    return times


def time_decode(xml: Path, prompt_tokens: int, decode_tokens: int, threads: int | None = None) -> dict:
    """Median prefill ms of a ``prompt_tokens`` prompt and decode ms/token after it, and the inference
    precision, under the plugin's default CPU configuration (``INFERENCE_NUM_THREADS`` = ``threads`` if given)."""
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    model = read_model(core, xml)
    prepare(core, model, "CPU", config)
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    vocab = compiled.output("logits").get_partial_shape()[-1].get_length()
    ids = np.random.default_rng(0).integers(0, vocab, (1, prompt_tokens))
    prefill, steps = [], []
    for rep in range(3):  # the first repetition warms up
        request.reset_state()
        start = time.perf_counter()
        request.infer(feed(names, ids))
        prefill.append(time.perf_counter() - start)
        decode = greedy_steps(compiled, request, ids, decode_tokens)
        if rep:
            steps += decode
    return {"prefill_ms": 1e3 * float(np.median(prefill[1:])), "decode_ms_per_token": 1e3 * float(np.median(steps)),
            # the plugin's choice for this CPU: f32, or bf16 where it has AVX512-BF16/AMX (weights rounded too)
            "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string()}


def configure_gpu(core) -> None:
    """Give the GPU plugin of ``core`` the op's OpenCL kernel (``CONFIG_FILE``), or refuse in one line where
    OpenVINO finds no GPU."""
    if not any(name.startswith("GPU") for name in core.available_devices):
        raise ActSparseError(f"device GPU: OpenVINO finds no GPU here (devices: {', '.join(core.available_devices)})")
    core.set_property("GPU", {"CONFIG_FILE": gpu_config()})


def load(folder: Path, plan: dict, device: str = "CPU", **kwargs):
    """``folder`` as an optimum-intel ``OVModelForCausalLM``; see :func:`actsparse.load`."""
    from optimum.intel import OVModelForCausalLM
    from optimum.intel.openvino import modeling_base, modeling_decoder

    if not plan.get("passes", {}).get("fused"):
        return OVModelForCausalLM.from_pretrained(folder, device=device, **kwargs)
    gpu = "GPU" in device.upper()
    for core in {id(m.core): m.core for m in (modeling_base, modeling_decoder)}.values():
        if gpu:
            configure_gpu(core)
        register(core)
    if gpu:
        # the GPU plugin's default f16 would also make the op's f32 params f16, which its validation refuses
        # (docs/op.md: GPU)
        kwargs["ov_config"] = {"INFERENCE_PRECISION_HINT": "f32", **(kwargs.get("ov_config") or {})}
    if kwargs.get("compile_only"):
        return OVModelForCausalLM.from_pretrained(folder, device=device, **kwargs)
    compile_now = kwargs.pop("compile", True)
    model = OVModelForCausalLM.from_pretrained(folder, device=device, compile=False, **kwargs)
    prepare(modeling_base.core, model.model, model._device, model.ov_config)
    if compile_now:
        model.compile()
    return model
