"""Reading and formatting the numbers of a study dict: the small helpers the report's rules and its
data model share.

Per-layer dicts may have int keys or, after a JSON round trip, string keys; `get` takes either.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from ..fsutil import human_size


def num(x: Any) -> float | None:
    """x as a finite float, else None (missing, text, NaN, inf)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def get(d: Mapping[Any, Any] | None, layer: Any):
    """d[layer] whether the keys are ints or strings; None when absent."""
    if not d:
        return None
    if layer in d:
        return d[layer]
    if str(layer) in d:
        return d[str(layer)]
    try:
        return d.get(int(layer))
    except (TypeError, ValueError):
        return None


def layer_keys(*dicts: Mapping[Any, Any] | None) -> list[int]:
    """The layers of one or more per-layer dicts, as sorted ints."""
    return sorted({int(k) for d in dicts if d for k in d})


def fmt(x: Any, spec: str = ".3f") -> str:
    v = num(x)
    return "—" if v is None else format(v, spec)


def signed(x: float, spec: str = ".1f") -> str:
    """+1.2 / −1.2 (a real minus sign), and never "−0.0"."""
    s = format(x, spec)
    if s.lstrip("-").strip("0.") == "":
        s = format(0.0, spec)
    return "+" + s if not s.startswith("-") else "−" + s[1:]


def interval(lo: float | None, hi: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    """[−2.5, +1.0] of a change's interval, or "" without one."""
    if lo is None or hi is None:
        return ""
    return f"[{signed(lo * scale, spec)}, {signed(hi * scale, spec)}]"


def significant(ci_low: float | None, ci_high: float | None) -> bool:
    """A change's interval excludes 0."""
    return ci_low is not None and ci_high is not None and (ci_low > 0 or ci_high < 0)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def size(n: Any) -> str:
    v = num(n)
    return "—" if v is None else human_size(v)


def visible(token: str) -> str:
    """A token with its whitespace made visible (a leading space is meaningful in BPE pieces)."""
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")


def quoted_piece(piece: str) -> str:
    """A token piece in quotes, its spaces kept and line breaks and tabs made visible: ' True', '⏎'."""
    return "'" + str(piece).replace("\n", "⏎").replace("\t", "⇥") + "'"


def shows_accuracy_norm(metrics: Mapping[str, Any] | None) -> bool:
    """Whether a run's acc_norm says something accuracy does not: a multiple-choice task, or labels whose
    answers were scored by log-likelihood (several tokens); with single-token labels both agree."""
    m = metrics or {}
    return bool(m.get("multiple_choice") or (m.get("label_scoring") or {}).get("loglik")) and \
        "accuracy_norm" in (m.get("label_set") or {})
