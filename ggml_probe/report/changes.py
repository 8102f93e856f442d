"""What changed: the rules that pick and word the largest changes of a study against its reference level.

    from ggml_probe.report.changes import what_changed
    for item in what_changed(study):   # a study dict, or study.json loaded
        print(item["text"])

Only the numbers already in the study dict are used. A change of accuracy, ACE or ECE is judged by the
paired bootstrap interval of the difference that the comparison recorded (comparison.levels.L.paired_deltas:
the same examples resampled for both levels), never by whether the two levels' own intervals overlap.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..analysis.noise_floor import within_floor
from .values import get, interval, num, signed, significant

# Calibration changes the list reports: (metric key in paired_deltas and in a run's metrics, name shown)
CALIBRATION_CHANGES = (("ace_paper", "ACE (paper)"), ("ece", "ECE"))


def _delta(d: Mapping[str, Any] | None) -> tuple[float, float | None, float | None] | None:
    d = d or {}
    v = num(d.get("value"))
    return None if v is None else (v, num(d.get("ci_low")), num(d.get("ci_high")))


def _verdict(lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None:
        return "no interval"
    return "significant" if significant(lo, hi) else "not significant"


def what_changed(study: Mapping[str, Any], max_items: int = 6) -> list[dict[str, Any]]:
    """The largest changes against the reference, each a sentence stating its number (and interval).

    Candidates, per task and non-reference level: the accuracy change (label-set scoring) with how many
    answers changed; the mean KL over the full vocabulary; the ACE and ECE changes (label-set scoring, or
    paper scoring in a paper-mode study), each with the paired interval of the difference; dead and salient
    count changes with the salient-set Jaccard; per level, the text KLD (llama-perplexity's) and the worst
    weight-error layer.
    Ranked: significant first (a paired interval excluding 0), then by a unitless size (|Δ| of a fraction,
    1 − agreement, 1 − e^−KL, 1 − Jaccard, relative RMSE); every kind of change gets a place before a kind
    repeats. Returns [{"text", "metric", "level", "task", "value", "ci_low", "ci_high", "significant",
    "score"}]; with the study's noise floor measured, also "within_noise_floor" and "noise_floor" (FLOOR_OF),
    and the text says when the change is within it.
    """
    items: list[dict[str, Any]] = []
    paper_mode = (study.get("study") or {}).get("mode") == "paper"
    scoring = "paper" if paper_mode else "label_set"
    scoring_note = " (paper scoring)" if paper_mode else ""

    def add(text, metric, level, task, value, lo=None, hi=None, score=0.0):
        items.append({"text": text, "metric": metric, "level": level, "task": task, "value": value,
                      "ci_low": lo, "ci_high": hi, "significant": significant(lo, hi), "score": float(score)})

    for task, t in (study.get("tasks") or {}).items():
        comparison = t.get("comparison") or {}
        ref = comparison.get("reference") or (study.get("study") or {}).get("reference")
        runs = t.get("runs") or {}
        for level, c in (comparison.get("levels") or {}).items():
            deltas = c.get("paired_deltas") or {}
            # accuracy: the label-set answers (whose flips are counted); accuracy_delta is the same paired
            # interval in a study.json written before paired_deltas existed
            acc = _delta((deltas.get("label_set") or {}).get("accuracy") or c.get("accuracy_delta"))
            if acc is not None:
                v, lo, hi = acc
                flips = c.get("flips") or {}
                span = f"{signed(100 * v)} points {interval(lo, hi, 100)}".strip()
                if "changed" in flips and c.get("n"):
                    text = (f"{level} changed {flips['changed']} of {c['n']} answers on {task}"
                            f" (agreement {100 * c.get('agreement', float('nan')):.1f}%); accuracy {span} vs {ref}, "
                            f"{_verdict(lo, hi)}.")
                else:
                    text = f"{level} on {task}: accuracy {span} vs {ref}, {_verdict(lo, hi)}."
                add(text, "accuracy_delta", level, task, v, lo, hi, score=max(abs(v), 1 - float(c.get("agreement", 1.0))))
                items[-1]["flips"] = flips.get("changed")
            kl = num(c.get("kl_full_mean"))
            if kl is not None:
                top1 = c.get("top1_agreement")
                extra = f"; the top-1 token matches {ref}'s in {100 * top1:.1f}% of answers" if top1 is not None else ""
                add(f"{level}'s next-token distribution on {task} is KL {kl:.3g} nats from {ref}'s on average"
                    f" (p99 {c.get('kl_full_p99', float('nan')):.3g}){extra}.",
                    "kl_full_mean", level, task, kl, score=1 - math.exp(-kl))
            for key, name in CALIBRATION_CHANGES:
                d = _delta((deltas.get(scoring) or {}).get(key))
                if d is None:
                    continue
                v, lo, hi = d
                r = num((((runs.get(ref) or {}).get("metrics") or {}).get(scoring) or {}).get(key, {}).get("value"))
                q = num((((runs.get(level) or {}).get("metrics") or {}).get(scoring) or {}).get(key, {}).get("value"))
                values = f"{level} {q:.3f} vs {ref} {r:.3f}, " if q is not None and r is not None else f"{level} vs {ref}: "
                add(f"{name}{scoring_note} on {task}: {values}change {signed(v, '.3f')} {interval(lo, hi, 1, '.3f')}"
                    f" (paired bootstrap), {_verdict(lo, hi)}.", key + "_delta", level, task, v, lo, hi, score=abs(v))
        _neuron_changes(t, task, ref, add)
    _text_kld_changes(study, add)
    _compare_with_floor(items, study)
    for level, w in (study.get("weights") or {}).items():
        rows = [r for r in (w or {}).get("layers") or [] if num(r.get("rel_rmse")) is not None]
        if not rows:
            continue
        worst = max(rows, key=lambda r: r["rel_rmse"])
        sq = num(worst.get("sqnr_db"))
        tot = num(((w or {}).get("total") or {}).get("rel_rmse"))
        text = (f"{level}'s weights are hurt most at layer {worst['layer']}: relative RMSE {worst['rel_rmse']:.4f}"
                + (f" (SQNR {sq:.1f} dB)" if sq is not None else "")
                + (f"; over all compared tensors {tot:.4f}." if tot is not None else "."))
        add(text, "weight_rel_rmse", level, None, worst["rel_rmse"], score=worst["rel_rmse"])
    return _rank(items, max_items)


# A change's size as the noise floor measures it: the what-changed metric → (floor metric, the size read
# from the item, how the floor's value is worded).
FLOOR_OF = {
    "accuracy_delta": ("flips", lambda i: i.get("flips"), lambda v: f"{v:.0f} flip{'s' if v != 1 else ''}"),
    "kl_full_mean": ("kl_full_mean", lambda i: i["value"], lambda v: f"KL {v:.3g}"),
    "ace_paper_delta": ("ace_paper_delta", lambda i: i["value"], lambda v: f"|Δ ACE| {v:.3f}"),
    "ece_delta": ("ece_delta", lambda i: i["value"], lambda v: f"|Δ ECE| {v:.3f}"),
    "dead_count_delta": ("dead_count_delta", lambda i: i["value"], lambda v: f"{v:.0f} dead neurons"),
    "salient_count_delta": ("salient_count_delta", lambda i: i["value"], lambda v: f"{v:.0f} salient neurons"),
    "text_kld_mean": ("text_kld_mean", lambda i: i["value"], lambda v: f"text KLD {v:.4f}"),
}


def floor_for(study: Mapping[str, Any], metric: str, task: str | None, level: str | None = None) -> dict[str, Any] | None:
    """The noise floor of a what-changed metric on a task (text KLD: the study's text), with its wording
    (`text`: "2 flips between batch layouts of F16"): the reference's, or `level`'s own under the other
    batch layout when that is larger; None when the study did not measure it."""
    section = study.get("noise_floor") or {}
    if metric not in FLOOR_OF or not section:
        return None
    name, _, word = FLOOR_OF[metric]
    paper = (study.get("study") or {}).get("mode") == "paper"
    if paper and name in ("ace_paper_delta", "ece_delta"):
        name = "paper." + name
    source = section.get("text_kld") if metric == "text_kld_mean" else (section.get("tasks") or {}).get(task)
    floor = ((source or {}).get("floor") or {}).get(name)
    own = ((((source or {}).get("levels") or {}).get(level) or {}).get("effects") or {}).get(name)
    by_level = section.get("reference")
    if own is not None and (not floor or own > float(floor["value"])):
        floor, by_level = {"value": float(own), "by": "batch"}, level
    if not floor:
        return None
    phrase = (section.get("perturbations") or {}).get(floor.get("by"), f"under {floor.get('by')}")
    return {**floor, "metric": name, "level": by_level,
            "text": f"{word(float(floor['value']))} {phrase} of {by_level}"}


def _compare_with_floor(items: list[dict[str, Any]], study: Mapping[str, Any]) -> None:
    """Each change against the noise floor: within it, the sentence says so (and the item records it)."""
    for item in items:
        floor = floor_for(study, item["metric"], item["task"], item["level"])
        if floor is None:
            continue
        effect = FLOOR_OF[item["metric"]][1](item)
        item["within_noise_floor"] = within_floor(effect, floor)
        item["noise_floor"] = floor["value"]
        if item["within_noise_floor"]:
            item["text"] = item["text"].removesuffix(".") + f" — within the noise floor ({floor['text']})."


def _text_kld_changes(study: Mapping[str, Any], add) -> None:
    """Per level, llama-perplexity's text KLD with its tail and same top p (the community's figures)."""
    kld = study.get("kld") or {}
    ref = (study.get("study") or {}).get("reference")
    for level, m in (kld.get("models") or {}).items():
        mean, se = num(m.get("kld_mean")), num(m.get("kld_mean_se"))
        if mean is None:
            continue
        p99, same, ratio = num(m.get("kld_p99")), num(m.get("same_top_p")), num(m.get("ppl_ratio"))
        text = (f"{level}'s text KLD against {ref} is {mean:.4f} ± {se or 0:.4f} nats per token"
                + (f" (p99 {p99:.3f})" if p99 is not None else "")
                + (f"; the top token matches {ref}'s at {100 * same:.1f}% of {m.get('n_tokens')} positions" if same
                   is not None else "")
                + (f"; PPL ratio {ratio:.4f}" if ratio is not None else "") + ".")
        # a mean more than 2 standard errors above 0 is a real divergence, not rounding
        add(text, "text_kld_mean", level, None, mean, mean - 2 * (se or 0), mean + 2 * (se or 0),
            score=1 - math.exp(-mean))


def _neuron_changes(t: Mapping[str, Any], task: str, ref: str | None, add) -> None:
    """Dead and salient count changes per level, at the layer where the count moved most."""
    neurons = t.get("neurons") or {}
    ref_n = neurons.get(ref) or {}
    if not ref_n:
        return
    for level, n in neurons.items():
        if level == ref:
            continue
        for kind in ("dead", "salient"):
            a, b = ref_n.get(kind) or {}, n.get(kind) or {}
            diffs = [(abs(get(b, L) - get(a, L)), int(L)) for L in a if get(b, L) is not None and get(a, L) is not None]
            if not diffs:
                continue
            size, layer = max(diffs)
            nb, na = get(b, layer), get(a, layer)
            what = f"dead (|a| < {n.get('tau', ref_n.get('tau'))})" if kind == "dead" else "salient"
            text = f"{level} has {nb} {what} {n.get('neuron', '')} neurons at layer {layer} vs {na} at {ref} on {task}"
            if kind == "salient":
                jac = get(((t.get("neuron_comparison") or {}).get(level) or {}).get("salient_jaccard") or {}, layer)
                if jac is not None:
                    text += f"; the two salient sets overlap with Jaccard {jac:.2f}"
                score = max(size / max(na, nb, 1), 1 - jac if jac is not None else 0.0)
            else:
                score = size / (n.get("n_ff") or 1)
            add(text + ".", f"{kind}_count_delta", level, task, float(nb - na), score=score)


def _rank(items: list[dict[str, Any]], max_items: int) -> list[dict[str, Any]]:
    """Significant first, then by score; one of each kind of change before any kind repeats."""
    ranked = sorted(items, key=lambda i: (not i["significant"], -i["score"]))
    chosen: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in ranked:
        if item["metric"] not in seen and len(chosen) < max_items:
            chosen.append(item)
            seen.add(item["metric"])
    for item in ranked:
        if len(chosen) >= max_items:
            break
        if item not in chosen:
            chosen.append(item)
    chosen.sort(key=lambda i: (not i["significant"], -i["score"]))
    return chosen
