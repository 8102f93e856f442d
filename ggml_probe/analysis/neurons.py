"""Streaming neuron statistics: moments, dead neurons, redundancy (correlation) and top activations.

Pure NumPy; memory is independent of the number of tokens. Every accumulator takes batches of
activations shaped (n_tokens, n_ff), merges with another of its kind (Chan et al.'s parallel update
in float64), and round-trips through plain arrays for .npz files.

Definitions (study-protocol.md):
- dead: every value of the neuron lies in (−τ, τ), i.e. max |a| < τ (τ = 0.1 in the paper);
- redundancy: Pearson correlation of neurons within a layer over tokens; the histogram of |corr|
  over pairs i < j in 0.1-wide bins [0, 0.1), …, [0.9, 1.0] (1.0 falls in the last bin); pairs with
  |corr| ≥ threshold; groups after average-linkage clustering on 1 − |corr| (NeuroX style).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.linalg import blas

from ..errors import ProbeError
from ..fsutil import atomic_output, human_size


# ------------------------------------------------------------------ per-neuron moments


class NeuronStats:
    """count, mean, variance (Welford/Chan), min, max, max |a|, fraction positive, sum of squares."""

    FIELDS = ("count", "mean", "m2", "min", "max", "maxabs", "n_pos", "sumsq")

    def __init__(self, n_ff: int) -> None:
        self.n_ff = int(n_ff)
        self.count = 0
        self.mean = np.zeros(n_ff)
        self.m2 = np.zeros(n_ff)  # sum of squared deviations from the mean
        self.min = np.full(n_ff, np.inf)
        self.max = np.full(n_ff, -np.inf)
        self.maxabs = np.zeros(n_ff)
        self.n_pos = np.zeros(n_ff, dtype=np.int64)
        self.sumsq = np.zeros(n_ff)

    def update(self, x: np.ndarray, weight: int = 1) -> None:
        """Add a batch of rows; `weight`: how many tokens each row stands for (a shared prefix's rows
        stand for every prompt that shares it)."""
        x = _as_batch(x, self.n_ff)
        n = x.shape[0]
        if n == 0:
            return
        batch = NeuronStats(self.n_ff)
        batch.count = n * weight
        batch.mean = x.mean(axis=0)
        centred = x - batch.mean
        batch.m2 = weight * np.einsum("ij,ij->j", centred, centred)
        batch.min = x.min(axis=0)
        batch.max = x.max(axis=0)
        batch.maxabs = np.maximum(batch.max, -batch.min)  # max |x| without another pass
        batch.n_pos = weight * (x > 0).sum(axis=0).astype(np.int64)
        batch.sumsq = weight * np.einsum("ij,ij->j", x, x)
        self.merge(batch)

    def merge(self, other: "NeuronStats") -> None:
        if other.n_ff != self.n_ff:
            raise ProbeError(f"cannot merge statistics of {other.n_ff} neurons into {self.n_ff}")
        if other.count == 0:
            return
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (n_a * n_b / n)
        self.count = n
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        self.maxabs = np.maximum(self.maxabs, other.maxabs)
        self.n_pos = self.n_pos + other.n_pos
        self.sumsq = self.sumsq + other.sumsq

    @property
    def variance(self) -> np.ndarray:
        """Population variance (ddof=0) over all tokens seen."""
        return self.m2 / self.count if self.count else np.full(self.n_ff, np.nan)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)

    @property
    def fraction_positive(self) -> np.ndarray:
        return self.n_pos / self.count if self.count else np.full(self.n_ff, np.nan)

    def dead(self, tau: float = 0.1) -> np.ndarray:
        """Ids of neurons whose every value lies in (−tau, tau)."""
        if self.count == 0:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.maxabs < tau)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: np.asarray(getattr(self, f)) for f in self.FIELDS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "NeuronStats":
        out = cls(len(arrays["mean"]))
        for f in cls.FIELDS:
            value = arrays[f]
            setattr(out, f, int(value) if f == "count" else np.array(value))
        return out


# ------------------------------------------------------------------ activation drift against a reference

DRIFT_NAME = "drift |Δmean|/σ_ref"
DRIFT_DEFINITION = ("activation drift: per neuron |mean_level − mean_reference| / std_reference, the means and the "
                    "reference's standard deviation (population) taken over the same prompts' tokens (a standardised "
                    "mean shift); per layer its mean and its max over the neurons whose reference std is non-zero")


def activation_drift(ref_mean: np.ndarray, ref_var: np.ndarray, level_mean: np.ndarray, top: int = 10) -> dict[str, Any]:
    """The one drift of ggml-probe (DRIFT_DEFINITION): per neuron |Δmean| / reference std, summarised per layer.

    ref_mean, ref_var: the reference level's per-neuron mean and population variance over the prompts'
    tokens (NeuronStats.mean / .variance, neuron_stats.npz's mean / var); level_mean: the other level's
    means over the same tokens. Neurons whose reference does not vary (std 0, or never seen) are left out
    and counted. Returns {"mean", "max", "neurons" (how many were averaged), "excluded" (how many were
    left out), "most_drifted" (the `top` neuron ids with the largest drift, largest first)}; mean and max
    are None when no neuron varies.
    """
    ref_mean, ref_var, level_mean = (np.asarray(x, dtype=np.float64) for x in (ref_mean, ref_var, level_mean))
    if not ref_mean.shape == ref_var.shape == level_mean.shape or ref_mean.ndim != 1:
        raise ValueError(f"drift needs three per-neuron vectors of one length, got {ref_mean.shape}, "
                         f"{ref_var.shape}, {level_mean.shape}")
    std = np.sqrt(ref_var)
    ok = np.isfinite(std) & (std > 0) & np.isfinite(level_mean) & np.isfinite(ref_mean)
    drift = np.full(ref_mean.shape, np.nan)
    drift[ok] = np.abs(level_mean[ok] - ref_mean[ok]) / std[ok]
    ids = np.flatnonzero(ok)
    ranked = ids[np.argsort(-drift[ok], kind="stable")][:top]
    return {"mean": float(drift[ok].mean()) if ok.any() else None, "max": float(drift[ok].max()) if ok.any() else None,
            "neurons": int(ok.sum()), "excluded": int((~ok).sum()), "most_drifted": [int(i) for i in ranked]}


# ------------------------------------------------------------------ correlation (redundancy)


# CoMoment: float32 block products summed in float32 over at most this many blocks before joining the float64 sums
_FOLD_BLOCKS = 8


class CoMoment:
    """Streaming co-moment matrix C = Σ (x − mean)(x − mean)ᵀ over tokens, float64, n_ff × n_ff.

    Rows are buffered up to `block_rows` and folded in one matrix product per block (the n_ff² work
    per fold would otherwise dominate for short prompts); reading results folds the buffer first. A fold
    updates one triangle (BLAS syrk and syr: half the products of a full XᵀX); reading `c` mirrors it into
    the other, and a saved state keeps the one triangle as it is.

    `product_dtype`: the precision of each block's products. The block is centred in float64 and the
    sums are float64 either way; float32 products (the neuron pass's default: twice BLAS's throughput on
    the pass's largest host cost) put a relative error of order 1e-6 on a block's sums, far below what a
    batch layout moves activations by (benchmarks/layout_noise.md), while float64 keeps the streaming
    update exact to 1e-10 at any offset. Float32 products of up to `_FOLD_BLOCKS` blocks are summed in
    place by syrk before they join the float64 sums: adding n_ff² float32s to float64 after every block
    cost as much as the block's products.
    """

    def __init__(self, n_ff: int, block_rows: int = 512, product_dtype: type = np.float64) -> None:
        self.n_ff = int(n_ff)
        self.block_rows = int(block_rows)
        if np.dtype(product_dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError("co-moment products are float32 or float64")
        self.product_dtype = np.dtype(product_dtype)
        self.count = 0
        self.mean = np.zeros(n_ff)
        self._c = np.zeros((n_ff, n_ff))
        self._lower_only = False  # True: only _c's lower triangle (row ≥ column) is current
        # rows not folded yet, in buffers kept across blocks (fresh ones of this size cost page faults each time)
        self._rows = np.empty((0, self.n_ff))
        self._row_weights = np.empty(0)  # how many tokens each row stands for
        self._rows32 = np.empty((0, self.n_ff), dtype=np.float32)
        self._pending_rows = 0
        self._pending_count = 0  # the tokens they stand for
        self._c32: np.ndarray | None = None  # float32 products of blocks not yet in _c (Fortran order, upper)
        self._c32_blocks = 0

    @property
    def c(self) -> np.ndarray:
        """The co-moment matrix, the buffered rows folded in."""
        self.flush()
        self._fold_c32()
        # read at the end of a run: the buffers' memory goes to the correlation matrix
        self._c32, self._rows, self._rows32 = None, np.empty((0, self.n_ff)), np.empty((0, self.n_ff), np.float32)
        if self._lower_only:
            upper = np.triu_indices(self.n_ff, 1)
            self._c[upper] = self._c.T[upper]
            self._lower_only = False
        return self._c

    @c.setter
    def c(self, value: np.ndarray) -> None:
        self._c, self._lower_only = value, False

    @staticmethod
    def bytes_needed(n_ff: int) -> int:
        """Memory of one accumulator plus the correlation matrix built from it."""
        return 2 * 8 * int(n_ff) ** 2

    def update(self, x: np.ndarray, weight: int = 1) -> None:
        """Add rows; `weight`: how many tokens each stands for (as NeuronStats.update)."""
        x = _as_batch(x, self.n_ff)
        n = x.shape[0]
        if n == 0:
            return
        start, end = self._pending_rows, self._pending_rows + n
        if end > len(self._rows):  # grown to a block and the batch that completes it
            grown = np.empty((max(end, self.block_rows), self.n_ff))
            grown[:start] = self._rows[:start]
            self._rows, self._row_weights = grown, np.concatenate([self._row_weights[:start], np.empty(len(grown) - start)])
        self._rows[start:end] = x  # a copy: callers reuse their buffers
        self._row_weights[start:end] = weight
        self._pending_rows, self._pending_count = end, self._pending_count + n * int(weight)
        if self._pending_rows >= self.block_rows:
            self.flush()

    def flush(self) -> None:
        """Fold the buffered rows into the co-moment: C += Σ (x − x̄_b)(x − x̄_b)ᵀ + w·δδᵀ (Chan et al.'s
        pairwise update), in place on the lower triangle. _c's transpose is a Fortran-ordered view whose
        upper triangle is _c's lower one, so BLAS writes straight into it."""
        if not self._pending_rows:
            return
        rows, n_b = self._pending_rows, self._pending_count
        self._pending_rows = self._pending_count = 0
        centred, w = self._rows[:rows], self._row_weights[:rows]
        if n_b == rows:  # every row one token
            batch_mean = centred.mean(axis=0)
            centred -= batch_mean
        else:  # rows standing for w tokens each: a weighted mean, and each centred row scaled by √w
            batch_mean = (w @ centred) / n_b
            centred -= batch_mean
            centred *= np.sqrt(w)[:, None]
        n_a, n = self.count, self.count + n_b
        delta = batch_mean - self.mean
        upper_of_transpose = self._c.T
        if self.product_dtype == np.float32:  # the block's products in float32, summed there for a few blocks
            if self._c32 is None:
                self._c32 = np.zeros((self.n_ff, self.n_ff), dtype=np.float32, order="F")
            if len(self._rows32) < rows:
                self._rows32 = np.empty((len(self._rows), self.n_ff), dtype=np.float32)
            block = self._rows32[:rows]
            np.copyto(block, centred, casting="same_kind")
            blas.ssyrk(1.0, block.T, beta=1.0, c=self._c32, trans=0, lower=0, overwrite_c=1)
            self._c32_blocks += 1
            if self._c32_blocks >= _FOLD_BLOCKS:
                self._fold_c32()
        else:
            blas.dsyrk(1.0, centred.T, beta=1.0, c=upper_of_transpose, trans=0, lower=0, overwrite_c=1)
        if n_a:
            blas.dsyr(n_a * n_b / n, delta, lower=0, a=upper_of_transpose, overwrite_a=1)
        self._lower_only = True
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def _fold_c32(self) -> None:
        """Add the float32 products summed so far to the float64 sums."""
        if self._c32_blocks:
            upper_of_transpose = self._c.T
            np.add(upper_of_transpose, self._c32, out=upper_of_transpose)
            self._c32.fill(0.0)
            self._c32_blocks = 0

    def merge(self, other: "CoMoment") -> None:
        if other.n_ff != self.n_ff:
            raise ProbeError(f"cannot merge co-moments of {other.n_ff} neurons into {self.n_ff}")
        other_c = other.c
        c = self.c
        n_a, n_b = self.count, other.count
        if n_b:
            n = n_a + n_b
            delta = other.mean - self.mean
            c += other_c
            if n_a:
                c += np.outer(delta, delta) * (n_a * n_b / n)
            self.mean = self.mean + delta * (n_b / n)
            self.count = n

    def correlation(self) -> np.ndarray:
        """Pearson correlation; rows/columns of constant neurons are NaN."""
        c = self.c
        d = np.sqrt(np.diag(c))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = c / np.outer(d, d)
        np.clip(r, -1.0, 1.0, out=r)
        constant = d == 0
        r[constant, :] = np.nan
        r[:, constant] = np.nan
        return r

    def arrays(self) -> dict[str, np.ndarray]:
        """The state as it stands: a per-chunk checkpoint does not mirror the triangle (`c_lower_only`)."""
        self.flush()
        self._fold_c32()
        return {"count": np.asarray(self.count), "mean": self.mean, "c": self._c,
                "c_lower_only": np.asarray(self._lower_only)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], product_dtype: type = np.float64) -> "CoMoment":
        out = cls(len(arrays["mean"]), product_dtype=product_dtype)
        out.count = int(arrays["count"])
        out.mean = np.array(arrays["mean"])
        out.c = np.array(arrays["c"])
        out._lower_only = bool(arrays.get("c_lower_only", False))  # states saved before it hold whole matrices
        return out


CORR_BIN_EDGES = np.round(np.linspace(0.0, 1.0, 11), 10)

# What the redundancy correlations may take unless asked otherwise (--redundancy-budget): the memory
# goal for a study (peak ≤ 1.3 × the largest file + 300 MB) leaves the 1B shape about 0.4 GB above the pass
# (benchmarks/scale-idle.md); every neuron of the demo's three layers needs 75 MiB.
DEFAULT_REDUNDANCY_BUDGET = 256 << 20


def redundancy_bytes(n_neurons: int, n_pairs: int) -> int:
    """Memory of the redundancy analysis: one float64 co-moment of n_neurons² per layer/definition pair, all
    held during the pass, plus at the end one pair's condensed |corr| and the clustering's copy of it."""
    return 8 * int(n_neurons) ** 2 * (int(n_pairs) + 1)


@dataclass(frozen=True)
class RedundancyPlan:
    """Which neurons of each layer the redundancy correlates: every `stride`-th (0, stride, 2·stride, …), all
    of them at stride 1; none at stride 0 (not even two fit). need_all: the bytes every neuron would need."""

    n_ff: int
    n_pairs: int
    stride: int
    need_all: int
    budget: int | None

    @property
    def neurons(self) -> np.ndarray:
        return np.arange(0, self.n_ff, self.stride) if self.stride else np.zeros(0, dtype=np.int64)

    @property
    def shrunk(self) -> bool:
        return self.stride != 1

    def note(self) -> str | None:
        """What was shrunk and why, and how to get every neuron; None when nothing was."""
        if not self.shrunk:
            return None
        budget = f"{human_size(self.budget)} " if self.budget is not None else ""
        why = (f"every neuron at {self.n_pairs} layer/definition pair(s) would need {human_size(self.need_all)}, "
               f"over the {budget}redundancy budget")
        how = "--redundancy-full (or a larger --redundancy-budget) correlates every neuron"
        if not self.stride:
            return f"redundancy skipped: {why}; {how}"
        ids = self.neurons
        shown = ", ".join(str(i) for i in ids[:3]) + (", …" if len(ids) > 3 else "")
        n = len(ids)
        return (f"redundancy on a subset: every {_ordinal(self.stride)} neuron of each layer ({n} of {self.n_ff}: "
                f"neurons {shown}), so pair counts cover {n}·{n - 1}/2 pairs, not {self.n_ff}·{self.n_ff - 1}/2; "
                f"{why}; {how}")


def plan_redundancy(n_ff: int, n_pairs: int, budget: int | None, *, full: bool = False) -> RedundancyPlan:
    """Every neuron when they fit `budget` bytes (None: no limit); else, unless `full` (an explicit request for
    every neuron, refused in one line), the densest evenly spaced subset that fits."""
    need_all = redundancy_bytes(n_ff, n_pairs)
    if budget is None or need_all <= budget:
        return RedundancyPlan(n_ff, n_pairs, 1, need_all, budget)
    if full:
        raise ProbeError(
            f"correlation matrices for {n_pairs} layer/definition pairs of {n_ff} neurons need "
            f"{human_size(need_all)} (budget {human_size(budget)}): give a larger --redundancy-budget, "
            "choose fewer layers (--layers), drop --redundancy-full to correlate an evenly spaced subset, or skip "
            "the redundancy (--no-redundancy)")
    fit = int(np.sqrt(budget / (8 * (n_pairs + 1))))
    stride = -(-n_ff // fit) if fit >= 2 else 0
    while stride and redundancy_bytes(len(range(0, n_ff, stride)), n_pairs) > budget:
        stride += 1
    if stride and len(range(0, n_ff, stride)) < 2:
        stride = 0
    return RedundancyPlan(n_ff, n_pairs, stride, need_all, budget)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def redundancy_from_comoment(c: np.ndarray, threshold: float = 0.9, cluster_threshold: float = 0.3,
                             clusters: bool = True, method: str = "average") -> dict[str, Any]:
    """corr_histogram, pairs_above and the correlation_groups count from a co-moment matrix, through one
    condensed |corr| vector (pairs i < j, row by row) instead of n² temporaries: the memory of one
    co-moment (the vector and the clustering's copy of it), not several."""
    n = c.shape[0]
    d = np.sqrt(np.diag(c))
    constant = d == 0
    values = np.empty(n * (n - 1) // 2)
    at = 0
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(n - 1):
            row = np.abs(c[i, i + 1:]) / (d[i] * d[i + 1:])
            np.minimum(row, 1.0, out=row)
            row[constant[i + 1:]] = np.nan
            if constant[i]:
                row[:] = np.nan
            values[at:at + len(row)] = row
            at += len(row)
    known = values[~np.isnan(values)]
    bins = np.searchsorted(CORR_BIN_EDGES[1:-1], known, side="right")
    out: dict[str, Any] = {"histogram": np.bincount(bins, minlength=10).astype(np.int64),
                           "pairs_above": int(np.count_nonzero(known >= threshold)), "n_constant": int(constant.sum())}
    del known, bins
    if clusters:
        if n == 1:
            out["groups"] = 1
        else:
            from scipy.cluster.hierarchy import fcluster, linkage  # scipy: only where clusters are asked for

            np.subtract(1.0, values, out=values)  # the distance 1 − |corr|, in place
            values[np.isnan(values)] = 1.0
            np.clip(values, 0.0, 1.0, out=values)
            tree = linkage(values, method=method)
            out["groups"] = int(fcluster(tree, t=cluster_threshold, criterion="distance").max())
    return out


def corr_histogram(corr: np.ndarray) -> np.ndarray:
    """Counts of neuron pairs i < j by |corr| in 10 bins [0, 0.1), …, [0.9, 1.0]; NaN pairs skipped."""
    values = np.abs(corr[np.triu_indices(corr.shape[0], k=1)])
    values = values[~np.isnan(values)]
    # values * 10 can land a hair below an edge (0.3 * 10 = 2.9999…): compare against the edges
    bins = np.searchsorted(CORR_BIN_EDGES[1:-1], values, side="right")
    return np.bincount(bins, minlength=10).astype(np.int64)


def pairs_above(corr: np.ndarray, threshold: float = 0.9) -> int:
    """Number of pairs i < j with |corr| ≥ threshold."""
    values = np.abs(corr[np.triu_indices(corr.shape[0], k=1)])
    return int(np.count_nonzero(values >= threshold))


def correlation_groups(corr: np.ndarray, threshold: float = 0.3, method: str = "average") -> np.ndarray:
    """Cluster label (1-based) per neuron: hierarchical clustering on distance 1 − |corr|, cut at
    `threshold`. Constant neurons (NaN correlation) are at distance 1 from every other neuron."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = corr.shape[0]
    if n == 1:
        return np.ones(1, dtype=np.int64)
    dist = 1.0 - np.abs(corr)
    dist = np.where(np.isnan(dist), 1.0, dist)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    np.clip(dist, 0.0, 1.0, out=dist)
    tree = linkage(squareform(dist, checks=False), method=method)
    return fcluster(tree, t=threshold, criterion="distance").astype(np.int64)


# ------------------------------------------------------------------ top activations


# TopActivations.update merges the values reaching the kept k-th best one by one when they are at most one
# in this many of the batch's values (else it selects each neuron's best rows first)
_SPARSE_SHARE = 8


class TopActivations:
    """The k highest activations of every neuron, with where they occurred (prompt, position).

    Order: by score (the value, or |value| with by="abs") descending, ties broken by the earlier
    (prompt, position), so streaming in prompt order and one batch give the same answer.
    Unfilled slots hold score −inf and prompt −1.
    """

    def __init__(self, n_ff: int, k: int = 10, by: str = "value") -> None:
        if by not in ("value", "abs"):
            raise ProbeError("top activations are ranked by 'value' or 'abs'")
        self.n_ff, self.k, self.by = int(n_ff), int(k), by
        self.score = np.full((k, n_ff), -np.inf)
        self.value = np.zeros((k, n_ff))
        self.prompt = np.full((k, n_ff), -1, dtype=np.int64)
        self.pos = np.full((k, n_ff), -1, dtype=np.int64)

    def update(self, x: np.ndarray, row_prompt: np.ndarray, row_pos: np.ndarray,
               shared_by: Sequence[int] | None = None) -> None:
        """Add rows at (row_prompt, row_pos). `shared_by`: the rows are a shared prefix's, standing at
        their positions in each of these prompts (row_prompt is then ignored)."""
        x = _as_batch(x, self.n_ff)
        if x.shape[0] == 0 or self.k == 0:
            return
        score = np.abs(x) if self.by == "abs" else x
        row_pos = np.asarray(row_pos, dtype=np.int64)
        if shared_by is not None:
            x, row_prompt, row_pos = self._shared_rows(x, score, row_pos, shared_by)
            if x.shape[0] == 0:
                return
            score = np.abs(x) if self.by == "abs" else x
        row_prompt = np.asarray(row_prompt, dtype=np.int64)
        # Only values reaching their neuron's current k-th best can enter. Once the slots are filled these
        # are few (about k per neuron per batch as long as a batch is not much longer than what came
        # before), and merging them alone is far cheaper than selecting from every row.
        reaching = score >= self.score[-1]
        n_reaching = int(np.count_nonzero(reaching))
        if n_reaching == 0:
            return
        # Fast path: rows arrive in (prompt, position) order after everything kept so far, so a stable
        # sort on the score alone breaks ties by that order; otherwise sort on all three keys.
        in_order = (self._after_kept(int(row_prompt[0]), int(row_pos[0]))
                    and bool(np.all((np.diff(row_prompt) > 0) | ((np.diff(row_prompt) == 0) & (np.diff(row_pos) > 0)))))
        if n_reaching * _SPARSE_SHARE <= reaching.size:
            self._merge_entries(*np.nonzero(reaching), score, x, row_prompt, row_pos, in_order)
            return
        cols = np.flatnonzero(reaching.any(axis=0))
        if cols.size < self.n_ff:
            score, x = score[:, cols], x[:, cols]
        n, m = score.shape
        if n > self.k:  # pre-select the batch's best k per neuron (same order as the final merge)
            if in_order:
                order = _best_rows(score, self.k)
            else:
                rp, ps = np.broadcast_to(row_prompt[:, None], (n, m)), np.broadcast_to(row_pos[:, None], (n, m))
                order = np.lexsort((ps, rp, -score), axis=0)[: self.k]
            score, x = np.take_along_axis(score, order, 0), np.take_along_axis(x, order, 0)
            rp, ps = row_prompt[order], row_pos[order]
        else:
            rp, ps = np.broadcast_to(row_prompt[:, None], (n, m)), np.broadcast_to(row_pos[:, None], (n, m))
        self._merge(score, x, rp, ps, cols if cols.size < self.n_ff else None, in_order)

    def _shared_rows(self, x: np.ndarray, score: np.ndarray, row_pos: np.ndarray, shared_by: Sequence[int]):
        """A shared prefix's rows as the prompts' own copies would enter, copied only where that can matter:
        rows reaching some neuron's current k-th best (it only rises), for the first k prompts (a copy in a
        later prompt ranks after k equal ones in earlier prompts)."""
        rows = np.flatnonzero((score >= self.score[-1]).any(axis=1))
        prompts = np.sort(np.asarray(shared_by, dtype=np.int64))[: self.k]
        return (np.tile(x[rows], (len(prompts), 1)), np.repeat(prompts, len(rows)),
                np.tile(row_pos[rows], len(prompts)))

    def _after_kept(self, prompt: int, pos: int) -> bool:
        """Whether (prompt, pos) comes after every kept entry's (prompt, position)."""
        last = int(self.prompt.max())
        return prompt > last or (prompt == last and pos > int(self.pos[self.prompt == last].max()))

    def _merge_entries(self, rows: np.ndarray, cols: np.ndarray, score, value, row_prompt, row_pos,
                       after: bool = False) -> None:
        """Merge single entries (rows[i], cols[i]) of a batch into the kept ones: one sort of the touched
        neurons' kept slots and new entries by (neuron, score descending, prompt, position). `after`: the
        entries come in (prompt, position) order after every kept one, so a stable sort on (neuron, score)
        keeps that order among ties (kept slots first, in their ranked order)."""
        touched, col_of = np.unique(cols, return_inverse=True)
        k, t = self.k, touched.size
        s = np.concatenate([self.score[:, touched].ravel(), score[rows, cols]])
        v = np.concatenate([self.value[:, touched].ravel(), value[rows, cols]])
        p = np.concatenate([self.prompt[:, touched].ravel(), row_prompt[rows]])
        q = np.concatenate([self.pos[:, touched].ravel(), row_pos[rows]])
        neuron = np.concatenate([np.tile(np.arange(t), k), col_of])
        if after:
            order = np.lexsort((-s, neuron))
        else:
            p_key = np.where(p < 0, np.iinfo(np.int64).max, p)  # empty slots last among equal −inf scores
            order = np.lexsort((q, p_key, -s, neuron))
        starts = np.concatenate([[0], np.cumsum(k + np.bincount(col_of, minlength=t))[:-1]])
        best = order[(starts[None, :] + np.arange(k)[:, None])]  # (k, t): each touched neuron's best k
        self.score[:, touched], self.value[:, touched] = s[best], v[best]
        self.prompt[:, touched], self.pos[:, touched] = p[best], q[best]

    def merge(self, other: "TopActivations") -> None:
        if (other.n_ff, other.by, other.k) != (self.n_ff, self.by, self.k):
            raise ProbeError("cannot merge top activations of different widths, k or rankings")
        self._merge(other.score, other.value, other.prompt, other.pos)

    def _merge(self, score, value, prompt, pos, cols: np.ndarray | None = None, after: bool = False) -> None:
        """Keep the best k of the kept entries and the new ones; `after`: every new entry comes
        after every kept one in (prompt, position) order (a stable sort on the score suffices)."""
        sel = slice(None) if cols is None else cols
        s = np.concatenate([self.score[:, sel], score])
        v = np.concatenate([self.value[:, sel], value])
        p = np.concatenate([self.prompt[:, sel], prompt])
        q = np.concatenate([self.pos[:, sel], pos])
        if after:  # empty slots (−inf) stay behind real entries; among themselves order is irrelevant
            order = np.argsort(-s, axis=0, kind="stable")[: self.k]
        else:
            # empty slots (prompt −1) sort last among equal −inf scores via a large prompt key
            p_key = np.where(p < 0, np.iinfo(np.int64).max, p)
            order = np.lexsort((q, p_key, -s), axis=0)[: self.k]
        self.score[:, sel] = np.take_along_axis(s, order, 0)
        self.value[:, sel] = np.take_along_axis(v, order, 0)
        self.prompt[:, sel] = np.take_along_axis(p, order, 0)
        self.pos[:, sel] = np.take_along_axis(q, order, 0)

    def for_neuron(self, j: int) -> list[tuple[float, int, int]]:
        """(value, prompt, position) best first, filled slots only."""
        keep = self.prompt[:, j] >= 0
        return [(float(v), int(p), int(q)) for v, p, q in
                zip(self.value[keep, j], self.prompt[keep, j], self.pos[keep, j])]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"score": self.score, "value": self.value, "prompt": self.prompt, "pos": self.pos,
                "k": np.asarray(self.k), "by": np.asarray(self.by)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TopActivations":
        out = cls(arrays["score"].shape[1], int(arrays["k"]), str(arrays["by"]))
        for f in ("score", "value", "prompt", "pos"):
            setattr(out, f, np.array(arrays[f]))
        return out


def top_token_contexts(
    top: TopActivations,
    neuron: int,
    prompt_tokens: Sequence[Sequence[int]],
    piece,
    window: int = 5,
) -> list[dict[str, Any]]:
    """Resolve a neuron's top activations to text: `piece(token_id) -> str`, `window` tokens of left
    context; prompt_tokens are the token arrays the run decoded (global prompt index → tokens)."""
    rows = []
    for value, prompt, pos in top.for_neuron(neuron):
        toks = prompt_tokens[prompt]
        left = "".join(piece(int(t)) for t in toks[max(0, pos - window):pos])
        rows.append({"value": value, "prompt": prompt, "position": pos, "token": piece(int(toks[pos])),
                     "context": left})
    return rows


# ------------------------------------------------------------------ all layers, both definitions


@dataclass
class RedundancySummary:
    histogram: np.ndarray  # int64 (10,): pairs per |corr| bin
    pairs_above: int
    threshold: float
    n_groups: int
    cluster_threshold: float
    n_constant: int  # neurons with zero variance (left out of the histogram)


class NeuronAccumulator:
    """Streaming statistics for several layers and neuron definitions; the state of a neuron run.

    update(layer, definition, values, layout) is FFNCapture's consumer (layout: anything with
    row_prompt and row_pos arrays). Memory: 3 vectors per neuron, n² floats per (layer,
    definition) with redundancy, and k slots per neuron for the top activations.

    Redundancy: n = every neuron when redundancy_bytes fits memory_budget_bytes (None or allow_large: no
    limit); otherwise an evenly spaced subset that fits (plan_redundancy; its note says so), or with
    redundancy_full a one-line refusal. The correlations' block products are float32 unless
    `comoment_dtype` says otherwise (CoMoment's product_dtype; a saved state continues in its own).
    """

    def __init__(
        self,
        layers: Sequence[int],
        definitions: Sequence[str],
        n_ff: int,
        *,
        redundancy: bool = True,
        top_k: int = 10,
        top_by: str = "value",
        memory_budget_bytes: int | None = DEFAULT_REDUNDANCY_BUDGET,
        allow_large: bool = False,
        redundancy_full: bool = False,
        comoment_dtype: type = np.float32,
    ) -> None:
        self.layers = [int(x) for x in layers]
        self.definitions = list(dict.fromkeys(definitions))
        self.n_ff = int(n_ff)
        self.redundancy = bool(redundancy)
        self.top_k = int(top_k)
        self.top_by = top_by
        keys = [(d, layer) for d in self.definitions for layer in self.layers]
        self.redundancy_plan = plan_redundancy(self.n_ff, len(keys), None if allow_large else memory_budget_bytes,
                                               full=redundancy_full) if self.redundancy else None
        if self.redundancy_plan is not None and not self.redundancy_plan.stride:  # not even two neurons fit
            self.redundancy = False
        self.stats = {k: NeuronStats(self.n_ff) for k in keys}
        self.comoment_dtype = np.dtype(comoment_dtype)
        self.comoment = ({k: CoMoment(len(self.redundancy_neurons), product_dtype=self.comoment_dtype) for k in keys}
                         if self.redundancy else {})
        self.top = {k: TopActivations(self.n_ff, self.top_k, top_by) for k in keys} if self.top_k else {}
        self.n_prompts = 0  # 1 + the largest prompt index seen

    def update(self, layer: int, definition: str, values: np.ndarray, layout) -> None:
        """FFNCapture's consumer. A layout whose `shared_by` names prompts holds a shared prefix's rows once:
        they count for every one of those prompts, as if each prompt's copy had come."""
        key = (definition, int(layer))
        if key not in self.stats:
            raise ProbeError(f"no accumulator for {definition} at layer {layer}")
        shared_by = getattr(layout, "shared_by", None)
        weight = 1 if shared_by is None else len(shared_by)
        self.stats[key].update(values, weight)
        if self.redundancy:
            stride = self.redundancy_stride
            self.comoment[key].update(values if stride == 1 else np.asarray(values)[:, ::stride], weight)
        if self.top_k:
            self.top[key].update(values, layout.row_prompt, layout.row_pos, shared_by=shared_by)
        prompts = layout.row_prompt if shared_by is None else shared_by
        if len(prompts):
            self.n_prompts = max(self.n_prompts, int(np.max(prompts)) + 1)

    @property
    def redundancy_stride(self) -> int:
        """Every how-many-th neuron the co-moments hold (1: all)."""
        return self.redundancy_plan.stride if self.redundancy_plan is not None else 1

    @property
    def redundancy_neurons(self) -> np.ndarray:
        """The neuron ids of the correlation matrices' rows and columns."""
        stride = self.redundancy_stride
        return np.arange(0, self.n_ff, stride) if stride else np.zeros(0, dtype=np.int64)

    def merge(self, other: "NeuronAccumulator") -> None:
        if (other.layers, other.definitions, other.n_ff, other.redundancy, other.top_k, other.redundancy_stride) != (
                self.layers, self.definitions, self.n_ff, self.redundancy, self.top_k, self.redundancy_stride):
            raise ProbeError("cannot merge neuron accumulators with different settings")
        for k in self.stats:
            self.stats[k].merge(other.stats[k])
            if self.redundancy:
                self.comoment[k].merge(other.comoment[k])
            if self.top_k:
                self.top[k].merge(other.top[k])
        self.n_prompts = max(self.n_prompts, other.n_prompts)

    # -------------------------------------------------------------- results
    def dead(self, tau: float = 0.1) -> dict[tuple[str, int], np.ndarray]:
        """Dead neuron ids per (definition, layer)."""
        return {k: s.dead(tau) for k, s in self.stats.items()}

    def correlation(self, definition: str, layer: int) -> np.ndarray:
        """Pearson correlation of the neurons in redundancy_neurons (all, unless the budget shrank them)."""
        if not self.redundancy:
            raise ProbeError("redundancy was not accumulated in this run")
        return self.comoment[(definition, int(layer))].correlation()

    def redundancy_summary(self, definition: str, layer: int, threshold: float = 0.9,
                           cluster_threshold: float = 0.3) -> RedundancySummary:
        if not self.redundancy:
            raise ProbeError("redundancy was not accumulated in this run")
        co = self.comoment[(definition, int(layer))]
        co.flush()
        r = redundancy_from_comoment(co.c, threshold, cluster_threshold)
        return RedundancySummary(r["histogram"], r["pairs_above"], threshold, r["groups"], cluster_threshold,
                                 r["n_constant"])

    def summary(self, tau: float = 0.1, threshold: float = 0.9, cluster_threshold: float = 0.3,
                clusters: bool = True) -> list[dict[str, Any]]:
        """One row per (definition, layer): tokens, dead count, max|a| quantiles, redundancy figures."""
        rows = []
        for (d, layer), s in self.stats.items():
            row: dict[str, Any] = {
                "definition": d, "layer": layer, "tokens": s.count, "tau": tau, "dead": int(len(s.dead(tau))),
                "maxabs_min": float(s.maxabs.min()) if s.count else float("nan"),
                "maxabs_median": float(np.median(s.maxabs)) if s.count else float("nan"),
            }
            if self.redundancy and s.count > 1:
                co = self.comoment[(d, layer)]
                co.flush()
                r = redundancy_from_comoment(co.c, threshold, cluster_threshold, clusters)
                row["corr_histogram"] = r["histogram"].tolist()
                row[f"pairs_ge_{threshold}"] = r["pairs_above"]
                if clusters:
                    row["groups"] = r["groups"]
                    row["cluster_threshold"] = cluster_threshold
            rows.append(row)
        return rows

    # -------------------------------------------------------------- persistence
    def state(self) -> dict[str, np.ndarray]:
        meta = {"layers": self.layers, "definitions": self.definitions, "n_ff": self.n_ff,
                "redundancy": self.redundancy, "top_k": self.top_k, "top_by": self.top_by,
                "n_prompts": self.n_prompts, "format": 1}
        if self.redundancy_stride != 1:  # only when shrunk, so states written before read the same
            meta["redundancy_stride"] = self.redundancy_stride
        if self.redundancy:
            meta["comoment_dtype"] = self.comoment_dtype.name
        out: dict[str, np.ndarray] = {"meta": np.asarray(json.dumps(meta))}
        for (d, layer), s in self.stats.items():
            prefix = f"{d}/{layer}/"
            out.update({prefix + "stats." + k: v for k, v in s.arrays().items()})
            if self.redundancy:
                out.update({prefix + "comoment." + k: v for k, v in self.comoment[(d, layer)].arrays().items()})
            if self.top_k:
                out.update({prefix + "top." + k: v for k, v in self.top[(d, layer)].arrays().items()})
        return out

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "NeuronAccumulator":
        meta = json.loads(str(state["meta"]))
        out = cls(meta["layers"], meta["definitions"], meta["n_ff"], redundancy=False, top_k=0,
                  top_by=meta["top_by"])
        out.redundancy, out.top_k = meta["redundancy"], meta["top_k"]
        out.n_prompts = meta["n_prompts"]
        out.comoment_dtype = np.dtype(meta.get("comoment_dtype", "float64"))  # states before it: float64
        stride = int(meta.get("redundancy_stride", 1))
        n_pairs = len(out.definitions) * len(out.layers)
        out.redundancy_plan = RedundancyPlan(out.n_ff, n_pairs, stride, redundancy_bytes(out.n_ff, n_pairs), None)

        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        for d in out.definitions:
            for layer in out.layers:
                key, prefix = (d, layer), f"{d}/{layer}/"
                out.stats[key] = NeuronStats.from_arrays(part(prefix + "stats."))
                if out.redundancy:
                    out.comoment[key] = CoMoment.from_arrays(part(prefix + "comoment."), out.comoment_dtype)
                if out.top_k:
                    out.top[key] = TopActivations.from_arrays(part(prefix + "top."))
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state to an .npz file atomically (nothing half-written under its name)."""
        return save_state(path, self.state())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NeuronAccumulator":
        return load_state(path, cls.from_state, "a neuron-state file")


def save_state(path: str | os.PathLike, state: dict[str, np.ndarray]) -> Path:
    """Write an accumulator's state to an .npz file atomically (nothing half-written under its name)."""
    final = Path(path)
    with atomic_output(final) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez must not append ".npz" to the temp name
            np.savez(f, **state)
    return final


def load_state(path: str | os.PathLike, from_state, what: str):
    """from_state(the arrays of the .npz file at path); a file that is not `what` is one ProbeError line."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return from_state({k: data[k] for k in data.files})
    except (OSError, ValueError, KeyError) as exc:
        raise ProbeError(f"{path}: not {what} ({exc})") from None


def _best_rows(score: np.ndarray, k: int) -> np.ndarray:
    """Per column, the rows of the k largest scores, best first, ties to the earlier row: what
    np.argsort(-score, axis=0, kind="stable")[:k] gives, without sorting every row.

    A partition finds each column's k-th largest score; where exactly k rows reach it (no tie at the
    boundary, no NaN) those k rows are sorted alone; other columns take the full stable sort.
    """
    n, m = score.shape
    kth = np.partition(score, n - k, axis=0)[n - k]
    reach = score >= kth
    exact = reach.sum(axis=0) == k
    order = np.empty((k, m), dtype=np.int64)
    if exact.any():
        cols = np.flatnonzero(exact)
        _, rows = np.nonzero(reach[:, cols].T)  # column by column, rows ascending within each
        rows = rows.reshape(len(cols), k).T
        ranked = np.argsort(-np.take_along_axis(score[:, cols], rows, 0), axis=0, kind="stable")
        order[:, cols] = np.take_along_axis(rows, ranked, 0)
    if not exact.all():
        cols = np.flatnonzero(~exact)
        order[:, cols] = np.argsort(-score[:, cols], axis=0, kind="stable")[:k]
    return order


def _as_batch(x: np.ndarray, n_ff: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != n_ff:
        raise ProbeError(f"expected activations shaped (tokens, {n_ff}), got {x.shape}")
    return x
