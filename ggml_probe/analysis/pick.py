"""Which quant should I run? The Pareto frontier of a ladder and the pick within a budget.

Pure functions over per-level records (no llama.cpp): `pareto_frontier` over the objectives every level
has figures for, `check_budget` per level, and `pick`: the smallest (default) or fastest level that meets
the quality budget and fits the memory budget, with the reasons, or "none fits" with the nearest miss.

    from ggml_probe.analysis.pick import Budget, LevelRecord, pick
    res = pick([LevelRecord("Q8_0", 145_000_000, kld_mean=0.004), LevelRecord("Q4_0", 85_000_000, kld_mean=0.3)],
               Budget(max_kld=0.1, memory_bytes=8 << 30))
    res.pick, res.reasons

Default budget: mean KLD ≤ 0.1 nats against the reference, nothing else. On llama.cpp's own scoreboard
(tools/perplexity/README.md, LLaMA 3 8B against FP16, Wikitext-2) Q8_0 is at 0.001, Q6_K 0.005, Q5_K_M
0.011, Q4_K_M 0.031, Q4_0 0.072, Q3_K_M 0.102 (PPL +10%), Q2_K 0.445 (PPL +56%): the community treats
below ~0.01 as near-lossless, 4-bit K-quants (~0.03) as the usual sweet spot, and the step into 3-bit
and below — from about 0.1 up — as where the loss becomes noticeable. So 0.1 admits everything down
to a good 3-bit quant of a 7-8B model and refuses what is clearly degraded. Tail KLD (p99) and task
accuracy vary too much with the model and the text for a general default: set them when they matter.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import ProbeError
from ..fsutil import human_size

DEFAULT_MAX_KLD = 0.1

# Each objective and its direction: "min" (smaller is better) or "max".
OBJECTIVES: dict[str, str] = {
    "size_bytes": "min",
    "kld_mean": "min",
    "kld_p99": "min",
    "same_top_p": "max",
    "accuracy_delta": "max",
    "pp_tokens_per_s": "max",
    "tg_tokens_per_s": "max",
}
# size × quality (mean KLD) × speed; each joins only when every level has a figure for it.
DEFAULT_OBJECTIVES = ("size_bytes", "kld_mean", "pp_tokens_per_s", "tg_tokens_per_s")

OBJECTIVE_LABELS = {"size_bytes": "size", "kld_mean": "mean KLD", "kld_p99": "p99 KLD", "same_top_p": "same top p",
                    "accuracy_delta": "accuracy Δ", "pp_tokens_per_s": "pp tokens/s",
                    "tg_tokens_per_s": "tg tokens/s"}


@dataclass(frozen=True)
class LevelRecord:
    """One level's figures; any but name and size may be unknown (None).

    kld_mean / kld_p99: nats against the reference (llama-perplexity's definitions); same_top_p: a
    fraction; accuracy_delta: accuracy(level) − accuracy(reference) in points, accuracy_delta_ci its
    paired 95% interval in points; pp/tg: prompt-processing and generation tokens/s; context_bytes: the
    memory a level needs beyond its file at the planned context (KV cache and compute buffers).
    """

    name: str
    size_bytes: int
    bits_per_weight: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    same_top_p: float | None = None
    accuracy_delta: float | None = None
    accuracy_delta_ci: tuple[float, float] | None = None
    pp_tokens_per_s: float | None = None
    tg_tokens_per_s: float | None = None
    context_bytes: int = 0

    def value(self, objective: str) -> float | None:
        v = getattr(self, objective)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    @property
    def memory_need_bytes(self) -> int:
        return int(self.size_bytes) + int(self.context_bytes)


@dataclass(frozen=True)
class Budget:
    """What a level must meet. None switches a check off; memory_bytes None: this machine's available memory."""

    max_kld: float | None = DEFAULT_MAX_KLD
    max_p99_kld: float | None = None
    max_accuracy_drop: float | None = None  # points
    memory_bytes: int | None = None


@dataclass
class Failure:
    """One budget a level fails: its figure (None: not measured), the limit, how far over (value/limit)."""

    budget: str  # "max_kld" | "max_p99_kld" | "max_accuracy_drop" | "memory"
    value: float | None
    limit: float
    excess: float  # ≥ 1 when measured and over; inf when not measured
    text: str


@dataclass
class LevelVerdict:
    name: str
    memory_need_bytes: int
    meets_budget: bool
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. an accuracy interval that reaches past the budget
    on_frontier: bool = True
    dominated_by: list[str] = field(default_factory=list)


@dataclass
class PickResult:
    pick: str | None  # None: no level meets the budget
    prefer: str
    budget: dict[str, Any]  # the limits used, memory's source included
    objectives: list[str]  # the objectives of the Pareto frontier
    dropped_objectives: dict[str, str]  # objective → why it was left out
    frontier: list[str]
    levels: dict[str, LevelVerdict]
    reasons: list[str]  # the pick and why, then every excluded or dominated level, one line each
    nearest_miss: str | None = None  # when nothing fits: the level closest to the budget

    def to_dict(self) -> dict[str, Any]:
        return {"pick": self.pick, "prefer": self.prefer, "budget": self.budget, "objectives": self.objectives,
                "dropped_objectives": self.dropped_objectives, "frontier": self.frontier,
                "levels": {k: asdict(v) for k, v in self.levels.items()}, "reasons": self.reasons,
                "nearest_miss": self.nearest_miss}


# ------------------------------------------------------------------ sizes and memory

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8GiB', '1.5 GB', '512M', '1000000' → bytes. KiB/MiB/GiB/TiB are powers of 1024, kB/MB/GB/TB of
    1000; a bare K/M/G/T is binary (as `free -g` and Docker read it); a plain number is bytes."""
    m = _SIZE.match(str(text))
    if not m or (not m.group(2) and m.group(3)):
        raise ProbeError(f"--memory: cannot read {text!r} as a size (e.g. 8GiB, 16GB, 512MiB, 1000000)")
    number, unit, binary, b = m.groups()
    power = "kmgt".index(unit.lower()) + 1 if unit else 0
    base = 1024 if (binary or not b) else 1000
    value = float(number) * base ** power
    if value < 1:
        raise ProbeError(f"--memory: {text!r} is not a positive size")
    return int(value)


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What a cgroup v2 memory limit leaves this process's group (None: no limit)."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_memory() -> tuple[int, str]:
    """This machine's available memory in bytes and where the figure came from: /proc/meminfo's
    MemAvailable (os.sysconf's free pages where there is none), lowered to a cgroup v2 limit's room."""
    found, source = _meminfo_available(), "MemAvailable (/proc/meminfo)"
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            source = "available pages (os.sysconf)"
        except (ValueError, OSError, AttributeError):
            raise ProbeError("cannot read this machine's available memory: give --memory") from None
    room = _cgroup_room()
    if room is not None and room < found:
        found, source = room, "the cgroup's memory.max − memory.current"
    return int(found), source


def context_allowance(*, n_layers: int, n_kv_heads: int, head_dim_k: int, head_dim_v: int | None = None,
                      n_heads: int, hidden_size: int, ffn_size: int, n_vocab: int, n_ctx: int = 4096,
                      n_ubatch: int = 512, kv_bytes_per_element: int = 2) -> dict[str, int]:
    """An estimate of the memory llama.cpp needs beyond the weights at a context of n_ctx tokens (CPU).

    KV cache: n_layers · n_ctx · n_kv_heads · (head_dim_k + head_dim_v) · 2 bytes (f16 K and V, llama.cpp's
    default) — exact for dense attention. Compute buffer: 4 bytes · n_ubatch · (max(n_vocab, n_heads·n_ctx)
    + ffn_size + hidden_size): the ubatch's logits or its attention scores, whichever is larger, plus the
    FFN and residual rows. On the demo (SmolLM2-135M, n_ctx 4096) llama.cpp reports KV 90.0 MiB and a
    compute buffer of 99.4 MiB; this gives 90.0 and 100.1 MiB.
    """
    head_dim_v = head_dim_k if head_dim_v is None else head_dim_v
    kv = n_layers * n_ctx * n_kv_heads * (head_dim_k + head_dim_v) * kv_bytes_per_element
    compute = 4 * n_ubatch * (max(n_vocab, n_heads * n_ctx) + ffn_size + hidden_size)
    return {"kv_cache_bytes": int(kv), "compute_bytes": int(compute), "total_bytes": int(kv + compute), "n_ctx": n_ctx}


# ------------------------------------------------------------------ frontier

def choose_objectives(records: Sequence[LevelRecord], wanted: Iterable[str] | None = None
                      ) -> tuple[list[str], dict[str, str]]:
    """The objectives of the frontier: the wanted ones (default DEFAULT_OBJECTIVES) that every level has
    a figure for; the others with why they were left out. Asking explicitly for one that some level lacks
    is an error (the default set drops it silently, and says so)."""
    explicit = wanted is not None
    used, dropped = [], {}
    for name in (list(wanted) if explicit else DEFAULT_OBJECTIVES):
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
        missing = [r.name for r in records if r.value(name) is None]
        if missing:
            if explicit:
                raise ValueError(f"objective {name!r} is not measured for {', '.join(missing)}")
            dropped[name] = f"not measured for {', '.join(missing)}" if len(missing) < len(records) else "not measured"
        else:
            used.append(name)
    return used, dropped


def _oriented(records: Sequence[LevelRecord], objectives: Sequence[str]) -> np.ndarray:
    """Every level's objectives as costs (maxima negated), one row per level."""
    sign = np.array([1.0 if OBJECTIVES[o] == "min" else -1.0 for o in objectives])
    values = np.array([[r.value(o) for o in objectives] for r in records], dtype=np.float64).reshape(len(records), -1)
    return values * sign


def pareto_frontier(records: Sequence[LevelRecord], objectives: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The levels no other level dominates, and for every level the levels dominating it.

    a dominates b when a is at least as good on every objective and strictly better on one; levels
    equal on every objective dominate neither and share the frontier.
    """
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ValueError("level names must be unique")
    costs = _oriented(records, objectives)
    le = (costs[:, None, :] <= costs[None, :, :]).all(axis=2)  # le[i, j]: i at least as good as j everywhere
    lt = (costs[:, None, :] < costs[None, :, :]).any(axis=2)
    dominates = le & lt
    by = {names[j]: [names[i] for i in np.flatnonzero(dominates[:, j])] for j in range(len(names))}
    return [n for n in names if not by[n]], by


# ------------------------------------------------------------------ budget and pick

def validate_budget(budget: Budget) -> Budget:
    """The budget itself, or a one-line error naming the option that is not a finite number ≥ 0."""
    for name in ("max_kld", "max_p99_kld", "max_accuracy_drop", "memory_bytes"):
        limit = getattr(budget, name)
        if limit is not None and not (limit >= 0 and math.isfinite(limit)):
            option = "--memory" if name == "memory_bytes" else "--" + name.replace("_", "-")
            raise ProbeError(f"{option} must be a finite number ≥ 0, not {limit!r}")
    return budget


def check_budget(record: LevelRecord, budget: Budget, memory_bytes: int) -> LevelVerdict:
    """Which budgets one level fails. A figure the budget needs but the level lacks fails it: a level is
    picked only when it is shown to meet the budget. Accuracy is judged by its point estimate; an
    interval reaching past the limit is noted."""
    v = LevelVerdict(record.name, record.memory_need_bytes, True)

    def over(name: str, label: str, value: float | None, limit: float, show) -> None:
        if value is None:
            v.failures.append(Failure(name, None, limit, math.inf, f"{label} not measured"))
        elif value > limit:
            excess = value / limit if limit > 0 else 1.0 + value - limit
            v.failures.append(Failure(name, value, limit, excess, f"{label} {show(value)} > {show(limit)}"))

    if budget.max_kld is not None:
        over("max_kld", "mean KLD", record.value("kld_mean"), budget.max_kld, lambda x: f"{x:.4g}")
    if budget.max_p99_kld is not None:
        over("max_p99_kld", "p99 KLD", record.value("kld_p99"), budget.max_p99_kld, lambda x: f"{x:.4g}")
    if budget.max_accuracy_drop is not None:
        delta = record.value("accuracy_delta")
        drop = None if delta is None else -delta
        over("max_accuracy_drop", "accuracy drop", drop, budget.max_accuracy_drop, lambda x: f"{x:.1f} points")
        ci = record.accuracy_delta_ci
        if drop is not None and drop <= budget.max_accuracy_drop and ci is not None and -ci[0] > budget.max_accuracy_drop:
            v.notes.append(f"accuracy Δ {delta:+.1f} points [{ci[0]:+.1f}, {ci[1]:+.1f}]: within the budget, "
                           f"but the interval reaches a drop of {-ci[0]:.1f} points")
    over("memory", "needs", record.memory_need_bytes, memory_bytes, human_size)
    if v.failures and v.failures[-1].budget == "memory":
        v.failures[-1].text += " of memory"
    v.meets_budget = not v.failures
    return v


def speed_key(records: Sequence[LevelRecord]) -> str:
    """The speed figure 'fastest' ranks by: generation (tg) tokens/s when every level has it, else
    prompt processing (pp)."""
    for key in ("tg_tokens_per_s", "pp_tokens_per_s"):
        if records and all(r.value(key) is not None for r in records):
            return key
    raise ProbeError("prefer='speed' needs speed figures (tg or pp tokens/s) for every level within the budget")


def _budget_text(budget: dict[str, Any]) -> str:
    parts = []
    if budget.get("max_kld") is not None:
        parts.append(f"mean KLD ≤ {budget['max_kld']:g}")
    if budget.get("max_p99_kld") is not None:
        parts.append(f"p99 KLD ≤ {budget['max_p99_kld']:g}")
    if budget.get("max_accuracy_drop") is not None:
        parts.append(f"accuracy drop ≤ {budget['max_accuracy_drop']:g} points")
    parts.append(f"memory {human_size(budget['memory_bytes'])}")
    return ", ".join(parts)


def pick(records: Sequence[LevelRecord], budget: Budget | None = None, *, prefer: str = "size",
         objectives: Iterable[str] | None = None) -> PickResult:
    """The level to run: among the levels meeting `budget`, the smallest file (prefer="size"; ties: lower
    mean KLD) or the fastest (prefer="speed": highest tg tokens/s, else pp; ties: smaller), with the
    Pareto frontier over `objectives` and one line of reasons per level. No level fits: pick is None and
    nearest_miss names the level with the fewest failed budgets, then the smallest excess."""
    if prefer not in ("size", "speed"):
        raise ValueError(f"prefer must be 'size' or 'speed', not {prefer!r}")
    if not records:
        raise ValueError("no levels to pick from")
    budget = validate_budget(budget or Budget())
    if budget.memory_bytes is None:
        memory, memory_source = available_memory()
    else:
        memory, memory_source = int(budget.memory_bytes), "given"
    budget_dict = {"max_kld": budget.max_kld, "max_p99_kld": budget.max_p99_kld,
                   "max_accuracy_drop": budget.max_accuracy_drop, "memory_bytes": memory, "memory_source": memory_source}
    used, dropped = choose_objectives(records, objectives)
    frontier, dominated_by = pareto_frontier(records, used)
    verdicts = {}
    for r in records:
        v = check_budget(r, budget, memory)
        v.on_frontier, v.dominated_by = not dominated_by[r.name], dominated_by[r.name]
        verdicts[r.name] = v
    by_name = {r.name: r for r in records}
    eligible = [r for r in records if verdicts[r.name].meets_budget]

    chosen: str | None = None
    if eligible:
        if prefer == "speed":
            key = speed_key(eligible)
            other = "pp_tokens_per_s" if key == "tg_tokens_per_s" else "tg_tokens_per_s"
            best = min(eligible, key=lambda r: (-r.value(key), -(r.value(other) or 0.0), r.size_bytes))
        else:
            best = min(eligible, key=lambda r: (r.size_bytes, r.value("kld_mean") if r.value("kld_mean") is not None
                                                else math.inf))
        chosen = best.name

    label = " × ".join(OBJECTIVE_LABELS[o] for o in used)
    reasons: list[str] = []
    nearest = None
    if chosen is not None:
        r = by_name[chosen]
        how = ("the smallest level" if prefer == "size" else
               f"the fastest level ({OBJECTIVE_LABELS[speed_key(eligible)]} {r.value(speed_key(eligible)):.1f})")
        where = (f"on the Pareto frontier of {label}" if verdicts[chosen].on_frontier else
                 f"dominated on {label} by {', '.join(verdicts[chosen].dominated_by)}, which fail the budget")
        reasons.append(f"{chosen}: {how} within the budget ({_budget_text(budget_dict)}); {where}.")
        reasons.extend(f"{chosen}: {n}" for n in verdicts[chosen].notes)
    else:
        def miss(r: LevelRecord) -> tuple[int, float, int]:
            f = verdicts[r.name].failures
            return (len(f), max(x.excess for x in f), r.size_bytes)

        nearest = min(records, key=miss).name
        reasons.append(f"none fits the budget ({_budget_text(budget_dict)}); nearest miss: {nearest} "
                       f"({'; '.join(f.text for f in verdicts[nearest].failures)}).")
    for r in records:
        v = verdicts[r.name]
        if r.name == chosen:
            continue
        parts = []
        if v.failures and r.name != nearest:
            parts.append("excluded: " + "; ".join(f.text for f in v.failures))
        if v.dominated_by:
            parts.append(f"dominated by {', '.join(v.dominated_by)}")
        if not parts and chosen is not None:
            parts.append(f"meets the budget; ranks after {chosen} by " + ("size" if prefer == "size" else "speed"))
        if parts:
            reasons.append(f"{r.name}: {'; '.join(parts)}.")
    return PickResult(chosen, prefer, budget_dict, used, dropped, frontier, verdicts, reasons, nearest)


def records_from_dicts(levels: Mapping[str, Mapping[str, Any]]) -> list[LevelRecord]:
    """LevelRecords from plain dicts keyed by level (a pick's JSON, or hand-made figures)."""
    known = set(LevelRecord.__dataclass_fields__) - {"name"}
    out = []
    for name, d in levels.items():
        kw = {k: d[k] for k in known if k in d}
        if kw.get("accuracy_delta_ci") is not None:
            kw["accuracy_delta_ci"] = tuple(kw["accuracy_delta_ci"])
        out.append(LevelRecord(name=name, **kw))
    return out
