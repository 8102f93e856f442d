"""How far a quantized model's outputs and representations are from the reference level's.

Every function takes per-example arrays aligned by example id (row i of both arguments is the same
prompt): predictions, logits over the label set or the full vocabulary, or hidden states.
Computation is in float64 whatever the input dtype; nothing here talks to llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax

# Rows of a logit matrix converted to float64 at once; bounds the temporaries for vocabulary-sized
# rows (3 000 examples x 49 152 tokens would be 1.2 GB per float64 copy).
_CHUNK_ELEMENTS = 4_000_000
# Probabilities below this are raised to it in `kl_divergence`, so a zero in q gives a large finite KL.
KL_EPS = 1e-12


def _aligned(name_a: str, a, name_b: str, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError(f"{name_a} is empty: need at least one example")
    return a, b


# ---------------------------------------------------------------------------------------------
# predictions


def prediction_agreement(pred_ref, pred_q) -> float:
    """Fraction of examples where the quantized model gives the same answer as the reference."""
    ref, q = _aligned("pred_ref", pred_ref, "pred_q", pred_q)
    return float(np.mean(ref == q))


@dataclass(frozen=True)
class Flips:
    """Examples whose answer changed between the reference and the quantized model (indices into the arrays).

    changed = correct_to_wrong + wrong_to_correct + wrong_to_wrong (a different wrong answer, only
    possible with more than two choices).
    """

    n: int
    changed: np.ndarray
    correct_to_wrong: np.ndarray
    wrong_to_correct: np.ndarray
    wrong_to_wrong: np.ndarray

    def counts(self) -> dict[str, int]:
        return {
            "n": self.n,
            "changed": int(self.changed.size),
            "correct_to_wrong": int(self.correct_to_wrong.size),
            "wrong_to_correct": int(self.wrong_to_correct.size),
            "wrong_to_wrong": int(self.wrong_to_wrong.size),
        }


def flips(pred_ref, pred_q, gold) -> Flips:
    """Which answers changed, split by whether they became wrong or right."""
    ref, q = _aligned("pred_ref", pred_ref, "pred_q", pred_q)
    ref, gold = _aligned("pred_ref", ref, "gold", gold)
    changed = ref != q
    ref_ok, q_ok = ref == gold, q == gold
    return Flips(
        n=int(ref.shape[0]),
        changed=np.flatnonzero(changed),
        correct_to_wrong=np.flatnonzero(changed & ref_ok & ~q_ok),
        wrong_to_correct=np.flatnonzero(changed & ~ref_ok & q_ok),
        wrong_to_wrong=np.flatnonzero(changed & ~ref_ok & ~q_ok),
    )


# ---------------------------------------------------------------------------------------------
# distributions


def _kl_rows(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        # 0 * log(0 / q) = 0 by convention; (-inf) - (-inf) would be NaN, so mask those terms out.
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    # Exact KL is >= 0; rounding of nearly identical rows can give -1e-17.
    return np.maximum(terms.sum(axis=-1), 0.0)


def kl_divergence_from_logits(logits_ref, logits_q, axis: int = -1) -> np.ndarray:
    """Per-example KL(P_ref || P_q) in nats, P = softmax(logits) along `axis`.

    Computed from log-softmax with the row maximum subtracted, in float64, so logits of any size
    are safe. Works for label-set logits (n, k) and full-vocabulary logits (n, ~49k); large inputs
    are processed in row chunks so memory stays bounded. -inf logits (masked tokens) are allowed:
    a token impossible under P_ref adds nothing, one impossible under P_q only gives inf.
    Returns an array of the input's shape without `axis`.
    """
    ref, q = _aligned("logits_ref", logits_ref, "logits_q", logits_q)
    ref, q = np.moveaxis(ref, axis, -1), np.moveaxis(q, axis, -1)
    out_shape = ref.shape[:-1]
    width = ref.shape[-1]
    ref2, q2 = ref.reshape(-1, width), q.reshape(-1, width)
    out = np.empty(ref2.shape[0], dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, ref2.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = _kl_rows(log_softmax(ref2[rows].astype(np.float64), axis=-1),
                             log_softmax(q2[rows].astype(np.float64), axis=-1))
    return out.reshape(out_shape)


def kl_divergence(p_ref, p_q, axis: int = -1, eps: float = KL_EPS) -> np.ndarray:
    """Per-example KL(p_ref || p_q) in nats from probabilities along `axis`.

    Entries of p_q are clipped below at `eps` (a zero where p_ref > 0 gives a large finite value,
    not inf); entries with p_ref = 0 contribute 0. Inputs are not renormalised: pass distributions.
    """
    p, q = _aligned("p_ref", p_ref, "p_q", p_q)
    p = np.asarray(p, dtype=np.float64)
    q = np.clip(np.asarray(q, dtype=np.float64), eps, None)
    if np.any(p < 0):
        raise ValueError("p_ref has negative entries")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return np.maximum(terms.sum(axis=axis), 0.0)


def top1_agreement(logits_ref, logits_q, axis: int = -1) -> float:
    """Fraction of examples whose most likely token is the same ("same top p" in llama-perplexity).

    Works on logits or probabilities alike (softmax keeps the argmax); ties go to the lowest index.
    """
    ref, q = _aligned("logits_ref", logits_ref, "logits_q", logits_q)
    return float(np.mean(np.argmax(ref, axis=axis) == np.argmax(q, axis=axis)))


# ---------------------------------------------------------------------------------------------
# representations


def cosine_similarity_rows(a, b) -> np.ndarray:
    """Cosine similarity of row i of `a` with row i of `b`, per example (float64).

    A row of zeros has no direction: its similarity is NaN.
    """
    a, b = _aligned("a", a, "b", b)
    if a.ndim != 2:
        raise ValueError(f"expected (n_examples, dim) arrays, got shape {a.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    dot = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, dot / norms, np.nan)


def linear_cka(X, Y) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019) between two representations of the same examples.

    X is (n, d1), Y is (n, d2), row i the same example. Columns are centred, then
    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), in float64. It is 1 for representations that
    differ by an orthogonal transform, isotropic scaling and translation. When n is small against
    the widths, the identical Gram form tr(K_X K_Y) / (||K_X||_F ||K_Y||_F) with K = X X^T
    (n x n) is used instead, which costs n^2 d rather than n d^2.
    """
    x = np.asarray(X, dtype=np.float64)
    y = np.asarray(Y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"X and Y must be (n_examples, dim), got shapes {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must describe the same examples, got {x.shape[0]} and {y.shape[0]} rows")
    if x.shape[0] < 2:
        raise ValueError("linear CKA needs at least two examples")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    n, d1 = x.shape
    d2 = y.shape[1]
    if n * (d1 + d2) < d1 * d2 + d1 * d1 + d2 * d2:
        kx, ky = x @ x.T, y @ y.T
        cross = float(np.sum(kx * ky))  # tr(K_X K_Y), both symmetric
        norm_x, norm_y = np.linalg.norm(kx), np.linalg.norm(ky)
    else:
        cross = float(np.linalg.norm(y.T @ x) ** 2)
        norm_x, norm_y = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    if norm_x == 0 or norm_y == 0:
        raise ValueError("linear CKA is undefined when a representation is constant across examples")
    return cross / (norm_x * norm_y)
