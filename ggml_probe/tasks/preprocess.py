"""Named text cleanups a task definition may ask for (`[choices] preprocess = "hellaswag"`).

Each is what lm-evaluation-harness does to that data set before scoring it, so a task's prompts and
choices are the ones its published numbers come from:

- `hellaswag` (lm_eval/tasks/hellaswag/utils.py): the context is `ctx_a + " " + ctx_b.capitalize()`
  (Python's capitalize: the first character upper-case, the rest lower-case), the prompt is
  `activity_label + ": " + context`, and the prompt and every ending are cleaned by `preprocess`:
  stripped, " [title]" → ". ", any "[…]" removed (WikiHow artifacts), "  " → " ".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Preprocessor:
    """derive: extra fields built from a row's columns before the template is filled (the columns it
    reads are `reads`; a file without them keeps its own value of the field); text: the cleanup of the
    rendered prompt and of every choice."""

    reads: tuple[str, ...]
    derive: Callable[[Mapping[str, Any]], dict[str, str]]
    text: Callable[[str], str]


def _hellaswag_text(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_fields(row: Mapping[str, Any]) -> dict[str, str]:
    a, b = row.get("ctx_a"), row.get("ctx_b")
    if isinstance(a, str) and isinstance(b, str):
        return {"ctx": a + " " + b.capitalize()}
    return {}


PREPROCESSORS: dict[str, Preprocessor] = {
    "hellaswag": Preprocessor(("ctx_a", "ctx_b"), _hellaswag_fields, _hellaswag_text),
}


def clean_text(name: str, text: str) -> str:
    """`text` through the named cleanup."""
    return PREPROCESSORS[name].text(text)
