"""llama-perplexity's quality statistics of a model against a reference, as the GGUF community reads them.

Definitions are those of tools/perplexity/perplexity.cpp (`kl_divergence`, llama.cpp as vendored by
llama-cpp-python 0.3.36), per scored token t with next token y, the model's logits z and the base's
stored log-probabilities b (formats/kld_base.py):

    nll        = logsumexp(z) − z[y]                       nll_base = −b[y]
    KLD        = Σ_i exp(b_i)·(b_i − log_softmax(z)_i)     over the i with b_i > −16
    same top   = argmax z == argmax b                      Δp = exp(−nll) − exp(−nll_base)

and over all scored tokens: PPL = exp(mean nll) with uncertainty PPL·se(nll); ln(PPL(Q)/PPL(base)) with
the covariance-aware uncertainty sqrt(se² + se_base² − 2·cov); KLD mean ± se and its percentiles
(linear interpolation on the sorted values, llama.cpp's `percentile`); RMS Δp ± its uncertainty;
same top p ± sqrt(p(1−p)/(n−1)). `se` is llama.cpp's mean_and_uncertainty: sqrt(var/(n−1)), and 0 for
n ≤ 10. Arithmetic follows the C code: float32 where it uses float, float64 sums.

The accumulator keeps one float32 KLD and one Δp per scored token (for the percentiles) and sums:
memory grows by 8 bytes a token, never by the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..formats.kld_base import FLOOR_NATS

KLD_PERCENTILES = {"kld_p999": 0.999, "kld_p99": 0.99, "kld_p95": 0.95, "kld_p90": 0.90,
                   "kld_p10": 0.10, "kld_p05": 0.05, "kld_p01": 0.01, "kld_p001": 0.001}
DP_PERCENTILES = {"dp_p999": 0.999, "dp_p99": 0.99, "dp_p95": 0.95, "dp_p90": 0.90, "dp_p75": 0.75,
                  "dp_p25": 0.25, "dp_p10": 0.10, "dp_p05": 0.05, "dp_p01": 0.01, "dp_p001": 0.001}


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama.cpp's mean and standard error from a sum and a sum of squares."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, (float(np.sqrt(df / (count - 1))) if df > 0 and count > 10 else 0.0)


def covariance(sum_a: float, sum_b: float, sum_ab: float, count: int) -> float:
    """llama.cpp's covariance of the two means (already divided by count − 1)."""
    if count < 10:
        return 0.0
    return (sum_ab / count - (sum_a / count) * (sum_b / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation between the two nearest of the sorted values."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = np.float32(fraction) * np.float32(len(v) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    return float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]) if n % 2 == 0 else sorted_values[n // 2])


@dataclass
class RowStatistics:
    """Per scored token: what KLDAccumulator sums (float32 as llama.cpp computes them; kld float64)."""

    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    p_diff: np.ndarray
    same_top: np.ndarray  # bool

    @classmethod
    def concat(cls, parts: "list[RowStatistics]") -> "RowStatistics":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("nll", "nll_base", "kld", "p_diff",
                                                                                "same_top")))


def row_statistics(logits: np.ndarray, base_logprobs: np.ndarray, next_tokens: np.ndarray) -> RowStatistics:
    """llama-perplexity's per-token figures for rows of logits against the base's log-probabilities.

    Written as few full passes over the (rows × vocabulary) arrays as NumPy allows, in place where it
    can: at a few rows per call the temporaries stay in cache, which is most of the cost.
    """
    z = np.asarray(logits, dtype=np.float32)
    b = np.asarray(base_logprobs, dtype=np.float32)
    y = np.asarray(next_tokens, dtype=np.int64)
    rows = np.arange(len(y))
    imax = z.argmax(axis=1)
    max_logit = z[rows, imax]
    shifted = z - max_logit[:, None]
    np.exp(shifted, out=shifted)
    log_sum_exp = np.log(shifted.sum(axis=1, dtype=np.float64)).astype(np.float32)
    log_norm = (max_logit + log_sum_exp).astype(np.float32)  # log_softmax(z)_i = z_i − log_norm
    nll = (log_norm - z[rows, y]).astype(np.float32)
    nll_base = (-b[rows, y]).astype(np.float32)
    # KLD terms exp(b)·(b − z + log_norm) over the stored log-probabilities above the floor
    terms = np.subtract(b, z, out=shifted)
    terms += log_norm[:, None]
    terms *= np.exp(b)
    terms[b <= np.float32(-FLOOR_NATS)] = 0.0
    kld = terms.sum(axis=1, dtype=np.float64)
    p_diff = (np.exp(-nll) - np.exp(-nll_base)).astype(np.float32)
    # llama.cpp's base argmax: the first index holding the largest stored log-probability
    return RowStatistics(nll, nll_base, kld, p_diff, imax == b.argmax(axis=1))


@dataclass
class KLDAccumulator:
    """Sums of llama-perplexity's kl_divergence_result, fed one chunk's scored rows at a time."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    max_p_diff: float = 0.0
    n_same_top: int = 0
    count: int = 0
    kld_values: list[np.ndarray] = field(default_factory=list)
    p_diff_values: list[np.ndarray] = field(default_factory=list)

    def update(self, logits: np.ndarray, base_logprobs: np.ndarray, next_tokens: np.ndarray) -> None:
        """logits (n, n_vocab) of the model, base_logprobs (n, n_vocab) decoded from the base file (float32,
        floor values included), next_tokens (n,) the token each row predicts."""
        self.add(row_statistics(logits, base_logprobs, next_tokens))

    def add(self, rows: "RowStatistics") -> None:
        """Adds scored rows' statistics (row_statistics of any split of the rows gives the same sums)."""
        nll64, base64, pd64 = (rows.nll.astype(np.float64), rows.nll_base.astype(np.float64),
                               rows.p_diff.astype(np.float64))
        kld = rows.kld
        self.sum_nll += nll64.sum()
        self.sum_nll2 += (nll64 * nll64).sum()
        self.sum_nll_base += base64.sum()
        self.sum_nll_base2 += (base64 * base64).sum()
        self.sum_nll_nll_base += (nll64 * base64).sum()
        self.sum_kld += kld.sum()
        self.sum_kld2 += (kld * kld).sum()
        self.sum_p_diff += pd64.sum()
        self.sum_p_diff2 += (pd64 * pd64).sum()
        self.sum_p_diff4 += (pd64 ** 4).sum()
        self.max_p_diff = max(self.max_p_diff, float(np.abs(rows.p_diff).max(initial=0.0)))
        self.n_same_top += int(rows.same_top.sum())
        self.count += len(rows.nll)
        self.kld_values.append(kld.astype(np.float32))
        self.p_diff_values.append(rows.p_diff)

    _SUMS = ("sum_nll", "sum_nll2", "sum_nll_base", "sum_nll_base2", "sum_nll_nll_base", "sum_kld", "sum_kld2",
             "sum_p_diff", "sum_p_diff2", "sum_p_diff4", "max_p_diff")

    def state(self) -> dict[str, np.ndarray]:
        """Everything needed to continue exactly where this accumulator stands (saved between chunks)."""
        out = {k: np.array(getattr(self, k), dtype=np.float64) for k in self._SUMS}
        out.update(n_same_top=np.array(self.n_same_top, np.int64), count=np.array(self.count, np.int64),
                   kld_values=np.concatenate(self.kld_values) if self.kld_values else np.zeros(0, np.float32),
                   p_diff_values=np.concatenate(self.p_diff_values) if self.p_diff_values else np.zeros(0, np.float32))
        return out

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "KLDAccumulator":
        acc = cls(**{k: float(state[k]) for k in cls._SUMS}, n_same_top=int(state["n_same_top"]),
                  count=int(state["count"]))
        acc.kld_values = [np.asarray(state["kld_values"], np.float32)]
        acc.p_diff_values = [np.asarray(state["p_diff_values"], np.float32)]
        return acc

    def result(self) -> dict[str, Any]:
        """Every figure llama-perplexity prints, under the keys `ggml-probe kld --json` uses."""
        n = self.count
        if n == 0:
            raise ValueError("no scored tokens")
        log_ppl, log_ppl_se = mean_and_uncertainty(self.sum_nll, self.sum_nll2, n)
        log_base, log_base_se = mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, n)
        cov = covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, n)
        ratio = log_ppl - log_base
        ratio_se = float(np.sqrt(max(log_ppl_se ** 2 + log_base_se ** 2 - 2.0 * cov, 0.0)))
        kld_mean, kld_se = mean_and_uncertainty(self.sum_kld, self.sum_kld2, n)
        dp_mean, dp_se = mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, n)
        mse, mse_se = mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, n)
        rms = float(np.sqrt(mse))
        same = self.n_same_top / n
        kv = np.sort(np.concatenate(self.kld_values))
        dv = np.sort(np.concatenate(self.p_diff_values))
        ppl, ppl_base = float(np.exp(log_ppl)), float(np.exp(log_base))
        out: dict[str, Any] = {
            "n_tokens": n,
            "ppl": ppl, "ppl_se": ppl * log_ppl_se, "ppl_base": ppl_base, "ppl_base_se": ppl_base * log_base_se,
            "ln_ppl_ratio": ratio, "ln_ppl_ratio_se": ratio_se,
            "ppl_ratio": float(np.exp(ratio)), "ppl_ratio_se": float(np.exp(ratio)) * ratio_se,
            "ppl_cor": cov / (log_ppl_se * log_base_se) if log_ppl_se and log_base_se else None,
            "kld_mean": kld_mean, "kld_mean_se": kld_se, "kld_max": float(kv[-1]), "kld_median": median(kv),
            "kld_min": float(kv[0]),
            "dp_mean": dp_mean, "dp_mean_se": dp_se, "dp_max": float(dv[-1]), "dp_median": median(dv),
            "dp_min": float(dv[0]),
            "rms_dp": rms, "rms_dp_se": 0.5 / rms * mse_se if rms else 0.0,
            "same_top_p": same, "same_top_p_se": float(np.sqrt(same * (1 - same) / (n - 1))) if n > 1 else 0.0,
        }
        out.update({k: percentile(kv, f) for k, f in KLD_PERCENTILES.items()})
        out.update({k: percentile(dv, f) for k, f in DP_PERCENTILES.items()})
        return out
