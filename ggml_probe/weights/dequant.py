"""Dequantizing GGUF tensors to float32, streamed from the memory-mapped file.

The primary path is ggml's own dequantizer: `ggml_get_type_traits(type)->to_float`, called through
the libggml that llama-cpp-python ships, so the values are exactly what llama.cpp computes with
(bit-exact by construction) and every type llama.cpp writes is covered. Types the library has no
`to_float` for fall back to gguf-py's NumPy dequantizer; tests check the two agree bit for bit.

Axis convention: a GGUF tensor with ggml shape [ne0, ne1] is stored row-major with ne0 contiguous
elements per row, so as a NumPy array it is (ne1, ne0): `numpy_shape = tuple(reversed(ggml_shape))`.

Memory: tensors are read from an `mmap` of the file, a block of rows at a time; after each block the
pages are released (MADV_DONTNEED), so resident memory stays near one block plus its float32 copy
instead of growing with every tensor touched.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import ProbeError
from ..formats.gguf import validate_gguf


# About this many float32 elements per block of rows (64 MiB): large enough that per-call overhead
# vanishes, small enough that a 7B model's largest matrix is never materialised twice.
DEFAULT_BLOCK_ELEMENTS = 1 << 24

# ggml types stored as plain NumPy scalars (no to_float in ggml for most of them).
_PLAIN_DTYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
                 28: np.float64}
_F32 = 0

# The types ggml_quantize_chunk has a case for (any other aborts the process: GGML_ASSERT).
QUANTIZABLE = frozenset({
    "F32", "F16", "BF16", "Q1_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "NVFP4", "Q2_K", "Q3_K",
    "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_S",
    "IQ1_M", "IQ4_NL", "IQ4_XS",
})

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h (llama-cpp-python 0.3.36's vendored ggml).
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class TypeFacts:
    ggml_type: int
    name: str  # gguf-py's spelling: Q4_K, IQ4_NL, F16 ...
    block_size: int  # elements per block
    type_size: int  # bytes per block


@lru_cache(maxsize=1)
def _lib() -> Any:
    from llama_cpp._ggml import libggml as lib  # ggml_get_type_traits lives in libggml-base, re-exported

    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    return lib


@lru_cache(maxsize=None)
def _type_table() -> dict[int, TypeFacts]:
    from gguf import GGML_QUANT_SIZES

    return {int(t): TypeFacts(int(t), t.name, block, nbytes) for t, (block, nbytes) in GGML_QUANT_SIZES.items()}


def type_facts(ggml_type: int) -> TypeFacts:
    facts = _type_table().get(int(ggml_type))
    if facts is None:
        raise ProbeError(f"unknown ggml type {ggml_type}")
    return facts


def type_name(ggml_type: int) -> str:
    facts = _type_table().get(int(ggml_type))
    return facts.name if facts else f"type {ggml_type}"


@lru_cache(maxsize=None)
def _ggml_to_float(ggml_type: int) -> Any | None:
    """ggml's row dequantizer for the type, or None when ggml has none (F32, integers, Q8_1, Q8_K)."""
    try:
        lib = _lib()
    except Exception:  # llama-cpp-python missing or broken: the NumPy fallback still works
        return None
    traits = lib.ggml_get_type_traits(int(ggml_type)).contents
    if not traits.to_float:
        return None
    facts = _type_table().get(int(ggml_type))
    # Guard against a layout mismatch between our struct and the library's: the sizes must agree.
    if facts is None or traits.blck_size != facts.block_size or traits.type_size != facts.type_size:
        return None
    return _TO_FLOAT(traits.to_float)


@lru_cache(maxsize=None)
def _numpy_can(ggml_type: int) -> bool:
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits  # the registry gguf.quants.dequantize dispatches on

    try:
        qtype = GGMLQuantizationType(int(ggml_type))
    except ValueError:
        return False
    return qtype in _type_traits


def backends_for(ggml_type: int) -> list[str]:
    """Which dequantizers handle this type: 'plain' (a NumPy cast), 'ggml', 'numpy' (gguf-py)."""
    out = []
    if int(ggml_type) in _PLAIN_DTYPES and int(ggml_type) != 1:
        out.append("plain")
    if _ggml_to_float(int(ggml_type)) is not None:
        out.append("ggml")
    if _numpy_can(int(ggml_type)) or int(ggml_type) == 1:
        out.append("numpy")
    return out


def can_dequantize(ggml_type: int) -> bool:
    return bool(backends_for(ggml_type))


def dequantize_bytes(raw: np.ndarray, ggml_type: int, n_elements: int, *, backend: str = "auto",
                     out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize `n_elements` values stored as `raw` (uint8, the type's blocks) to a flat float32 array.

    backend: 'auto' (ggml where it can, else a NumPy cast or gguf-py), 'ggml' or 'numpy' (gguf-py's
    dequantizer, for cross-checking). Raises ProbeError naming the type when it cannot be done.
    """
    ggml_type = int(ggml_type)
    facts = type_facts(ggml_type)
    if n_elements % facts.block_size:
        raise ProbeError(f"{n_elements} elements is not a whole number of {facts.name} blocks ({facts.block_size})")
    need = n_elements // facts.block_size * facts.type_size
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size < need:
        raise ProbeError(f"{facts.name} data too short: {raw.size} bytes for {n_elements} elements")
    raw = raw[:need]
    if out is None:
        out = np.empty(n_elements, dtype=np.float32)
    elif out.dtype != np.float32 or out.size != n_elements or not out.flags.c_contiguous:
        raise ValueError("out must be a contiguous float32 array of n_elements")
    flat = out.reshape(-1)

    # F32 needs no conversion whatever the backend (ggml computes with it as stored).
    if ggml_type == _F32 or (backend in ("auto", "plain") and ggml_type in _PLAIN_DTYPES and ggml_type != 1):
        flat[:] = raw.view(_PLAIN_DTYPES[ggml_type])
        return out
    if backend in ("auto", "ggml"):
        fn = _ggml_to_float(ggml_type)
        if fn is not None:
            if n_elements:
                fn(raw.ctypes.data, flat.ctypes.data, n_elements)
            return out
        if backend == "ggml":
            raise ProbeError(f"ggml has no dequantizer for {facts.name}")
    if backend in ("auto", "numpy"):
        if ggml_type in _PLAIN_DTYPES:  # F32, F16 (what gguf.quants.dequantize does), integers
            flat[:] = raw.view(_PLAIN_DTYPES[ggml_type])
            return out
        if _numpy_can(ggml_type):
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            flat[:] = dequantize(raw, GGMLQuantizationType(ggml_type)).reshape(-1)
            return out
    if backend not in ("auto", "ggml", "numpy", "plain"):
        raise ValueError(f"unknown backend {backend!r}")
    raise ProbeError(f"cannot dequantize type {facts.name}: neither ggml nor gguf-py has a dequantizer for it")


def quantize_rows(data: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize a float32 matrix (rows, n_per_row) with llama.cpp's own quantizer (ggml_quantize_chunk).

    Returns the blocks as uint8 of shape (rows, row_bytes). `imatrix` (n_per_row importance weights)
    is required by the IQ1/IQ2 types and used by most others when given, as llama-quantize does.
    """
    lib = _lib()
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError("data must be 2-D (rows, n_per_row)")
    n_rows, n_per_row = data.shape
    facts = type_facts(ggml_type)
    if facts.name not in QUANTIZABLE:
        raise ProbeError(f"llama.cpp cannot quantize to {facts.name}")
    if n_per_row % facts.block_size:
        raise ProbeError(f"rows of {n_per_row} are not a whole number of {facts.name} blocks ({facts.block_size})")
    if lib.ggml_quantize_requires_imatrix(int(ggml_type)) and imatrix is None:
        raise ProbeError(f"{facts.name} needs an importance matrix")
    row_bytes = lib.ggml_row_size(int(ggml_type), n_per_row)
    out = np.zeros((n_rows, row_bytes), dtype=np.uint8)
    im_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise ValueError(f"imatrix must have shape ({n_per_row},)")
        im_ptr = imatrix.ctypes.data
    written = lib.ggml_quantize_chunk(int(ggml_type), data.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, im_ptr)
    if written != out.nbytes:
        raise ProbeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


# ---------------------------------------------------------------------------------------------
# Streaming tensors out of a GGUF file


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives in the file and how to view it."""

    name: str
    ggml_shape: tuple[int, ...]  # shape[0] = row length (contiguous)
    ggml_type: int
    offset: int  # absolute file offset of the data
    n_bytes: int

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ggml_shape))

    @property
    def row_length(self) -> int:
        return self.ggml_shape[0] if self.ggml_shape else 1

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.ggml_shape[1:], dtype=np.int64)) if len(self.ggml_shape) > 1 else 1

    @property
    def n_elements(self) -> int:
        return self.row_length * self.n_rows

    @property
    def row_bytes(self) -> int:
        return self.n_bytes // self.n_rows if self.n_rows else 0

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


class GGUFTensors:
    """A GGUF file's tensors, read from an mmap one block of rows at a time.

    Use as a context manager (or call close()). The header is parsed and bounds-checked by
    `validate_gguf`; gguf-py's GGUFReader (slow on big files) is never used.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.summary = validate_gguf(self.path, for_llama=False)
        self.tensors: dict[str, TensorRef] = {
            t.name: TensorRef(t.name, tuple(int(d) for d in t.shape), int(t.ggml_type), int(t.offset), int(t.n_bytes))
            for t in self.summary.tensors
        }
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    # context manager -----------------------------------------------------------------------
    def __enter__(self) -> "GGUFTensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a NumPy view still holds it; the GC unmaps it later
                pass
            self._mm = None
        self._file.close()

    # lookup --------------------------------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        return self.summary.architecture

    def names(self) -> list[str]:
        return list(self.tensors)

    def ref(self, name: str) -> TensorRef:
        ref = self.tensors.get(name)
        if ref is None:
            raise ProbeError(unknown_tensor_message(name, self.tensors, self.path))
        return ref

    # reading -------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as a read-only uint8 view of shape (n_rows, row_bytes) — no copy."""
        ref = self.ref(name)
        flat = np.frombuffer(self._mm, dtype=np.uint8, count=ref.n_bytes, offset=ref.offset)
        return flat.reshape(ref.n_rows, ref.row_bytes)

    def iter_rows(self, name: str, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS, backend: str = "auto",
                  release: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, float32 array (rows, row_length)) blocks covering the whole tensor.

        The yielded array is reused for the next block: copy it if you keep it. With `release`,
        the file pages of each block are dropped from this process once it is dequantized.
        """
        ref = self.ref(name)
        if not can_dequantize(ref.ggml_type):
            raise ProbeError(f"{self.path.name}: cannot dequantize {name}: type {ref.type_name} has no dequantizer "
                             "in ggml or gguf-py")
        rows_per_block = max(1, block_elements // max(1, ref.row_length))
        raw = self.raw(name)
        buf = np.empty((min(rows_per_block, ref.n_rows), ref.row_length), dtype=np.float32)
        for start in range(0, ref.n_rows, rows_per_block):
            stop = min(ref.n_rows, start + rows_per_block)
            block = buf[: stop - start]
            dequantize_bytes(raw[start:stop], ref.ggml_type, block.size, backend=backend, out=block)
            if release:
                self._release(ref.offset + start * ref.row_bytes, (stop - start) * ref.row_bytes)
            yield start, block

    def dequantize(self, name: str, *, backend: str = "auto") -> np.ndarray:
        """The whole tensor as float32 in NumPy axis order (reversed ggml shape)."""
        ref = self.ref(name)
        out = np.empty((ref.n_rows, ref.row_length), dtype=np.float32)
        for start, block in self.iter_rows(name, backend=backend):
            out[start:start + len(block)] = block
        return out.reshape(ref.numpy_shape)

    def _release(self, offset: int, length: int) -> None:
        # Drop the pages from our resident set (they stay in the page cache); whole pages only.
        if self._mm is None or not hasattr(self._mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        begin = (offset + page - 1) // page * page
        end = (offset + length) // page * page
        if end > begin:
            self._mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def unknown_tensor_message(name: str, names: Any, where: Any) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    label = where.name if isinstance(where, Path) else where
    return f"{label}: no tensor named {name!r}{hint}"
