"""ctypes wrapper of the C++ kernel core (libactsparse_core_capi.so) plus numpy packers and a reference.

The library is found as the runtime libraries are (:func:`actsparse.runtime_ext.library_path`).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import library_path

_LIB_NAME = "libactsparse_core_capi.so"
_lib = None


class KernelError(RuntimeError):
    """The C++ core rejected a call; the message is the core's own."""


def _load():
    global _lib
    if _lib is None:
        path = library_path(_LIB_NAME, "kernel core", "build actsparse/runtime_ext/core or set ACTSPARSE_EXT_DIR")
        lib = ctypes.CDLL(str(path))
        p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        lib.actsparse_core_matmul.argtypes = [p, i64, ctypes.c_int, i64, i64, i64, p, i64, p, p, i64, p, f32, f32,
                                              ctypes.c_int, p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, i64,
                                              ctypes.c_int, ctypes.c_int]
        lib.actsparse_core_matmul.restype = ctypes.c_int
        for name in ("actsparse_core_last_error", "actsparse_core_kernels", "actsparse_core_best_kernel",
                     "actsparse_core_formats"):
            getattr(lib, name).argtypes = []
            getattr(lib, name).restype = ctypes.c_char_p
        lib.actsparse_core_get_tuning.argtypes = [p, p, p, p, p]
        lib.actsparse_core_get_tuning.restype = None
        lib.actsparse_core_set_tuning.argtypes = [i64, ctypes.c_char, ctypes.c_int, i64, i64]
        lib.actsparse_core_set_tuning.restype = ctypes.c_int
        lib.actsparse_core_tuning_report.argtypes = []
        lib.actsparse_core_tuning_report.restype = ctypes.c_char_p
        lib.actsparse_core_activate.argtypes = [p, ctypes.c_int, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, p,
                                                ctypes.c_int]
        lib.actsparse_core_activate.restype = ctypes.c_int
        lib.actsparse_core_to_huge_pages.argtypes = [p, i64]
        lib.actsparse_core_to_huge_pages.restype = None
        _lib = lib
    return _lib


_CACHE_NAMES = {("1", "Data"): "L1d", ("1", "Instruction"): "L1i", ("2", "Unified"): "L2", ("3", "Unified"): "L3"}


def cache_sizes() -> dict[str, int]:
    """Bytes of each cache level the first CPU sees (L1d, L1i, L2, L3: the whole cache it shares), from Linux sysfs;
    the levels it cannot read are left out."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            name = _CACHE_NAMES.get(((index / "level").read_text().strip(), (index / "type").read_text().strip()))
            text = (index / "size").read_text().strip()  # e.g. "32768K"
            if name:
                sizes[name] = int(text.rstrip("KM")) * {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return sizes


def last_level_cache_mb() -> float:
    """This CPU's last-level cache in MB (32 MiB where it cannot be read). Benchmarks that must read their weights
    from DRAM, as a model's decode step does, hold at least three times this much."""
    return max(cache_sizes().values(), default=32 << 20) / 1e6


def available_kernels() -> list[str]:
    return [k for k in _load().actsparse_core_kernels().decode().split(",") if k]


def best_kernel() -> str:
    return _load().actsparse_core_best_kernel().decode()


def get_tuning() -> dict:
    """The core's decode knobs (see Tuning in actsparse_core.hpp): par_bytes, split ("n", "k" or ""), prefetch
    ("l1" or "l2"), decode_max_rows and union_pct. :func:`tuning_report` says where each came from."""
    nbytes, split, l2, rows, union = ctypes.c_int64(), ctypes.c_char(), ctypes.c_int(), ctypes.c_int64(), ctypes.c_int64()
    _load().actsparse_core_get_tuning(*map(ctypes.byref, (nbytes, split, l2, rows, union)))
    return {"par_bytes": nbytes.value, "split": split.value.decode().strip("\0"), "prefetch": "l2" if l2.value else "l1",
            "decode_max_rows": rows.value, "union_pct": union.value}


def tuning_report() -> dict:
    """The knobs now, each as ``{"value", "source"}`` (source "env", "file", "rule", "default", or "set_tuning"
    where this process changed it), and the tuning file: its path (``file``), whether the library used it
    (``file_used``), why not where it exists (``file_ignored``), the thread count it was measured with, and its
    key (``cpu``, ``kernel``, ``version``)."""
    return json.loads(_load().actsparse_core_tuning_report().decode())


def set_tuning(par_bytes: Optional[int] = None, split: Optional[str] = None, prefetch: Optional[str] = None,
               decode_max_rows: Optional[int] = None, union_pct: Optional[int] = None) -> None:
    """Change the given knobs for this library (not while another thread runs a matmul). The OpenVINO and
    ONNX Runtime libraries hold their own copies of the core: steer those with the environment variables or
    the tuning file (:mod:`actsparse.runtime_ext.tuning`)."""
    given = dict(par_bytes=par_bytes, split=split, prefetch=prefetch, decode_max_rows=decode_max_rows,
                 union_pct=union_pct)
    knobs = {**get_tuning(), **{k: v for k, v in given.items() if v is not None}}
    if knobs["prefetch"] not in ("l1", "l2"):
        raise ValueError(f"prefetch must be l1 or l2, got {knobs['prefetch']!r}")
    lib = _load()
    if lib.actsparse_core_set_tuning(int(knobs["par_bytes"]), knobs["split"].encode()[:1] or b"\0",
                                     int(knobs["prefetch"] == "l2"), int(knobs["decode_max_rows"]),
                                     int(knobs["union_pct"])):
        raise KernelError(lib.actsparse_core_last_error().decode())


@contextlib.contextmanager
def tuning(**knobs):
    """set_tuning(**knobs) within the block, then the previous values."""
    old = get_tuning()
    set_tuning(**knobs)
    try:
        yield
    finally:
        set_tuning(**old)


def to_huge_pages(a: np.ndarray) -> None:
    """Move the 2 MB-aligned part of a's bytes onto 2 MB pages, in place (what each op does to its weights on
    its first call; see to_huge_pages in actsparse_core.hpp)."""
    if not a.flags.c_contiguous:
        raise ValueError("to_huge_pages needs a contiguous array")
    _load().actsparse_core_to_huge_pages(a.ctypes.data, a.nbytes)


@functools.lru_cache(maxsize=None)
def formats() -> dict[str, dict]:
    """The core's weight formats by name (its formats.inc and traits): id, bits per weight, storage (the
    element the weight travels as in a graph), params ("none", "per_column", "per_group"), compact_params
    and tile_cols (the column tile width exports write)."""
    return {f["name"]: f for f in json.loads(_load().actsparse_core_formats().decode())}


class _FormatColumn(Mapping):
    """One trait of every format, read from the library on first use (importing this module needs none)."""

    def __init__(self, trait: str):
        self._trait = trait

    def _table(self) -> dict:
        return {name: f[self._trait] for name, f in formats().items()}

    def __getitem__(self, name):
        return self._table()[name]

    def __iter__(self):
        return iter(self._table())

    def __len__(self):
        return len(self._table())

    def __repr__(self):
        return repr(self._table())


FORMATS = _FormatColumn("id")  # the C API's number of each format
# Columns per stored tile by format (see PackedWeight in actsparse_core.hpp), written into each fused op as its
# tile_cols attribute; an op without one was exported with LEGACY_TILE_COLS.
TILE_COLS = _FormatColumn("tile_cols")
LEGACY_TILE_COLS = 2048


def row_bytes(fmt: str, n: int) -> int:
    """Bytes of n columns of one stored row (u4: two codes a byte)."""
    return (n * formats()[fmt]["bits"] + 7) // 8


def to_tiles(data: np.ndarray, fmt: str, tile_cols: Optional[int] = None) -> np.ndarray:
    """Input-channel-major ``[K, row bytes]`` data in the kernel's tile-major order, same shape and dtype.

    Columns are cut into tiles of ``tile_cols`` (default TILE_COLS[fmt]); tile t holds its K row slices
    one after another.
    """
    b = np.ascontiguousarray(data).view(np.uint8).reshape(data.shape[0], -1)
    tb = row_bytes(fmt, tile_cols or TILE_COLS[fmt])
    return np.concatenate([b[:, i:i + tb].ravel() for i in range(0, b.shape[1], tb)] or [b.ravel()]).view(
        data.dtype).reshape(data.shape)


def from_tiles(data: np.ndarray, fmt: str, tile_cols: Optional[int] = None) -> np.ndarray:
    """The inverse of :func:`to_tiles`."""
    flat = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    K = data.shape[0]
    out = np.empty((K, flat.size // max(K, 1)), np.uint8)
    tb, pos = row_bytes(fmt, tile_cols or TILE_COLS[fmt]), 0
    for i in range(0, out.shape[1], tb):
        w = min(tb, out.shape[1] - i)
        out[:, i:i + w] = flat[pos:pos + K * w].reshape(K, w)
        pos += K * w
    return out.view(data.dtype).reshape(data.shape)


@dataclass
class PackedWeight:
    """Weight [K, N] stored input-channel-major (row k = the N outputs of input channel k), tile-major
    (:func:`to_tiles`): ``data`` has the shape of the row-major array, its bytes are in tile order."""
    format: str                          # 'f32' | 'f16' | 'bf16' | 'u8' | 'u4'
    K: int
    N: int
    group_size: int                      # u4: K-group size; u8: K; f32/f16: 0
    data: np.ndarray                     # f32 [K,N] / uint16 [K,N] / uint8 [K,N] / uint8 [K, ceil(N/2)]
    scale: Optional[np.ndarray] = None   # u8: [N]; u4: [K/G, N]; float32, or float16 for compact u4 params
    zero_point: Optional[np.ndarray] = None  # float32, or uint8 for compact u4 params
    tile_cols: int = 0                   # columns per stored tile; 0: TILE_COLS[format]

    def __post_init__(self):
        self.tile_cols = self.tile_cols or TILE_COLS[self.format]

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.format, self.N)

    @property
    def compact(self) -> bool:
        """u4 params as f16 scales and u8 zero points (what the export writes), not f32."""
        return self.scale is not None and self.scale.dtype == np.float16


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


# pack_*: tile_cols 0 stores the format's default tiles (TILE_COLS)

def pack_f32(w_kn, tile_cols: int = 0) -> PackedWeight:
    w = _f32(w_kn)
    return PackedWeight("f32", w.shape[0], w.shape[1], 0, to_tiles(w, "f32", tile_cols), tile_cols=tile_cols)


def pack_f16(w_kn, tile_cols: int = 0) -> PackedWeight:
    w = np.ascontiguousarray(np.asarray(w_kn, dtype=np.float16)).view(np.uint16)
    return PackedWeight("f16", w.shape[0], w.shape[1], 0, to_tiles(w, "f16", tile_cols), tile_cols=tile_cols)


def to_bf16(w) -> np.ndarray:
    """float32 → bf16 bits (uint16), rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(u.view(np.float32)), ((u >> 16) | 0x40).astype(np.uint16), rounded)


def pack_bf16(w_kn, tile_cols: int = 0) -> PackedWeight:
    w = to_bf16(w_kn)
    return PackedWeight("bf16", w.shape[0], w.shape[1], 0, to_tiles(w, "bf16", tile_cols), tile_cols=tile_cols)


def pack_u8(q_kn, scale, zp, tile_cols: int = 0) -> PackedWeight:
    q = np.ascontiguousarray(q_kn, dtype=np.uint8)
    K, N = q.shape
    return PackedWeight("u8", K, N, K, to_tiles(q, "u8", tile_cols), _f32(scale).reshape(N), _f32(zp).reshape(N),
                        tile_cols)


def compact_u4_params(scale, zp):
    """(f16 scale, u8 zero point) when both hold those values exactly (as NNCF writes them), else None."""
    scale, zp = np.asarray(scale, np.float32), np.asarray(zp, np.float32)
    s16, z8 = scale.astype(np.float16), np.clip(zp, 0, 255).astype(np.uint8)
    return (s16, z8) if np.array_equal(s16.astype(np.float32), scale) and np.array_equal(z8, zp) else None


def pack_u4(q_kn, scale, zp, group_size: int, tile_cols: int = 0, compact: bool = False) -> PackedWeight:
    """compact: params as f16 scales and u8 zero points (ValueError where they do not hold them exactly)."""
    q = np.asarray(q_kn, dtype=np.uint8)
    K, N = q.shape
    if K % group_size:
        raise ValueError(f"group_size {group_size} must divide K={K}")
    if q.size and q.max() > 15:
        raise ValueError("u4 values must be in 0..15")
    if N % 2:
        q = np.concatenate([q, np.zeros((K, 1), np.uint8)], axis=1)
    packed = np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4))  # even n -> low nibble
    ng = K // group_size
    scale, zp = _f32(scale).reshape(ng, N), _f32(zp).reshape(ng, N)
    if compact:
        params = compact_u4_params(scale, zp)
        if params is None:
            raise ValueError("compact u4 params need f16 scales and zero points in 0..255")
        scale, zp = params
    return PackedWeight("u4", K, N, group_size, to_tiles(packed, "u4", tile_cols), scale, zp, tile_cols)


def dequantize(packed: PackedWeight) -> np.ndarray:
    """Independent numpy reference: float32 [K, N]."""
    K, N = packed.K, packed.N
    data = from_tiles(packed.data, packed.format, packed.tile_cols)
    if packed.format == "f32":
        return data.astype(np.float32)
    if packed.format == "f16":
        return data.view(np.float16).astype(np.float32)
    if packed.format == "bf16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if packed.format == "u8":
        return (data.astype(np.float32) - packed.zero_point[None, :]) * packed.scale[None, :]
    if packed.format == "u4":
        q = np.empty((K, 2 * data.shape[1]), np.float32)
        q[:, 0::2] = data & 0xF
        q[:, 1::2] = data >> 4
        g = np.arange(K) // packed.group_size
        return (q[:, :N] - packed.zero_point[g].astype(np.float32)) * packed.scale[g].astype(np.float32)
    raise ValueError(packed.format)


def _ptr(a: Optional[np.ndarray]):
    return None if a is None else a.ctypes.data


def matmul(x, packed: PackedWeight, bias=None, mode=0.0, threshold=0.0, mask=True, threads=1,
           kernel: Optional[str] = None, int8_activations: bool = False) -> np.ndarray:
    """y = z'·W + bias. A uint16 x holds bf16 values (as OpenVINO's bf16 graphs pass them); y is then bf16
    (uint16, rounded to nearest even) too. A float16 x (OpenVINO's GPU precision) gives a float16 y, computed
    in f32 and rounded to nearest even. Any other x is converted to float32.

    int8_activations: u8 or u4 weights quantise the activations z = x − m to int8 where the kernel has
    int8 dot products (avx512bf16, which needs AVX512-VNNI too), as the CPU plugin's dynamic quantisation
    does for its own u8/u4 FullyConnected: in a decode (up to get_tuning()["decode_max_rows"] rows) each
    run of 8 consecutive live channels (u4: within one group), in a prefill each group of 32 channels (u4:
    only where 128 divides the group size), gets the scale max|z| / 127, and q = round(z / scale). A NaN
    or Inf keeps the call as it would be without the flag."""
    lib = _load()
    # the core's activation types: 0 f32, 1 bf16 (uint16 bits), 2 f16
    activations = {np.dtype(np.uint16): 1, np.dtype(np.float16): 2}.get(getattr(x, "dtype", None), 0)
    x = np.ascontiguousarray(x) if activations else _f32(x)
    if x.ndim != 2 or x.shape[1] != packed.K:
        raise ValueError(f"x must be [M, {packed.K}], got {x.shape}")
    M = x.shape[0]
    b = None if bias is None else _f32(bias).reshape(packed.N)
    data = np.ascontiguousarray(packed.data)  # its size is checked by the core, as an op's weight input is
    compact = packed.compact
    sc, zp = ((np.ascontiguousarray(packed.scale), np.ascontiguousarray(packed.zero_point, np.uint8)) if compact else
              (None if packed.scale is None else _f32(packed.scale), None if packed.zero_point is None else _f32(packed.zero_point)))
    if sc is not None and (zp is None or zp.size != sc.size):
        raise ValueError("scale and zero_point must have the same size")
    y = np.empty((M, packed.N), x.dtype)
    rc = lib.actsparse_core_matmul(
        _ptr(x), M, FORMATS.get(packed.format, -1), packed.K, packed.N, packed.group_size, _ptr(data), data.nbytes,
        _ptr(sc), _ptr(zp), 0 if sc is None else sc.size, _ptr(b), float(mode), float(threshold), int(bool(mask)), _ptr(y), int(threads),
        None if kernel is None else kernel.encode(), activations, int(packed.tile_cols),
        int(bool(int8_activations)), int(compact))
    if rc != 0:
        raise KernelError(lib.actsparse_core_last_error().decode())
    return y


ACTIVATIONS = ("silu", "gelu_erf", "gelu_tanh")  # ActSparseMLP's, in the core's order
GATES = ("none", "first", "second")


def activate(h, activation: str, gate: str = "none", round_bf16: bool = False, threads: int = 1) -> np.ndarray:
    """ActSparseMLP's activation on h [M, N]: act(h), or act of one half times the other (gate first: act(h[:, :N/2])
    · h[:, N/2:]). A uint16 h holds bf16 values and gives a bf16 result; round_bf16 rounds an f32 one to bf16 values."""
    lib = _load()
    activations = {np.dtype(np.uint16): 1, np.dtype(np.float16): 2}.get(getattr(h, "dtype", None), 0)
    h = np.ascontiguousarray(h) if activations else _f32(h)
    if h.ndim != 2:
        raise ValueError(f"h must be [M, N], got {h.shape}")
    a = np.empty((h.shape[0], h.shape[1] if gate == "none" else h.shape[1] // 2), h.dtype)
    rc = lib.actsparse_core_activate(_ptr(h), activations, h.shape[0], h.shape[1], ACTIVATIONS.index(activation),
                                     GATES.index(gate), int(bool(round_bf16)), _ptr(a), int(threads))
    if rc != 0:
        raise KernelError(lib.actsparse_core_last_error().decode())
    return a

