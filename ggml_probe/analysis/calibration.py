"""Output-level calibration metrics: accuracy, confidence, ACE (the reference study's), ECE, Brier, NLL.

Everything here is a pure function of NumPy arrays (one entry per example), so it is tested on arrays
with known answers. Every metric's exact definition is in `DEFINITIONS`; outputs embed those strings so
that a reader of a table knows which "ACE" it is (the name is used for three different things in the
literature: the reference study's equal-count ACE, netcal's *average* CE over equal-width bins, and
Nixon et al.'s per-class *adaptive* CE).

Conventions shared by all functions:
- `confidence` is the probability the model gave to its own prediction (top-label), in [0, 1].
- `correct` is 1/True where the prediction was right.
- `prob_matrix` is (n_examples, n_classes) of probabilities (rows are softmax outputs: over the label
  set, or over the full vocabulary in paper mode); `gold_index` is the column of the right answer.
- Computation is in float64 whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.special import ndtr, ndtri

from ..fsutil import atomic_output

# Values a softmax in float32 can give just outside [0, 1]; anything further out is a caller bug.
_PROB_TOLERANCE = 1e-6
# NLL clips p(gold) below at this value so one zero probability gives a large finite loss, not inf.
NLL_EPS = 1e-12
# Bootstrap resamples are drawn in chunks of at most this many (resample x example) entries,
# which bounds the memory of the vectorised path (~ 8 bytes x 4M x a few temporaries).
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000
# Rows of a probability matrix processed at once (bounds float64 temporaries for vocab-sized rows).
_ROW_CHUNK_ELEMENTS = 8_000_000

DEFINITIONS: dict[str, str] = {
    "accuracy": "accuracy: fraction of examples whose prediction is correct",
    "mean_confidence": "mean confidence: mean over examples of the probability of the predicted answer",
    "ace_paper": (
        "ACE (paper): sort by top-label confidence (stable, ties in example order), 10 equal-count bins "
        "(first N mod 10 bins one larger), unweighted mean over the 10 bins of |accuracy - mean confidence| "
        "(Singh & Sajjad 2025 code)"
    ),
    "ece": (
        "ECE: 15 equal-width confidence bins on [0,1], right-inclusive (lo,hi] with 0 in the first bin, "
        "top-label, mean of |accuracy - mean confidence| weighted by bin count (Guo et al. 2017)"
    ),
    "brier": "Brier: mean over examples of sum over classes of (p_k - y_k)^2, y one-hot gold (range 0..2)",
    "nll": f"NLL: mean over examples of -ln p(gold), p clipped below at {NLL_EPS:g} (nats)",
}


# ---------------------------------------------------------------------------------------------
# input checks


def _as_1d(name: str, values, dtype=np.float64) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per example), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: calibration needs at least one example")
    return arr


def _as_confidence(values) -> np.ndarray:
    conf = _as_1d("confidence", values)
    if not np.all(np.isfinite(conf)):
        raise ValueError("confidence contains NaN or inf")
    if conf.min() < -_PROB_TOLERANCE or conf.max() > 1 + _PROB_TOLERANCE:
        raise ValueError(f"confidence must lie in [0, 1], got values in [{conf.min()}, {conf.max()}]")
    return np.clip(conf, 0.0, 1.0)


def _as_correct(values) -> np.ndarray:
    raw = np.asarray(values)
    if raw.dtype != bool and not np.all(np.isin(raw, (0, 1))):
        raise ValueError("correct must hold only 0/1 or True/False")
    return _as_1d("correct", raw, dtype=np.float64)


def _pair(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = _as_confidence(confidence)
    corr = _as_correct(correct)
    if conf.shape != corr.shape:
        raise ValueError(f"confidence and correct differ in length ({conf.size} vs {corr.size})")
    return conf, corr


def _check_probs_and_gold(prob_matrix, gold_index) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(prob_matrix)
    if probs.ndim != 2:
        raise ValueError(f"prob_matrix must be (n_examples, n_classes), got shape {probs.shape}")
    gold = np.asarray(gold_index)
    if gold.ndim != 1 or gold.shape[0] != probs.shape[0]:
        raise ValueError(f"gold_index must be 1-D with one entry per row of prob_matrix ({probs.shape[0]})")
    if probs.shape[0] == 0:
        raise ValueError("prob_matrix is empty: calibration needs at least one example")
    if not np.issubdtype(gold.dtype, np.integer):
        raise ValueError("gold_index must be integer class indices")
    if gold.min() < 0 or gold.max() >= probs.shape[1]:
        raise ValueError(f"gold_index out of range [0, {probs.shape[1]})")
    return probs, gold.astype(np.int64)


def _row_chunks(n_rows: int, row_len: int):
    step = max(1, _ROW_CHUNK_ELEMENTS // max(1, row_len))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


# ---------------------------------------------------------------------------------------------
# simple means


def accuracy(correct) -> float:
    """Fraction of examples that are correct."""
    return float(_as_correct(correct).mean())


def mean_confidence(conf) -> float:
    """Mean over examples of the probability the model gave to its own answer."""
    return float(_as_confidence(conf).mean())


# ---------------------------------------------------------------------------------------------
# ACE (paper) and ECE; each has a row-batched core so the bootstrap runs without a Python loop


def equal_count_bin_sizes(n: int, n_bins: int) -> np.ndarray:
    """Sizes of `n_bins` equal-count bins over `n` sorted examples: the first n mod n_bins are one larger.

    This is the reference code's rule (`samples_per_bin + (1 if i < total % num_bins else 0)`), and
    the same as `np.array_split`. With n < n_bins the last bins are empty (size 0).
    """
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    base, extra = divmod(n, n_bins)
    return np.array([base + 1] * extra + [base] * (n_bins - extra), dtype=np.int64)


def _ace_paper_rows(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """ACE (paper) of each row of (B, n) arrays."""
    order = np.argsort(conf, axis=1, kind="stable")
    conf_sorted = np.take_along_axis(conf, order, axis=1)
    corr_sorted = np.take_along_axis(correct, order, axis=1)
    sizes = equal_count_bin_sizes(conf.shape[1], n_bins)
    sizes = sizes[sizes > 0]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    bin_conf = np.add.reduceat(conf_sorted, starts, axis=1) / sizes
    bin_acc = np.add.reduceat(corr_sorted, starts, axis=1) / sizes
    # Divided by n_bins, not by the number of non-empty bins: the reference code does so (it differs
    # only when there are fewer examples than bins).
    return np.abs(bin_acc - bin_conf).sum(axis=1) / n_bins


def ace_paper(confidence, correct, n_bins: int = 10) -> float:
    """The reference study's ACE (Singh & Sajjad 2025, `analysis_and_viz/ace.py`), reproduced exactly.

    Definition: sort the examples by top-label confidence; cut the sorted list into `n_bins`
    equal-count bins, the first N mod n_bins bins holding one example more (`np.array_split`
    sizes); in each bin take |accuracy - mean confidence|; ACE = sum of those over bins / n_bins
    (unweighted mean; empty bins, which occur only when N < n_bins, add 0 but still count in the
    divisor, as in the reference code).

    Ties: examples with equal confidence keep their input order (stable sort). The reference used
    pandas' default quicksort, whose order among ties is unspecified; ties matter only when a run of
    equal confidences with mixed correctness straddles a bin boundary.
    """
    conf, corr = _pair(confidence, correct)
    return float(_ace_paper_rows(conf[None, :], corr[None, :], n_bins)[0])


def _ece_bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # Bin b covers (b/n, (b+1)/n]; 0 falls in bin 0. Counting interior edges strictly below x does it.
    # Edges are b/n correctly rounded (not linspace's b*(1/n)), so a confidence of exactly 3/5 is an edge.
    interior = np.arange(1, n_bins) / n_bins
    return np.searchsorted(interior, conf, side="left")


def _ece_rows(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of each row of (B, n) arrays."""
    n_rows, n = conf.shape
    flat_bin = (_ece_bin_index(conf, n_bins) + n_bins * np.arange(n_rows)[:, None]).ravel()
    conf_sum = np.bincount(flat_bin, weights=conf.ravel(), minlength=n_rows * n_bins)
    corr_sum = np.bincount(flat_bin, weights=correct.ravel(), minlength=n_rows * n_bins)
    # (n_b / N) * |acc_b - conf_b| = |sum correct - sum conf over the bin| / N: no division by n_b.
    return np.abs(corr_sum - conf_sum).reshape(n_rows, n_bins).sum(axis=1) / n


def ece(confidence, correct, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017), top-label.

    Bins: `n_bins` equal-width bins on [0, 1], right-inclusive: bin b is (b/n_bins, (b+1)/n_bins],
    and confidence 0 belongs to the first bin. ECE = sum over bins of (count_b / N) *
    |accuracy_b - mean confidence_b|. (torchmetrics puts edge values in the bin above, [lo, hi);
    the two agree unless a confidence lies exactly on an interior edge.)
    """
    conf, corr = _pair(confidence, correct)
    return float(_ece_rows(conf[None, :], corr[None, :], n_bins)[0])


# ---------------------------------------------------------------------------------------------
# proper scoring rules


def brier_per_example(prob_matrix, gold_index) -> np.ndarray:
    """Per-example multi-class Brier score sum_k (p_k - y_k)^2, y one-hot at `gold_index` (float64).

    Computed as sum_k p_k^2 - 2 p_gold + 1, in row chunks so vocabulary-sized rows fit in memory.
    """
    probs, gold = _check_probs_and_gold(prob_matrix, gold_index)
    out = np.empty(probs.shape[0], dtype=np.float64)
    for rows in _row_chunks(probs.shape[0], probs.shape[1]):
        chunk = probs[rows].astype(np.float64)
        p_gold = chunk[np.arange(chunk.shape[0]), gold[rows]]
        out[rows] = np.einsum("ij,ij->i", chunk, chunk) - 2.0 * p_gold + 1.0
    return out


def brier(prob_matrix, gold_index) -> float:
    """Multi-class Brier score: mean over examples of sum_k (p_k - y_k)^2 (range 0..2).

    Equals sklearn's `brier_score_loss(..., scale_by_half=False)`; for two classes it is twice the
    binary Brier score of the positive class.
    """
    return float(brier_per_example(prob_matrix, gold_index).mean())


def brier_binary(prob_positive, label) -> float:
    """Binary Brier score: mean over examples of (p - y)^2, y in {0, 1}.

    `brier_binary(confidence, correct)` is the top-label Brier score.
    """
    p = _as_confidence(prob_positive)
    y = _as_correct(label)
    if p.shape != y.shape:
        raise ValueError(f"prob_positive and label differ in length ({p.size} vs {y.size})")
    return float(np.mean((p - y) ** 2))


def nll_per_example(prob_matrix, gold_index, eps: float = NLL_EPS) -> np.ndarray:
    """Per-example -ln p(gold) in nats, with p(gold) clipped below at `eps` (so p = 0 gives -ln eps)."""
    probs, gold = _check_probs_and_gold(prob_matrix, gold_index)
    p_gold = probs[np.arange(probs.shape[0]), gold].astype(np.float64)
    return -np.log(np.clip(p_gold, eps, 1.0))


def nll(prob_matrix, gold_index, eps: float = NLL_EPS) -> float:
    """Mean negative log-likelihood of the gold class, nats; p(gold) clipped below at `eps`.

    The clip keeps one zero probability (possible after float32 softmax over a vocabulary) from
    making the mean infinite; it caps each example's loss at -ln(eps) (27.6 nats for 1e-12).
    """
    return float(nll_per_example(prob_matrix, gold_index, eps).mean())


# ---------------------------------------------------------------------------------------------
# reliability diagrams


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics for a reliability diagram or table.

    For scheme "width", lo/hi are the bin edges ((lo, hi], 0 in the first bin). For scheme "count",
    they are the smallest and largest confidence inside the bin (the bins of `ace_paper` when
    n_bins=10). Empty bins have count 0 and NaN accuracy / mean_confidence (and NaN lo/hi for "count").
    """

    scheme: str
    lo: np.ndarray
    hi: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    mean_confidence: np.ndarray

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def gap(self) -> np.ndarray:
        """|accuracy - mean confidence| per bin (NaN for empty bins)."""
        return np.abs(self.accuracy - self.mean_confidence)

    def weighted_gap(self) -> float:
        """Count-weighted mean gap: the ECE for scheme "width"."""
        filled = self.count > 0
        return float(np.sum(self.count[filled] * self.gap[filled]) / self.n)

    def rows(self) -> list[dict]:
        """One plain dict per bin (JSON-ready; NaN becomes None)."""

        def clean(x: float):
            return None if np.isnan(x) else float(x)

        return [
            {
                "lo": clean(self.lo[i]),
                "hi": clean(self.hi[i]),
                "count": int(self.count[i]),
                "accuracy": clean(self.accuracy[i]),
                "mean_confidence": clean(self.mean_confidence[i]),
            }
            for i in range(self.count.size)
        ]


def reliability_bins(confidence, correct, n_bins: int = 15, scheme: str = "width") -> ReliabilityBins:
    """Bin examples by confidence: scheme "width" (the ECE bins) or "count" (the ACE-paper bins)."""
    conf, corr = _pair(confidence, correct)
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    if scheme == "width":
        edges = np.arange(n_bins + 1) / n_bins
        idx = _ece_bin_index(conf, n_bins)
        count = np.bincount(idx, minlength=n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.bincount(idx, weights=corr, minlength=n_bins) / count
            mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        return ReliabilityBins("width", edges[:-1].copy(), edges[1:].copy(), count.astype(np.int64), acc, mean_conf)
    if scheme == "count":
        order = np.argsort(conf, kind="stable")
        sizes = equal_count_bin_sizes(conf.size, n_bins)
        lo, hi, acc, mean_conf = (np.full(n_bins, np.nan) for _ in range(4))
        start = 0
        for b, size in enumerate(sizes):
            if size:
                members = order[start : start + size]
                lo[b], hi[b] = conf[members].min(), conf[members].max()
                acc[b], mean_conf[b] = corr[members].mean(), conf[members].mean()
            start += size
        return ReliabilityBins("count", lo, hi, sizes, acc, mean_conf)
    raise ValueError(f"scheme must be 'width' or 'count', got {scheme!r}")


def plot_reliability(
    bins_by_label: Mapping[str, ReliabilityBins],
    path: str | Path,
    title: str | None = None,
    *,
    overlay: bool = False,
) -> Path:
    """Write a PNG reliability diagram for one or more labels (e.g. quant levels) and return its path.

    Side by side (default): one panel per label with the diagonal, accuracy bars spanning each bin,
    a dot at (mean confidence, accuracy) per bin, and a count histogram underneath. `overlay=True`
    draws every label as a line in one panel instead. The file appears only once fully written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not bins_by_label:
        raise ValueError("bins_by_label is empty: nothing to plot")
    labels = list(bins_by_label)
    n_panels = 1 if overlay else len(labels)
    fig, axes = plt.subplots(
        2, n_panels, figsize=(4.2 * n_panels, 5.4), squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]}, sharex=True,
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        bins = bins_by_label[label]
        col = 0 if overlay else i
        top, bottom = axes[0, col], axes[1, col]
        color = colors[i % len(colors)]
        filled = bins.count > 0
        lo, hi = bins.lo[filled], bins.hi[filled]
        # Count bins can be zero-wide (all confidences equal); give them a visible minimum width.
        width = np.maximum(hi - lo, 0.01)
        if overlay:
            top.plot(bins.mean_confidence[filled], bins.accuracy[filled], "o-", color=color,
                     label=f"{label} (n={bins.n}, wgap={bins.weighted_gap():.3f})")
            bottom.bar(lo, bins.count[filled], width=width, align="edge", color=color, alpha=0.35)
        else:
            top.bar(lo, bins.accuracy[filled], width=width, align="edge", color=color, alpha=0.45,
                    edgecolor="black", linewidth=0.5, label="accuracy")
            top.plot(bins.mean_confidence[filled], bins.accuracy[filled], "o", color="black",
                     markersize=3, label="(mean conf, acc)")
            top.set_title(f"{label}\nn={bins.n}, weighted |acc-conf|={bins.weighted_gap():.3f}", fontsize=9)
            bottom.bar(lo, bins.count[filled], width=width, align="edge", color=color, alpha=0.6)
        top.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        bottom.set_xlabel(f"confidence ({bins.scheme} bins)")
        bottom.set_ylabel("count")
        top.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# bootstrap


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _rows_mean(x: np.ndarray) -> np.ndarray:
    return _f64(x).mean(axis=1)


# Vectorised versions of metrics over (n_boot, n) resample matrices, used by bootstrap_ci. Inputs
# were validated by one plain call of the metric; here they only need casting (bool/float32 -> f64).
_BATCHED: dict[Callable, Callable] = {
    accuracy: _rows_mean,
    mean_confidence: _rows_mean,
    np.mean: _rows_mean,
    ace_paper: lambda conf, corr: _ace_paper_rows(_f64(conf), _f64(corr), 10),
    ece: lambda conf, corr: _ece_rows(_f64(conf), _f64(corr), 15),
}


def _mean_left_out(values: np.ndarray) -> np.ndarray:
    """Mean of `values` without entry i, for each i."""
    values = _f64(values)
    return (values.sum() - values) / (values.size - 1)


def _ace_paper_left_out(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """ACE (paper) without example i, for each i, from one sort: O(n log n) instead of n sorts of n - 1.

    Leaving one example out of the stably sorted list leaves the others sorted in the same order, and the
    n - 1 examples' bins have fixed boundaries; so each bin's sums are differences of the full list's prefix
    sums, read one place further on past the left-out position.
    """
    conf, correct = _f64(conf), _f64(correct)
    n = conf.size
    order = np.argsort(conf, kind="stable")
    sizes = equal_count_bin_sizes(n - 1, n_bins)
    edges = np.concatenate(([0], np.cumsum(sizes)))  # boundaries in the list of n - 1
    past = edges[None, :] > np.arange(n)[:, None]  # row p leaves out sorted position p; these edges lie past it

    def bin_sums(values: np.ndarray) -> np.ndarray:
        in_order = values[order]
        prefix = np.concatenate(([0.0], np.cumsum(in_order)))
        at_edges = np.where(past, prefix[edges + 1][None, :] - in_order[:, None], prefix[edges][None, :])
        return np.diff(at_edges, axis=1)

    gaps = bin_sums(correct) - bin_sums(conf)
    filled = sizes > 0
    per_sorted = np.abs(gaps[:, filled] / sizes[filled]).sum(axis=1) / n_bins
    out = np.empty(n)
    out[order] = per_sorted
    return out


def _ece_left_out(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """ECE without example i, for each i: only the left-out example's own bin changes."""
    conf, correct = _f64(conf), _f64(correct)
    bin_index = _ece_bin_index(conf, n_bins)
    gap = np.bincount(bin_index, weights=correct - conf, minlength=n_bins)  # sum correct - sum conf per bin
    total = np.abs(gap).sum()
    own = gap[bin_index]
    return (total - np.abs(own) + np.abs(own - (correct - conf))) / (conf.size - 1)


# Closed forms of the jackknife (the metric without each example in turn) of the metrics in _BATCHED.
_LEFT_OUT: dict[Callable, Callable] = {
    accuracy: _mean_left_out,
    mean_confidence: _mean_left_out,
    np.mean: _mean_left_out,
    ace_paper: _ace_paper_left_out,
    ece: _ece_left_out,
}


def _check_bootstrap(n_boot: int, alpha: float) -> None:
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError("need n_boot >= 1 and 0 < alpha < 1")


def _resamples(n: int, n_boot: int, seed: int):
    """(start, stop, idx) chunks of `n_boot` resamples of `n` example indices drawn with replacement.

    One stream from `np.random.default_rng(seed)`, row after row: the chunking does not change the draws
    (resample b is the b-th `rng.integers(0, n, size=n)`).
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        yield start, stop, rng.integers(0, n, size=(stop - start, n))


def _leave_one_out(n: int):
    """(start, stop, idx) chunks of the n jackknife samples: row i holds every example index but i, in order."""
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // max(1, n - 1))
    cols = np.arange(n - 1)[None, :]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        left_out = np.arange(start, stop)[:, None]
        yield start, stop, cols + (cols >= left_out)


def _resampled_metric(metric_fn: Callable[..., float], vectorised: Callable[..., np.ndarray] | None,
                      data: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """The metric on each resample (row of idx), vectorised when a batched form is known."""
    if vectorised is not None:
        return vectorised(*(a[idx] for a in data))
    return np.array([metric_fn(*(a[row] for a in data)) for row in idx], dtype=np.float64)


def _jackknife(metric_fn: Callable[..., float], vectorised: Callable[..., np.ndarray] | None,
               data: list[np.ndarray], left_out: Callable[..., np.ndarray] | None) -> np.ndarray:
    """The metric with each example left out in turn (n values; empty for n = 1, which has no jackknife).

    `left_out` is a closed form (`_LEFT_OUT`); without one the metric runs on the n leave-one-out samples,
    batched when `vectorised` is given.
    """
    n = data[0].shape[0]
    if n < 2:
        return np.empty(0, dtype=np.float64)
    if left_out is not None:
        return left_out(*data)
    out = np.empty(n, dtype=np.float64)
    for start, stop, idx in _leave_one_out(n):
        out[start:stop] = _resampled_metric(metric_fn, vectorised, data, idx)
    return out


# Differences within this many ulps of the values compared count as rounding (a resample equal to the data
# summed in another order), not as a difference.
_ROUNDING_ULPS = 64


def _bca_interval(replicates: np.ndarray, estimate: float, jackknife: np.ndarray, alpha: float,
                  scale: float = 0.0) -> tuple[float, float]:
    """The BCa interval (Efron 1987) from bootstrap replicates, the point estimate and its jackknife values.

    z0 = Φ⁻¹(share of replicates below the estimate, ties counting half); acceleration a = Σd³ / (6 (Σd²)^1.5)
    with d = mean(jackknife) − jackknife_i; the bounds are the replicates' percentiles (linear interpolation)
    at levels Φ(z0 + (z0 + z)/(1 − a (z0 + z))) for z = Φ⁻¹(alpha/2) and Φ⁻¹(1 − alpha/2). This is
    `scipy.stats.bootstrap(method="BCa")`'s computation, on our resamples. Degenerate cases: a = 0 when the
    jackknife values do not vary (or n = 1); level 0 or 1 past the pole of the level map (1 − a (z0 + z) ≤ 0,
    where the map tends to the near end); the plain percentile interval when every replicate lies on one
    side of the estimate (z0 infinite: no bias correction is defined). A replicate within rounding of the
    estimate (64 ulps of the largest of them and `scale`, the size of the values a difference was taken of)
    counts as a tie: a resampled accuracy change of 31/60 − 29/60 is the same change as 30/60 − 28/60.

    The interval contains the estimate exactly when |z0| <= Φ⁻¹(1 − alpha/2), as the percentile interval
    does: past that, the lower level Φ(z0 + w/(1 − a w)) with w = z0 + Φ⁻¹(alpha/2) >= 0 is at least Φ(z0),
    the estimate's own rank (and symmetrically for the upper one).
    """
    eps = np.finfo(np.float64).eps
    tol = _ROUNDING_ULPS * eps * np.maximum(max(abs(estimate), abs(scale)), np.abs(replicates))
    below = np.count_nonzero(replicates < estimate - tol)
    ties = np.count_nonzero(np.abs(replicates - estimate) <= tol)
    share = (below + ties / 2) / replicates.size
    if share <= 0.0 or share >= 1.0:
        return tuple(float(v) for v in np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    z0 = float(ndtri(share))
    accel = 0.0
    if jackknife.size:
        d = jackknife.mean() - jackknife
        if np.max(np.abs(d)) > _ROUNDING_ULPS * eps * max(abs(scale), float(np.max(np.abs(jackknife)))):
            accel = float(np.sum(d**3) / (6.0 * np.sum(d**2) ** 1.5))
    w = z0 + ndtri(np.array([alpha / 2, 1 - alpha / 2]))
    denom = 1.0 - accel * w
    inside = denom > 0
    levels = np.where(inside, ndtr(z0 + w / np.where(inside, denom, 1.0)), (w > 0).astype(np.float64))
    return tuple(float(v) for v in np.percentile(replicates, 100 * levels))


def _arrays(arrays, what: str) -> list[np.ndarray]:
    if not arrays:
        raise ValueError(f"{what} needs at least one array")
    data = [np.asarray(a) for a in arrays]
    n = data[0].shape[0]
    if n == 0 or any(a.shape[0] != n for a in data):
        raise ValueError("arrays must be non-empty and share their first dimension")
    return data


BOOTSTRAP_INTERVAL_DEFINITION = (
    "95% bootstrap interval, bias-corrected and accelerated (BCa, Efron 1987): the resampled values' percentiles "
    "at levels shifted by the share of resamples below the value (bias) and by the jackknife skewness "
    "(acceleration). Like the percentile interval it leaves the value out when fewer than 2.5% of the resamples "
    "fall on one side of it (the bias then exceeds the spread), and it then lies beyond the value, towards the "
    "bias-corrected one"
)


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    batched_fn: Callable[..., np.ndarray] | None = None,
) -> tuple[float, float]:
    """BCa bootstrap interval (Efron 1987) of `metric_fn(*arrays)` at coverage 1 - alpha.

    Each resample draws N example indices with replacement from `np.random.default_rng(seed)` and
    applies them to every array's first axis together (examples stay paired). The interval is the
    bias-corrected and accelerated one (`_bca_interval`): the resampled values' percentiles at levels
    moved from (alpha/2, 1 - alpha/2) by the share of resamples below the point value and by the
    acceleration from the jackknife (the metric with each example left out). The metric is evaluated
    without a Python loop when a vectorised form is known: `batched_fn`, given arrays with a leading
    resample axis, must return one value per resample (and is used on the leave-one-out samples
    too); `accuracy`, `mean_confidence`, `np.mean`, `ace_paper` and `ece` (default bin counts) have
    built-in vectorised forms and closed forms of their jackknife. Any other metric is called once
    per resample and once per left-out example.

    Why BCa: ACE and ECE are biased upward on small samples (a resample repeats examples, and |accuracy
    - confidence| per bin only grows with the noise), so the plain percentile interval can sit almost
    wholly above the point value (F16 ACE 0.179 with percentile interval [0.172, 0.410] on 30 BoolQ
    questions of the demo model), and can even exclude it. BCa moves the levels by the bias the
    resamples show; it falls back to the percentile interval only when every resample lies on one side
    of the value. It does not make the interval contain the value: it excludes it exactly when the
    percentile interval does (fewer than alpha/2 of the resamples on one side), and then lies further
    beyond it, towards the bias-corrected value. Compare two levels with `paired_bootstrap_delta`,
    never by overlap of these.
    """
    data = _arrays(arrays, "bootstrap_ci")
    _check_bootstrap(n_boot, alpha)
    vectorised = batched_fn if batched_fn is not None else _BATCHED.get(metric_fn)
    left_out = None if batched_fn is not None else _LEFT_OUT.get(metric_fn)
    estimate = float(metric_fn(*data))  # first, on the data as given: its input checks raise here, not mid-bootstrap
    stats = np.empty(n_boot, dtype=np.float64)
    for start, stop, idx in _resamples(data[0].shape[0], n_boot, seed):
        stats[start:stop] = _resampled_metric(metric_fn, vectorised, data, idx)
    return _bca_interval(stats, estimate, _jackknife(metric_fn, vectorised, data, left_out), alpha)


def paired_bootstrap_delta(
    metric_fn: Callable[..., float],
    reference: Sequence,
    level: Sequence,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    batched_fn: Callable[..., np.ndarray] | None = None,
) -> tuple[float, float | None, float | None]:
    """metric(level) - metric(reference) over the same examples, with its paired percentile bootstrap interval.

    `reference` and `level` are the metric's arguments (tuples of arrays) for the two models, one entry
    per example, the same examples in the same order. Each resample draws N example indices once
    (`np.random.default_rng(seed)`, the same draws as `bootstrap_ci`) and evaluates the metric on both
    models' arrays at those indices; the interval is the (alpha/2, 1 - alpha/2) percentiles of the
    differences. Because both levels see the same resample, the example-to-example variation they share
    cancels (which two separate intervals, compared for overlap, cannot do), and the upward small-sample
    bias of ACE/ECE, which both levels share, largely cancels too (on 30 examples, in simulation: +0.047
    for one level's resampled ACE, +0.001 on average for the difference). Returns (value, ci_low,
    ci_high); with n_boot=0 the bounds are None.
    """
    ref, cur = _arrays(reference, "paired_bootstrap_delta"), _arrays(level, "paired_bootstrap_delta")
    if len(ref) != len(cur) or ref[0].shape[0] != cur[0].shape[0]:
        raise ValueError(f"reference and level must hold the same arguments over the same examples "
                         f"({len(ref)} arrays of {ref[0].shape[0]} vs {len(cur)} of {cur[0].shape[0]})")
    value = float(metric_fn(*cur)) - float(metric_fn(*ref))  # also runs the metric's input checks
    if n_boot == 0:
        return value, None, None
    _check_bootstrap(n_boot, alpha)
    vectorised = batched_fn if batched_fn is not None else _BATCHED.get(metric_fn)
    deltas = np.empty(n_boot, dtype=np.float64)
    for start, stop, idx in _resamples(ref[0].shape[0], n_boot, seed):
        deltas[start:stop] = (_resampled_metric(metric_fn, vectorised, cur, idx)
                              - _resampled_metric(metric_fn, vectorised, ref, idx))
    low, high = np.percentile(deltas, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return value, float(low), float(high)


PAIRED_DELTA_DEFINITION = (
    "Δ metric = metric(level) − metric(reference) on the same examples; 95% paired percentile bootstrap: each "
    "resample draws the example indices once and evaluates both levels on it (significant: the interval excludes 0)"
)


def paired_deltas(
    ref_confidence,
    ref_correct,
    confidence,
    correct,
    *,
    ref_prob_matrix=None,
    prob_matrix=None,
    gold_index=None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Every metric of `calibration_summary`, level minus reference, each with its paired bootstrap interval.

    confidence/correct per example for each model (same examples, same order); with both probability
    matrices and the gold index, Brier and NLL too. Returns {metric: {"value", "ci_low", "ci_high"}} for
    accuracy, mean_confidence, ace_paper, ece (and brier, nll), all from the same resamples
    (PAIRED_DELTA_DEFINITION).
    """
    ref_conf, ref_corr = _pair(ref_confidence, ref_correct)
    conf, corr = _pair(confidence, correct)
    if conf.shape != ref_conf.shape:
        raise ValueError(f"the two models cover different numbers of examples ({ref_conf.size} vs {conf.size})")
    plan: dict[str, tuple[Callable, tuple, tuple]] = {
        "accuracy": (accuracy, (ref_corr,), (corr,)),
        "mean_confidence": (mean_confidence, (ref_conf,), (conf,)),
        "ace_paper": (ace_paper, (ref_conf, ref_corr), (conf, corr)),
        "ece": (ece, (ref_conf, ref_corr), (conf, corr)),
    }
    if ref_prob_matrix is not None and prob_matrix is not None and gold_index is not None:
        plan["brier"] = (np.mean, (brier_per_example(ref_prob_matrix, gold_index),),
                         (brier_per_example(prob_matrix, gold_index),))
        plan["nll"] = (np.mean, (nll_per_example(ref_prob_matrix, gold_index),), (nll_per_example(prob_matrix, gold_index),))
    out: dict = {}
    for name, (fn, ref_args, args) in plan.items():
        value, low, high = paired_bootstrap_delta(fn, ref_args, args, n_boot=n_boot, alpha=alpha, seed=seed)
        out[name] = {"value": value, "ci_low": low, "ci_high": high}
    return out


# ---------------------------------------------------------------------------------------------
# the summary eval uses


def calibration_summary(
    prob_matrix,
    gold_index,
    pred_index=None,
    confidence=None,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    correct=None,
    alpha: float = 0.05,
) -> dict:
    """All calibration metrics of one run, each with a BCa bootstrap interval (`bootstrap_ci`).

    prob_matrix (n, k) and gold_index (n,) feed Brier and NLL. The prediction defaults to the
    argmax of each row and its confidence to that row's probability; pass `pred_index` /
    `confidence` when they come from elsewhere (paper mode: argmax over the full vocabulary), and
    `correct` when correctness is not `pred_index == gold_index` (paper mode: substring match).

    Returns {"n", "n_boot", "alpha", "seed", "interval" (BOOTSTRAP_INTERVAL_DEFINITION), "definitions",
    and for each of accuracy, mean_confidence, ace_paper, ece, brier, nll: {"value", "ci_low",
    "ci_high"}}. All intervals use the same resamples (same seed). With n_boot=0 the intervals are None.
    """
    probs, gold = _check_probs_and_gold(prob_matrix, gold_index)
    n = probs.shape[0]
    if pred_index is None:
        pred = np.argmax(probs, axis=1)
    else:
        pred = np.asarray(pred_index, dtype=np.int64)
        if pred.shape != (n,):
            raise ValueError(f"pred_index must have one entry per example ({n})")
    if confidence is None:
        if pred.min() < 0 or pred.max() >= probs.shape[1]:
            raise ValueError("pred_index out of range of prob_matrix columns; pass confidence explicitly")
        confidence = probs[np.arange(n), pred]
    conf = _as_confidence(confidence)
    corr = _as_correct(pred == gold if correct is None else correct)
    if conf.shape != (n,) or corr.shape != (n,):
        raise ValueError(f"confidence and correct must have one entry per example ({n})")

    per_example_brier = brier_per_example(probs, gold)
    per_example_nll = nll_per_example(probs, gold)
    plan = {
        "accuracy": (accuracy, (corr,)),
        "mean_confidence": (mean_confidence, (conf,)),
        "ace_paper": (ace_paper, (conf, corr)),
        "ece": (ece, (conf, corr)),
        "brier": (np.mean, (per_example_brier,)),
        "nll": (np.mean, (per_example_nll,)),
    }
    summary: dict = {
        "n": int(n),
        "n_boot": int(n_boot),
        "alpha": float(alpha),
        "seed": int(seed),
        "interval": BOOTSTRAP_INTERVAL_DEFINITION,
        "definitions": {name: DEFINITIONS[name] for name in plan},
    }
    for name, (fn, arrays) in plan.items():
        value = float(fn(*arrays))
        if n_boot > 0:
            low, high = bootstrap_ci(fn, *arrays, n_boot=n_boot, alpha=alpha, seed=seed)
        else:
            low = high = None
        summary[name] = {"value": value, "ci_low": low, "ci_high": high}
    return summary
