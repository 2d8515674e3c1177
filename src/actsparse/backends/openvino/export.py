"""Export a Hugging Face folder to OpenVINO IR through optimum-intel, weights compressed by NNCF."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import mmap
import re
import warnings
from pathlib import Path

import openvino as ov

from ..._common import ActSparseError, dropping_mapped_pages, stage
from ...exports.models import hf_config, is_decoder, loads_16bit
from .. import FORMATS

IR_NAME = FORMATS["openvino"].model_file
TOKENIZER_IRS = ("openvino_tokenizer.xml", "openvino_detokenizer.xml")
log = logging.getLogger("actsparse")


def int4_group_size(hf_dir: Path) -> int:
    """Largest NNCF group size (128, 64 or 32) that divides the model's Linear input sizes."""
    config = hf_config(hf_dir)
    sizes = [config.get(k) for k in ("hidden_size", "intermediate_size", "n_embd", "d_model") if config.get(k)]
    return next((g for g in (128, 64, 32) if all(s % g == 0 for s in sizes)), 32)


def compress_weights(ir: Path, weight_format: str, group_size: int) -> None:
    """Compress the weights of the IR at ``ir`` in place: fp16 at save time, int8/int4 with NNCF.

    int8 is asymmetric per output channel, int4 asymmetric group-wise (``group_size``); NNCF
    keeps the embeddings and the last layer at int8, as optimum-cli does.
    """
    with dropping_mapped_pages(ir.with_suffix(".bin")):  # each weight is read once: its pages need not stay
        model = ov.Core().read_model(ir)
        if weight_format in ("int8", "int4"):
            import nncf

            mode = nncf.CompressWeightsMode.INT8_ASYM if weight_format == "int8" else nncf.CompressWeightsMode.INT4_ASYM
            options = {} if weight_format == "int8" else {"group_size": group_size, "ratio": 1.0}
            model = nncf.compress_weights(model, mode=mode, **options)
        save_ir_over(model, ir, compress_to_fp16=weight_format == "fp16")


# A constant in an IR: <data element_type=".." shape=".." offset="N" size="M" />, as OpenVINO writes it.
_CONSTANT_DATA = re.compile(rb'(<data element_type="[^"]*" shape="[^"]*" offset=")(\d+)(" size=")(\d+)(")')


def save_ir(model, xml: Path, compress_to_fp16: bool = False, alignment: int = 64) -> None:
    """``ov.save_model``, then every constant moved to an offset in the .bin that is a multiple of ``alignment``.

    OpenVINO packs constants back to back, so a 4-byte scalar leaves the weights after it 4 bytes off a cache
    line. The CPU plugin repacks its own FullyConnected weights, but ActSparseMatMul reads its weight constant
    where the .bin is mapped: split cache lines cost its u4 decode about 9 % in OpenVINO (4096x11008, s=0.5).
    Callers write to a staged name: the .bin and the XML are rewritten one after the other.
    """
    ov.save_model(model, xml, compress_to_fp16=compress_to_fp16)
    text, bin_path = xml.read_bytes(), xml.with_suffix(".bin")
    blocks = sorted({(int(m[2]), int(m[4])) for m in _CONSTANT_DATA.finditer(text)})
    if all(offset % alignment == 0 for offset, _ in blocks):
        return
    moved, staged = {}, bin_path.with_name(bin_path.name + ".aligned")
    try:
        with open(bin_path, "rb") as src, open(staged, "wb") as dst, \
                mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as old:
            for offset, size in blocks:  # shared (deduplicated) constants stay shared
                dst.write(b"\0" * (-dst.tell() % alignment))
                moved[offset, size] = dst.tell()
                dst.write(old[offset:offset + size])
                start = offset - offset % mmap.PAGESIZE  # copied once: out of the RSS
                old.madvise(mmap.MADV_DONTNEED, start, offset + size - start)
        staged.replace(bin_path)
    finally:
        staged.unlink(missing_ok=True)
    xml.write_bytes(_CONSTANT_DATA.sub(lambda m: b"%s%d%s%s%s" % (m[1], moved[int(m[2]), int(m[4])], m[3], m[4], m[5]), text))


def save_ir_over(model, ir: Path, compress_to_fp16: bool = False) -> None:
    """Save ``model`` (:func:`save_ir`) in place of the IR at ``ir``, which may still be memory-mapped by ``model``.

    Written beside it, then renamed over it: the old mapping keeps the old inode alive.
    """
    staged = ir.with_name("actsparse_staged.xml")
    save_ir(model, staged, compress_to_fp16=compress_to_fp16)
    staged.replace(ir)
    staged.with_suffix(".bin").replace(ir.with_suffix(".bin"))


def export_openvino(hf_dir: Path, output: Path, weight_format: str = "fp32") -> Path:
    """Write ``openvino_model.xml``/``.bin`` plus tokenizer and configs into ``output``; return the IR path.

    Causal LMs are exported with their KV cache, encoders for feature extraction (embeddings).
    """
    FORMATS["openvino"].check_weight_format(weight_format)
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            logging.getLogger("nncf").setLevel(logging.ERROR)
            # optimum first tries a TorchScript wrapper and falls back; its failure is logged as an ERROR
            logging.getLogger("openvino.frontend.pytorch.utils").setLevel(logging.CRITICAL)
            task = "text-generation-with-past" if is_decoder(hf_dir) else "feature-extraction"
            # dtype None: optimum traces a 16-bit checkpoint with its 16-bit weights (f32 compute)
            dtype = None if loads_16bit(hf_dir, weight_format) else "fp32"
            with stage("optimum export"):
                main_export(str(hf_dir), output, task=task, ov_config=OVConfig(dtype=dtype), convert_tokenizer=False)
            if weight_format not in ("fp32", "bf16"):
                with stage(f"compress {weight_format}"):
                    compress_weights(output / IR_NAME, weight_format, int4_group_size(hf_dir))
        if task.startswith("text-generation"):
            with stage("tokenizer IRs"):
                write_tokenizers(output)
    except ActSparseError:
        raise
    except Exception as err:  # optimum and transformers raise many kinds for a bad model folder
        raise ActSparseError(f"cannot export {hf_dir}: {(str(err).strip().splitlines() or [type(err).__name__])[0]}") from err
    ir = output / IR_NAME
    if not ir.is_file():
        raise ActSparseError(f"optimum wrote no {IR_NAME} for {hf_dir}")
    return ir


def write_tokenizers(folder: Path) -> None:
    """The tokenizer and detokenizer IRs (openvino-tokenizers) of the tokenizer in ``folder``, written beside it
    as ``optimum-cli export openvino`` writes them: openvino_genai pipelines read them. A tokenizer the converter
    cannot take is left out with a warning, as optimum-cli does."""
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    plain_byte_level_decoder(tokenizer)
    try:
        irs = convert_tokenizer(tokenizer, with_detokenizer=True)
    except Exception as err:  # the converter raises many kinds for tokenizers it does not support
        log.warning("no tokenizer IRs written (openvino_genai will not load this folder): %s",
                    (str(err).strip().splitlines() or [type(err).__name__])[0])
        return
    for model, name in zip(irs, TOKENIZER_IRS):
        ov.save_model(model, folder / name)


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def plain_byte_level_decoder(tokenizer) -> bool:
    """Decode with ByteLevel alone where the decoder wraps it in ByteFallback, Fuse and Replace("▁", " ") steps that
    change nothing for this vocabulary (no byte tokens, no "▁"), as SmolLM2's does; return whether it did.
    openvino-tokenizers 2026.4 cannot convert that sequence (its FuzeRagged gets too few inputs)."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = (json.loads(backend.to_str()).get("decoder") or {}) if backend is not None else {}
    steps = spec.get("decoders", []) if spec.get("type") == "Sequence" else []
    identity = {("ByteFallback", None), ("Fuse", None), ("Replace", ("▁", " "))}
    kinds = [(step["type"], (step["pattern"].get("String"), step["content"]) if step["type"] == "Replace" else None)
             for step in steps if step["type"] != "ByteLevel"]
    if len(kinds) != len(steps) - 1 or not set(kinds) <= identity:
        return False
    if any("▁" in token or _BYTE_TOKEN.fullmatch(token) for token in backend.get_vocab()):
        return False
    backend.decoder = decoders.ByteLevel()
    return True
