"""Choosing per-tensor types under a size budget, and ranking agreement (pure NumPy).

The model: each tensor u at type t adds cost[u][t] to the output's mean KLD, independently of the
others (first order: small perturbations of different weights add). Minimising Σ cost under Σ bytes ≤
budget is a multiple-choice knapsack; the greedy below starts every tensor at its cheapest type and
repeatedly takes the upgrade with the largest KLD saved per extra byte, over each tensor's lower convex
hull of (bytes, cost) — the classic greedy for this problem, optimal up to the last partial step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


@dataclass
class Allocation:
    types: dict[str, str]  # unit → chosen type
    size_bytes: int  # Σ bytes of the chosen types
    predicted_cost: float  # Σ cost of the chosen types


def _hull(options: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """The (bytes, cost, type) options on the lower convex hull, by growing bytes, cost strictly falling."""
    by_size: dict[int, tuple[int, float, str]] = {}
    for b, c, t in options:
        if b not in by_size or c < by_size[b][1]:
            by_size[b] = (b, c, t)
    pts = sorted(by_size.values())
    frontier: list[tuple[int, float, str]] = []
    for p in pts:
        if frontier and p[1] >= frontier[-1][1]:
            continue  # more bytes and no less cost: never worth it
        frontier.append(p)
    hull: list[tuple[int, float, str]] = []
    for p in frontier:
        while len(hull) >= 2:
            (b0, c0, _), (b1, c1, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the line from hull[-2] to p
            if (c1 - c0) * (p[0] - b0) >= (p[1] - c0) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def smallest_size(size: Mapping[str, Mapping[str, int]]) -> int:
    return int(sum(min(options.values()) for options in size.values()))


def allocate(size: Mapping[str, Mapping[str, int]], cost: Mapping[str, Mapping[str, float]],
             budget_bytes: int) -> Allocation:
    """Per unit the type minimising Σ cost with Σ size ≤ budget (greedy on the convex hulls).

    `size[u][t]` bytes and `cost[u][t]` predicted KLD of unit u at type t (the same types in both).
    Raises ValueError when even the smallest types exceed the budget.
    """
    hulls = {u: _hull([(int(size[u][t]), float(cost[u][t]), t) for t in size[u]]) for u in size}
    step = {u: 0 for u in hulls}
    total = sum(h[0][0] for h in hulls.values())
    if total > budget_bytes:
        raise ValueError(f"the smallest choice is {total} bytes, over the budget of {budget_bytes}")
    while True:
        best, best_gain = None, 0.0
        for u, h in hulls.items():
            i = step[u]
            if i + 1 >= len(h):
                continue
            extra = h[i + 1][0] - h[i][0]
            if total + extra > budget_bytes:
                continue
            gain = (h[i][1] - h[i + 1][1]) / extra
            if gain > best_gain:
                best, best_gain = u, gain
        if best is None:
            break
        i = step[best]
        total += hulls[best][i + 1][0] - hulls[best][i][0]
        step[best] = i + 1
    types = {u: hulls[u][step[u]][2] for u in hulls}
    return Allocation(types, int(total), float(sum(hulls[u][step[u]][1] for u in hulls)))


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with fewer than 3 pairs or a constant side."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3 or a.size != b.size:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    for v in np.unique(x):  # ties share their average rank
        tied = x == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks
