"""Per-tensor-group sensitivity: the text KLD when only one group of tensors is at a low type.

A probe file holds the group at the low type and every other quantizable tensor at the base type
(F16 by default: llama.cpp's --tensor-type '.=F16' after the group's own pattern; the first pattern
that matches a tensor wins), and its text KLD against the reference is llama-perplexity's (pipeline/kld.py),
on a base of the reference's log-probabilities computed once.

Measuring every group of a deep model costs one quantize and one KLD pass each (the demo: 30 layers ×
7 matrices + the embeddings = 211). The scheme measures each kind of matrix across all layers at once
(attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, token_embd, output), then per layer
the `per_layer_kinds` kinds with the most KLD per byte saved; a tensor whose own layer was not measured
gets its kind's KLD split over the layers in proportion to the static estimate
(weights/type_error.py: Σ δW²·E[x²]). Every probe is cached by (source file hash, overrides, base file).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import gguf
import numpy as np

from ..analysis.mix import spearman
from ..errors import ProbeError
from ..formats.imatrix import read_imatrix
from ..fsutil import sha256_file
from ..models.ggufinfo import GGUFInfo, inspect_gguf
from ..models.quantize import GGML_TYPES, MixOptions, ggml_type_id, quantizable_names, quantize_ladder
from ..weights.type_error import type_errors
from .kld import KLDSettings, run_kld, score_model
from .rundir import read_json, write_json

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
# A quantized file type for the probes: llama.cpp applies --tensor-type only when the main type is quantized.
_PROBE_FTYPE = "Q8_0"

Progress = Callable[[str], None]


def kind_of(name: str) -> str:
    m = _LAYER.match(name)
    return m[2] if m else name.removesuffix(".weight")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m[1]) if m else None


def kind_pattern(kind: str) -> str:
    return rf"^blk\.\d+\.{kind}\.weight$" if kind in KINDS else rf"^{re.escape(kind)}\.weight$"


def tensor_pattern(name: str) -> str:
    return f"^{re.escape(name)}$"


@dataclass
class GroupMeasure:
    group: str  # "ffn_down" (every layer), "blk.3.ffn_down", "token_embd"
    pattern: str
    tensors: list[str]
    low_types: dict[str, str]  # tensor → the type llama.cpp really used (fallbacks included)
    size_bytes: int  # the probe file's size
    kld_mean: float
    kld_mean_se: float
    same_top_p: float
    static: float = 0.0  # Σ over the group's tensors of E(W, low type)
    cached: bool = False


@dataclass
class SensitivityResult:
    source: str
    reference: str
    low_type: str
    base_type: str
    base_file: str
    groups: list[GroupMeasure] = field(default_factory=list)
    tensor_cost: dict[str, float] = field(default_factory=dict)  # tensor → KLD it adds at its low type
    tensor_low_type: dict[str, str] = field(default_factory=dict)
    cost_source: dict[str, str] = field(default_factory=dict)  # tensor → "measured" | "kind share"
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor → type → E(W, type)
    spearman_all: float | None = None  # measured KLD vs static estimate over every measured group
    spearman_layers: float | None = None  # the same over the per-layer groups only

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("errors")
        return d


class ProbeCache:
    """Measured groups by (source hash, overrides, KLD base), in one JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, Any] = read_json(path) if path.exists() else {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries[key] = value
        write_json(self.path, self.entries)


def measure_group(source: Path, source_sha: str, group: str, pattern: str, low_type: str, base_type: str,
                  base_file: Path, settings: KLDSettings, work_dir: Path, cache: ProbeCache,
                  imatrix: Mapping[str, np.ndarray] | None = None, imatrix_key: str = "none") -> GroupMeasure:
    """The text KLD of a file with `pattern`'s tensors at `low_type` and the rest at `base_type`.

    `imatrix_key` names the imatrix file (its hash) in the cache key: another imatrix, another probe file."""
    options = MixOptions([(pattern, low_type), (".", base_type)])
    key = f"{source_sha[:16]}|{options.key()}|imatrix={imatrix_key}|{base_file.stem}"
    hit = cache.get(key)
    if hit is not None:
        return GroupMeasure(**{**hit, "cached": True})
    probe = work_dir / "probe.gguf"
    result = quantize_ladder(source, [_PROBE_FTYPE], mix=options, out_file=probe, allow_requantize=True,
                             force=True, imatrix=imatrix, nthread=settings.threads or 0)[0]
    regex = re.compile(pattern)
    low_types = {t.name: t.type for t in result.info.tensors if regex.search(t.name)}
    try:
        figures = score_model(probe, base_file, settings)
    finally:
        probe.unlink(missing_ok=True)
    measure = GroupMeasure(group, pattern, sorted(low_types), low_types, result.info.size_bytes,
                           figures["kld_mean"], figures["kld_mean_se"], figures["same_top_p"])
    cache.put(key, asdict(measure))
    return measure


def reference_base(reference: Path, text: str, out_dir: Path, settings: KLDSettings) -> Path:
    """The reference's log-probabilities over the text (computed once, cached by pipeline/kld)."""
    return Path(run_kld({}, reference, text, out_dir / "kld", settings).base_file)


def measure_sensitivity(source: str | Path, reference: str | Path, text: str, low_type: str, out_dir: Path, *,
                        base_type: str = "F16", per_layer_kinds: int = 1, imatrix: str | Path | None = None,
                        types: Mapping[str, int] | None = None, settings: KLDSettings | None = None,
                        progress: Progress | None = None) -> SensitivityResult:
    """Measured KLD per group (the scheme in the module's doc) and the static estimate beside it.

    `types`: the types whose static error E(W, type) is computed for every tensor (the low type is
    always among them); kept in the result for the mix.
    """
    s = settings or KLDSettings()
    source, reference = Path(source), Path(reference)
    low_type, base_type = low_type.upper(), base_type.upper()
    ggml_type_id(low_type)
    ggml_type_id(base_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    info = inspect_gguf(source)
    names = quantizable_names(info)
    if not names:
        raise ProbeError(f"{source.name} has no tensors llama.cpp can quantize")
    im = read_imatrix(imatrix).mean_squares() if imatrix else None
    im_key = sha256_file(Path(imatrix))[:16] if imatrix else "none"

    say("reference log-probabilities")
    base_file = reference_base(reference, text, out_dir, s)
    source_sha = sha256_file(source)
    cache = ProbeCache(out_dir / "sensitivity-cache.json")

    result = SensitivityResult(str(source), str(reference), low_type, base_type, str(base_file))
    kinds = [k for k in (*KINDS, "token_embd", "output")
             if any(re.search(kind_pattern(k), n) for n in names)]
    kind_measures: dict[str, GroupMeasure] = {}
    for i, kind in enumerate(kinds):
        say(f"group {i + 1}/{len(kinds)}: {kind}")
        kind_measures[kind] = measure_group(source, source_sha, kind, kind_pattern(kind), low_type, base_type,
                                            base_file, s, out_dir, cache, im, im_key)
    # The tensors' types at the low level as llama.cpp really wrote them (576 columns: Q4_K → Q5_0).
    for m in kind_measures.values():
        result.tensor_low_type.update(m.low_types)

    # Static errors at the asked types and at every type the probes really used.
    all_types = dict(types or {})
    for type_name in {low_type, *result.tensor_low_type.values()}:
        all_types[type_name] = GGML_TYPES[type_name]
    errors = result.errors = _static_errors(source, source_sha, names, all_types, im, imatrix, out_dir, say)
    for m in kind_measures.values():
        m.static = _static(m.tensors, result.tensor_low_type, errors)

    # Per layer for the kinds with the most KLD per byte saved.
    saved = {k: max(1, _bytes_saved(info, m, base_type)) for k, m in kind_measures.items()}
    ranked = sorted((k for k in kinds if k in KINDS), key=lambda k: kind_measures[k].kld_mean / saved[k], reverse=True)
    layer_measures: list[GroupMeasure] = []
    for kind in ranked[:per_layer_kinds]:
        layer_names = [n for n in names if kind_of(n) == kind]
        for j, name in enumerate(layer_names):
            say(f"{kind} per layer {j + 1}/{len(layer_names)}")
            m = measure_group(source, source_sha, name.removesuffix(".weight"), tensor_pattern(name), low_type,
                              base_type, base_file, s, out_dir, cache, im, im_key)
            m.static = _static(m.tensors, result.tensor_low_type, errors)
            layer_measures.append(m)
    result.groups = [*kind_measures.values(), *layer_measures]

    measured = {m.tensors[0]: m for m in layer_measures if len(m.tensors) == 1}
    for kind, km in kind_measures.items():
        total_static = sum(errors[n].get(result.tensor_low_type.get(n, low_type), 0.0) for n in km.tensors)
        for n in km.tensors:
            if n in measured:
                result.tensor_cost[n], result.cost_source[n] = max(measured[n].kld_mean, 0.0), "measured"
            else:
                share = (errors[n].get(result.tensor_low_type.get(n, low_type), 0.0) / total_static
                         if total_static > 0 else 1.0 / len(km.tensors))
                result.tensor_cost[n], result.cost_source[n] = max(km.kld_mean, 0.0) * share, "kind share"

    def corr(groups: list[GroupMeasure]) -> float | None:
        return spearman(np.array([g.kld_mean for g in groups]), np.array([g.static for g in groups]))

    result.spearman_all = corr(result.groups)
    result.spearman_layers = corr(layer_measures)
    write_json(out_dir / "sensitivity.json", result.to_dict())
    return result


def _static(tensors: list[str], low: Mapping[str, str], errors: Mapping[str, Mapping[str, float]]) -> float:
    return float(sum(errors.get(n, {}).get(low.get(n, ""), 0.0) for n in tensors))


def _bytes_saved(info: GGUFInfo, m: GroupMeasure, base_type: str) -> int:
    """Bytes the group's tensors save at their low types against the base type."""
    by_name = {t.name: t for t in info.tensors}
    saved = 0
    for name, low in m.low_types.items():
        t = by_name[name]
        for type_name, sign in ((base_type, 1), (low, -1)):
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
            saved += sign * (t.n_elements // block * size)
    return saved


def _static_errors(source: Path, source_sha: str, names: list[str], types: Mapping[str, int],
                   im: Mapping[str, np.ndarray] | None, imatrix: str | Path | None, out_dir: Path,
                   say: Progress) -> dict[str, dict[str, float]]:
    """E(W, type) for every tensor and type, cached by (source, imatrix file); only types not yet done are computed."""
    im_key = sha256_file(Path(imatrix))[:16] if imatrix else "none"
    path = out_dir / f"type-errors-{source_sha[:16]}-{im_key}.json"
    cached = read_json(path) if path.exists() else {"types_done": [], "errors": {}}
    missing = {t: tid for t, tid in types.items() if t not in cached["types_done"]}
    if missing:
        say(f"static error of every tensor at {', '.join(missing)}")
        for name, per_type in type_errors(source, names, missing, im).items():
            cached["errors"].setdefault(name, {}).update(per_type)
        cached["types_done"] = sorted({*cached["types_done"], *missing})
        write_json(path, cached)
    return {n: {t: v for t, v in cached["errors"].get(n, {}).items() if t in types} for n in names}
