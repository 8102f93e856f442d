"""The noise floor: how far the reference level moves from itself under changes that carry no quantization
(another batch layout, flash attention on/off, another thread count), per metric, and whether a
quantization effect lies inside it.

Pure functions over plain data: a comparison of two runs of one task (pipeline.compare.compare_runs's dict:
flips, KL, paired deltas), the neuron figures of both (pipeline.neurons.neuron_level's dict) and
llama-perplexity's text-KLD figures. The same extraction (`effects`) reads a quantization level's
comparison and a perturbation's, so an effect and its floor are one definition.

    effects_by_perturbation = {"batch": effects(comparison, ref_neurons, pert_neurons), ...}
    floor = noise_floor(effects_by_perturbation)   # {"flips": {"value": 2, "by": "batch"}, ...}
    within_floor(1, floor["flips"])                 # True
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

Comparison = Mapping[str, Any]


def _paired(scoring: str, key: str) -> Callable[[Comparison], float | None]:
    def read(c: Comparison) -> float | None:
        v = (((c.get("paired_deltas") or {}).get(scoring) or {}).get(key) or {}).get("value")
        return None if v is None else abs(float(v))
    return read


def _field(key: str) -> Callable[[Comparison], float | None]:
    return lambda c: None if c.get(key) is None else float(c[key])


# Every metric of the floor: name → (what it is, how it is read from a comparison dict). Each is a size
# (≥ 0): an absolute change, a count, a divergence, a loss of overlap.
COMPARISON_METRICS: dict[str, tuple[str, Callable[[Comparison], float | None]]] = {
    "flips": ("answers whose label-set prediction changed", lambda c: float((c.get("flips") or {}).get("changed", 0))),
    "accuracy_delta": ("|accuracy change| (label-set scoring, fraction)", _paired("label_set", "accuracy")),
    "kl_label_mean": ("mean KL(P_ref ‖ P) of the label distribution (nats)", _field("kl_label_mean")),
    "kl_full_mean": ("mean KL(P_ref ‖ P) of the full next-token distribution (nats)", _field("kl_full_mean")),
    "kl_full_p99": ("p99 of the full-vocabulary KL (nats)", _field("kl_full_p99")),
    "top1_changed": ("share of answers whose full-vocabulary argmax changed",
                     lambda c: None if c.get("top1_agreement") is None else 1.0 - float(c["top1_agreement"])),
    "ace_paper_delta": ("|ACE (paper) change|, label-set scoring", _paired("label_set", "ace_paper")),
    "ece_delta": ("|ECE change|, label-set scoring", _paired("label_set", "ece")),
    "paper.accuracy_delta": ("|accuracy change|, paper scoring", _paired("paper", "accuracy")),
    "paper.ace_paper_delta": ("|ACE (paper) change|, paper scoring", _paired("paper", "ace_paper")),
    "paper.ece_delta": ("|ECE change|, paper scoring", _paired("paper", "ece")),
}

NEURON_METRICS = {
    "dead_count_delta": "largest |change in the dead count| over the analysed layers",
    "salient_count_delta": "largest |change in the salient count| over the attributed layers",
    "dead_jaccard_loss": "1 − the smallest Jaccard overlap of the dead sets over the layers",
    "salient_jaccard_loss": "1 − the smallest Jaccard overlap of the salient sets over the layers",
}

TEXT_KLD_METRICS = {
    "text_kld_mean": "llama-perplexity's mean KLD on the text (nats per token)",
    "text_kld_p99": "llama-perplexity's p99 KLD on the text",
    "text_top_changed": "1 − llama-perplexity's same top p",
}

DEFINITIONS = {**{k: v[0] for k, v in COMPARISON_METRICS.items()}, **NEURON_METRICS, **TEXT_KLD_METRICS}


def jaccard(a, b) -> float:
    """|A ∩ B| / |A ∪ B| of two id sets; 1 when both are empty."""
    a, b = set(a), set(b)
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def neuron_effects(ref: Mapping[str, Any] | None, other: Mapping[str, Any] | None) -> dict[str, float]:
    """Dead and salient set changes of one level against the reference (neuron_level's dicts), largest over layers."""
    out: dict[str, float] = {}
    if not ref or not other:
        return out
    for kind in ("dead", "salient"):
        counts_ref, counts = ref.get(kind) or {}, other.get(kind) or {}
        layers = [k for k in counts_ref if k in counts]
        if layers:
            out[f"{kind}_count_delta"] = float(max(abs(counts[k] - counts_ref[k]) for k in layers))
        ids_ref, ids = ref.get(f"{kind}_ids") or {}, other.get(f"{kind}_ids") or {}
        layers = [k for k in ids_ref if k in ids]
        if layers:
            out[f"{kind}_jaccard_loss"] = 1.0 - min(jaccard(ids_ref[k], ids[k]) for k in layers)
    return out


def effects(comparison: Comparison, ref_neurons: Mapping[str, Any] | None = None,
            neurons: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Every floor metric this comparison (and these neuron figures) can give, as sizes ≥ 0."""
    out = {}
    for name, (_, read) in COMPARISON_METRICS.items():
        v = read(comparison)
        if v is not None and math.isfinite(v):
            out[name] = v
    out.update(neuron_effects(ref_neurons, neurons))
    return out


def text_kld_effects(figures: Mapping[str, Any]) -> dict[str, float]:
    """The text-KLD metrics of one scored model (pipeline.kld's figures)."""
    out = {}
    for name, key in (("text_kld_mean", "kld_mean"), ("text_kld_p99", "kld_p99")):
        if figures.get(key) is not None:
            out[name] = float(figures[key])
    if figures.get("same_top_p") is not None:
        out["text_top_changed"] = 1.0 - float(figures["same_top_p"])
    return out


def noise_floor(by_perturbation: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric, the largest value over the perturbations and which one gave it (the first on ties)."""
    floor: dict[str, dict[str, Any]] = {}
    for name, values in by_perturbation.items():
        for metric, v in values.items():
            if metric not in floor or v > floor[metric]["value"]:
                floor[metric] = {"value": float(v), "by": name}
    return floor


def within_floor(effect: float | None, floor: Mapping[str, Any] | None) -> bool | None:
    """Whether a quantization effect (a size, or a signed change: its magnitude counts) is no larger than
    the floor; None when either is unknown."""
    if effect is None or not floor or floor.get("value") is None:
        return None
    return abs(float(effect)) <= float(floor["value"])
