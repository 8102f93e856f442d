"""Building a quantization ladder with llama.cpp's own quantizer, in-process."""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import gguf
import numpy as np

from .. import __version__
from ..engine.llama_lib import QuantizePlan, quantize_file
from ..errors import ProbeError
from ..formats.gguf import validate_gguf
from ..formats.imatrix import check_imatrix, read_imatrix
from ..fsutil import atomic_output, check_output
from .ggufinfo import GGUFInfo, TensorInfo, inspect_gguf
from .quant_types import FLOAT_TYPES, NEEDS_IMATRIX, QUANT_TYPES, normalize_quant
from .store import models_dir, resolve_model


# A trailing quant label on a file stem ("model.Q4_1", "model-f16"), removed before naming outputs.
_QUANT_SUFFIX = re.compile(
    r"[.\-_](" + "|".join(sorted((re.escape(q) for q in QUANT_TYPES), key=len, reverse=True)) + r")$",
    re.IGNORECASE,
)


@dataclass
class MixOptions:
    """llama-quantize's per-tensor options: --tensor-type REGEX=TYPE, --output-tensor-type,
    --token-embedding-type, --pure. Types are ggml tensor types (Q4_K, Q6_K, Q8_0, F16, ...)."""

    tensor_types: list[tuple[str, str]] = field(default_factory=list)  # (regex, type); the first match wins
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False  # every tensor at the main type, no k-quant mix rules

    def __bool__(self) -> bool:
        return bool(self.tensor_types or self.output_tensor_type or self.token_embedding_type or self.pure)

    def key(self) -> str:
        """A stable text of the options (cache keys, file metadata)."""
        parts = [f"{p}={t}" for p, t in self.tensor_types]
        if self.output_tensor_type:
            parts.append(f"output={self.output_tensor_type}")
        if self.token_embedding_type:
            parts.append(f"token_embd={self.token_embedding_type}")
        if self.pure:
            parts.append("pure")
        return ";".join(parts)


GGML_TYPES = {t.name: int(t.value) for t in gguf.GGMLQuantizationType}


def ggml_type_id(name: str) -> int:
    key = name.strip().upper()
    if key not in GGML_TYPES:
        raise ProbeError(f"unknown tensor type {name!r}; valid: {', '.join(GGML_TYPES)}")
    return GGML_TYPES[key]


def parse_tensor_type(spec: str) -> tuple[str, str]:
    """'REGEX=TYPE' (llama-quantize's --tensor-type) → (regex, TYPE); the regex may itself hold '='."""
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern:
        raise ProbeError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. 'ffn_down=Q6_K'")
    ggml_type_id(type_name)
    return pattern, type_name.strip().upper()


def quantizable_names(info: GGUFInfo) -> list[str]:
    """Tensors llama.cpp may quantize (2-D and larger weights; norms and biases stay as they are)."""
    return [t.name for t in info.tensors if len([d for d in t.shape if d > 1]) >= 2 and t.name.endswith("weight")]


def check_mix_options(options: MixOptions, info: GGUFInfo, model_name: str) -> None:
    """Every pattern must compile and name at least one tensor of the model; every type must exist."""
    names = quantizable_names(info)
    for pattern, type_name in options.tensor_types:
        ggml_type_id(type_name)
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ProbeError(f"--tensor-type {pattern}={type_name}: not a regular expression ({exc})") from None
        if not any(regex.search(n) for n in names):
            raise ProbeError(f"--tensor-type {pattern}={type_name}: the pattern matches no tensor of {model_name} "
                             f"(names look like {names[len(names) // 2] if names else 'blk.0.ffn_down.weight'})")
    for type_name in (options.output_tensor_type, options.token_embedding_type):
        if type_name:
            ggml_type_id(type_name)


def _engine_options(options: MixOptions | None) -> dict:
    if not options:
        return {}
    return {
        "tensor_types": [(p, ggml_type_id(t)) for p, t in options.tensor_types],
        "output_tensor_type": ggml_type_id(options.output_tensor_type) if options.output_tensor_type else None,
        "token_embedding_type": ggml_type_id(options.token_embedding_type) if options.token_embedding_type else None,
        "pure": options.pure,
    }


def planned_info(src_info: GGUFInfo, plan: QuantizePlan, quant: str, path: Path) -> GGUFInfo:
    """What the file of a dry run would hold: the source's header with the planned tensor types and sizes.

    Tensor data is nrows × the type's row size, each tensor aligned to general.alignment; the header is
    taken as the source's (the quantizer rewrites the same keys, and the padding to the alignment absorbs
    the few bytes its values differ by).
    """
    alignment = int(src_info.metadata.get("general.alignment", 32))
    tensors, data = [], 0
    for t in src_info.tensors:
        type_name = plan.types.get(t.name, t.type)
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
        n_bytes = t.n_elements // block * type_size
        tensors.append(TensorInfo(name=t.name, type=type_name, shape=t.shape, n_elements=t.n_elements, n_bytes=n_bytes))
        data += -(-n_bytes // alignment) * alignment
    src_data = sum(-(-t.n_bytes // alignment) * alignment for t in src_info.tensors)
    header = src_info.size_bytes - src_data
    types = Counter(t.type for t in tensors)
    type_bytes: Counter[str] = Counter()
    for t in tensors:
        type_bytes[t.type] += t.n_bytes
    return dataclasses.replace(
        src_info, path=str(path), size_bytes=header + data, file_type=quant, tensors=tensors,
        bits_per_weight=8.0 * sum(t.n_bytes for t in tensors) / src_info.n_params if src_info.n_params else 0.0,
        tensor_types=dict(types.most_common()), tensor_type_bytes=dict(type_bytes.most_common()))


@dataclass
class QuantResult:
    quant: str
    path: Path
    seconds: float
    info: GGUFInfo
    requantized_from: str | None  # the source's file type when the source was already quantized
    skipped: bool = False  # the file existed and was kept (--skip-existing)
    dry_run: bool = False  # nothing written: `info` is what the file would hold (planned_info)
    fallbacks: dict[str, tuple[str, str]] = field(default_factory=dict)  # tensor → (type asked, type used)

    @property
    def fallback_types(self) -> dict[str, int]:
        """Tensor types other than the target's main type and F32 (K-quant fallbacks etc.)."""
        main = self.quant.split("_")[0] if self.quant not in FLOAT_TYPES else self.quant
        return {t: n for t, n in self.info.tensor_types.items() if t != "F32" and not t.startswith(main)}


def ladder_stem(source: Path) -> str:
    """The stem output files share: the source's stem without its own quant label."""
    return _QUANT_SUFFIX.sub("", source.stem)


def ladder_path(source: Path, quant: str, out_dir: Path | None = None, suffix: str = "") -> Path:
    return Path(out_dir or models_dir()) / f"{ladder_stem(source)}-{normalize_quant(quant)}{suffix}.gguf"


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
    mix: MixOptions | None = None,
    dry_run: bool = False,
    out_file: Path | None = None,
) -> list[QuantResult]:
    """Quantize `source` to every target type; returns what each output file really holds.

    All targets are checked before any work starts, so a typo in the last one wastes nothing.
    Each output is written to a temporary file and renamed, so an interrupted run leaves no
    partial GGUF under a final name.
    `imatrix`: per-channel mean squares by tensor name (Imatrix.mean_squares()), or an imatrix file;
    one made for another model is refused before any work (names and row lengths must match).
    `mix`: per-tensor types (llama-quantize's --tensor-type etc.); outputs are then named
    `<stem>-<QUANT>-mix.gguf` unless `out_file` (one target) names the file. `dry_run`: nothing is
    written; each result's `info` is what the file would hold (types as llama.cpp chose them, sizes).
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
    if mix:
        check_mix_options(mix, src_info, src.name)
    if out_file is not None and len(quants) != 1:
        raise ProbeError("an output file name needs exactly one target type")
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
    if missing_imatrix and not dry_run:
        raise ProbeError(f"{', '.join(missing_imatrix)} need an importance matrix (--imatrix FILE)")

    if out_file is not None:
        plan = [(quants[0], Path(out_file))]
    else:
        plan = [(q, ladder_path(src, q, out_dir, "-mix" if mix else "")) for q in quants]
    for _, path in plan:
        if path.resolve() == src.resolve():
            raise ProbeError(f"output {path} would overwrite the source")
        if not dry_run and not (skip_existing and path.exists()):
            check_output(path, force)

    metadata = {"ggml_probe.quantized_by": f"ggml-probe {__version__}", "ggml_probe.source": src.name}
    if requantized_from:
        metadata["ggml_probe.requantized_from"] = requantized_from
    if mix:
        metadata["ggml_probe.tensor_types"] = mix.key()[:127]  # llama.cpp's kv override strings hold 127 bytes
    engine_options = _engine_options(mix)

    results = []
    for quant, path in plan:
        if skip_existing and path.exists():
            info = inspect_gguf(path)
            results.append(QuantResult(quant, path, 0.0, info, requantized_from, skipped=True))
            continue
        if on_start:
            on_start(quant, path)
        t0 = time.perf_counter()
        if dry_run:
            done = quantize_file(src, path, QUANT_TYPES[quant], allow_requantize=quantized_source, nthread=nthread,
                                 imatrix=imatrix, metadata=metadata, dry_run=True, **engine_options)
            results.append(QuantResult(quant, path, time.perf_counter() - t0, planned_info(src_info, done, quant, path),
                                       requantized_from, dry_run=True, fallbacks=done.fallbacks))
            continue
        with atomic_output(path) as tmp:
            done = quantize_file(
                src,
                tmp,
                QUANT_TYPES[quant],
                allow_requantize=quantized_source,
                nthread=nthread,
                imatrix=imatrix,
                metadata=metadata,
                **engine_options,
            )
        seconds = time.perf_counter() - t0
        results.append(QuantResult(quant, path, seconds, inspect_gguf(path), requantized_from,
                                   fallbacks=done.fallbacks))
    return results
