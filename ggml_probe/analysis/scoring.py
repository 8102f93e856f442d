"""Turning next-token logits into predictions and confidences, under two definitions.

- label-set (default): softmax over the labels only. Each label is scored by what the model would
  emit for it after the prompt, its answer tokens (tasks.answers: ' True' after 'Answer:', read by
  tokenizing prompt + answer, so SentencePiece's '▁' + 'True' for ' True' alone does not arise):
  - when every label's answer is one token right after the prompt (the usual case), a label's logit
    is the log-sum-exp of the logits of its single-token surface forms there: the answer token
    (' True') and the label glued to the prompt ('True') — the rule ggml-probe always had, so these
    runs keep their numbers;
  - otherwise every label is scored by its answer's log-likelihood, the sum of its tokens'
    log-probabilities (lm-evaluation-harness's loglikelihood), and the label-set distribution is the
    softmax over those. `acc_norm` divides each log-likelihood by the label's length in characters
    before the argmax, as lm-evaluation-harness does.
- paper: full-vocabulary softmax; prediction = argmax token, confidence = its probability,
  correct when the lower-cased gold label is a substring of the lower-cased predicted token
  (Singh & Sajjad 2025).
- multiple choice (PIQA, HellaSwag): the example's own choices are its labels, each always scored by its
  answer's log-likelihood (lm-evaluation-harness's multiple_choice: acc, and acc_norm by characters); the
  paper's substring rule has no label word to look for, so paper scoring there asks whether the argmax
  token is the first token of the gold choice's answer (`mc_paper_prediction`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax as _log_softmax, logsumexp

DEFINITIONS = {
    "label_set": (
        "softmax over the labels only; prediction = argmax, confidence = its probability. A label's answer "
        "tokens are what the model emits for it after the prompt (prompt + ' W' tokenized, the tokens after "
        "the prompt's). When every label's answer is one token, a label's logit = logsumexp of the logits of "
        "its single-token forms after the prompt (' W' and 'W'); otherwise a label's logit = its answer's "
        "log-likelihood (sum of the tokens' log-probabilities). A multiple-choice task's labels are each example's own "
        "choices, always scored by their answer's log-likelihood after the prompt (' ' + choice; "
        "lm-evaluation-harness's multiple_choice); acc_norm divides each by len(choice) in characters"
    ),
    "paper": (
        "full-vocabulary softmax at the last prompt position; prediction = argmax token, "
        "confidence = its probability; correct iff lower(gold) is a substring of lower(token) "
        "(Singh & Sajjad 2025). A multiple-choice task has no label words to find in the token: there the "
        "prediction is the one choice whose answer starts with the argmax token (none or several: no answer), "
        "correct iff it is the gold choice"
    ),
}


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """scipy.special.log_softmax in float64, whatever the input dtype (llama.cpp hands float32, the runs store float16)."""
    return _log_softmax(np.asarray(logits, dtype=np.float64), axis=axis)


@dataclass(frozen=True)
class LabelTokens:
    """For each label, the distinct token ids whose next-token logits stand for it (its single-token forms)."""

    labels: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]


def label_logits(logits: np.ndarray, label_tokens: LabelTokens) -> np.ndarray:
    """(n, n_labels) label logits from (n, n_vocab) next-token logits."""
    x = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    cols = []
    for ids in label_tokens.token_ids:
        cols.append(logsumexp(x[:, list(ids)], axis=1))
    return np.stack(cols, axis=1)


def continuation_loglik(logits: np.ndarray, tokens) -> float:
    """Sum of log p(token j | everything before it): row j of `logits` (k, n_vocab) predicts tokens[j]."""
    x = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    toks = np.asarray(tokens, dtype=np.int64)
    if x.shape[0] != len(toks):
        raise ValueError(f"{x.shape[0]} rows of logits for {len(toks)} tokens")
    return float(log_softmax(x)[np.arange(len(toks)), toks].sum())


def norm_prediction(loglik: np.ndarray, answers) -> np.ndarray:
    """lm-evaluation-harness's acc_norm prediction: argmax over labels of loglik / len(answer) in characters.

    answers: the label words (the same for every example), or one list per example of its own choices
    (a multiple-choice task). lm-evaluation-harness divides by `float(len(choice))`, the choice's length
    in characters (Python str length, code points; not bytes, not tokens), the choice without the ' '
    that joins it to the prompt."""
    chars = np.array([[float(len(w)) for w in row] for row in answers] if answers and not isinstance(answers[0], str)
                     else [float(len(w)) for w in answers])
    return np.argmax(np.atleast_2d(np.asarray(loglik, dtype=np.float64)) / chars, axis=1)


def mc_paper_prediction(top_tokens: np.ndarray, answers) -> np.ndarray:
    """Paper scoring of a multiple-choice task: the index of the one choice whose answer starts with the
    full-vocabulary argmax token, -1 when none or several do. answers: per example, per choice, its answer
    tokens after the prompt."""
    out = np.full(len(top_tokens), -1, dtype=np.int64)
    for i, (top, per_choice) in enumerate(zip(top_tokens, answers)):
        hits = [j for j, toks in enumerate(per_choice) if toks and int(toks[0]) == int(top)]
        if len(hits) == 1:
            out[i] = hits[0]
    return out


def paper_correct(predicted_piece: str, gold_label: str) -> bool:
    return gold_label.lower() in predicted_piece.lower()


def paper_prediction_index(predicted_piece: str, labels: tuple[str, ...]) -> int:
    """Index of the label whose word the predicted token contains; -1 when none (or several)."""
    hits = [i for i, w in enumerate(labels) if w.lower() in predicted_piece.lower()]
    return hits[0] if len(hits) == 1 else -1
