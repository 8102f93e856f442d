"""Static per-neuron sensitivity: how much each FFN neuron should move under a model's weight error,
predicted from the GGUF files alone (plus, where one exists, an imatrix's activation statistics).

For a matmul y = W·x whose input channels have mean squares m_i = E[x_i²], the change of output j
caused by the weight error δW = W_model − W_ref alone (x held fixed) has mean square
    E[(δW_j · x)²] ≈ Σ_i δW[j,i]² · m_i
(exact when the channels are uncorrelated — the diagonal approximation llama.cpp's quantizer makes
when it weights rounding error by the imatrix). Its square root is the predicted RMS change:
    e(W)_j = sqrt(Σ_i δW[j,i]² m_i)            (m = 1 without an imatrix: plain row norm of δW)
and the same formula on W_ref gives the predicted RMS of the output itself, r(W)_j.

Per FFN neuron j of a layer (row j of ffn_gate/ffn_up, column j of ffn_down), with m from the
imatrix entry of ffn_gate/ffn_up (the ffn_norm output) and of ffn_down (the neuron outputs):
  act     = SiLU(g_j):      predicted RMS change = e(gate)_j. SiLU' lies in [−0.1, 1.1] and is ≈ 1 where
                            a neuron is strongly on; without per-neuron activation statistics it is taken
                            as 1 (a per-neuron factor would need the run itself).
  down_in = SiLU(g_j)·u_j:  first order, δ ≈ SiLU'(g)·u·δg + SiLU(g)·δu; as relative errors,
                            s_j · sqrt((e(gate)_j / r(gate)_j)² + (e(up)_j / r(up)_j)²), where s_j is the
                            RMS of down_in_j: measured, sqrt(m_down[j]) from the imatrix's ffn_down entry,
                            or without one r(gate)_j · r(up)_j (SiLU(g) ~ g).
  out     = the neuron's contribution to the layer output: sqrt(Σ_k δD[k,j]²) · s_j (ffn_down column);
            reported, not checked against measurement (the capture does not record it per neuron).
These count only this layer's own weight error: a measured drift also carries the error that earlier
layers pass down, so layer 0 is where the prediction can be compared cleanly.

Streaming: one tensor pair at a time, a block of rows at a time (GGUFTensors.iter_rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import ProbeError
from ..formats.imatrix import check_imatrix, read_imatrix
from ..layerspec import parse_layer_spec
from ..models.store import resolve_model
from .dequant import GGUFTensors
from .error import _check_pair, _n_layers, _nums, COMPARE_BLOCK_ELEMENTS


DEFINITIONS = ("act", "down_in", "out")
UNWEIGHTED = "unweighted (E[x²] = 1 for every input channel)"


# ---------------------------------------------------------------------------------------------
# The estimator on arrays (NumPy axis order: one row per output channel)


def weighted_row_norms(a: np.ndarray, mean_squares: np.ndarray | None = None) -> np.ndarray:
    """sqrt(Σ_i a[j,i]² · m_i) per row j (m = 1 when None), in float64."""
    a = np.asarray(a, dtype=np.float64)
    sq = a * a
    return np.sqrt(sq.sum(axis=1) if mean_squares is None else sq @ np.asarray(mean_squares, dtype=np.float64))


def predict(gate_err: np.ndarray, up_err: np.ndarray, gate_rms: np.ndarray, up_rms: np.ndarray,
            down_in_rms: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """act and down_in predictions from per-neuron row errors e(·) and reference output RMS r(·)."""
    gate_err, up_err, gate_rms, up_rms = (np.asarray(x, dtype=np.float64) for x in (gate_err, up_err, gate_rms, up_rms))
    scale = gate_rms * up_rms if down_in_rms is None else np.asarray(down_in_rms, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_g = np.where(gate_rms > 0, gate_err / gate_rms, np.where(gate_err > 0, np.inf, 0.0))
        rel_u = np.where(up_rms > 0, up_err / up_rms, np.where(up_err > 0, np.inf, 0.0))
        down_in = scale * np.sqrt(rel_g ** 2 + rel_u ** 2)
    down_in = np.where(scale == 0, 0.0, down_in)  # a neuron that never fires cannot drift
    return {"act": gate_err, "down_in": down_in}


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class LayerSensitivity:
    layer: int
    act: np.ndarray  # predicted RMS change of SiLU(gate) per neuron
    down_in: np.ndarray  # predicted RMS change of SiLU(gate)·up
    out: np.ndarray  # predicted RMS change of the layer output from this neuron's ffn_down column
    parts: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # e_gate, e_up, r_gate, r_up, s

    def values(self, definition: str) -> np.ndarray:
        if definition not in DEFINITIONS:
            raise ProbeError(f"sensitivity definition must be one of {', '.join(DEFINITIONS)}, not {definition!r}")
        return getattr(self, definition)

    def to_dict(self, with_units: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer}
        for d in DEFINITIONS:
            v = self.values(d)
            out[d] = {"mean": _num(np.mean(v)), "max": _num(np.max(v)), "argmax": int(np.argmax(v))}
        if with_units:
            out["units"] = {d: _nums(self.values(d)) for d in DEFINITIONS}
            out["units"].update({k: _nums(v) for k, v in self.parts.items()})
        return out


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class SensitivityReport:
    model: str
    ref: str
    imatrix: str | None
    weighting: str  # which E[x²] was used: the imatrix, or unweighted
    layers: list[LayerSensitivity]

    @property
    def weighted(self) -> bool:
        return self.imatrix is not None

    def layer(self, layer: int) -> LayerSensitivity:
        for s in self.layers:
            if s.layer == layer:
                return s
        raise KeyError(layer)

    def top(self, definition: str = "act", k: int = 10) -> list[tuple[int, int, float]]:
        """(layer, neuron, predicted change), largest first, over every analysed layer."""
        rows = [(s.layer, int(j), float(v)) for s in self.layers for j, v in enumerate(s.values(definition))]
        rows.sort(key=lambda r: -r[2] if math.isfinite(r[2]) else -math.inf)
        return rows[:k]

    def to_dict(self, with_units: bool = True, top_k: int = 10) -> dict[str, Any]:
        return {
            "model": self.model, "ref": self.ref, "imatrix": self.imatrix, "weighting": self.weighting,
            "definitions": {"act": "RMS change of SiLU(gate) pre-activation from the gate row error (SiLU' taken as 1)",
                            "down_in": "RMS change of SiLU(gate)·up, first order from gate and up row errors",
                            "out": "RMS change of the layer output from the neuron's ffn_down column error"},
            "top": {d: [{"layer": a, "index": b, "value": _num(c)} for a, b, c in self.top(d, top_k)]
                    for d in DEFINITIONS},
            "layers": [s.to_dict(with_units) for s in self.layers],
        }


# ---------------------------------------------------------------------------------------------
# Streaming over GGUF files


def _row_sums(model: GGUFTensors, ref: GGUFTensors, name: str, ms: np.ndarray | None,
              block_elements: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: Σ δW² m and Σ W_ref² m (rows = output channels)."""
    a = model.ref(name)
    err, rms = np.zeros(a.n_rows), np.zeros(a.n_rows)
    m = None if ms is None else np.asarray(ms, dtype=np.float64)
    for (start, w), (_, r) in zip(model.iter_rows(name, block_elements=block_elements),
                                  ref.iter_rows(name, block_elements=block_elements)):
        rv = r.astype(np.float64)
        d = w.astype(np.float64) - rv
        sl = slice(start, start + len(w))
        err[sl] = (d * d).sum(axis=1) if m is None else (d * d) @ m
        rms[sl] = (rv * rv).sum(axis=1) if m is None else (rv * rv) @ m
    return err, rms


def _column_sums(model: GGUFTensors, ref: GGUFTensors, name: str, block_elements: int) -> np.ndarray:
    """Per column: Σ_k δW[k,j]² (ffn_down: column j is neuron j's output weights)."""
    a = model.ref(name)
    out = np.zeros(a.row_length)
    for (_, w), (_, r) in zip(model.iter_rows(name, block_elements=block_elements),
                              ref.iter_rows(name, block_elements=block_elements)):
        d = w.astype(np.float64) - r.astype(np.float64)
        out += np.einsum("ij,ij->j", d, d)
    return out


def _mean_squares_for(values: Mapping[str, np.ndarray] | None, name: str, width: int) -> np.ndarray | None:
    if values is None:
        return None
    ms = values.get(name)
    if ms is None:
        raise ProbeError(f"the imatrix has no entry for {name}; collect one over every layer "
                         "(ggml-probe imatrix collect) or drop --imatrix for the unweighted estimate")
    if ms.size != width:  # check_imatrix refuses this first; kept for direct calls with a mapping
        raise ProbeError(f"imatrix entry {name} has {ms.size} values, the tensor's rows have {width}")
    return ms


def neuron_sensitivity(
    model: str | Path,
    ref: str | Path,
    *,
    imatrix: str | Path | Mapping[str, np.ndarray] | None = None,
    layers: str | Sequence[int] | None = None,
    block_elements: int = COMPARE_BLOCK_ELEMENTS,
    on_layer: Callable[[int, int, int], None] | None = None,
) -> SensitivityReport:
    """Predicted per-neuron change of every selected layer's FFN neurons under `model`'s weight error.

    imatrix: an imatrix file (or Imatrix.mean_squares()-style mapping) of the reference model:
    weights each input channel by E[x²]; None: unweighted (say so: `report.weighting`).
    An imatrix for another model (names or row lengths differ) is refused.
    """
    model_path, ref_path = resolve_model(model), resolve_model(ref)
    values: Mapping[str, np.ndarray] | None = None
    label = None
    if imatrix is not None:
        if isinstance(imatrix, (str, Path)):
            label = str(imatrix)
            values = read_imatrix(imatrix).mean_squares()
            check_imatrix(values, ref_path, f"imatrix {Path(imatrix).name}")
        else:
            label = "(in memory)"
            values = imatrix
            check_imatrix(values, ref_path)
    with GGUFTensors(model_path) as a, GGUFTensors(ref_path) as r:
        n_layers = _n_layers(a)
        wanted = parse_layer_spec(layers)
        chosen = list(range(n_layers)) if wanted is None else sorted({x + n_layers if x < 0 else x for x in wanted})
        for x in chosen:
            if not 0 <= x < n_layers:
                raise ProbeError(f"layer {x} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        names = [f"blk.{x}.{k}.weight" for x in chosen for k in ("ffn_gate", "ffn_up", "ffn_down")]
        absent = [n for n in names if n not in a.tensors]
        if absent:
            raise ProbeError(f"neuron sensitivity needs a gated FFN (ffn_gate, ffn_up, ffn_down); "
                             f"{a.path.name} has no {absent[0]}")
        _check_pair(a, r, names)
        out = []
        for i, layer in enumerate(chosen):
            if on_layer:
                on_layer(layer, i, len(chosen))
            gate, up, down = (f"blk.{layer}.{k}.weight" for k in ("ffn_gate", "ffn_up", "ffn_down"))
            n_embd, n_ff = a.ref(gate).row_length, a.ref(down).row_length
            ms_in = _mean_squares_for(values, gate, n_embd)
            ms_up = _mean_squares_for(values, up, n_embd)
            ms_down = _mean_squares_for(values, down, n_ff)
            g_err, g_rms = (np.sqrt(x) for x in _row_sums(a, r, gate, ms_in, block_elements))
            u_err, u_rms = (np.sqrt(x) for x in _row_sums(a, r, up, ms_up, block_elements))
            scale = None if ms_down is None else np.sqrt(ms_down.astype(np.float64))
            pred = predict(g_err, u_err, g_rms, u_rms, scale)
            s = g_rms * u_rms if scale is None else scale
            out_err = np.sqrt(_column_sums(a, r, down, block_elements)) * s
            out.append(LayerSensitivity(layer, pred["act"], pred["down_in"], out_err,
                                        {"gate_err": g_err, "up_err": u_err, "gate_rms": g_rms, "up_rms": u_rms,
                                         "down_in_rms": s}))
    weighting = f"E[x²] from imatrix {label}" if values is not None else UNWEIGHTED
    return SensitivityReport(str(model_path), str(ref_path), label, weighting, out)


# ---------------------------------------------------------------------------------------------
# Text


def format_sensitivity(report: SensitivityReport, top_k: int = 10) -> str:
    lines = [f"neuron sensitivity (predicted RMS change from this model's weight error; {report.weighting})",
             f"{'layer':>5}  {'act mean':>9}  {'act max':>9}  {'down_in mean':>12}  {'down_in max':>11}  "
             f"{'out mean':>9}  {'out max':>9}"]
    for s in report.layers:
        lines.append(f"{s.layer:>5}  {np.mean(s.act):>9.4g}  {np.max(s.act):>9.4g}  {np.mean(s.down_in):>12.4g}  "
                     f"{np.max(s.down_in):>11.4g}  {np.mean(s.out):>9.4g}  {np.max(s.out):>9.4g}")
    for d in ("act", "down_in"):
        lines.append(f"most sensitive neurons ({d}, layer:index value): "
                     + ", ".join(f"{layer}:{j} {v:.4g}" for layer, j, v in report.top(d, top_k)))
    return "\n".join(lines)
