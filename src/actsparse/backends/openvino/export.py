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

import numpy as np
import openvino as ov

from ..._common import ActSparseError, dropping_mapped_pages, stage
from ...exports.models import hf_config, is_decoder, loads_16bit
from .. import FORMATS
from .graph import constant_behind

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
            last_compressed = compress_vocabulary(model)[1]  # NNCF finds no weight in what it compressed
            if weight_format == "int4" and last_compressed:
                options["all_layers"] = True
            model = nncf.compress_weights(model, mode=mode, **options)
        save_ir_over(model, ir, compress_to_fp16=weight_format == "fp16")


# NNCF works on a tensor at about 8 bytes an element: Llama-3's 128256x4096 embeddings would alone take 4 GiB.
VOCABULARY_ELEMENTS = 1 << 26
BLOCK_ELEMENTS = 1 << 25


def vocabulary_weights(model: ov.Model, min_elements: int = VOCABULARY_ELEMENTS) -> tuple[dict, bool]:
    """``({weight Constant: its consumers}, whether the last MatMul is among them)`` for the 2-D float weights of
    at least ``min_elements`` read only (through Converts) one row per output: by embeddings (Gather on axis 0)
    or ``transpose_b`` MatMuls. NNCF keeps the last MatMul at int8 and, once that one is compressed, would take
    the one before for the last; it can only be told that there is none by compressing embeddings in int4 too,
    so the last MatMul is taken only where every embedding is."""
    def per_row(node) -> bool:
        if node.get_type_name() == "MatMul":
            return node.get_attributes()["transpose_b"]
        axis = constant_behind(node.input_value(2))
        return axis is not None and int(axis.data.reshape(-1)[0]) == 0

    users, matmuls = {}, []
    for node in model.get_ordered_ops():
        if node.get_type_name() in ("Gather", "MatMul"):
            const = constant_behind(node.input_value(0 if node.get_type_name() == "Gather" else 1))
            if const is not None and const.get_output_element_type(0).is_real():
                users.setdefault(const, []).append(node)
                matmuls += [node] if node.get_type_name() == "MatMul" else []

    def readers(output) -> int:  # consumers that are not Converts, through Converts
        return sum(readers(t.get_node().output(0)) if t.get_node().get_type_name() == "Convert" else 1
                   for t in output.get_target_inputs())

    found = {c: us for c, us in users.items()
             if len(c.get_output_partial_shape(0)) == 2 and int(np.prod(list(c.get_output_shape(0)))) >= min_elements
             and all(map(per_row, us)) and readers(c.output(0)) == len(us)}
    last = matmuls[-1] if matmuls else None
    if any(c not in found for c, us in users.items() if any(u.get_type_name() == "Gather" for u in us)):
        found = {c: us for c, us in found.items() if last not in us}
    return found, any(last in us for us in found.values())


def compress_vocabulary(model: ov.Model, min_elements: int = VOCABULARY_ELEMENTS,
                        block_elements: int = BLOCK_ELEMENTS) -> tuple[list[str], bool]:
    """Compress the vocabulary-sized weights of ``model`` (``vocabulary_weights``) to int8, asymmetric per row, in
    place, a block of rows at a time through NNCF itself, so that the values and the graph are those NNCF would
    give (it keeps embeddings and the last layer at int8 for int4 too) at a fraction of its working memory.
    Returns their consumers' names and whether the last MatMul was among them."""
    import nncf
    from openvino import opset13 as ops

    found, last = vocabulary_weights(model, min_elements)
    names = []
    for const, users in found.items():
        rows, cols = (d.get_length() for d in const.get_output_partial_shape(0))
        kind, data, name = const.get_output_element_type(0), const.data, const.get_friendly_name()
        codes, scale, zero_point = np.empty((rows, cols), np.uint8), None, None
        step = max(1, block_elements // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            raw = np.array(data[r0:r1])  # the Tensor shares this memory: it must outlive the block's model
            block = ops.constant(ov.Tensor(raw, [r1 - r0, cols], kind))
            x = ops.parameter([1, cols], ov.Type.f32)
            compressed = nncf.compress_weights(ov.Model([ops.matmul(x, ops.convert(block, ov.Type.f32), False, True)],
                                                        [x]), mode=nncf.CompressWeightsMode.INT8_ASYM)
            parts = {c.get_friendly_name(): c.data for c in compressed.get_ordered_ops() if c.get_type_name() == "Constant"}
            q, zp, s = (parts[block.get_friendly_name() + suffix] for suffix in ("", "/zero_point", "/scale"))
            if scale is None:
                scale, zero_point = np.empty((rows, 1), s.dtype), np.empty((rows, 1), np.uint8)
            codes[r0:r1], zero_point[r0:r1], scale[r0:r1] = q, zp, s
        del data
        # the subgraph NNCF's OpenVINO backend builds for an int8 asymmetric weight
        weight = ops.subtract(ops.convert(ops.constant(codes, shared_memory=True, name=name), ov.Type.f16),
                              ops.convert(ops.constant(zero_point, name=f"{name}/zero_point"), ov.Type.f16),
                              name=f"{name}/zero_point/subtract")
        port = 0 if users[0].get_type_name() == "Gather" else 1
        weight = ops.multiply(weight, ops.constant(scale, name=f"{name}/scale"), name=f"{name}/fq_weights_{port}")
        replace_constant(const, weight.output(0))
        names += [user.get_friendly_name() for user in users]
    return names, last


def replace_constant(const, new: ov.Output) -> None:
    """Feed ``const``'s consumers from ``new``; a Convert to ``new``'s type is bypassed, and a consumer that is
    not a Convert gets one back to ``const``'s type (NNCF does the same)."""
    for target in list(const.output(0).get_target_inputs()):
        node = target.get_node()
        if node.get_type_name() == "Convert" and node.get_output_element_type(0) == new.get_element_type():
            replace_constant(node, new)
        elif node.get_type_name() == "Convert" or const.get_output_element_type(0) == new.get_element_type():
            target.replace_source_output(new)
        else:
            from openvino import opset13 as ops
            target.replace_source_output(ops.convert(new, const.get_output_element_type(0)).output(0))


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
