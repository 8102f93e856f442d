"""Exporting GGUF tensors, raw (the quantized blocks) or dequantized, to .npy or .safetensors.

Raw export keeps the bytes exactly as stored: a uint8 array (n_rows, row_bytes) in NumPy order, with
the ggml type and ggml shape recorded — in the safetensors header's `__metadata__`, or for .npy
(whose header has no room for it) in a sidecar `FILE.npy.json`. Dequantized export is float32 in
NumPy axis order (the reversed ggml shape: ffn_down, ggml [n_ff, n_embd], becomes (n_embd, n_ff)).

The safetensors format is simple enough to write directly (no dependency): 8-byte little-endian
header length, a JSON header (padded with spaces to 8 bytes) mapping names to dtype / shape /
data_offsets, then the data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..errors import ProbeError
from ..fsutil import atomic_output, check_output
from ..models.store import resolve_model
from .dequant import GGUFTensors, can_dequantize


_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}
# Rows copied per write when streaming a tensor into the output file.
_WRITE_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class DumpedTensor:
    name: str
    ggml_type: str
    ggml_shape: tuple[int, ...]
    dequantized: bool
    array_shape: tuple[int, ...]  # shape as written
    dtype: str  # float32 or uint8


@dataclass(frozen=True)
class DumpResult:
    path: Path
    sidecar: Path | None
    tensors: tuple[DumpedTensor, ...]
    n_bytes: int


def dump_tensors(
    model: str | Path,
    names: str | Sequence[str],
    output: str | Path,
    *,
    dequantize: bool = False,
    force: bool = False,
) -> DumpResult:
    """Write tensors of `model` to `output` (.npy: exactly one tensor; .safetensors: one or more).

    dequantize=False writes the stored blocks (uint8, shape (n_rows, row_bytes)) and records the
    ggml type and shape; dequantize=True writes float32 values in NumPy axis order.
    Refuses (ProbeError) unknown names (with close matches), undequantizable types, other suffixes,
    and an existing output unless force. The file appears only when complete (atomic rename).
    """
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in (".npy", ".safetensors"):
        raise ProbeError(f"output must end in .npy or .safetensors, not {output.name!r}")
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ProbeError("no tensor named (use --tensor NAME)")
    if suffix == ".npy" and len(names) != 1:
        raise ProbeError(f".npy holds one tensor, {len(names)} were asked for: use .safetensors")
    if len(set(names)) != len(names):
        raise ProbeError("a tensor is named twice")
    check_output(output, force)
    sidecar = output.with_name(output.name + ".json") if suffix == ".npy" else None
    if sidecar is not None:
        check_output(sidecar, force)

    with GGUFTensors(resolve_model(model)) as src:
        refs = [src.ref(n) for n in names]  # unknown names: ProbeError with close matches
        if dequantize:
            bad = [f"{r.name} ({r.type_name})" for r in refs if not can_dequantize(r.ggml_type)]
            if bad:
                raise ProbeError(f"cannot dequantize {', '.join(bad)}: no dequantizer in ggml or gguf-py")
        dumped = tuple(
            DumpedTensor(r.name, r.type_name, r.ggml_shape, dequantize,
                         r.numpy_shape if dequantize else (r.n_rows, r.row_bytes),
                         "float32" if dequantize else "uint8")
            for r in refs
        )
        meta = {
            "source": src.path.name, "architecture": src.architecture or "", "written_by": f"ggml-probe {__version__}",
            "dequantized": str(dequantize).lower(),
        }
        with atomic_output(output) as tmp:
            with open(tmp, "wb") as f:
                if suffix == ".npy":
                    _write_npy(f, src, dumped[0])
                else:
                    _write_safetensors(f, src, dumped, meta)
            n_bytes = tmp.stat().st_size
        if sidecar is not None:
            d = dumped[0]
            info = {**meta, "tensor": d.name, "ggml_type": d.ggml_type, "ggml_shape": list(d.ggml_shape),
                    "array_shape": list(d.array_shape), "dtype": d.dtype}
            with atomic_output(sidecar) as tmp:
                tmp.write_text(json.dumps(info, indent=2) + "\n")
    return DumpResult(output, sidecar, dumped, n_bytes)


def _stream(f, src: GGUFTensors, d: DumpedTensor) -> None:
    """Write one tensor's data (C order) block by block: memory stays near one block."""
    if d.dequantized:
        for _, block in src.iter_rows(d.name, block_elements=_WRITE_BLOCK_ELEMENTS):
            f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
    else:
        raw = src.raw(d.name)
        rows = max(1, _WRITE_BLOCK_ELEMENTS // max(1, raw.shape[1]))
        for start in range(0, raw.shape[0], rows):
            f.write(raw[start:start + rows].tobytes())


def _write_npy(f, src: GGUFTensors, d: DumpedTensor) -> None:
    dtype = np.dtype("<f4") if d.dequantized else np.dtype(np.uint8)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(d.array_shape)}
    np.lib.format.write_array_header_1_0(f, header) if _fits_v1(header) else \
        np.lib.format.write_array_header_2_0(f, header)
    _stream(f, src, d)


def _fits_v1(header: dict) -> bool:
    return len(repr(header)) < 65000  # v1 headers store their length in 16 bits


def _write_safetensors(f, src: GGUFTensors, dumped: Sequence[DumpedTensor], meta: dict[str, str]) -> None:
    entries: dict[str, object] = {}
    offset = 0
    for d in dumped:
        dtype = np.dtype(np.float32) if d.dequantized else np.dtype(np.uint8)
        size = int(np.prod(d.array_shape, dtype=np.int64)) * dtype.itemsize
        entries[d.name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(d.array_shape),
                           "data_offsets": [offset, offset + size]}
        offset += size
    metadata = dict(meta)
    for d in dumped:  # the ggml facts of each tensor, so raw blocks can be decoded later
        metadata[f"{d.name}.ggml_type"] = d.ggml_type
        metadata[f"{d.name}.ggml_shape"] = json.dumps(list(d.ggml_shape))
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data must start 8-byte aligned
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for d in dumped:
        _stream(f, src, d)
