"""One grammar for choosing layers, shared by every command (`--layers`).

    all            every layer
    0,14,-1        layer indices; negatives count from the end (-1 is the last layer)
    3-7            an inclusive range; may be mixed with single indices: 0,3-7,-1
"""

from __future__ import annotations

import re
from typing import Sequence

from .errors import ProbeError

_INDEX = re.compile(r"-?\d+")
_RANGE = re.compile(r"(\d+)-(\d+)")


def parse_layer_spec(spec: str | int | Sequence[int] | None) -> list[int] | None:
    """The layers a spec names, in order, negatives kept; None for 'all' (or None / empty)."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return [int(x) for x in spec]
    text = spec.replace(" ", "").lower()
    if text in ("", "all"):
        return None
    out: list[int] = []
    for part in text.split(","):
        if not part:
            continue
        if _INDEX.fullmatch(part):
            out.append(int(part))
        elif m := _RANGE.fullmatch(part):
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ProbeError(f"bad layer range {part!r} in --layers: {b} < {a}")
            out.extend(range(a, b + 1))
        else:
            raise ProbeError(f"bad layer {part!r} in --layers (use e.g. 0,14,-1 or 3-7 or all)")
    return out


def resolve_layers(spec: str | int | Sequence[int] | None, n_layer: int) -> list[int]:
    """A layer spec against a model of `n_layer` layers: sorted distinct indices, each checked in range."""
    named = parse_layer_spec(spec)
    if named is None:
        return list(range(n_layer))
    out = set()
    for layer in named:
        idx = layer + n_layer if layer < 0 else layer
        if not 0 <= idx < n_layer:
            raise ProbeError(f"layer {layer} out of range: the model has {n_layer} layers (0..{n_layer - 1})")
        out.add(idx)
    if not out:
        raise ProbeError("no layers chosen")
    return sorted(out)
