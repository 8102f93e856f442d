"""Salient neurons of the last layer: the paper's integrated gradients, exact and without autograd.

In the last transformer layer only the last position reaches the answer, and the path from the act
neurons a (SiLU(gate), before the product with up) to the target log-probability is closed-form for
llama-family models:

    h      = r + W_down (a ⊙ u)              r: the residual (ffn_inp), u: the up projection
    y      = g ⊙ h / sqrt(mean(h²) + eps)    the final RMSNorm
    z      = W_out y                         logits
    f(a)   = z_t − logsumexp(z)              log-probability of the target token t

Integrated gradients along the straight path from the baseline activations b (the all-token-0
prompt's) to a, with r and u held at the input's values as Captum's LayerIntegratedGradients does:

    attr_j = (a_j − b_j) ∫₀¹ ∂f/∂a_j (b + α(a − b)) dα,   by n-point Gauss–Legendre quadrature.

Completeness: Σ attr = f(a) − f(b) up to the quadrature error, reported per example.

Phi-2's head adds biases (ffn_down's, the output's) and a LayerNorm (h − mean(h) normalised, plus a
bias) for the RMSNorm; its FFN is ungated, which is u = 1. Its residual r is everything of l_out but the
FFN's output: the layer input plus the attention, which read the same normed input in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp, softmax

from ..errors import ProbeError


@dataclass
class LastLayerHead:
    """Weights of the closed-form path, float64: W_down (n_embd, n_ff), final norm, W_out (n_vocab, n_embd).

    Gemma 2/3 add a post-FFN RMSNorm (`post_norm`, on W_down(a ⊙ u) before the residual add) and Gemma 2
    a final logit soft-cap (`softcap`: z ← c·tanh(z / c)); both stay None / 0 for llama-like heads.
    Phi-2 adds ffn_down's bias (`down_bias`), a LayerNorm final norm (`layer_norm`, its bias `norm_bias`)
    and the output's bias (`out_bias`).
    """

    w_down: np.ndarray
    norm_weight: np.ndarray
    eps: float
    w_out: np.ndarray
    post_norm: np.ndarray | None = None
    softcap: float = 0.0
    down_bias: np.ndarray | None = None
    layer_norm: bool = False
    norm_bias: np.ndarray | None = None
    out_bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        n_embd, n_ff = self.w_down.shape
        if self.norm_weight.shape != (n_embd,) or self.w_out.shape[1] != n_embd:
            raise ProbeError(f"inconsistent head shapes: W_down {self.w_down.shape}, norm {self.norm_weight.shape}, "
                             f"W_out {self.w_out.shape}")

    def contribution(self, acts: np.ndarray, up: np.ndarray) -> np.ndarray:
        """What the FFN adds to the residual for each row of acts (m, n_ff) → (m, n_embd)."""
        m = self._down(acts, up)
        return m if self.post_norm is None else _rms(m, self.post_norm, self.eps)[0]

    def _down(self, acts: np.ndarray, up: np.ndarray) -> np.ndarray:
        m = (np.atleast_2d(acts) * up[None, :]) @ self.w_down.T
        return m if self.down_bias is None else m + self.down_bias[None, :]

    def _center(self, h: np.ndarray) -> np.ndarray:
        """What the final norm scales: h, or h − mean(h) for a LayerNorm."""
        return h - h.mean(axis=1, keepdims=True) if self.layer_norm else h

    def _final_norm(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y, s = _rms(self._center(h), self.norm_weight, self.eps)
        return (y if self.norm_bias is None else y + self.norm_bias[None, :]), s

    def _logit_bias(self) -> np.ndarray | float:
        """What the final norm's and the output's biases add to the logits (0 without them)."""
        bias = 0.0 if self.norm_bias is None else self.norm_bias @ self.w_out.T
        return bias if self.out_bias is None else bias + self.out_bias

    def hidden(self, acts: np.ndarray, up: np.ndarray, residual: np.ndarray) -> np.ndarray:
        """h for each row of acts (m, n_ff) → (m, n_embd)."""
        return residual[None, :] + self.contribution(acts, up)

    def logprob(self, acts: np.ndarray, up: np.ndarray, residual: np.ndarray, target: int) -> np.ndarray:
        """f(a) for each row of acts → (m,)."""
        h = self.hidden(acts, up, residual)
        z = self._logits(h)
        return z[:, target] - logsumexp(z, axis=1)

    def gradient(self, acts: np.ndarray, up: np.ndarray, residual: np.ndarray, target: int) -> np.ndarray:
        """∂f/∂a for each row of acts (m, n_ff) → (m, n_ff)."""
        m = self._down(acts, up)
        if self.post_norm is None:
            h, s_m = residual[None, :] + m, None
        else:
            p, s_m = _rms(m, self.post_norm, self.eps)
            h = residual[None, :] + p
        y, s_h = self._final_norm(h)
        z = y @ self.w_out.T
        return self._backward(m, s_m, h, s_h, z if self.out_bias is None else z + self.out_bias[None, :], up, target)

    def gradient_on_line(self, start: np.ndarray, step: np.ndarray, alphas: np.ndarray, up: np.ndarray,
                         residual: np.ndarray, target: int) -> np.ndarray:
        """gradient(start + α·step) for each α → (len(alphas), n_ff). Along a line h is linear in α, and so
        are the logits before the norm's per-row scale: two vector products with W_out instead of one per α.
        A post-FFN norm (Gemma 2/3) makes h nonlinear in α: there, every point is computed in full."""
        if self.post_norm is not None:
            return self.gradient(start[None, :] + alphas[:, None] * step[None, :], up, residual, target)
        h_start = self.hidden(start, up, residual)[0]
        h_step = (np.asarray(step) * up) @ self.w_down.T
        h = h_start[None, :] + alphas[:, None] * h_step[None, :]
        c_start, c_step = self._center(h_start[None])[0], self._center(h_step[None])[0]  # centring is linear
        c = c_start[None, :] + alphas[:, None] * c_step[None, :]
        s = 1.0 / np.sqrt((c * c).mean(axis=1) + self.eps)
        z_start = (c_start * self.norm_weight) @ self.w_out.T
        z_step = (c_step * self.norm_weight) @ self.w_out.T
        z = s[:, None] * (z_start[None, :] + alphas[:, None] * z_step[None, :]) + self._logit_bias()
        return self._backward(None, None, h, s, z, up, target)

    def _backward(self, m: np.ndarray | None, s_m: np.ndarray | None, h: np.ndarray, s_h: np.ndarray,
                  z: np.ndarray, up: np.ndarray, target: int) -> np.ndarray:
        """∂f/∂a from the forward: the FFN output m and its post-norm scale s_m (post-norm heads only), the
        hidden state h (m, n_embd), its final-norm scale s_h (m,) and the logits z before any soft-cap."""
        if self.softcap:
            t = np.tanh(z / self.softcap)
            z = self.softcap * t
        dz = -softmax(z, axis=1)
        dz[:, target] += 1.0
        if self.softcap:
            dz = dz * (1.0 - t * t)
        dh = _rms_backward(self._center(h), s_h, self.norm_weight, dz @ self.w_out)
        if self.layer_norm:  # through the centring: its Jacobian is I − 1/n
            dh = dh - dh.mean(axis=1, keepdims=True)
        dm = dh if self.post_norm is None else _rms_backward(m, s_m, self.post_norm, dh)
        return (dm @ self.w_down) * up[None, :]

    def _logits(self, h: np.ndarray) -> np.ndarray:
        z = self._final_norm(h)[0] @ self.w_out.T
        if self.out_bias is not None:
            z = z + self.out_bias[None, :]
        return self.softcap * np.tanh(z / self.softcap) if self.softcap else z


def _rms(x: np.ndarray, g: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """RMSNorm of each row, and the per-row scale s = (mean x² + eps)^(-1/2)."""
    s = 1.0 / np.sqrt((x * x).mean(axis=1) + eps)
    return x * s[:, None] * g[None, :], s


def _rms_backward(x: np.ndarray, s: np.ndarray, g: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dL/dx of y = g ⊙ x·s(x) given dL/dy: s v − s³/n · x (x·v), v = dy ⊙ g."""
    v = dy * g[None, :]
    return s[:, None] * v - (s**3 / x.shape[1])[:, None] * x * (x * v).sum(axis=1, keepdims=True)


def gauss_legendre_01(n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of n-point Gauss–Legendre quadrature on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(int(n_points))
    return (x + 1.0) / 2.0, w / 2.0


@dataclass
class IGResult:
    attributions: np.ndarray  # (n_ff,)
    logprob_input: float  # f(a)
    logprob_baseline: float  # f(b), r and u from the input
    completeness_error: float  # Σ attr − (f(a) − f(b))


def integrated_gradients(head: LastLayerHead, act: np.ndarray, baseline: np.ndarray, up: np.ndarray,
                         residual: np.ndarray, target: int, n_points: int = 50) -> IGResult:
    act, baseline = np.asarray(act, np.float64), np.asarray(baseline, np.float64)
    up, residual = np.asarray(up, np.float64), np.asarray(residual, np.float64)
    alphas, weights = gauss_legendre_01(n_points)
    grads = head.gradient_on_line(baseline, act - baseline, alphas, up, residual, target)
    attr = (act - baseline) * (weights @ grads)
    ends = head.logprob(np.stack([act, baseline]), up, residual, target)
    return IGResult(attr, float(ends[0]), float(ends[1]), float(attr.sum() - (ends[0] - ends[1])))


def direct_effect(head: LastLayerHead, act: np.ndarray, baseline: np.ndarray, up: np.ndarray,
                  final_residual: np.ndarray, target: int) -> np.ndarray:
    """(act − baseline)_j × ∂ log p(target) / ∂ act_j along the direct path only: act ⊙ up → W_down
    (head.w_down, any layer's) → straight into the final residual, linearised there. (n_ff,)"""
    act, baseline = np.asarray(act, np.float64), np.asarray(baseline, np.float64)
    up, r = np.asarray(up, np.float64), np.asarray(final_residual, np.float64)
    # head.hidden(act) must give the final residual: take this layer's own contribution out of it.
    grad = head.gradient(act[None], up, r - head.contribution(act, up)[0], target)[0]
    return (act - baseline) * grad


def normalised(attr: np.ndarray) -> np.ndarray:
    """|attr| / max |attr| (all zeros stay zeros)."""
    a = np.abs(np.asarray(attr, np.float64))
    m = a.max(axis=-1, keepdims=True) if a.size else 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m > 0, a / np.where(m > 0, m, 1), 0.0)


def salient(attr: np.ndarray, threshold: float = 0.7) -> np.ndarray:
    """Ids of neurons whose normalised |attribution| exceeds threshold (paper: 0.7)."""
    return np.flatnonzero(normalised(attr) > threshold)


@dataclass
class SalientSummary:
    threshold: float
    per_example: list[np.ndarray]  # salient ids per example
    union: np.ndarray  # ids salient in any example
    frequency: np.ndarray  # (n_ff,) int: in how many examples each neuron was salient
    ranking: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ids by frequency, most first


def summarise_salient(attributions: np.ndarray, threshold: float = 0.7) -> SalientSummary:
    """attributions (n_examples, n_ff) → per-example salient sets, their union and a frequency ranking."""
    attributions = np.atleast_2d(attributions)
    per = [salient(a, threshold) for a in attributions]
    freq = np.zeros(attributions.shape[1], dtype=np.int64)
    for ids in per:
        freq[ids] += 1
    union = np.flatnonzero(freq)
    ranking = union[np.lexsort((union, -freq[union]))]
    return SalientSummary(threshold, per, union, freq, ranking)
