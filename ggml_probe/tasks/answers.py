"""What the model would emit to give each label as its answer to a prompt.

A label's *answer* is the text that follows the prompt — the label word after a space (' True' after
'Answer:'), or the word alone after a prompt that ends in whitespace — and its *answer tokens* are
the tokens of prompt + answer after the prompt's own tokens. Tokenizers differ in how that looks:

- BPE (Llama 3, Qwen2, GPT-2): 'Answer: True' → … ':' 'ĠTrue' — one token, as it is alone (' True').
- SentencePiece (Llama 2, Mistral, Phi-3, Gemma): ' True' alone is '▁' + 'True' (llama.cpp adds a
  space prefix), but after 'Answer:' it is the one token '▁True'. Tokenizing the label alone would
  make every label start with '▁'; tokenizing it after the prompt does not.
- A tokenizer may merge across the boundary ('Answer: ' + 'True': the prompt's trailing ' ' and
  'True' become ' True'). The prompt's tokens are then not a prefix of prompt + answer; the answer
  tokens are what follows the longest common prefix, and they follow that prefix (`context`), not
  the whole prompt.

Used by the label-set scoring (pipeline.evaluation) and by the salient-neuron targets
(pipeline.neurons), so both speak of the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ProbeError
from .spec import Tokenizer


def label_continuation(prompt: str, word: str) -> str:
    """A label word as the answer to `prompt`: ' True' after 'Answer:', the word alone after a space or newline."""
    return word if not prompt or prompt[-1].isspace() else " " + word


@dataclass(frozen=True)
class Answer:
    """One label's answer to one prompt, in tokens.

    tokens: what the model emits for `text` after the prompt (at least one).
    context: how many of the prompt's tokens it follows — all of them unless the tokenizer merges
    across the boundary, then the longest common prefix of the prompt's and prompt + answer's tokens.
    glued: the token of the label word written right after the whole prompt with no separator
    ('Answer:True' → 'True'), when that is one token; else None. With `tokens`, the two surface forms
    the single-token scoring merges (analysis.scoring: today's rule, read after the prompt).
    """

    label: str
    text: str
    tokens: tuple[int, ...]
    context: int
    glued: int | None = None

    @property
    def single(self) -> bool:
        """One token right after the whole prompt (the case the next-token logits score alone)."""
        return len(self.tokens) == 1


def _after_prompt(tokenizer: Tokenizer, head: np.ndarray, text: str) -> tuple[tuple[int, ...], int]:
    """(tokens after the longest common prefix with the prompt's tokens, that prefix's length)."""
    joint = tokenizer.tokenize(text)
    k, n = 0, min(len(head), len(joint))
    while k < n and head[k] == joint[k]:
        k += 1
    return tuple(int(t) for t in joint[k:]), k


def label_answers(tokenizer: Tokenizer, prompt: str, labels: Sequence[str],
                  prompt_tokens: np.ndarray | None = None, distinct: bool = True) -> list[Answer]:
    """Every label's answer to `prompt` (tokenizer: an Engine or a Vocab; prompt_tokens: the prompt's own
    tokens, BOS included as the model gets them, when already at hand). `labels`: the label words, or a
    multiple-choice example's choices.

    Raises ProbeError when a label adds no token after the prompt, or (with `distinct`, for label words)
    when two labels have the same answer tokens (the scoring could not tell them apart). A multiple-choice
    example may repeat a choice: both are scored, as lm-evaluation-harness does."""
    head = tokenizer.tokenize(prompt) if prompt_tokens is None else np.asarray(prompt_tokens)
    out = []
    for word in labels:
        text = label_continuation(prompt, word)
        tokens, k = _after_prompt(tokenizer, head, prompt + text)
        if not tokens:
            raise ProbeError(f"the label {word!r} adds no token after the prompt {prompt[-40:]!r}")
        glued = None
        if len(tokens) == 1 and k == len(head):
            if text == word:  # no separator: the answer is the glued form
                glued = tokens[0]
            else:
                g, gk = _after_prompt(tokenizer, head, prompt + word)
                if len(g) == 1 and gk == len(head):
                    glued = g[0]
        out.append(Answer(word, text, tokens, k, glued))
    seen: dict[tuple[int, ...], str] = {}
    for a in out if distinct else ():
        if a.tokens in seen:
            raise ProbeError(f"labels {seen[a.tokens]!r} and {a.label!r} are the same tokens after the prompt; "
                             "choose distinct label words")
        seen[a.tokens] = a.label
    return out


def single_token_forms(answers: Sequence[Answer], prompt_length: int) -> tuple[tuple[int, ...], ...] | None:
    """Per label, the distinct tokens of its single-token surface forms after the prompt (the answer
    token, and the glued token unless another label owns it): the label-set scoring's token sets.

    None when some label's answer is not one token right after the whole prompt: then every label is
    scored by its answer's log-likelihood instead."""
    if not all(a.single and a.context == prompt_length for a in answers):
        return None
    answer_of = {a.tokens[0]: a.label for a in answers}
    sets = []
    for a in answers:
        ids = {a.tokens[0]}
        if a.glued is not None and answer_of.get(a.glued, a.label) == a.label:
            ids.add(a.glued)
        sets.append(tuple(sorted(ids)))
    owner: dict[int, str] = {}
    for a, ids in zip(answers, sets):
        for t in ids:
            if t in owner:
                raise ProbeError(f"labels {owner[t]!r} and {a.label!r} are written with the same token after the "
                                 "prompt; choose distinct label words")
            owner[t] = a.label
    return tuple(sets)
