"""llama.cpp importance-matrix files: read (GGUF format and legacy .dat) and write (GGUF format).

An imatrix holds, for each matmul weight, the sum over tokens of the squared input activations
per input channel (`<tensor>.in_sum2`) and how many tokens were counted (`<tensor>.counts`).
The quantizer weights each channel's rounding error by the mean square (in_sum2 / counts).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import ProbeError
from ..fsutil import atomic_output
from .gguf import read_gguf, validate_gguf


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float64, shape (n_mat, n_per_row): sum of squares per input channel
    counts: np.ndarray  # float64, shape (n_mat,): tokens (GGUF format) or calls (legacy) per matrix


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def mean_squares(self) -> dict[str, np.ndarray]:
        """What llama-quantize hands the quantizer (tools/quantize load_imatrix): per-channel mean of
        squares, flattened, one row per matrix. A matrix that counted nothing (an expert no token was
        routed to) gets ones, uniform weights, not zeros; a legacy file's sums are kept as they are."""
        out = {}
        for name, e in self.entries.items():
            counts = np.where(e.counts > 0, e.counts, 1.0)[:, None]
            # Legacy files store sums already scaled to (sum/count)*ncall; dividing by ncall matches.
            means = e.sums / counts
            if not self.legacy:
                means = np.where(e.counts[:, None] > 0, means, 1.0)
            out[name] = means.astype(np.float32).reshape(-1)
        return out


    def summary(self) -> list[dict]:
        """Per entry: its width and matrices (experts), tokens counted, and the mean, max and max/mean of
        the quantizer's per-channel weights (mean_squares) over the matrices that counted something: an
        expert no token was routed to weighs 1 everywhere and would only dilute them."""
        rows = []
        means = self.mean_squares()
        for name, e in self.entries.items():
            n_mat, n_per_row = e.sums.shape
            counted = e.counts > 0
            ms = means[name].reshape(n_mat, n_per_row)[counted] if counted.any() else np.zeros((0, n_per_row))
            mean = float(ms.mean()) if ms.size else None
            peak = float(ms.max()) if ms.size else None
            rows.append({"name": name, "channels": int(n_per_row), "matrices": int(n_mat),
                         "matrices_counted": int(counted.sum()), "count": float(e.counts.sum()),
                         "counts": [float(c) for c in e.counts] if n_mat > 1 else None,
                         "mean": mean, "max": peak,
                         "max_over_mean": peak / mean if mean else None})
        return rows


def read_imatrix(path: str | Path) -> Imatrix:
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf_imatrix(path)
    return _read_legacy_imatrix(path)


def _read_gguf_imatrix(path: Path) -> Imatrix:
    reader = read_gguf(path, for_llama=False)
    tensors = {t.name: t for t in reader.tensors}
    entries = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(f"{base}.counts")
        if counts is None:
            raise ProbeError(f"{path}: imatrix entry {base} has in_sum2 but no counts")
        n_mat = int(counts.n_elements)
        sums = np.asarray(t.data, dtype=np.float64).reshape(n_mat, -1)
        entries[base] = ImatrixEntry(sums, np.asarray(counts.data, dtype=np.float64).reshape(-1))
    if not entries:
        raise ProbeError(f"{path}: no imatrix entries (*.in_sum2 tensors) in this GGUF file")

    def field_value(key: str, default):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    return Imatrix(
        entries,
        datasets=list(field_value("imatrix.datasets", [])),
        chunk_count=int(field_value("imatrix.chunk_count", 0)),
        chunk_size=int(field_value("imatrix.chunk_size", 0)),
    )


def _read_legacy_imatrix(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ProbeError(f"{path}: not an imatrix file (truncated legacy .dat at byte {pos})")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise ProbeError(f"{path}: not an imatrix file (neither GGUF nor a legacy .dat)")
    entries = {}
    for _ in range(n_entries):
        (name_len,) = take("<i")
        if not 0 < name_len < 4096:
            raise ProbeError(f"{path}: not an imatrix file (bad entry name length {name_len})")
        name = data[pos : pos + name_len].decode("utf-8", errors="replace")
        pos += name_len
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise ProbeError(f"{path}: not an imatrix file (bad value count for {name})")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        entries[name] = ImatrixEntry(sums.reshape(1, -1), np.array([float(ncall)]))
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (ds_len,) = take("<i")
            if 0 < ds_len <= len(data) - pos:
                datasets.append(data[pos : pos + ds_len].decode("utf-8", errors="replace"))
    return Imatrix(entries, datasets=datasets, chunk_count=chunk_count, legacy=True)


def check_imatrix(imatrix: "Imatrix | Mapping[str, np.ndarray]", model_path: str | Path,
                  label: str = "the imatrix") -> None:
    """Refuse an imatrix made for another model: every entry must name a tensor of the model and hold
    one value per input channel (its row length, times the expert count of a 3-D tensor).

    llama.cpp aborts the whole process on a length mismatch inside the quantizer, so this runs first.
    """
    values = imatrix.mean_squares() if isinstance(imatrix, Imatrix) else imatrix
    model_path = Path(model_path)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in validate_gguf(model_path, for_llama=False).tensors}
    missing = [name for name in values if name not in shapes]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ProbeError(f"{label} is for another model: {model_path.name} has no tensor "
                         f"{', '.join(missing[:3])}{more}")
    for name, v in values.items():
        shape = shapes[name]
        n_mat = shape[2] if len(shape) > 2 else 1  # MoE expert stacks: one row of channels per expert
        if np.size(v) != shape[0] * n_mat:
            experts = f" × {n_mat} experts" if n_mat > 1 else ""
            raise ProbeError(f"{label} is for another model: {name} has {np.size(v)} values, "
                             f"the model's rows have {shape[0]}{experts}")


def write_imatrix(path: str | Path, imatrix: Imatrix) -> Path:
    """Write the GGUF imatrix format llama-imatrix writes (llama-quantize reads it)."""
    import gguf  # gguf-py loads its constant tables on import: only when writing

    path = Path(path)
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="imatrix")
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix files carry none
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, imatrix.datasets or ["ggml-probe"])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(imatrix.chunk_count))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(imatrix.chunk_size))
        for name, e in imatrix.entries.items():
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype=np.float32))
            writer.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
