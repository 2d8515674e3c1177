"""Independent references: numpy semantics of the method, and the HF torch model with plan hooks."""
from __future__ import annotations

import numpy as np

from actsparse import ActSparseError


def torch_bf16(a) -> np.ndarray:
    """``a`` rounded to bf16 the way torch rounds (float64 result)."""
    import torch

    return torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16).double().numpy()


def decode_rows() -> int:
    """The kernel core's Tuning::decode_max_rows now (16 unless a tuning file or $ACTSPARSE_DECODE_MAX_ROWS sets
    it): longer calls are a prefill (a GEMM)."""
    from actsparse.runtime_ext import kernels as ks

    return ks.get_tuning()["decode_max_rows"]


try:
    DECODE_ROWS = decode_rows()  # as the libraries loaded it
except (ActSparseError, OSError):  # the library is not built: the modules that need it skip
    DECODE_ROWS = 16


def multiplies_in_bf16(fmt: str, rows: int, kernel: str | None = None, bf16_io: bool = False) -> bool:
    """Whether the kernel core rounds the activations to bf16: the avx512bf16 kernel (``kernel``, or the
    one chosen for this CPU) in a prefill call (more than DECODE_ROWS rows) with bf16 weights
    or bf16 activations (``bf16_io``), or in a decode call with u4 weights."""
    from actsparse.runtime_ext import kernels as ks

    decode = rows <= decode_rows()
    return (kernel or ks.best_kernel()) == "avx512bf16" and ((fmt == "bf16" or bf16_io) and not decode or
                                                            fmt.startswith("u4") and decode)


def weights_in_bf16(fmt: str, rows: int, kernel: str | None = None, bf16_io: bool = False) -> bool:
    """Whether it also rounds the dequantised weights to bf16: such a prefill with bf16 activations and
    weights of another format."""
    return bf16_io and fmt != "bf16" and rows > decode_rows() and multiplies_in_bf16(fmt, rows, kernel, bf16_io)


def quantises_activations(fmt: str, rows: int, kernel: str | None = None, group_size: int = 0) -> bool:
    """Whether a call with int8_activations quantises them: a u8 or u4 call on the avx512bf16 kernel
    (``kernel``, or the one chosen for this CPU), which has int8 dot products; a u4 prefill (more than
    DECODE_ROWS rows) only where 128 divides its ``group_size``."""
    from actsparse.runtime_ext import kernels as ks

    return ((kernel or ks.best_kernel()) == "avx512bf16" and fmt in ("u8", "u4", "u4c") and
            (rows <= decode_rows() or fmt == "u8" or group_size % 128 == 0))


def _int8(v: np.ndarray, m) -> np.ndarray:
    """v (f32) quantised with the scale s = m / 127: s · round(v / s), to nearest even, in f32 (0 where m is 0)."""
    m = np.asarray(m, np.float32)
    q = np.clip(np.rint(v * np.divide(np.float32(127), m, out=np.zeros_like(m), where=m > 0)), -127, 127)
    return (m / np.float32(127)) * q


def int8_live(z: np.ndarray, group_size: int = 0) -> np.ndarray:
    """The dynamic int8 quantisation of the decode's live activations: per row of z (f32, pruned
    channels exactly 0), each run of 8 consecutive nonzero values (u4: within one group of
    ``group_size`` channels, runs starting afresh in each) gets the scale s = max|z| / 127 and becomes
    s · round(z / s) (to nearest even), in f32 arithmetic."""
    z = np.asarray(z, np.float32)
    size = group_size or z.shape[-1]
    out = np.zeros_like(z)
    for row, dst in zip(z, out):
        for g0 in range(0, z.shape[-1], size):
            live = g0 + np.flatnonzero(row[g0:g0 + size])
            for run in np.split(live, np.arange(8, live.size, 8)):
                dst[run] = _int8(row[run], np.abs(row[run]).max(initial=np.float32(0)))
    return out


def int8_groups(z: np.ndarray, size: int = 32) -> np.ndarray:
    """The dynamic int8 quantisation of a prefill's activations: per row of z (f32, pruned channels 0),
    each group of ``size`` consecutive channels gets the scale s = max|z| / 127 and becomes
    s · round(z / s) (to nearest even), in f32 arithmetic."""
    z = np.asarray(z, np.float32)
    out = np.zeros_like(z)
    for g0 in range(0, z.shape[-1], size):
        g = z[:, g0:g0 + size]
        out[:, g0:g0 + size] = _int8(g, np.abs(g).max(axis=1, keepdims=True))
    return out


def pruned_input(x: np.ndarray, mode: float, tau: float) -> np.ndarray:
    """The input a pruned Linear effectively sees: x where ¬(|x − m| ≤ τ) (NaN kept), else m."""
    return np.where(np.abs(x - mode) <= tau, mode, x)


def torch_model_with_plan(hf_dir, plan: dict):
    """The Hugging Face model, with forward pre-hooks that prune each planned Linear's input.

    A layer with a ``mask_source`` (cats) is masked where |SiLU(gate)| ≤ τ instead: a forward
    hook on the MLP's ``act_fn`` keeps its output for the down projection's pre-hook.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    for layer in plan["layers"]:
        if layer["target_sparsity"] <= 0:
            continue
        mode, tau = layer["mode"], layer["threshold"]
        if "mask_source" in layer:
            seen = {}
            act = modules[layer["module"].rsplit(".", 1)[0] + ".act_fn"]
            act.register_forward_hook(lambda module, args, out, seen=seen: seen.update(out=out))

            def hook(module, args, tau=tau, seen=seen):
                x = args[0]
                return (torch.where(seen["out"].abs() <= tau, torch.zeros_like(x), x),)
        else:
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

    from actsparse.backends.openvino.graph import EXACT_CONFIG
    from actsparse.backends.openvino.passes import set_prefill_sparse
    from actsparse.backends.openvino.runtime import feed, read_model

    core = ov.Core()
    model = read_model(core, folder / "openvino_model.xml")
    if prefill_sparse:
        set_prefill_sparse(model)
    compiled = core.compile_model(model, "CPU", EXACT_CONFIG)
    request = compiled.create_infer_request()
    result = request.infer(feed([i.get_any_name() for i in compiled.inputs], ids))
    return np.array(result[compiled.output("logits")])


def assert_close_through_flips(got: np.ndarray, expected: np.ndarray, exact_positions: int = 4) -> None:
    """Logits of two implementations of the same pruned model, ``[1, seq, vocab]``.

    Inputs within float rounding of τ may be pruned in one and kept in the other; attention
    then carries such a flip to every later position. So: equal to float tolerance over the
    first positions, and close distributions everywhere: mean KL < 0.045, argmax agreement > 0.9.
    Measured on SmolLM2 (up 0.3 / down 0.5) on a Zen 5 CPU: OpenVINO's stock unfused pattern
    against torch flips first at position 20 (mean KL 0.025 over 64 tokens); the fused int8
    model against the unfused one at position 8 (32 tokens: KL 0.0023, argmax agreement 0.94).
    Thresholds 10 % off cost a mean KL of 0.07–0.11, no pruning at all 0.094.
    """
    from scipy.special import log_softmax

    np.testing.assert_allclose(got[:, :exact_positions], expected[:, :exact_positions], atol=1e-3, rtol=1e-3)
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.9
    log_p, log_q = log_softmax(expected.astype(np.float64), -1), log_softmax(got.astype(np.float64), -1)
    assert (np.exp(log_p) * (log_p - log_q)).sum(-1).mean() < 0.045


def make_weight(fmt: str, K: int, N: int, G: int, rng, tile_cols: int = 0):
    """A random packed weight ``[K, N]`` of format ``fmt`` (u4: group size ``G``; u4c: u4 with compact params,
    f16 scales and u8 zero points), NNCF-like codes, stored
    in tiles of ``tile_cols`` columns (0: the format's default)."""
    from actsparse.runtime_ext import kernels as ks

    if fmt == "f32":
        return ks.pack_f32(rng.standard_normal((K, N)), tile_cols)
    if fmt == "f16":
        return ks.pack_f16(rng.standard_normal((K, N)), tile_cols)
    if fmt == "bf16":
        return ks.pack_bf16(rng.standard_normal((K, N)), tile_cols)
    if fmt == "u8":
        return ks.pack_u8(rng.integers(0, 256, (K, N)), rng.uniform(0.001, 0.02, N), rng.integers(100, 156, N),
                          tile_cols)
    ng = K // G
    scale = rng.uniform(0.01, 0.2, (ng, N)).astype(np.float16)  # as NNCF stores them: f32 params hold the same values
    return ks.pack_u4(rng.integers(0, 16, (K, N)), scale, rng.integers(6, 10, (ng, N)), G, tile_cols, fmt == "u4c")
