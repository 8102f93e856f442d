"""Calibration metrics against hand arithmetic and independent implementations.

Independent references: plain-Python loops over lists (ACE as the reference study's code defines it,
ECE bin by bin), scikit-learn (brier_score_loss, log_loss), torchmetrics (binary/multiclass
calibration error; slow only because importing torch takes seconds), the normal approximation
for a proportion's confidence interval, scipy.stats.bootstrap(method="BCa") on its own resamples, and
the BCa interval written out from its definition (tests/bca_reference.py) on ours.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats

from bca_reference import bca_written_out, leave_one_out
from ggml_probe.analysis import calibration as cal


# ---------------------------------------------------------------------------------------------
# independent implementations written with Python lists


def ace_reference_loop(conf, correct, num_bins=10):
    """The study's ACE, re-derived with lists: Python's sorted() is stable, like our argsort."""
    pairs = sorted(zip(list(conf), list(correct)), key=lambda pair: pair[0])
    total = len(pairs)
    per_bin, extra = total // num_bins, total % num_bins
    gaps_sum, start = 0.0, 0
    for i in range(num_bins):
        end = start + per_bin + (1 if i < extra else 0)
        chunk = pairs[start:end]
        if chunk:
            acc = sum(float(c) for _, c in chunk) / len(chunk)
            mean_conf = sum(p for p, _ in chunk) / len(chunk)
            gaps_sum += abs(acc - mean_conf)
        start = end
    return gaps_sum / num_bins


def ece_reference_loop(conf, correct, n_bins=15):
    """ECE bin by bin with explicit membership tests: (lo, hi], and 0 joins the first bin."""
    total = 0.0
    conf, correct = list(conf), list(correct)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [(c, k) for c, k in zip(conf, correct) if lo < c <= hi or (b == 0 and c == 0.0)]
        if members:
            acc = sum(float(k) for _, k in members) / len(members)
            mean_conf = sum(c for c, _ in members) / len(members)
            total += len(members) * abs(acc - mean_conf)
    return total / len(conf)


def random_run(rng, n, n_classes=2, sharpness=2.0):
    """Probabilities from random logits and gold labels drawn so the model is roughly calibrated."""
    logits = rng.normal(scale=sharpness, size=(n, n_classes))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    gold = np.array([rng.choice(n_classes, p=row) for row in probs])
    return probs, gold


# ---------------------------------------------------------------------------------------------
# accuracy / confidence


def test_accuracy_and_mean_confidence_by_hand():
    assert cal.accuracy([1, 0, 1, 1]) == 0.75  # 3 of 4
    assert cal.accuracy(np.array([True, False])) == 0.5
    assert cal.mean_confidence([0.9, 0.6, 0.3]) == pytest.approx(0.6)  # 1.8 / 3


def test_inputs_are_checked():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cal.ece([0.5, 1.2], [1, 0])
    with pytest.raises(ValueError, match="differ in length"):
        cal.ace_paper([0.5, 0.7], [1])
    with pytest.raises(ValueError, match="0/1"):
        cal.accuracy([0, 2])
    with pytest.raises(ValueError, match="out of range"):
        cal.brier([[0.5, 0.5]], [2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # the vectorised bootstrap checks inputs too
        cal.bootstrap_ci(cal.ece, np.array([0.5, 1.5]), np.array([1, 0]))


# ---------------------------------------------------------------------------------------------
# ACE (paper)


def test_equal_count_bin_sizes_follow_array_split_and_the_reference_rule():
    for n in [0, 1, 7, 9, 10, 11, 23, 299, 300, 3001]:
        for k in [1, 3, 10, 15]:
            sizes = cal.equal_count_bin_sizes(n, k)
            assert sizes.tolist() == [len(part) for part in np.array_split(np.arange(n), k)]
            # the reference's rule, spelled out: first n mod k bins hold n // k + 1
            assert sizes.tolist() == [n // k + (1 if i < n % k else 0) for i in range(k)]
            assert sizes.sum() == n


def test_ace_paper_by_hand():
    conf = [0.9, 0.1, 0.6, 0.3, 0.8, 0.4, 0.7]
    correct = [1, 0, 1, 1, 0, 0, 1]
    # sorted: 0.1(0) 0.3(1) 0.4(0) | 0.6(1) 0.7(1) | 0.8(0) 0.9(1)   sizes 3,2,2 (7 = 3*2 + 1)
    # gaps:   |1/3 - 0.8/3| = 0.2/3     |1 - 0.65| = 0.35    |0.5 - 0.85| = 0.35
    # ACE = (0.2/3 + 0.7) / 3 = 2.3 / 9
    assert cal.ace_paper(conf, correct, n_bins=3) == pytest.approx(2.3 / 9, abs=1e-15)


def test_ace_paper_divides_by_n_bins_like_the_reference_when_bins_are_empty():
    # 4 examples, 10 bins: sizes 1,1,1,1,0,...; gaps 0.2, 0.6, 0.4, 0.2 sum to 1.4;
    # the reference divides by 10 (not by the 4 non-empty bins, which would give 0.35)
    assert cal.ace_paper([0.2, 0.4, 0.6, 0.8], [0, 1, 1, 1]) == pytest.approx(0.14, abs=1e-15)


def test_ace_paper_ties_keep_example_order():
    # The 0.5 pair straddles the boundary of 2 bins of 2; stable sort keeps input order.
    # correct [0,1,0,1]: bins (0.3:0, 0.5:1) and (0.5:0, 0.9:1): gaps |0.5-0.4|, |0.5-0.7| -> 0.15
    assert cal.ace_paper([0.3, 0.5, 0.5, 0.9], [0, 1, 0, 1], n_bins=2) == pytest.approx(0.15)
    # swap the tied pair's outcomes: bins (0.3:0, 0.5:0), (0.5:1, 0.9:1): gaps 0.4, 0.3 -> 0.35
    assert cal.ace_paper([0.3, 0.5, 0.5, 0.9], [0, 0, 1, 1], n_bins=2) == pytest.approx(0.35)


@pytest.mark.parametrize("n", [5, 10, 37, 300, 1001])
def test_ace_paper_matches_list_loop_on_random_data_with_ties(n):
    rng = np.random.default_rng(n)
    conf = np.round(rng.uniform(0.3, 1.0, n), 2)  # rounding makes many ties
    correct = rng.uniform(size=n) < conf
    for k in (10, 7):
        assert cal.ace_paper(conf, correct, n_bins=k) == pytest.approx(
            ace_reference_loop(conf, correct, k), abs=1e-12
        )


# ---------------------------------------------------------------------------------------------
# ECE


def test_ece_by_hand_and_edge_convention():
    # 5 bins, edges 0 .2 .4 .6 .8 1, right-inclusive:
    #   0.0 -> bin0 (gap 0), 0.4 -> bin1 (|1 - 0.4| = 0.6), 0.5 -> bin2 (|0 - 0.5| = 0.5), 1.0 -> bin4 (0)
    #   ECE = (1*0 + 1*0.6 + 1*0.5 + 1*0) / 4 = 0.275
    # (left-inclusive bins would put 0.4 and 0.5 together: |1 - 0.9| / 4 = 0.025)
    conf, correct = [0.0, 0.4, 0.5, 1.0], [0, 1, 0, 1]
    assert cal.ece(conf, correct, n_bins=5) == pytest.approx(0.275, abs=1e-15)
    bins = cal.reliability_bins(conf, correct, n_bins=5, scheme="width")
    assert bins.count.tolist() == [1, 1, 1, 0, 1]
    assert np.isnan(bins.accuracy[3])


def test_ece_matches_list_loop_including_values_on_edges():
    rng = np.random.default_rng(7)
    for n_bins in (15, 10, 4):
        conf = np.concatenate([rng.uniform(size=500), np.arange(n_bins + 1) / n_bins, [0.0, 1.0]])
        correct = rng.uniform(size=conf.size) < conf
        assert cal.ece(conf, correct, n_bins) == pytest.approx(
            ece_reference_loop(conf, correct, n_bins), abs=1e-12
        )


@pytest.mark.slow
def test_ece_matches_torchmetrics():
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.functional.classification")
    rng = np.random.default_rng(3)
    probs, gold = random_run(rng, 2000, n_classes=4)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    # torchmetrics bins are [lo, hi); they agree with ours unless a value sits on an interior edge
    assert not np.any(np.isin(np.round(conf * 15, 12), np.arange(16)))
    expected_mc = tm.multiclass_calibration_error(
        torch.tensor(probs), torch.tensor(gold), num_classes=4, n_bins=15, norm="l1"
    ).item()
    # (torchmetrics' multiclass path casts confidences to float32, hence the looser tolerance)
    assert cal.ece(conf, pred == gold) == pytest.approx(expected_mc, abs=1e-6)
    # the binary form with (confidence, correct) is the same top-label ECE
    expected_bin = tm.binary_calibration_error(
        torch.tensor(conf), torch.tensor((pred == gold).astype(np.int64)), n_bins=10, norm="l1"
    ).item()
    assert cal.ece(conf, pred == gold, n_bins=10) == pytest.approx(expected_bin, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Brier and NLL


def test_brier_and_nll_by_hand():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]]
    gold = [0, 2]
    # (0.7-1)^2 + 0.2^2 + 0.1^2 = 0.09 + 0.04 + 0.01 = 0.14;  0.1^2 + 0.5^2 + (0.4-1)^2 = 0.62
    assert cal.brier(probs, gold) == pytest.approx((0.14 + 0.62) / 2, abs=1e-15)
    # (-ln 0.7 - ln 0.4) / 2 = ln(1 / 0.28) / 2
    assert cal.nll(probs, gold) == pytest.approx(math.log(1 / 0.28) / 2, abs=1e-15)
    # binary: ((0.9-1)^2 + (0.2-0)^2) / 2 = (0.01 + 0.04) / 2
    assert cal.brier_binary([0.9, 0.2], [1, 0]) == pytest.approx(0.025, abs=1e-15)


def test_nll_clips_zero_probability():
    assert cal.nll([[1.0, 0.0]], [1]) == pytest.approx(-math.log(1e-12))
    assert cal.nll([[1.0, 0.0]], [1], eps=1e-6) == pytest.approx(-math.log(1e-6))


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_brier_and_nll_match_sklearn(n_classes):
    from sklearn.metrics import brier_score_loss, log_loss

    rng = np.random.default_rng(n_classes)
    probs, gold = random_run(rng, 400, n_classes)
    labels = list(range(n_classes))
    assert cal.brier(probs, gold) == pytest.approx(
        brier_score_loss(gold, probs, labels=labels, scale_by_half=False), rel=1e-12
    )
    assert cal.nll(probs, gold) == pytest.approx(log_loss(gold, probs, labels=labels), rel=1e-12)
    if n_classes == 2:
        # sklearn's default binary Brier is ours for the positive class, and half the multi-class sum
        assert cal.brier_binary(probs[:, 1], gold) == pytest.approx(brier_score_loss(gold, probs[:, 1]), rel=1e-12)
        assert cal.brier(probs, gold) == pytest.approx(2 * cal.brier_binary(probs[:, 1], gold), rel=1e-12)


def test_brier_on_vocabulary_sized_rows_in_float32():
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=3, size=(200, 49152)).astype(np.float32)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    gold = rng.integers(0, 49152, 200)
    one_hot = np.zeros(probs.shape)
    one_hot[np.arange(200), gold] = 1.0
    # direct definition on the float64 matrix; ours goes through row chunks and sum p^2 - 2 p_gold + 1
    expected = np.mean(np.sum((probs.astype(np.float64) - one_hot) ** 2, axis=1))
    assert cal.brier(probs, gold) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# reliability bins and plots


def test_reliability_bins_reproduce_ece_and_ace():
    rng = np.random.default_rng(5)
    conf = rng.uniform(0.4, 1.0, 333)
    correct = rng.uniform(size=333) < conf**2
    width = cal.reliability_bins(conf, correct, n_bins=15, scheme="width")
    assert width.n == 333
    assert width.weighted_gap() == pytest.approx(cal.ece(conf, correct), abs=1e-12)
    count = cal.reliability_bins(conf, correct, n_bins=10, scheme="count")
    assert count.count.tolist() == [34, 34, 34, 33, 33, 33, 33, 33, 33, 33]
    assert np.mean(count.gap) == pytest.approx(cal.ace_paper(conf, correct), abs=1e-12)
    # count bins are sorted and non-overlapping
    assert np.all(count.hi[:-1] <= count.lo[1:])
    rows = count.rows()
    assert len(rows) == 10 and rows[0]["count"] == 34 and rows[0]["lo"] == pytest.approx(conf.min())


def test_plot_reliability_writes_a_png(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(2)
    conf = rng.uniform(0.5, 1.0, 300)
    by_level = {
        "F16": cal.reliability_bins(conf, rng.uniform(size=300) < conf, n_bins=10),
        "Q4_0": cal.reliability_bins(conf, rng.uniform(size=300) < conf - 0.1, n_bins=10, scheme="count"),
    }
    for overlay in (False, True):
        path = tmp_path / f"rel-{overlay}.png"
        assert cal.plot_reliability(by_level, path, "BoolQ reliability", overlay=overlay) == path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[1] > image.shape[0] * (1.2 if not overlay else 0.5)
        assert image[..., :3].std() > 0.05  # something was drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel-False.png", "rel-True.png"]


# ---------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_accuracy_interval_matches_normal_approximation():
    rng = np.random.default_rng(0)
    correct = rng.uniform(size=3000) < 0.7
    acc = cal.accuracy(correct)
    low, high = cal.bootstrap_ci(cal.accuracy, correct)
    assert low < acc < high
    # Wald interval half-width 1.96 * sqrt(p (1-p) / n); the BCa bootstrap is within ~10% at n = 3000
    wald = 2 * 1.96 * math.sqrt(acc * (1 - acc) / correct.size)
    assert high - low == pytest.approx(wald, rel=0.12)


def test_bootstrap_width_shrinks_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (200, 5000):
        conf = rng.uniform(0.5, 1.0, n)
        correct = rng.uniform(size=n) < conf
        low, high = cal.bootstrap_ci(cal.accuracy, correct)
        widths.append(high - low)
        low, high = cal.bootstrap_ci(cal.ece, conf, correct)
        widths.append(high - low)
    # 25x the examples: intervals shrink ~5x (sqrt n); demand at least 3x for both metrics
    assert widths[2] < widths[0] / 3 and widths[3] < widths[1] / 3


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(4)
    conf = rng.uniform(0.5, 1.0, 500)
    correct = rng.uniform(size=500) < conf
    first = cal.bootstrap_ci(cal.ace_paper, conf, correct, seed=123)
    assert cal.bootstrap_ci(cal.ace_paper, conf, correct, seed=123) == first
    assert cal.bootstrap_ci(cal.ace_paper, conf, correct, seed=124) != first


@pytest.mark.parametrize("metric", [cal.ace_paper, cal.ece, cal.accuracy])
def test_bootstrap_vectorised_path_equals_per_resample_loop(metric):
    rng = np.random.default_rng(9)
    conf = np.round(rng.uniform(0.5, 1.0, 400), 2)
    correct = rng.uniform(size=400) < conf
    args = (correct,) if metric is cal.accuracy else (conf, correct)
    fast = cal.bootstrap_ci(metric, *args, n_boot=300, seed=5)
    # a lambda is not in the table of vectorised metrics, so it is called once per resample
    slow = cal.bootstrap_ci(lambda *a: metric(*a), *args, n_boot=300, seed=5)
    assert fast == pytest.approx(slow, abs=1e-12)


@pytest.mark.parametrize("metric", ["mean", "ace"])
def test_bootstrap_ci_is_the_bca_interval_of_explicit_resamples(metric):
    # The definition spelled out: resample rows of the Generator's integers, leave each example out,
    # and take the replicates' percentiles at the BCa levels (bca_reference, lists and NormalDist).
    rng = np.random.default_rng(8)
    if metric == "mean":  # skewed, so the acceleration is not 0
        fn, loop, args = np.mean, lambda xs: sum(xs) / len(xs), (rng.exponential(size=250),)
    else:
        conf = rng.uniform(0.5, 1.0, 250)
        fn, loop, args = cal.ace_paper, ace_reference_loop, (conf, rng.uniform(size=250) < conf - 0.1)
    idx = np.random.default_rng(17).integers(0, 250, size=(400, 250))
    replicates = [loop(*[list(a[row]) for a in args]) for row in idx]
    jackknife = leave_one_out(loop, [list(a) for a in args])
    expected = bca_written_out(replicates, loop(*[list(a) for a in args]), jackknife, alpha=0.1)
    assert cal.bootstrap_ci(fn, *args, n_boot=400, alpha=0.1, seed=17) == pytest.approx(expected, abs=1e-12)
    # and it is not the percentile interval of the same replicates
    assert np.max(np.abs(np.subtract(expected, np.percentile(replicates, [5, 95])))) > 1e-3


@pytest.mark.parametrize("metric", ["ace", "ece", "mean"])
def test_jackknife_closed_forms_equal_leaving_each_example_out(metric):
    # ties in confidence (rounded), fewer examples than bins, one more, and a few hundred
    loop = {"ace": ace_reference_loop, "ece": ece_reference_loop, "mean": lambda xs: sum(xs) / len(xs)}[metric]
    fn = {"ace": cal.ace_paper, "ece": cal.ece, "mean": cal.mean_confidence}[metric]
    for n in (2, 7, 11, 16, 301):
        rng = np.random.default_rng(n)
        conf = np.round(rng.uniform(0.5, 1.0, n), 1)
        args = (conf,) if metric == "mean" else (conf, rng.uniform(size=n) < conf)
        got = cal._LEFT_OUT[fn](*args)
        assert got == pytest.approx(leave_one_out(loop, [list(a) for a in args]), abs=1e-12), n


# scipy draws its own resamples, so its bounds and ours differ by Monte-Carlo error. Measured over repeated
# seeds at 20000 resamples, each side's bounds vary by at most 0.06 standard errors of the statistic (the
# standard deviation of the resampled values), so their difference by about 0.085; 0.25 is three of those.
# The percentile interval is further than that from BCa in each case below, so the check tells them apart.
SCIPY_RESAMPLES = 20_000
MONTE_CARLO_TOLERANCE = 0.25  # in standard errors


def _scipy_bca(statistic, arrays):
    result = scipy.stats.bootstrap(arrays, statistic, paired=True, vectorized=False, method="BCa",
                                   n_resamples=SCIPY_RESAMPLES, rng=np.random.default_rng(1))
    interval = (result.confidence_interval.low, result.confidence_interval.high)
    percentile = tuple(np.percentile(result.bootstrap_distribution, [2.5, 97.5]))
    return interval, percentile, result.standard_error


def _calibration_sample(seed, n):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.5, 1.0, n)
    return conf, rng.uniform(size=n) < conf - 0.1  # overconfident by 0.1


@pytest.mark.parametrize("case", ["skewed mean", "ace", pytest.param("ece", marks=pytest.mark.slow)])
def test_bootstrap_ci_agrees_with_scipy_bca(case):
    fn, loop, args = {
        "skewed mean": (np.mean, lambda x: float(np.mean(x)), (np.random.default_rng(101).exponential(size=40),)),
        "ace": (cal.ace_paper, ace_reference_loop, _calibration_sample(7, 150)),
        "ece": (cal.ece, ece_reference_loop, _calibration_sample(7, 150)),
    }[case]
    expected, percentile, se = _scipy_bca(loop, args)
    got = cal.bootstrap_ci(fn, *args, n_boot=SCIPY_RESAMPLES)
    assert got == pytest.approx(expected, abs=MONTE_CARLO_TOLERANCE * se)
    assert np.max(np.abs(np.subtract(percentile, expected))) > MONTE_CARLO_TOLERANCE * se


def test_bootstrap_degenerate_cases_fall_back_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # every resample equals the value, and the jackknife does not vary
        assert cal.bootstrap_ci(np.mean, np.full(20, 0.7), n_boot=200) == pytest.approx((0.7, 0.7))
        assert cal.paired_bootstrap_delta(cal.accuracy, (np.ones(12),), (np.ones(12),), n_boot=200) == (0.0, 0.0, 0.0)
        # one example: no jackknife
        assert cal.bootstrap_ci(cal.accuracy, np.array([1]), n_boot=50) == (1.0, 1.0)
        # every resample below the value (a resample of 20 distinct values almost surely repeats one):
        # z0 is infinite, so the interval is the percentile one
        distinct = lambda x: float(len(set(x.tolist())))  # noqa: E731
        values = np.arange(20.0)
        replicates = [distinct(values[row]) for row in np.random.default_rng(3).integers(0, 20, size=(300, 20))]
        assert max(replicates) < 20
        assert cal.bootstrap_ci(distinct, values, n_boot=300, seed=3) == pytest.approx(
            tuple(np.percentile(replicates, [2.5, 97.5])))
        # past the pole of the level map (1 - a (z0 + z) <= 0, here for the lower level): that level is 0
        replicates = np.arange(100_000) / 100_000
        jackknife = np.r_[np.zeros(999), 1.0]  # one outlier: a close to -1/6
        low, high = cal._bca_interval(replicates, 1.5e-5, jackknife, 0.05)
        assert low == 0.0 and 0.0 <= high < 1e-4


def _two_levels(rng, n, flips=None):
    """A reference and a level that answers like it except for a few examples (paired, as quant levels are)."""
    ref_conf = rng.uniform(0.5, 1.0, n)
    ref_correct = rng.uniform(size=n) < ref_conf
    conf = np.clip(ref_conf + rng.normal(scale=0.05, size=n), 0.5, 1.0)
    correct = ref_correct.copy()
    flip = rng.choice(n, size=flips or max(1, n // 10), replace=False)
    correct[flip] = ~correct[flip]
    return ref_conf, ref_correct, conf, correct


def _paired_loop(metric, ref_args, args, n_boot, seed, alpha=0.05):
    """The paired bootstrap written out with the list references: one index draw, both levels on it."""
    rng = np.random.default_rng(seed)
    n = len(ref_args[0])
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        deltas.append(metric(*[[a[i] for i in idx] for a in args]) - metric(*[[a[i] for i in idx] for a in ref_args]))
    low, high = np.percentile(deltas, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return metric(*args) - metric(*ref_args), low, high


@pytest.mark.parametrize("name", ["ace", "ece", "accuracy", "confidence"])
def test_paired_bootstrap_delta_matches_a_plain_loop(name):
    rng = np.random.default_rng(21)
    ref_conf, ref_correct, conf, correct = _two_levels(rng, 60)
    mean = lambda xs: sum(float(x) for x in xs) / len(xs)  # noqa: E731
    fn, loop, ref_args, args = {
        "ace": (cal.ace_paper, ace_reference_loop, (ref_conf, ref_correct), (conf, correct)),
        "ece": (cal.ece, ece_reference_loop, (ref_conf, ref_correct), (conf, correct)),
        "accuracy": (cal.accuracy, mean, (ref_correct,), (correct,)),
        "confidence": (cal.mean_confidence, mean, (ref_conf,), (conf,)),
    }[name]
    got = cal.paired_bootstrap_delta(fn, ref_args, args, n_boot=300, seed=7)
    assert got == pytest.approx(_paired_loop(loop, ref_args, args, 300, 7), abs=1e-12)


def test_paired_deltas_cover_every_metric_with_the_same_resamples():
    rng = np.random.default_rng(22)
    ref_probs, gold = random_run(rng, 50)
    probs = np.clip(ref_probs + rng.normal(scale=0.05, size=ref_probs.shape), 1e-3, None)
    probs /= probs.sum(axis=1, keepdims=True)
    ref_pred, pred = ref_probs.argmax(axis=1), probs.argmax(axis=1)
    out = cal.paired_deltas(ref_probs.max(axis=1), ref_pred == gold, probs.max(axis=1), pred == gold,
                            ref_prob_matrix=ref_probs, prob_matrix=probs, gold_index=gold, n_boot=200, seed=3)
    assert set(out) == {"accuracy", "mean_confidence", "ace_paper", "ece", "brier", "nll"}
    brier = lambda p: [sum((p[i, k] - (k == gold[i])) ** 2 for k in range(p.shape[1])) for i in range(len(gold))]  # noqa: E731
    nll = lambda p: [-math.log(p[i, gold[i]]) for i in range(len(gold))]  # noqa: E731
    mean = lambda xs: sum(float(x) for x in xs) / len(xs)  # noqa: E731
    expected = {
        "accuracy": (mean, (ref_pred == gold,), (pred == gold,)),
        "mean_confidence": (mean, (ref_probs.max(axis=1),), (probs.max(axis=1),)),
        "ace_paper": (ace_reference_loop, (ref_probs.max(axis=1), ref_pred == gold), (probs.max(axis=1), pred == gold)),
        "ece": (ece_reference_loop, (ref_probs.max(axis=1), ref_pred == gold), (probs.max(axis=1), pred == gold)),
        "brier": (mean, (brier(ref_probs),), (brier(probs),)),
        "nll": (mean, (nll(ref_probs),), (nll(probs),)),
    }
    for name, (loop, ref_args, args) in expected.items():
        got = out[name]
        assert (got["value"], got["ci_low"], got["ci_high"]) == pytest.approx(
            _paired_loop(loop, ref_args, args, 200, 3), abs=1e-9), name
    without = cal.paired_deltas(ref_probs.max(axis=1), ref_pred == gold, probs.max(axis=1), pred == gold, n_boot=0)
    assert "brier" not in without and without["ace_paper"]["ci_low"] is None


def test_paired_interval_of_a_small_change_is_narrower_than_the_levels_intervals():
    # Same examples, few answers changed: the levels' own accuracy intervals are wide and overlap, while the
    # paired interval of the difference is as narrow as the few changed answers make it.
    rng = np.random.default_rng(23)
    ref_conf, ref_correct, conf, correct = _two_levels(rng, 200, flips=6)
    lo_r, hi_r = cal.bootstrap_ci(cal.accuracy, ref_correct, seed=0)
    lo_q, hi_q = cal.bootstrap_ci(cal.accuracy, correct, seed=0)
    _, lo, hi = cal.paired_bootstrap_delta(cal.accuracy, (ref_correct,), (correct,), seed=0)
    changed = int(np.sum(ref_correct != correct))
    assert hi - lo < 0.5 * min(hi_r - lo_r, hi_q - lo_q)
    assert hi - lo <= 2 * changed / 200  # never wider than all changed answers moving one way


def test_paired_bootstrap_delta_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="same examples"):
        cal.paired_bootstrap_delta(cal.accuracy, (np.ones(5),), (np.ones(6),))
    with pytest.raises(ValueError, match="0/1"):
        cal.paired_bootstrap_delta(cal.accuracy, (np.ones(5),), (np.full(5, 2.0),))


def test_bootstrap_of_ace_on_3000_calibrated_examples_stays_small():
    rng = np.random.default_rng(6)
    conf = rng.uniform(0.5, 1.0, 3000)
    correct = rng.uniform(size=3000) < conf  # calibrated by construction: ACE near 0
    low, high = cal.bootstrap_ci(cal.ace_paper, conf, correct, n_boot=1000)
    assert 0 <= low < high < 0.1


# ---------------------------------------------------------------------------------------------
# summary


def test_calibration_summary_agrees_with_the_single_metrics():
    rng = np.random.default_rng(12)
    probs, gold = random_run(rng, 600, n_classes=3)
    summary = cal.calibration_summary(probs, gold, n_boot=200, seed=1)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = pred == gold
    assert summary["n"] == 600
    expected = {
        "accuracy": cal.accuracy(correct),
        "mean_confidence": cal.mean_confidence(conf),
        "ace_paper": cal.ace_paper(conf, correct),
        "ece": cal.ece(conf, correct),
        "brier": cal.brier(probs, gold),
        "nll": cal.nll(probs, gold),
    }
    for name, value in expected.items():
        entry = summary[name]
        assert entry["value"] == pytest.approx(value, abs=1e-12), name
        assert entry["ci_low"] < entry["ci_high"], name
        assert summary["definitions"][name] == cal.DEFINITIONS[name]
    for name in ("accuracy", "mean_confidence", "brier", "nll"):  # unbiased means: interval brackets them
        assert summary[name]["ci_low"] <= summary[name]["value"] <= summary[name]["ci_high"], name


def test_calibration_summary_with_paper_mode_predictions():
    # Paper mode: the prediction is a vocabulary token that may be neither label; correctness is
    # decided elsewhere (substring match) and passed in.
    probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5], [0.9, 0.1]])
    gold = np.array([0, 0, 1, 0])
    confidence = np.array([0.8, 0.55, 0.9, 0.6])
    correct = np.array([True, False, False, True])
    summary = cal.calibration_summary(
        probs, gold, pred_index=np.array([7, 8, 9, 7]), confidence=confidence, correct=correct, n_boot=0
    )
    assert summary["accuracy"] == {"value": 0.5, "ci_low": None, "ci_high": None}
    assert summary["mean_confidence"]["value"] == pytest.approx(2.85 / 4)
    # NLL still scores the gold column: (-ln .6 - ln .3 - ln .5 - ln .9) / 4
    assert summary["nll"]["value"] == pytest.approx(-math.log(0.6 * 0.3 * 0.5 * 0.9) / 4)
