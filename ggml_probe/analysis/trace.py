"""The divergence trace's statistics: where a quantized model's tensors leave the reference's, and how much
each part of the model adds to the final KL. Pure NumPy; fed one chunk of tokens at a time (sums only, so
memory does not grow with the text).

Per block and sublayer tensor (engine.trace: kqv_out, attn_out, ffn_out, l_out), over the traced tokens t,
with r_t the reference's row and q_t the quantized model's:

    rel_err        mean over tokens of ‖q_t − r_t‖ / ‖r_t‖
    rel_err_total  sqrt(Σ_t ‖q_t − r_t‖² / Σ_t ‖r_t‖²)   (dominated by the tokens with the largest norms,
                   e.g. the massive activations at the first position, so both are kept)
    cos            mean over tokens of q_t·r_t / (‖q_t‖‖r_t‖)

KL attribution: KL(k) = mean over tokens of KL(P_ref ‖ P_k), where P_k is the reference model's output when
its residual stream after block k (l_out-k) is replaced by the quantized model's: the token embedding and
blocks 0…k run quantized, blocks k+1… and the output head at the reference's precision. KL(embd) patches the
token embeddings only; KL(full) is the quantized model itself. The step of a part is KL(part) − KL(the
part before), so the steps add up exactly to KL(full) (they may be negative: a later part can undo error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.special import log_softmax

# Float64 elements per block of rows in the KL (4M: 32 MB per temporary, ~30 rows of a 150k vocabulary).
_BLOCK_ELEMENTS = 4_000_000
EMBEDDING_POINT = "embd"
FULL_POINT = "full"

DEFINITIONS = {
    "rel_err": "mean over tokens of ‖q_t − r_t‖/‖r_t‖ (q: the quantized model's tensor row, r: the reference's)",
    "rel_err_total": "sqrt(Σ‖q_t − r_t‖² / Σ‖r_t‖²) over the traced tokens",
    "cos": "mean over tokens of the cosine between q_t and r_t",
    "kl_upto": ("KL(P_ref ‖ P) per token, full vocabulary, mean over every traced position, where P is the "
                "reference model run with its residual stream after block k (l_out-k) replaced by the quantized "
                "model's: the embedding and blocks ≤ k quantized, the rest at the reference's precision"),
    "kl_step": "KL up to this part minus KL up to the part before: the steps add up to the quantized model's KL",
}


def log_probs(logits: np.ndarray) -> np.ndarray:
    """Rows of logits as float64 log-probabilities (log-softmax with the row maximum subtracted)."""
    return log_softmax(np.asarray(logits, dtype=np.float64), axis=-1)


@dataclass
class TensorErrorSums:
    """Sums over tokens of one tensor's error against the reference."""

    n: int = 0
    sum_rel: float = 0.0
    sum_cos: float = 0.0
    sum_sq_diff: float = 0.0
    sum_sq_ref: float = 0.0

    def update(self, ref: np.ndarray, quant: np.ndarray) -> None:
        """Add one chunk's rows (tokens, width) of the reference's and the quantized model's tensor."""
        r = np.asarray(ref, dtype=np.float64)
        q = np.asarray(quant, dtype=np.float64)
        if r.shape != q.shape:
            raise ValueError(f"reference rows {r.shape} and quantized rows {q.shape} differ in shape")
        d = q - r
        sq_diff = np.einsum("ij,ij->i", d, d)
        sq_ref = np.einsum("ij,ij->i", r, r)
        sq_q = np.einsum("ij,ij->i", q, q)
        dot = np.einsum("ij,ij->i", q, r)
        norm_ref = np.sqrt(sq_ref)
        # a zero reference row: no error if the quantized row is zero too, else counted as total (1 per unit)
        rel = np.where(norm_ref > 0, np.sqrt(sq_diff) / np.where(norm_ref > 0, norm_ref, 1.0), np.sqrt(sq_diff))
        denom = np.sqrt(sq_q * sq_ref)
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where(sq_q == sq_ref, 1.0, 0.0))
        self.n += len(r)
        self.sum_rel += float(rel.sum())
        self.sum_cos += float(cos.sum())
        self.sum_sq_diff += float(sq_diff.sum())
        self.sum_sq_ref += float(sq_ref.sum())

    def result(self) -> dict[str, float | int | None]:
        if self.n == 0:
            return {"n": 0, "rel_err": None, "rel_err_total": None, "cos": None}
        total = float(np.sqrt(self.sum_sq_diff / self.sum_sq_ref)) if self.sum_sq_ref > 0 else float(self.sum_sq_diff > 0)
        return {"n": self.n, "rel_err": self.sum_rel / self.n, "rel_err_total": total, "cos": self.sum_cos / self.n}


@dataclass
class KLSums:
    """Sums of the per-token KL of one patched (or the quantized) model against the reference."""

    n: int = 0
    total: float = 0.0
    total2: float = 0.0
    max: float = 0.0

    def update(self, ref_log_probs: np.ndarray, logits: np.ndarray) -> None:
        """Add one chunk's rows: the reference's log-probabilities (log_probs, computed once per chunk for every
        KL point) and the other model's logits."""
        kl = np.empty(len(logits))
        step = max(1, _BLOCK_ELEMENTS // max(1, np.shape(logits)[-1]))
        for start in range(0, len(logits), step):  # float64 temporaries of a few rows, whatever the vocabulary
            rows = slice(start, start + step)
            lp, lq = ref_log_probs[rows], log_probs(logits[rows])
            p = np.exp(lp)
            # a token impossible under the reference adds nothing (0 · −inf would be nan)
            kl[rows] = np.where(p > 0, p * (lp - lq), 0.0).sum(axis=-1)
        self.n += len(kl)
        self.total += float(kl.sum())
        self.total2 += float((kl * kl).sum())
        self.max = max(self.max, float(kl.max(initial=0.0)))

    def result(self) -> dict[str, float | int | None]:
        if self.n == 0:
            return {"n": 0, "mean": None, "se": None, "max": None}
        mean = self.total / self.n
        var = max(self.total2 / self.n - mean * mean, 0.0)
        se = float(np.sqrt(var / (self.n - 1))) if self.n > 1 else 0.0
        return {"n": self.n, "mean": mean, "se": se, "max": self.max}


@dataclass
class TraceAccumulator:
    """Everything the trace sums, chunk by chunk: tensor errors per (sublayer, layer) and KL per point.

    `layers`: the blocks whose sublayer tensors are compared; `kl_layers`: the blocks after which the residual
    stream is patched (KL points between the embedding and the full model); `n_layer`: the model's blocks.
    """

    sublayers: Sequence[str]
    layers: Sequence[int]
    kl_layers: Sequence[int]
    n_layer: int
    errors: dict[tuple[str, int], TensorErrorSums] = field(default_factory=dict)
    kl: dict[Any, KLSums] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = sorted(set(int(k) for k in self.layers))
        self.kl_layers = sorted(set(int(k) for k in self.kl_layers))
        for sub in self.sublayers:
            for k in self.layers:
                self.errors[(sub, k)] = TensorErrorSums()
        for point in self.kl_points:
            self.kl[point] = KLSums()

    @property
    def kl_points(self) -> list[Any]:
        """The KL points in model order: the embedding, the chosen blocks, the full quantized model."""
        return [EMBEDDING_POINT, *self.kl_layers, FULL_POINT]

    def update_tensor(self, sublayer: str, layer: int, ref: np.ndarray, quant: np.ndarray) -> None:
        self.errors[(sublayer, int(layer))].update(ref, quant)

    def update_kl(self, point: Any, ref_log_probs: np.ndarray, logits: np.ndarray) -> None:
        self.kl[point].update(ref_log_probs, logits)

    def result(self) -> dict[str, Any]:
        """Per-layer rows, the KL decomposition into parts, and a summary of where the error enters."""
        kl = {p: self.kl[p].result() for p in self.kl_points}
        measured_kl = [p for p in self.kl_points if kl[p]["n"]]
        steps = _kl_steps(measured_kl, kl, self.n_layer)
        layers = []
        for k in self.layers:
            row: dict[str, Any] = {"layer": k}
            for sub in self.sublayers:
                row[sub] = self.errors[(sub, k)].result()
            if k in kl and kl[k]["n"]:
                row["kl_upto"] = kl[k]["mean"]
                row["kl_upto_se"] = kl[k]["se"]
                row["kl_step"] = next((s["step"] for s in steps if s["point"] == k), None)
            layers.append(row)
        full = kl[FULL_POINT]
        return {"layers": layers, "kl_steps": steps,
                "kl": {"full": full["mean"], "full_se": full["se"], "full_max": full["max"],
                       "embd": kl[EMBEDDING_POINT]["mean"], "tokens": full["n"]},
                "summary": _summary(layers, steps, full["mean"], self.sublayers)}


def _part_name(point: Any, previous: Any, n_layer: int) -> str:
    """What a KL step covers: 'token embedding', 'block 3', 'blocks 1–14', 'output (norm, head)'."""
    if point == EMBEDDING_POINT:
        return "token embedding"
    first = 0 if previous == EMBEDDING_POINT else int(previous) + 1
    if point == FULL_POINT:
        if first >= n_layer:
            return "output (norm, head)"
        span = f"block {first}" if first == n_layer - 1 else f"blocks {first}–{n_layer - 1}"
        return f"{span} and the output (norm, head)"
    k = int(point)
    return f"block {k}" if first == k else f"blocks {first}–{k}"


def _kl_steps(points: Sequence[Any], kl: dict[Any, dict[str, Any]], n_layer: int) -> list[dict[str, Any]]:
    steps, before, previous = [], 0.0, EMBEDDING_POINT
    for p in points:
        mean = kl[p]["mean"]
        steps.append({"point": p, "part": _part_name(p, previous, n_layer), "kl_upto": mean,
                      "kl_upto_se": kl[p]["se"], "step": mean - before})
        before, previous = mean, p
    return steps


def _summary(layers: list[dict[str, Any]], steps: list[dict[str, Any]], full: float | None,
             sublayers: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if len(steps) > 1 and full is not None:  # one step (no KL points) would name the whole model
        top = max(steps, key=lambda s: s["step"])
        out["largest_kl_step"] = {"part": top["part"], "step": top["step"],
                                  "share": top["step"] / full if full > 0 else None}
    residual = [(r["layer"], r["l_out"]["rel_err"]) for r in layers if "l_out" in r and r["l_out"]["rel_err"] is not None]
    if residual:
        out["l_out_rel_err_first"] = {"layer": residual[0][0], "rel_err": residual[0][1]}
        out["l_out_rel_err_last"] = {"layer": residual[-1][0], "rel_err": residual[-1][1]}
        # where it grows: the largest rise of the residual stream's error from one compared block to the next
        rises = [(b[0], b[1] - a[1], a[1], b[1]) for a, b in zip(residual, residual[1:])]
        if rises:
            layer, rise, before, after = max(rises, key=lambda r: r[1])
            out["l_out_largest_rise"] = {"layer": layer, "rise": rise, "from": before, "to": after}
        worst = {}
        for sub in sublayers:
            vals = [(r["layer"], r[sub]["rel_err"]) for r in layers if sub in r and r[sub]["rel_err"] is not None]
            if vals:
                layer, value = max(vals, key=lambda v: v[1])
                worst[sub] = {"layer": layer, "rel_err": value}
        out["worst_rel_err"] = worst
    return out
