"""Building a quantization ladder with llama.cpp's own quantizer, in-process."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from .. import __version__
from ..engine.llama_lib import quantize_file
from ..errors import ProbeError
from ..formats.gguf import validate_gguf
from ..formats.imatrix import check_imatrix, read_imatrix
from ..fsutil import atomic_output, check_output
from .ggufinfo import GGUFInfo, inspect_gguf
from .quant_types import FLOAT_TYPES, NEEDS_IMATRIX, QUANT_TYPES, normalize_quant
from .store import models_dir, resolve_model


# A trailing quant label on a file stem ("model.Q4_1", "model-f16"), removed before naming outputs.
_QUANT_SUFFIX = re.compile(
    r"[.\-_](" + "|".join(sorted((re.escape(q) for q in QUANT_TYPES), key=len, reverse=True)) + r")$",
    re.IGNORECASE,
)


@dataclass
class QuantResult:
    quant: str
    path: Path
    seconds: float
    info: GGUFInfo
    requantized_from: str | None  # the source's file type when the source was already quantized
    skipped: bool = False  # the file existed and was kept (--skip-existing)

    @property
    def fallback_types(self) -> dict[str, int]:
        """Tensor types other than the target's main type and F32 (K-quant fallbacks etc.)."""
        main = self.quant.split("_")[0] if self.quant not in FLOAT_TYPES else self.quant
        return {t: n for t, n in self.info.tensor_types.items() if t != "F32" and not t.startswith(main)}


def ladder_stem(source: Path) -> str:
    """The stem output files share: the source's stem without its own quant label."""
    return _QUANT_SUFFIX.sub("", source.stem)


def ladder_path(source: Path, quant: str, out_dir: Path | None = None) -> Path:
    return Path(out_dir or models_dir()) / f"{ladder_stem(source)}-{normalize_quant(quant)}.gguf"


def source_is_quantized(info: GGUFInfo) -> bool:
    """True when any matrix is stored in a quantized type (so a requantize would compound error)."""
    return any(t not in FLOAT_TYPES for t in info.tensor_types)


def quantize_ladder(
    source: str | Path,
    targets: Iterable[str],
    *,
    out_dir: Path | None = None,
    allow_requantize: bool = False,
    imatrix: Mapping[str, np.ndarray] | str | Path | None = None,
    force: bool = False,
    skip_existing: bool = False,
    nthread: int = 0,
    on_start: Callable[[str, Path], None] | None = None,
) -> list[QuantResult]:
    """Quantize `source` to every target type; returns what each output file really holds.

    All targets are checked before any work starts, so a typo in the last one wastes nothing.
    Each output is written to a temporary file and renamed, so an interrupted run leaves no
    partial GGUF under a final name.
    `imatrix`: per-channel mean squares by tensor name (Imatrix.mean_squares()), or an imatrix file;
    one made for another model is refused before any work (names and row lengths must match).
    """
    src = resolve_model(source)
    quants = [normalize_quant(t) for t in targets]
    if not quants:
        raise ProbeError("no target quant types given (e.g. --to Q8_0 --to Q4_K_M)")
    src_info = inspect_gguf(src)
    validate_gguf(src, for_llama=True)

    quantized_source = source_is_quantized(src_info)
    # Provenance carries through: an F16 file dequantized from Q4_1 still holds Q4_1's error.
    requantized_from = src_info.file_type if quantized_source else src_info.metadata.get("ggml_probe.requantized_from")
    if quantized_source and not allow_requantize:
        raise ProbeError(
            f"{src.name} is already quantized ({requantized_from}); requantizing compounds the error "
            "of both levels — pass --allow-requantize to do it anyway"
        )
    if isinstance(imatrix, (str, Path)):
        label = f"imatrix {Path(imatrix).name}"
        imatrix = read_imatrix(imatrix).mean_squares()
    else:
        label = "the imatrix"
    if imatrix:
        check_imatrix(imatrix, src, label)
    missing_imatrix = [q for q in quants if q in NEEDS_IMATRIX and not imatrix]
    if missing_imatrix:
        raise ProbeError(f"{', '.join(missing_imatrix)} need an importance matrix (--imatrix FILE)")

    plan = [(q, ladder_path(src, q, out_dir)) for q in quants]
    for _, path in plan:
        if path.resolve() == src.resolve():
            raise ProbeError(f"output {path} would overwrite the source")
        if not (skip_existing and path.exists()):
            check_output(path, force)

    metadata = {"ggml_probe.quantized_by": f"ggml-probe {__version__}", "ggml_probe.source": src.name}
    if requantized_from:
        metadata["ggml_probe.requantized_from"] = requantized_from

    results = []
    for quant, path in plan:
        if skip_existing and path.exists():
            info = inspect_gguf(path)
            results.append(QuantResult(quant, path, 0.0, info, requantized_from, skipped=True))
            continue
        if on_start:
            on_start(quant, path)
        t0 = time.perf_counter()
        with atomic_output(path) as tmp:
            quantize_file(
                src,
                tmp,
                QUANT_TYPES[quant],
                allow_requantize=quantized_source,
                nthread=nthread,
                imatrix=imatrix,
                metadata=metadata,
            )
        seconds = time.perf_counter() - t0
        results.append(QuantResult(quant, path, seconds, inspect_gguf(path), requantized_from))
    return results
