"""Quantization error of a GGUF model's weights against a reference file, per tensor, layer and neuron.

Figures, for a quantized W against the reference R (both dequantized to float32, sums in float64):
  rel_rmse = ‖W−R‖ / ‖R‖               max_abs = max |W−R|
  cosine   = <W,R> / (‖W‖·‖R‖)          sqnr_db = 10·log10(‖R‖² / ‖W−R‖²)
An exact copy has rel_rmse 0 and sqnr_db +inf (written as null in JSON); an all-zero reference
gives rel_rmse inf, cosine nan (null).

Neurons. ggml stores a matrix with ggml shape [ne0, ne1] as ne1 rows of ne0 contiguous values, i.e. a
NumPy array (ne1, ne0), and computes y = W·x with x of length ne0 (one output per row):
  - ffn_gate / ffn_up: ggml [n_embd, n_ff] → NumPy (n_ff, n_embd); ROW j is neuron j's input weights.
  - ffn_down:          ggml [n_ff, n_embd] → NumPy (n_embd, n_ff); COLUMN j is neuron j's output weights.
(Checked on SmolLM2-135M: ffn_down ggml shape (1536, 576), n_ff = 1536.) For other matrices the
per-unit figures are per output channel (a row). A neuron's combined figures pool its gate row,
up row and down column.

Everything streams: each tensor pair is read a block of rows at a time, per-row and per-column
sums are accumulated, so peak memory stays near one block, not one model.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import ProbeError
from ..layerspec import parse_layer_spec, resolve_layers
from ..models.store import resolve_model
from .dequant import GGUFTensors, TensorRef, can_dequantize


# float32 elements per block when comparing: four float64 work arrays of this size stay ~128 MiB.
COMPARE_BLOCK_ELEMENTS = 1 << 22

NEURON_ROW_KINDS = ("ffn_gate", "ffn_up")
NEURON_COLUMN_KINDS = ("ffn_down",)
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")
_GLOB_CHARS = set("*?[")


# ---------------------------------------------------------------------------------------------
# Figures from accumulated sums


def figures(dd: Any, rr: Any, ww: Any, wr: Any) -> dict[str, Any]:
    """rel_rmse, cosine and sqnr_db from sums of squares (scalars or arrays, float64)."""
    dd, rr, ww, wr = (np.asarray(v, dtype=np.float64) for v in (dd, rr, ww, wr))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.sqrt(dd / rr)
        rel = np.where((dd == 0) & (rr == 0), 0.0, rel)
        cos = wr / np.sqrt(ww * rr)
        sqnr = 10.0 * np.log10(rr / dd)
    return {"rel_rmse": rel, "cosine": cos, "sqnr_db": sqnr}


@dataclass
class _Sums:
    """Running sums for a set of units (one per row, per column, or a single total)."""

    dd: np.ndarray
    rr: np.ndarray
    ww: np.ndarray
    wr: np.ndarray
    max_abs: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> "_Sums":
        return cls(*(np.zeros(n, dtype=np.float64) for _ in range(5)))

    def figures(self) -> dict[str, np.ndarray]:
        out = figures(self.dd, self.rr, self.ww, self.wr)
        out["max_abs"] = self.max_abs
        return out


# ---------------------------------------------------------------------------------------------
# Results


def _num(x: Any) -> float | None:
    """A JSON-safe float: non-finite values (inf SQNR of an exact copy, nan cosine) become null."""
    x = float(x)
    return x if math.isfinite(x) else None


def _nums(a: np.ndarray) -> list[float | None]:
    return [_num(v) for v in np.asarray(a, dtype=np.float64).tolist()]


@dataclass
class TensorError:
    name: str
    layer: int | None  # None for tensors outside the blocks (token_embd, output)
    kind: str  # short name: ffn_down, attn_q, token_embd ...
    ggml_shape: tuple[int, ...]
    type: str
    ref_type: str
    rel_rmse: float
    max_abs: float
    cosine: float
    sqnr_db: float
    unit_axis: str | None  # "row" (ffn_gate/up, other matrices: output channels), "column" (ffn_down)
    units: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # per-unit figures
    _unit_sums: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (dd, rr)
    _totals: _Sums | None = field(default=None, repr=False)  # pooled sums, for layer summaries

    @property
    def is_neuron_tensor(self) -> bool:
        return self.kind in NEURON_ROW_KINDS + NEURON_COLUMN_KINDS

    def to_dict(self, with_units: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "layer": self.layer, "kind": self.kind, "ggml_shape": list(self.ggml_shape),
            "type": self.type, "ref_type": self.ref_type, "rel_rmse": _num(self.rel_rmse),
            "max_abs": _num(self.max_abs), "cosine": _num(self.cosine), "sqnr_db": _num(self.sqnr_db),
            "unit_axis": self.unit_axis,
        }
        if with_units and self.units:
            out["units"] = {k: _nums(v) for k, v in self.units.items()}
        return out


@dataclass
class LayerSummary:
    layer: int
    n_tensors: int
    rel_rmse: float  # pooled over the layer's selected tensors: ‖ΔW‖/‖W_ref‖ over all their elements
    sqnr_db: float
    cosine: float
    max_abs: float
    worst_tensor: str  # highest rel_rmse

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "n_tensors": self.n_tensors, "rel_rmse": _num(self.rel_rmse),
                "sqnr_db": _num(self.sqnr_db), "cosine": _num(self.cosine), "max_abs": _num(self.max_abs),
                "worst_tensor": self.worst_tensor}


@dataclass
class NeuronError:
    layer: int
    index: int
    rel_rmse: float  # pooled over its gate row, up row and down column (those selected)
    sqnr_db: float
    by_tensor: dict[str, float]  # kind -> that tensor's per-neuron rel_rmse

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "index": self.index, "rel_rmse": _num(self.rel_rmse),
                "sqnr_db": _num(self.sqnr_db), "by_tensor": {k: _num(v) for k, v in self.by_tensor.items()}}


@dataclass
class WeightReport:
    model: str
    ref: str
    architecture: str | None
    tensors: list[TensorError]
    layers: list[LayerSummary]
    top_layers: list[LayerSummary]  # most hurt first
    top_neurons: list[NeuronError]  # most hurt first
    total: dict[str, float]  # pooled over every selected tensor

    def tensor(self, name: str) -> TensorError:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self, with_units: bool = True) -> dict[str, Any]:
        """Every figure; per-unit (per-neuron) arrays only with `with_units`. Non-finite values are null."""
        return {
            "model": self.model, "ref": self.ref, "architecture": self.architecture,
            "total": {k: _num(v) for k, v in self.total.items()},
            "layers": [s.to_dict() for s in self.layers],
            "top_layers": [s.to_dict() for s in self.top_layers],
            "top_neurons": [n.to_dict() for n in self.top_neurons],
            "tensors": [t.to_dict(with_units) for t in self.tensors],
        }

    def to_json(self, with_units: bool = True, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(with_units), indent=indent, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Selection


def split_name(name: str) -> tuple[int | None, str]:
    """'blk.14.ffn_down.weight' -> (14, 'ffn_down'); 'token_embd.weight' -> (None, 'token_embd')."""
    m = _BLOCK_NAME.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, name.removesuffix(".weight")


def parse_patterns(spec: str | Sequence[str] | None) -> list[str] | None:
    """'ffn_down,attn_*' -> ['ffn_down', 'attn_*']; None/'all' -> None (every matrix)."""
    if spec is None:
        return None
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    parts = [p.strip() for p in parts if p.strip()]
    if not parts or parts == ["all"]:
        return None
    return parts


def _n_layers(tensors: GGUFTensors) -> int:
    arch = tensors.architecture
    count = tensors.summary.value(f"{arch}.block_count") if arch else None
    if isinstance(count, (int, np.integer)) and count > 0:
        return int(count)
    layers = [split_name(n)[0] for n in tensors.names()]
    return max((x for x in layers if x is not None), default=-1) + 1


def select_tensors(tensors: GGUFTensors, layers: str | Sequence[int] | None = None,
                   patterns: str | Sequence[str] | None = None) -> list[str]:
    """Names of the tensors to analyse, in file order.

    layers: None/'all' = every block plus the tensors outside blocks; otherwise only those blocks.
    patterns: glob patterns over short names (ffn_down, attn_*); None = every matrix (≥ 2-D).
    Wildcards select matrices only; a 1-D tensor (ffn_norm) is taken when named exactly.
    A pattern without wildcards that names nothing is refused with close matches.
    """
    pats = parse_patterns(patterns)
    n_layers = _n_layers(tensors)
    wanted_layers = None if parse_layer_spec(layers) is None else resolve_layers(layers, n_layers)

    kinds = {split_name(n)[1] for n in tensors.names()}
    if pats:
        for pat in pats:
            if _GLOB_CHARS & set(pat):
                if not any(fnmatch.fnmatchcase(k, pat) for k in kinds):
                    raise ProbeError(f"--tensors pattern {pat!r} matches no tensor; names are: "
                                     f"{', '.join(sorted(kinds))}")
            elif pat not in kinds:
                import difflib

                close = difflib.get_close_matches(pat, sorted(kinds), n=4, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; names are: {', '.join(sorted(kinds))}"
                raise ProbeError(f"no tensor named {pat!r}{hint}")

    out = []
    for name, ref in tensors.tensors.items():
        layer, kind = split_name(name)
        if wanted_layers is not None and (layer is None or layer not in wanted_layers):
            continue
        if pats is None:
            if len(ref.ggml_shape) < 2:
                continue  # norms and biases: unquantized F32 in every llama.cpp ladder
        elif kind in pats:
            pass  # named exactly: taken even if 1-D
        elif len(ref.ggml_shape) < 2 or not any(fnmatch.fnmatchcase(kind, p) for p in pats):
            continue  # wildcards select matrices only (ffn_* is not meant to pull in ffn_norm)
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# Comparing


def _unit_axis(kind: str, ref: TensorRef) -> str | None:
    if len(ref.ggml_shape) != 2:
        return None  # 1-D vectors, 3-D expert stacks: tensor-level figures only
    return "column" if kind in NEURON_COLUMN_KINDS else "row"


def compare_tensor(model: GGUFTensors, ref: GGUFTensors, name: str, *,
                   block_elements: int = COMPARE_BLOCK_ELEMENTS) -> TensorError:
    """Stream one tensor of `model` against the same tensor of `ref`; per-tensor and per-unit figures."""
    a, r = model.ref(name), ref.ref(name)
    if a.ggml_shape != r.ggml_shape:
        raise ProbeError(f"shape mismatch for {name}: {list(a.ggml_shape)} in {model.path.name} vs "
                         f"{list(r.ggml_shape)} in {ref.path.name}")
    layer, kind = split_name(name)
    axis = _unit_axis(kind, a)
    n_units = a.n_rows if axis == "row" else a.row_length if axis == "column" else 0
    units = _Sums.zeros(n_units)
    total = _Sums.zeros(1)
    # Same row blocks in both files: iter_rows splits by block_elements // row_length in each.
    for (start, wa), (_, wr_) in zip(model.iter_rows(name, block_elements=block_elements),
                                     ref.iter_rows(name, block_elements=block_elements)):
        w = wa.astype(np.float64)
        rv = wr_.astype(np.float64)
        d = w - rv
        absd = np.abs(d)
        if axis == "row":
            sl = slice(start, start + len(w))
            units.dd[sl] = np.einsum("ij,ij->i", d, d)
            units.rr[sl] = np.einsum("ij,ij->i", rv, rv)
            units.ww[sl] = np.einsum("ij,ij->i", w, w)
            units.wr[sl] = np.einsum("ij,ij->i", w, rv)
            units.max_abs[sl] = absd.max(axis=1)
            blk_dd, blk_rr, blk_ww, blk_wr = (units.dd[sl].sum(), units.rr[sl].sum(), units.ww[sl].sum(),
                                              units.wr[sl].sum())
        elif axis == "column":
            col_dd = np.einsum("ij,ij->j", d, d)
            col_rr = np.einsum("ij,ij->j", rv, rv)
            col_ww = np.einsum("ij,ij->j", w, w)
            col_wr = np.einsum("ij,ij->j", w, rv)
            units.dd += col_dd
            units.rr += col_rr
            units.ww += col_ww
            units.wr += col_wr
            np.maximum(units.max_abs, absd.max(axis=0), out=units.max_abs)
            blk_dd, blk_rr, blk_ww, blk_wr = col_dd.sum(), col_rr.sum(), col_ww.sum(), col_wr.sum()
        else:
            blk_dd, blk_rr, blk_ww, blk_wr = np.vdot(d, d), np.vdot(rv, rv), np.vdot(w, w), np.vdot(w, rv)
        total.dd += blk_dd
        total.rr += blk_rr
        total.ww += blk_ww
        total.wr += blk_wr
        total.max_abs[0] = max(total.max_abs[0], float(absd.max()) if absd.size else 0.0)
    tot = total.figures()
    return TensorError(
        name=name, layer=layer, kind=kind, ggml_shape=a.ggml_shape, type=a.type_name, ref_type=r.type_name,
        rel_rmse=float(tot["rel_rmse"][0]), max_abs=float(tot["max_abs"][0]), cosine=float(tot["cosine"][0]),
        sqnr_db=float(tot["sqnr_db"][0]), unit_axis=axis,
        units=units.figures() if axis else {},
        _unit_sums=(units.dd, units.rr) if axis else None, _totals=total,
    )


def _check_pair(model: GGUFTensors, ref: GGUFTensors, names: Iterable[str]) -> None:
    if model.architecture != ref.architecture:
        raise ProbeError(f"architecture mismatch: {model.path.name} is {model.architecture!r}, "
                         f"reference {ref.path.name} is {ref.architecture!r}")
    bad_types = []
    for name in names:
        if name not in ref.tensors:
            raise ProbeError(f"{name} is in {model.path.name} but not in the reference {ref.path.name}")
        a, r = model.tensors[name], ref.tensors[name]
        if a.ggml_shape != r.ggml_shape:
            raise ProbeError(f"shape mismatch for {name}: {list(a.ggml_shape)} in {model.path.name} vs "
                             f"{list(r.ggml_shape)} in {ref.path.name}")
        for which, t in ((model, a), (ref, r)):
            if not can_dequantize(t.ggml_type):
                bad_types.append(f"{name} ({t.type_name} in {which.path.name})")
    if bad_types:
        raise ProbeError(f"cannot dequantize {len(bad_types)} tensor(s), no dequantizer in ggml or gguf-py: "
                         + ", ".join(bad_types[:5]) + (" ..." if len(bad_types) > 5 else ""))


def compare_weights(
    model: str | Path,
    ref: str | Path,
    *,
    layers: str | Sequence[int] | None = None,
    tensors: str | Sequence[str] | None = None,
    top_k: int = 10,
    block_elements: int = COMPARE_BLOCK_ELEMENTS,
    on_tensor: Callable[[str, int, int], None] | None = None,
) -> WeightReport:
    """Quantization error of `model`'s weights against `ref` (e.g. Q4_0 against F16 of the same model).

    layers: None/'all', a list of ints or a string '0,5,-1' (negatives count from the end).
    tensors: glob patterns over short names, a list or 'ffn_down,attn_*'; None = every matrix.
    top_k: how many layers and neurons to list as most hurt (by relative RMSE).
    on_tensor(name, i, n) is called before each tensor (progress).
    Raises ProbeError (one line) on different architectures or shapes, unknown tensor names (with
    close matches) and types nothing can dequantize (named).
    """
    model_path, ref_path = resolve_model(model), resolve_model(ref)
    with GGUFTensors(model_path) as a, GGUFTensors(ref_path) as r:
        if a.architecture != r.architecture:
            _check_pair(a, r, [])
        names = select_tensors(a, layers, tensors)
        if not names:
            raise ProbeError("no tensors selected (check --layers and --tensors)")
        _check_pair(a, r, names)
        results = []
        for i, name in enumerate(names):
            if on_tensor:
                on_tensor(name, i, len(names))
            results.append(compare_tensor(a, r, name, block_elements=block_elements))
        return _report(str(model_path), str(ref_path), a.architecture, results, top_k)


def _report(model: str, ref: str, arch: str | None, results: list[TensorError], top_k: int) -> WeightReport:
    by_layer: dict[int, list[TensorError]] = {}
    for t in results:
        if t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)

    def pooled(items: list[TensorError]) -> dict[str, float]:
        dd = sum(float(t._totals.dd[0]) for t in items)
        rr = sum(float(t._totals.rr[0]) for t in items)
        ww = sum(float(t._totals.ww[0]) for t in items)
        wr = sum(float(t._totals.wr[0]) for t in items)
        f = figures(dd, rr, ww, wr)
        return {"rel_rmse": float(f["rel_rmse"]), "sqnr_db": float(f["sqnr_db"]), "cosine": float(f["cosine"]),
                "max_abs": max((t.max_abs for t in items), default=0.0)}

    layers = []
    for layer in sorted(by_layer):
        items = by_layer[layer]
        p = pooled(items)
        worst = max(items, key=lambda t: _sort_key(t.rel_rmse))
        layers.append(LayerSummary(layer, len(items), p["rel_rmse"], p["sqnr_db"], p["cosine"], p["max_abs"],
                                   worst.name))
    top_layers = sorted(layers, key=lambda s: _sort_key(s.rel_rmse), reverse=True)[:top_k]
    top_neurons = _top_neurons(by_layer, top_k)
    total = pooled(results)
    return WeightReport(model, ref, arch, results, layers, top_layers, top_neurons, total)


def _sort_key(x: float) -> float:
    return -1.0 if math.isnan(x) else x


def neuron_table(layer_tensors: list[TensorError]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]] | None:
    """Per-neuron pooled (rel_rmse, sqnr_db, {kind: rel_rmse}) over a layer's ffn_gate/up/down, if any."""
    parts = [t for t in layer_tensors if t.is_neuron_tensor and t._unit_sums is not None]
    if not parts:
        return None
    n = {len(t._unit_sums[0]) for t in parts}  # type: ignore[index]
    if len(n) != 1:
        return None  # inconsistent n_ff across the three (should not happen in a valid file)
    dd = sum(t._unit_sums[0] for t in parts)  # type: ignore[index]
    rr = sum(t._unit_sums[1] for t in parts)  # type: ignore[index]
    f = figures(dd, rr, np.ones_like(dd), np.ones_like(dd))
    return f["rel_rmse"], f["sqnr_db"], {t.kind: t.units["rel_rmse"] for t in parts}


def _top_neurons(by_layer: dict[int, list[TensorError]], top_k: int) -> list[NeuronError]:
    candidates: list[NeuronError] = []
    for layer, items in sorted(by_layer.items()):
        table = neuron_table(items)
        if table is None:
            continue
        rel, sqnr, per_kind = table
        key = np.where(np.isnan(rel), -1.0, rel)
        k = min(top_k, len(rel))
        for idx in np.argsort(-key, kind="stable")[:k]:
            candidates.append(NeuronError(layer, int(idx), float(rel[idx]), float(sqnr[idx]),
                                          {kind: float(v[idx]) for kind, v in per_kind.items()}))
    candidates.sort(key=lambda n: _sort_key(n.rel_rmse), reverse=True)
    return candidates[:top_k]


# ---------------------------------------------------------------------------------------------
# Text


def _fmt(x: float, spec: str) -> str:
    return "inf" if x == math.inf else "nan" if math.isnan(x) else format(x, spec)


def format_report(report: WeightReport, top_k: int = 10) -> str:
    """A plain-text summary: totals, per-layer table, the most hurt layers, tensors and neurons."""
    lines = [f"{Path(report.model).name} vs reference {Path(report.ref).name} ({report.architecture}), "
             f"{len(report.tensors)} tensors",
             f"total: rel RMSE {_fmt(report.total['rel_rmse'], '.4f')}, "
             f"SQNR {_fmt(report.total['sqnr_db'], '.2f')} dB, cosine {_fmt(report.total['cosine'], '.6f')}, "
             f"max |err| {_fmt(report.total['max_abs'], '.4g')}", ""]
    if report.layers:
        lines.append(f"{'layer':>5}  {'tensors':>7}  {'rel RMSE':>9}  {'SQNR dB':>8}  {'cosine':>9}  "
                     f"{'max|err|':>9}  worst tensor")
        for s in report.layers:
            lines.append(f"{s.layer:>5}  {s.n_tensors:>7}  {_fmt(s.rel_rmse, '.5f'):>9}  {_fmt(s.sqnr_db, '.2f'):>8}  "
                         f"{_fmt(s.cosine, '.6f'):>9}  {_fmt(s.max_abs, '.4g'):>9}  {split_name(s.worst_tensor)[1]}")
        lines.append("")
        lines.append("most hurt layers: " + ", ".join(f"{s.layer} ({_fmt(s.rel_rmse, '.4f')})"
                                                      for s in report.top_layers[:top_k]))
    worst = sorted(report.tensors, key=lambda t: _sort_key(t.rel_rmse), reverse=True)[:top_k]
    lines.append("most hurt tensors: " + ", ".join(f"{t.name} {t.type} ({_fmt(t.rel_rmse, '.4f')})" for t in worst))
    if report.top_neurons:
        lines.append("most hurt neurons (layer:index, rel RMSE pooled over the selected ffn_gate row, "
                     "ffn_up row, ffn_down column):")
        for n in report.top_neurons[:top_k]:
            parts = ", ".join(f"{k} {_fmt(v, '.4f')}" for k, v in sorted(n.by_tensor.items()))
            lines.append(f"  {n.layer}:{n.index}  {_fmt(n.rel_rmse, '.4f')}  "
                         f"SQNR {_fmt(n.sqnr_db, '.2f')} dB  ({parts})")
    return "\n".join(lines)
