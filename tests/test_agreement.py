"""Agreement metrics against hand arithmetic and independent implementations.

Independent references: scipy (special.softmax / log_softmax, special.rel_entr, stats.entropy for KL;
spatial.distance.cosine), the squared Pearson correlation (1-D linear CKA), and the kernel (HSIC)
form of CKA with explicit centring matrices H K H.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats
from scipy.spatial import distance

from ggml_probe.analysis import agreement as agr


# ---------------------------------------------------------------------------------------------
# predictions


def test_prediction_agreement_by_hand():
    assert agr.prediction_agreement([0, 1, 2, 1], [0, 2, 2, 0]) == 0.5  # positions 0 and 2 agree
    with pytest.raises(ValueError, match="same shape"):
        agr.prediction_agreement([0, 1], [0])


def test_flips_by_hand():
    ref = [0, 1, 2, 1, 0]
    q = [0, 2, 2, 0, 1]
    gold = [0, 1, 0, 0, 2]
    # 0: same | 1: ref right (1), q wrong (2) | 2: same | 3: ref wrong (1), q right (0)
    # 4: ref wrong (0), q wrong (1), a different wrong answer
    result = agr.flips(ref, q, gold)
    assert result.changed.tolist() == [1, 3, 4]
    assert result.correct_to_wrong.tolist() == [1]
    assert result.wrong_to_correct.tolist() == [3]
    assert result.wrong_to_wrong.tolist() == [4]
    assert result.counts() == {"n": 5, "changed": 3, "correct_to_wrong": 1, "wrong_to_correct": 1, "wrong_to_wrong": 1}


def test_flips_accuracy_bookkeeping_on_random_answers():
    rng = np.random.default_rng(0)
    ref, q, gold = (rng.integers(0, 4, 1000) for _ in range(3))
    result = agr.flips(ref, q, gold)
    # accuracy(q) - accuracy(ref) is exactly (wrong->correct - correct->wrong) / n
    delta = np.mean(q == gold) - np.mean(ref == gold)
    assert delta == pytest.approx((result.wrong_to_correct.size - result.correct_to_wrong.size) / 1000)
    assert result.changed.size == np.sum(ref != q)
    assert 1 - result.changed.size / 1000 == agr.prediction_agreement(ref, q)


# ---------------------------------------------------------------------------------------------
# KL divergence


def test_kl_from_logits_by_hand_and_direction():
    # P = softmax(0, 0) = (1/2, 1/2); Q = softmax(ln 3, 0) = (3/4, 1/4)
    # KL(P||Q) = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3)
    # KL(Q||P) = 3/4 ln(3/2) + 1/4 ln(1/2)
    ref, q = np.array([[0.0, 0.0]]), np.array([[math.log(3), 0.0]])
    assert agr.kl_divergence_from_logits(ref, q)[0] == pytest.approx(0.5 * math.log(4 / 3), abs=1e-15)
    assert agr.kl_divergence_from_logits(q, ref)[0] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-15)
    # the same distributions from logits shifted per row: zero up to rounding, and never negative
    rows = np.random.default_rng(7).normal(scale=5, size=(200, 9))
    same = agr.kl_divergence_from_logits(rows, rows + np.linspace(-40, 40, 200)[:, None])
    assert np.all(same >= 0.0) and same.max() < 1e-13


def test_kl_from_logits_is_stable_for_huge_logits():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(20, 9))
    q = ref + rng.normal(scale=0.3, size=ref.shape)
    plain = agr.kl_divergence_from_logits(ref, q)
    # adding a per-row constant leaves softmax unchanged; 1e4 would overflow a naive exp
    shifted = agr.kl_divergence_from_logits(ref + 1e4, q - 5e3 + np.arange(20)[:, None])
    assert np.all(np.isfinite(shifted))
    np.testing.assert_allclose(shifted, plain, rtol=1e-9, atol=1e-12)


def test_kl_from_logits_matches_scipy_on_label_sets():
    rng = np.random.default_rng(2)
    ref = rng.normal(scale=3, size=(300, 7)).astype(np.float32)
    q = (ref + rng.normal(scale=0.5, size=ref.shape)).astype(np.float32)
    p_ref, p_q = special.softmax(ref.astype(np.float64), axis=1), special.softmax(q.astype(np.float64), axis=1)
    ours = agr.kl_divergence_from_logits(ref, q)
    assert ours.shape == (300,) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, stats.entropy(p_ref, p_q, axis=1), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ours, special.rel_entr(p_ref, p_q).sum(axis=1), rtol=1e-10, atol=1e-14)
    # the axis argument: examples along columns
    np.testing.assert_allclose(agr.kl_divergence_from_logits(ref.T, q.T, axis=0), ours, rtol=1e-14)


def test_kl_from_logits_on_full_vocabulary_rows_in_chunks():
    # 120 x 49152 float32 is more than one chunk of rows (4M elements / 49152 = 81 rows)
    rng = np.random.default_rng(3)
    ref = rng.normal(scale=4, size=(120, 49152)).astype(np.float32)
    q = (ref + rng.normal(scale=0.2, size=ref.shape)).astype(np.float32)
    log_p = special.log_softmax(ref.astype(np.float64), axis=1)
    log_q = special.log_softmax(q.astype(np.float64), axis=1)
    expected = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    np.testing.assert_allclose(agr.kl_divergence_from_logits(ref, q), expected, rtol=1e-9)


def test_kl_from_logits_with_masked_tokens():
    # P = (1, 0) against Q = (1/2, 1/2): KL = 1 * ln(1 / (1/2)) = ln 2; the masked token adds 0
    assert agr.kl_divergence_from_logits([[0.0, -np.inf]], [[0.0, 0.0]])[0] == pytest.approx(math.log(2))
    # a token impossible under Q but possible under P: infinite divergence
    assert agr.kl_divergence_from_logits([[0.0, 0.0]], [[0.0, -np.inf]])[0] == np.inf


def test_kl_from_probabilities():
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(5), size=50)
    q = rng.dirichlet(np.ones(5), size=50)
    np.testing.assert_allclose(agr.kl_divergence(p, q), special.rel_entr(p, q).sum(axis=1), rtol=1e-12)
    # zeros: p = (1/2, 1/2), q = (1, 0) -> 1/2 ln(1/2) + 1/2 ln(1/2 / 1e-12), finite thanks to the clip
    clipped = agr.kl_divergence([[0.5, 0.5]], [[1.0, 0.0]])[0]
    assert clipped == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.5 / 1e-12))
    # p = (1, 0) against q = (1/4, 3/4): the zero term of p adds nothing -> ln 4
    assert agr.kl_divergence([[1.0, 0.0]], [[0.25, 0.75]])[0] == pytest.approx(math.log(4))


def test_top1_agreement_by_hand():
    ref = [[1, 2, 0], [3, 1, 0], [0, 0, 5]]  # argmax 1, 0, 2
    q = [[0, 2, 1], [1, 3, 0], [1, 0, 5]]  # argmax 1, 1, 2
    assert agr.top1_agreement(ref, q) == pytest.approx(2 / 3)
    assert agr.top1_agreement(np.array(ref).T, np.array(q).T, axis=0) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# representations


def test_cosine_similarity_rows():
    # (1,0)·(1,1) / (1 * sqrt 2) = 1/sqrt 2; (2,0) vs (-3,0): -1; a zero row: NaN
    sims = agr.cosine_similarity_rows([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [-3.0, 0.0], [1.0, 2.0]])
    assert sims[0] == pytest.approx(1 / math.sqrt(2))
    assert sims[1] == pytest.approx(-1.0)
    assert np.isnan(sims[2])
    rng = np.random.default_rng(5)
    a = rng.normal(size=(40, 576)).astype(np.float32)
    b = a + rng.normal(size=a.shape).astype(np.float32)
    expected = [1 - distance.cosine(a[i].astype(np.float64), b[i].astype(np.float64)) for i in range(40)]
    np.testing.assert_allclose(agr.cosine_similarity_rows(a, b), expected, rtol=1e-12)


def cka_hsic(x, y):
    """CKA in kernel form: HSIC(K, L) = tr(K H L H) / (n-1)^2 with explicit H = I - 11^T / n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("n, d1, d2", [(30, 200, 150), (400, 12, 8), (100, 64, 64)])
def test_linear_cka_matches_hsic_form(n, d1, d2):
    # (30, 200, 150) takes the Gram path, (400, 12, 8) the feature path
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d1)) + 5.0  # uncentred on purpose
    y = x @ rng.normal(size=(d1, d2)) + rng.normal(scale=3.0, size=(n, d2)) - 2.0
    ours = agr.linear_cka(x.astype(np.float32), y.astype(np.float32))
    assert ours == pytest.approx(cka_hsic(x, y), rel=1e-5)  # float32 inputs, float64 reference
    assert agr.linear_cka(x, y) == pytest.approx(cka_hsic(x, y), rel=1e-10)
    assert 0.0 < ours < 1.0


def test_linear_cka_of_one_feature_is_squared_correlation():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(500, 1))
    b = 0.5 * a + rng.normal(size=(500, 1))
    r = np.corrcoef(a[:, 0], b[:, 0])[0, 1]
    assert agr.linear_cka(a, b) == pytest.approx(r**2, rel=1e-12)


@pytest.mark.parametrize("n, d", [(300, 20), (20, 300)])
def test_linear_cka_invariances(n, d):
    rng = np.random.default_rng(d)
    x = rng.normal(size=(n, d))
    orthogonal, _ = np.linalg.qr(rng.normal(size=(d, d)))
    # orthogonal transform, isotropic scaling and translation leave CKA at 1
    assert agr.linear_cka(x, 3.7 * x @ orthogonal + 11.0) == pytest.approx(1.0, abs=1e-10)
    # it is not invariant to stretching one direction
    stretched = x.copy()
    stretched[:, 0] *= 30.0
    assert agr.linear_cka(x, stretched) < 0.9


def test_linear_cka_rejects_constant_and_mismatched_inputs():
    with pytest.raises(ValueError, match="constant"):
        agr.linear_cka(np.ones((5, 3)), np.arange(15.0).reshape(5, 3))
    with pytest.raises(ValueError, match="same examples"):
        agr.linear_cka(np.zeros((5, 3)), np.zeros((4, 3)))
