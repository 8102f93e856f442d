"""The static error of each tensor at each candidate type, before any file is written.

Each tensor of the source is quantized in memory with llama.cpp's own quantizer (ggml_quantize_chunk,
with the imatrix as llama-quantize passes it), dequantized, and its error against the source weighed by
the imatrix's mean squares m = E[x²] of the matmul's input channels:
    E(W, type) = Σ_j Σ_i δW[j,i]² · m_i
the predicted mean square change of the matmul's outputs summed over them (weights/sensitivity.py's
e(W)², summed over rows; m = 1 without an imatrix). Types whose block does not divide a tensor's row
length are left out for that tensor (llama.cpp would fall back to another type). A tensor of more than
`max_rows` rows (token embeddings: one row per vocabulary entry) is estimated from every k-th row, the sum
scaled by rows / sampled rows (unbiased: rows are quantized independently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .dequant import GGUFTensors, dequantize_bytes, quantize_rows, type_facts

# Rows quantized per call: bounds the float32 copies of a large tensor (token embeddings) to ~64 MiB.
_ROW_BLOCK_ELEMENTS = 1 << 24


def fits(type_id: int, row_length: int) -> bool:
    """Whether rows of this length are a whole number of the type's blocks."""
    return row_length % type_facts(type_id).block_size == 0


def type_errors(
    source: str | Path,
    names: Sequence[str],
    types: Mapping[str, int],
    imatrix: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    max_rows: int | None = 4096,
) -> dict[str, dict[str, float]]:
    """E(W, type) of every named tensor at every type (name → type name → value) that fits its rows."""
    out: dict[str, dict[str, float]] = {}
    with GGUFTensors(source) as tensors:
        for k, name in enumerate(names):
            ref = tensors.ref(name)
            n_per_row = ref.row_length
            weights = tensors.dequantize(name).reshape(-1, n_per_row)
            n_rows = weights.shape[0]
            if max_rows and n_rows > max_rows:
                weights = weights[:: -(-n_rows // max_rows)]
            scale = n_rows / weights.shape[0]
            m = imatrix.get(name) if imatrix else None
            m = None if m is None else np.asarray(m, dtype=np.float32).reshape(-1)
            if m is not None and m.size != n_per_row:
                m = None  # an entry of another shape (e.g. stacked experts) is not this matmul's input
            step = max(1, _ROW_BLOCK_ELEMENTS // n_per_row)
            per_type = {}
            for type_name, type_id in types.items():
                if not fits(type_id, n_per_row):
                    continue
                total = 0.0
                for start in range(0, weights.shape[0], step):
                    rows = weights[start:start + step]
                    blocks = quantize_rows(rows, type_id, m)
                    back = dequantize_bytes(blocks, type_id, rows.size).reshape(rows.shape)
                    err2 = np.square(back - rows, dtype=np.float64)
                    total += float((err2 @ m.astype(np.float64)).sum() if m is not None else err2.sum())
                per_type[type_name] = total * scale
            out[name] = per_type
            if progress:
                progress(k + 1, len(names), name)
    return out
