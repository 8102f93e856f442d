"""Turning next-token logits into predictions and confidences, under two definitions.

- label-set (default): softmax over the label words only. A label's logit is the log-sum-exp of
  the logits of the distinct first tokens of its surface forms ("True" and " True": prompts end
  with "Answer:", so a BPE model usually answers with the space-prefixed token).
- paper: full-vocabulary softmax; prediction = argmax token, confidence = its probability,
  correct when the lower-cased gold label is a substring of the lower-cased predicted token
  (Singh & Sajjad 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax as _log_softmax, logsumexp

DEFINITIONS = {
    "label_set": (
        "softmax over the label words only; a label's logit = logsumexp over the first tokens of "
        "its surface forms ('W' and ' W'); prediction = argmax, confidence = its probability"
    ),
    "paper": (
        "full-vocabulary softmax at the last prompt position; prediction = argmax token, "
        "confidence = its probability; correct iff lower(gold) is a substring of lower(token) "
        "(Singh & Sajjad 2025)"
    ),
}


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """scipy.special.log_softmax in float64, whatever the input dtype (llama.cpp hands float32, the runs store float16)."""
    return _log_softmax(np.asarray(logits, dtype=np.float64), axis=axis)


@dataclass(frozen=True)
class LabelTokens:
    """For each label, the distinct token ids of its surface forms' first tokens."""

    labels: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]


def label_logits(logits: np.ndarray, label_tokens: LabelTokens) -> np.ndarray:
    """(n, n_labels) label logits from (n, n_vocab) next-token logits."""
    x = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    cols = []
    for ids in label_tokens.token_ids:
        cols.append(logsumexp(x[:, list(ids)], axis=1))
    return np.stack(cols, axis=1)


def paper_correct(predicted_piece: str, gold_label: str) -> bool:
    return gold_label.lower() in predicted_piece.lower()


def paper_prediction_index(predicted_piece: str, labels: tuple[str, ...]) -> int:
    """Index of the label whose word the predicted token contains; -1 when none (or several)."""
    hits = [i for i, w in enumerate(labels) if w.lower() in predicted_piece.lower()]
    return hits[0] if len(hits) == 1 else -1
