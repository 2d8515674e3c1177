"""Independent references: numpy semantics of the method, and the HF torch model with plan hooks."""
from __future__ import annotations

import numpy as np


def pruned_input(x: np.ndarray, mode: float, tau: float) -> np.ndarray:
    """The input a pruned Linear effectively sees: x where ¬(|x − m| ≤ τ) (NaN kept), else m."""
    return np.where(np.abs(x - mode) <= tau, mode, x)


def torch_model_with_plan(hf_dir, plan: dict):
    """The Hugging Face model, with forward pre-hooks that prune each planned Linear's input."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    for layer in plan["layers"]:
        if layer["target_sparsity"] <= 0:
            continue
        mode, tau = layer["mode"], layer["threshold"]

        def hook(module, args, mode=mode, tau=tau):
            x = args[0]
            return (torch.where((x - mode).abs() <= tau, torch.full_like(x, mode), x),)

        modules[layer["module"]].register_forward_pre_hook(hook)
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def ov_logits(folder, ids: np.ndarray, prefill_sparse: bool = False) -> np.ndarray:
    """Logits of an exported folder for ``[1, seq]`` ids from a fresh state, in exact f32."""
    import openvino as ov

    from actsparse.calibration.openvino_backend import EXACT_CONFIG, feed
    from actsparse.passes.openvino import set_prefill_sparse
    from actsparse.runtime_ext import read_model

    core = ov.Core()
    model = read_model(core, folder / "openvino_model.xml")
    if prefill_sparse:
        set_prefill_sparse(model)
    compiled = core.compile_model(model, "CPU", EXACT_CONFIG)
    request = compiled.create_infer_request()
    result = request.infer(feed([i.get_any_name() for i in compiled.inputs], ids))
    return np.array(result[compiled.output("logits")])
