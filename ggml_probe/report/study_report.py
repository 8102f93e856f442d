"""The study report: one self-contained HTML page and a Markdown twin, from a study dict.

    from ggml_probe.report.study_report import render_report
    paths = render_report(study, Path("study-out"))   # report.html, report.md, plots/*.png

The study dict (also STUDY_DIR/study.json) has the sections "study", "levels", "tasks", "weights" and
"what_changed"; any section may be missing or empty, and the report then says "not measured in this
study" for it instead of failing. Per-layer dicts may have int keys or, after a JSON round trip,
string keys. The helpers `weights_section`, `neurons_section` and `neuron_comparison` build the
"weights", "tasks.T.neurons.L" and "tasks.T.neuron_comparison.L" pieces from the library's results;
`what_changed` ranks the largest changes, computed only from the numbers in the dict.

The HTML needs no network and no JavaScript: CSS is inline, figures are base64 PNG data URIs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..analysis.neurons import corr_histogram, pairs_above, top_token_contexts
from ..fsutil import atomic_output, human_size
from . import plots


NOT_MEASURED = "not measured in this study"

DRIFT_DEFINITION = ("activation drift: per neuron |mean_level − mean_reference| / std_reference over the "
                    "same tokens' activations (standardised mean shift); per layer the mean and the max over "
                    "neurons with non-zero reference spread")
DEAD_JACCARD_DEFINITION = "dead/salient Jaccard: |A ∩ B| / |A ∪ B| of the neuron-id sets of a level and the reference (1 when both are empty)"

# Metrics of a run's label_set / paper dicts, in table order: (key, label, format, is a probability)
RUN_METRICS = (("accuracy", "accuracy", ".3f"), ("mean_confidence", "mean confidence", ".3f"),
               ("ace_paper", "ACE (paper)", ".3f"), ("ece", "ECE", ".3f"), ("brier", "Brier", ".3f"),
               ("nll", "NLL (nats)", ".3f"))


# =============================================================================================
# building sections from library results


def weights_section(report: Any) -> dict[str, Any]:
    """The study's "weights" entry for one level from a weights.error.WeightReport (or its to_dict()).

    Returns {"model", "ref", "total": {rel_rmse, sqnr_db, cosine, max_abs}, "layers": [{layer, rel_rmse,
    sqnr_db, cosine, max_abs, n_tensors, worst_tensor}], "worst_tensors": [{name, type, rel_rmse,
    sqnr_db}] (five highest rel RMSE)}. Non-finite values (the infinite SQNR of an exact copy) are None.
    """
    d = report.to_dict(with_units=False) if hasattr(report, "to_dict") else dict(report)
    keys = ("rel_rmse", "sqnr_db", "cosine", "max_abs")
    total = {k: _num((d.get("total") or {}).get(k)) for k in keys}
    layers = []
    for row in d.get("layers") or []:
        out = {"layer": int(row["layer"]), **{k: _num(row.get(k)) for k in keys}}
        if "n_tensors" in row:
            out["n_tensors"] = int(row["n_tensors"])
        if row.get("worst_tensor"):
            out["worst_tensor"] = str(row["worst_tensor"])
        layers.append(out)
    layers.sort(key=lambda r: r["layer"])
    tensors = [t for t in d.get("tensors") or [] if _num(t.get("rel_rmse")) is not None]
    tensors.sort(key=lambda t: t["rel_rmse"], reverse=True)
    worst = [{"name": t["name"], "type": t.get("type"), "rel_rmse": _num(t.get("rel_rmse")),
              "sqnr_db": _num(t.get("sqnr_db"))} for t in tensors[:5]]
    return {"model": d.get("model"), "ref": d.get("ref"), "total": total, "layers": layers, "worst_tensors": worst}


def neurons_section(
    accumulator: Any,
    definition: str = "act",
    tau: float = 0.1,
    *,
    salient: Mapping[int, Sequence[int]] | None = None,
    salient_method: str = "",
    salient_converged: Mapping[int, bool] | None = None,
    redundancy_threshold: float = 0.9,
    prompt_tokens: Sequence[Sequence[int]] | None = None,
    piece: Callable[[int], str] | None = None,
    top_neurons: int = 3,
    top_examples: int = 5,
) -> dict[str, Any]:
    """The study's "tasks.T.neurons.LEVEL" entry from an analysis.neurons.NeuronAccumulator.

    salient: {layer: neuron ids, most salient first} where salient neurons were measured (e.g. the
    exact last-layer integrated gradients); their count is the number of distinct ids. Top tokens are
    listed for the `top_neurons` most salient neurons of each layer that has them, otherwise for the
    neurons with the largest max |a|; they need `prompt_tokens` (what the run decoded) and `piece`.
    """
    layers = [int(x) for x in accumulator.layers]
    out: dict[str, Any] = {"layers": layers, "neuron": definition, "tau": float(tau), "n_ff": int(accumulator.n_ff),
                           "dead": {}, "max_abs_quantiles": {}, "tokens": {}}
    pooled = np.zeros(10, dtype=np.int64)
    for layer in layers:
        s = accumulator.stats[(definition, layer)]
        out["tokens"][layer] = int(s.count)
        out["dead"][layer] = int(len(s.dead(tau)))
        if s.count:
            out["max_abs_quantiles"][layer] = [float(q) for q in np.quantile(s.maxabs, [0, 0.1, 0.5, 0.9, 1.0])]
    if getattr(accumulator, "redundancy", False):
        out["redundant_pairs"] = {}
        out["redundancy_threshold"] = float(redundancy_threshold)
        for layer in layers:
            if accumulator.stats[(definition, layer)].count > 1:
                corr = accumulator.correlation(definition, layer)
                pooled += corr_histogram(corr)
                out["redundant_pairs"][layer] = int(pairs_above(corr, redundancy_threshold))
        out["redundancy_hist"] = [int(x) for x in pooled]
    if salient is not None:
        out["salient"] = {int(k): len(set(int(i) for i in v)) for k, v in salient.items()}
        out["salient_ids"] = {int(k): [int(i) for i in v] for k, v in salient.items()}
        out["salient_method"] = salient_method
        if salient_converged is not None:
            out["salient_converged"] = {int(k): bool(v) for k, v in salient_converged.items()}
    top = getattr(accumulator, "top", None) or {}
    if prompt_tokens is not None and piece is not None and top:
        out["top_tokens"] = {}
        out["top_tokens_ranked_by"] = {}
        for layer in layers:
            t = top.get((definition, layer))
            if t is None:
                continue
            ranked = list((salient or {}).get(layer, []))[:top_neurons]
            out["top_tokens_ranked_by"][layer] = "salience"
            if not ranked:
                ranked = [int(i) for i in np.argsort(-accumulator.stats[(definition, layer)].maxabs)[:top_neurons]]
                out["top_tokens_ranked_by"][layer] = "max |a|"
            out["top_tokens"][layer] = {
                int(j): [[r["token"], r["context"], float(r["value"])]
                         for r in top_token_contexts(t, int(j), prompt_tokens, piece)[:top_examples]]
                for j in ranked
            }
    return out


def _jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    a, b = set(a), set(b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def neuron_comparison(reference: Any, level: Any, definition: str = "act", tau: float = 0.1, *,
                      reference_salient: Mapping[int, Sequence[int]] | None = None,
                      level_salient: Mapping[int, Sequence[int]] | None = None) -> dict[str, Any]:
    """The study's "tasks.T.neuron_comparison.LEVEL" entry: two NeuronAccumulators over the same prompts.

    dead_jaccard and salient_jaccard compare neuron-id sets per layer; drift is the standardised shift
    of each neuron's mean activation (DRIFT_DEFINITION), its mean and max over neurons.
    """
    out: dict[str, Any] = {"dead_jaccard": {}, "drift": {}}
    for layer in reference.layers:
        ref_s, lvl_s = reference.stats[(definition, layer)], level.stats[(definition, layer)]
        out["dead_jaccard"][int(layer)] = _jaccard(ref_s.dead(tau).tolist(), lvl_s.dead(tau).tolist())
        spread = ref_s.std
        ok = np.isfinite(spread) & (spread > 0)
        if ok.any():
            shift = np.abs(lvl_s.mean[ok] - ref_s.mean[ok]) / spread[ok]
            out["drift"][int(layer)] = {"mean": float(shift.mean()), "max": float(shift.max())}
    if reference_salient is not None and level_salient is not None:
        out["salient_jaccard"] = {int(k): _jaccard(reference_salient[k], level_salient.get(k, []))
                                  for k in reference_salient}
    return out


# =============================================================================================
# what changed


def _sig(ci_low: float | None, ci_high: float | None) -> bool:
    return ci_low is not None and ci_high is not None and (ci_low > 0 or ci_high < 0)


def _signed(x: float, spec: str = ".1f") -> str:
    s = format(x, spec)
    if s.lstrip("-").strip("0.") == "":
        s = format(0.0, spec)  # no "−0.0"
    return ("+" + s if not s.startswith("-") else "−" + s[1:])


def _interval(lo: float | None, hi: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    if lo is None or hi is None:
        return ""
    return f"[{_signed(lo * scale, spec)}, {_signed(hi * scale, spec)}]"


def what_changed(study: Mapping[str, Any], max_items: int = 6) -> list[dict[str, Any]]:
    """The largest changes against the reference, each a sentence stating its number (and CI).

    Candidates, per task and non-reference level: accuracy change with its paired-bootstrap interval
    (and how many answers changed), mean KL over the full vocabulary, the ACE and ECE shifts (label-set
    scoring, or paper scoring in a paper-mode study; each level's own bootstrap interval, so called
    significant only when the two intervals do not overlap),
    dead/salient count changes and salient-set Jaccard; per level, the worst weight-error layer.
    Ranked: significant first (an interval excluding 0), then by a unitless size (|Δ| of a fraction,
    1 − agreement, 1 − e^−KL, 1 − Jaccard, relative RMSE); every kind of change gets a place before a
    kind repeats. Returns [{"text", "metric", "level", "task", "value", "ci_low", "ci_high",
    "significant", "score"}].
    """
    items: list[dict[str, Any]] = []
    paper_mode = (study.get("study") or {}).get("mode") == "paper"
    scoring = "paper" if paper_mode else "label_set"
    scoring_note = " (paper scoring)" if paper_mode else ""

    def add(text, metric, level, task, value, lo=None, hi=None, score=0.0, significant=None):
        items.append({"text": text, "metric": metric, "level": level, "task": task, "value": value,
                      "ci_low": lo, "ci_high": hi,
                      "significant": bool(_sig(lo, hi) if significant is None else significant),
                      "score": float(score)})

    for task, t in (study.get("tasks") or {}).items():
        comparison = t.get("comparison") or {}
        ref = comparison.get("reference") or (study.get("study") or {}).get("reference")
        runs = t.get("runs") or {}
        for level, c in (comparison.get("levels") or {}).items():
            acc = c.get("accuracy_delta") or {}
            if _num(acc.get("value")) is not None:
                v, lo, hi = acc["value"], _num(acc.get("ci_low")), _num(acc.get("ci_high"))
                flips = c.get("flips") or {}
                head = ""
                if "changed" in flips and c.get("n"):
                    head = (f"{level} changed {flips['changed']} of {c['n']} answers on {task}"
                            f" (agreement {100 * c.get('agreement', float('nan')):.1f}%); ")
                verdict = "significant" if _sig(lo, hi) else "not significant"
                text = (f"{head}accuracy {_signed(100 * v)} points {_interval(lo, hi, 100)} vs {ref}, {verdict}."
                        if head else f"{level} on {task}: accuracy {_signed(100 * v)} points "
                                     f"{_interval(lo, hi, 100)} vs {ref}, {verdict}.")
                add(text, "accuracy_delta", level, task, v, lo, hi,
                    score=max(abs(v), 1 - float(c.get("agreement", 1.0))))
            kl = _num(c.get("kl_full_mean"))
            if kl is not None:
                top1 = c.get("top1_agreement")
                extra = f"; the top-1 token matches {ref}'s in {100 * top1:.1f}% of answers" if top1 is not None else ""
                add(f"{level}'s next-token distribution on {task} is KL {kl:.3g} nats from {ref}'s on average"
                    f" (p99 {c.get('kl_full_p99', float('nan')):.3g}){extra}.",
                    "kl_full_mean", level, task, kl, score=1 - math.exp(-kl))
            for key, name in (("ace_paper", "ACE (paper)"), ("ece", "ECE")):
                for scoring_name in (scoring,):
                    r = ((runs.get(ref) or {}).get("metrics") or {}).get(scoring_name, {}).get(key) or {}
                    q = ((runs.get(level) or {}).get("metrics") or {}).get(scoring_name, {}).get(key) or {}
                    if _num(r.get("value")) is None or _num(q.get("value")) is None:
                        continue
                    d = q["value"] - r["value"]
                    rlo, rhi, qlo, qhi = (_num(x) for x in (r.get("ci_low"), r.get("ci_high"),
                                                            q.get("ci_low"), q.get("ci_high")))
                    apart = None not in (rlo, rhi, qlo, qhi) and (qlo > rhi or qhi < rlo)
                    add(f"{name}{scoring_note} on {task}: {level} {q['value']:.3f} {_interval(qlo, qhi, 1, '.3f').replace('+', '')}"
                        f" vs {ref} {r['value']:.3f} {_interval(rlo, rhi, 1, '.3f').replace('+', '')}"
                        f" ({_signed(d, '.3f')}); the intervals {'do not overlap' if apart else 'overlap'}.",
                        key + "_delta", level, task, d, score=abs(d), significant=apart)
        neurons = t.get("neurons") or {}
        ref_n = neurons.get(ref) or {}
        for level, n in neurons.items():
            if level == ref or not ref_n:
                continue
            for kind in ("dead", "salient"):
                a, b = ref_n.get(kind) or {}, n.get(kind) or {}
                diffs = [(abs(_get(b, L) - _get(a, L)), int(L)) for L in a
                         if _get(b, L) is not None and _get(a, L) is not None]
                if not diffs:
                    continue
                size, layer = max(diffs)
                nb, na = _get(b, layer), _get(a, layer)
                n_ff = n.get("n_ff") or 1
                what = f"dead (|a| < {n.get('tau', ref_n.get('tau'))})" if kind == "dead" else "salient"
                text = f"{level} has {nb} {what} {n.get('neuron', '')} neurons at layer {layer} vs {na} at {ref} on {task}"
                if kind == "salient":
                    jac = _get((t.get("neuron_comparison") or {}).get(level, {}).get("salient_jaccard") or {}, layer)
                    if jac is not None:
                        text += f"; the two salient sets overlap with Jaccard {jac:.2f}"
                    score = max(size / max(na, nb, 1), 1 - jac if jac is not None else 0.0)
                else:
                    score = size / n_ff
                add(text + ".", f"{kind}_count_delta", level, task, float(nb - na), score=score)
    for level, w in (study.get("weights") or {}).items():
        rows = [r for r in (w or {}).get("layers") or [] if _num(r.get("rel_rmse")) is not None]
        if not rows:
            continue
        worst = max(rows, key=lambda r: r["rel_rmse"])
        sq = _num(worst.get("sqnr_db"))
        tot = _num(((w or {}).get("total") or {}).get("rel_rmse"))
        text = (f"{level}'s weights are hurt most at layer {worst['layer']}: relative RMSE {worst['rel_rmse']:.4f}"
                + (f" (SQNR {sq:.1f} dB)" if sq is not None else "")
                + (f"; over all compared tensors {tot:.4f}." if tot is not None else "."))
        add(text, "weight_rel_rmse", level, None, worst["rel_rmse"], score=worst["rel_rmse"])

    ranked = sorted(items, key=lambda i: (not i["significant"], -i["score"]))
    chosen: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in ranked:  # one of each kind first, then the rest in rank order
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


# =============================================================================================
# small helpers


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _get(d: Mapping[Any, Any] | None, layer: Any):
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


def _layer_keys(*dicts: Mapping[Any, Any] | None) -> list[int]:
    return sorted({int(k) for d in dicts if d for k in d})


def _fmt(x: Any, spec: str = ".3f") -> str:
    v = _num(x)
    if v is None:
        return "—"
    return format(v, spec)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def _human_size(n: Any) -> str:
    v = _num(n)
    return "—" if v is None else human_size(v)


def _visible(token: str) -> str:
    """Make a token's whitespace visible (a leading space is meaningful in BPE pieces)."""
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")


# =============================================================================================
# the report model: tables and figures shared by both renderings


class _Table:
    def __init__(self, headers: list[str], rows: list[list[Any]], *, caption: str = "", cls: str = "",
                 first_col_header: bool = True) -> None:
        self.headers, self.rows, self.caption, self.cls = headers, rows, caption, cls
        self.first_col_header = first_col_header


class _Group:
    """A full-width row naming the group of rows under it."""

    def __init__(self, label: str) -> None:
        self.label = label


class _Cell:
    """A value with an optional smaller second line (a confidence interval, a note)."""

    def __init__(self, main: str, sub: str = "", cls: str = "") -> None:
        self.main, self.sub, self.cls = main, sub, cls

    def text(self) -> str:
        return f"{self.main} {self.sub}".strip()


def _metric_cell(m: Mapping[str, Any] | None, spec: str = ".3f") -> _Cell:
    m = m or {}
    v = _num(m.get("value"))
    if v is None:
        return _Cell("—")
    lo, hi = _num(m.get("ci_low")), _num(m.get("ci_high"))
    return _Cell(format(v, spec), f"[{format(lo, spec)}, {format(hi, spec)}]" if lo is not None and hi is not None else "")


def _delta_cell(c: Mapping[str, Any]) -> _Cell:
    d = c.get("accuracy_delta") or {}
    v, lo, hi = _num(d.get("value")), _num(d.get("ci_low")), _num(d.get("ci_high"))
    if v is None:
        return _Cell("—")
    return _Cell(_signed(100 * v), _interval(lo, hi, 100), cls="sig" if _sig(lo, hi) else "")


def _token_rows(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Top-activation rows [token, context, a], identical (token, context) pairs merged as ×n."""
    merged: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        merged.setdefault((str(r[0]), str(r[1])), []).append(float(r[2]))
    out = []
    for (tok, ctx), vals in merged.items():
        out.append([_Cell(_visible(tok), cls="tok"), _Cell("…" + _visible(ctx) if ctx else "(start of prompt)", cls="ctx"),
                    _Cell(_fmt(max(vals), ".2f"), f"×{len(vals)}" if len(vals) > 1 else "")])
    return out


def _per_layer_text(d: Mapping[Any, Any] | None, spec: str = "g") -> _Cell:
    if not d:
        return _Cell("—")
    layers = _layer_keys(d)
    total = sum(_get(d, L) or 0 for L in layers)
    return _Cell(format(total, spec), " · ".join(f"L{L}: {format(_get(d, L), spec)}" for L in layers))


def _salient_cell(level: Mapping[str, Any]) -> _Cell:
    """Salient counts per layer; a layer whose integral did not converge is marked, with its error."""
    counts = level.get("salient")
    if not counts:
        return _Cell("—")
    detail = (level.get("salient_detail") or {}).get("layers") or {}
    parts, flagged = [], False
    for L in _layer_keys(counts):
        d = detail.get(str(L)) or {}
        text = f"L{L}: {_get(counts, L)}"
        if d.get("converged") is False:
            flagged = True
            text += (f" ⚠ not converged (mean |Σ attr − Δ log p| {d['completeness_error_mean']:.3g} nats, "
                     f"{d['converged_prompts']}/{(level.get('salient_detail') or {}).get('n_prompts')} prompts ok)")
        parts.append(text)
    total = sum(_get(counts, L) or 0 for L in _layer_keys(counts))
    return _Cell(f"{total}" + (" ⚠" if flagged else ""), " · ".join(parts))


class _Section:
    def __init__(self, sid: str, title: str) -> None:
        self.id, self.title = sid, title
        self.blocks: list[tuple[str, Any]] = []  # ("h3"|"p"|"note"|"table"|"figure"|"grid"|"list"|"details", payload)

    def add(self, kind: str, payload: Any) -> None:
        self.blocks.append((kind, payload))


class _Figure:
    def __init__(self, name: str, png: bytes, caption: str) -> None:
        self.name, self.png, self.caption = name, png, caption


def _try_figure(name: str, caption: str, fn: Callable[[], bytes], notes: list[str]) -> _Figure | None:
    try:
        return _Figure(name, fn(), caption)
    except ValueError as exc:  # nothing to draw: the section says so instead
        notes.append(f"{caption}: {exc}")
        return None
    except (KeyError, TypeError, IndexError) as exc:  # malformed input: say so, never lose the whole report
        notes.append(f"{caption}: could not be drawn ({type(exc).__name__}: {exc})")
        return None


def _build(study: Mapping[str, Any]) -> tuple[dict[str, Any], list[_Section], list[_Figure]]:
    meta = dict(study.get("study") or {})
    levels_info = dict(study.get("levels") or {})
    tasks = dict(study.get("tasks") or {})
    weights = dict(study.get("weights") or {})
    levels = list(meta.get("quants") or levels_info or [])
    for t in tasks.values():
        for lvl in (t.get("runs") or {}):
            if lvl not in levels:
                levels.append(lvl)
    reference = meta.get("reference") or (levels[0] if levels else None)
    colors = plots.level_colors(levels)
    mode = meta.get("mode") or "default"
    scoring_key = "paper" if mode == "paper" else "label_set"
    figures: list[_Figure] = []
    sections: list[_Section] = []
    plot_notes: list[str] = []

    # ---- what changed
    sec = _Section("what-changed", "What changed")
    changes = study.get("what_changed")
    if changes is None:
        changes = what_changed(study)
    if changes:
        sec.add("list", [(c.get("text", ""), bool(c.get("significant"))) for c in changes])
        sec.add("p", "Computed from the numbers below; bracketed ranges are 95% bootstrap intervals. "
                     "Significant: the interval of the change excludes 0 (ACE/ECE: the levels' intervals do not overlap).")
    else:
        sec.add("note", f"No comparison against a reference level: {NOT_MEASURED}.")
    sections.append(sec)

    # ---- ladder + tables
    sec = _Section("tables", "Results per quantization level")
    if levels_info:
        rows = []
        for lvl in levels:
            li = levels_info.get(lvl) or {}
            types = li.get("tensor_types") or {}
            rows.append([_Cell(lvl + (" (reference)" if lvl == reference else "")), li.get("file_type", "—"),
                         _fmt(li.get("bits_per_weight"), ".2f"), _human_size(li.get("size_bytes")),
                         ", ".join(f"{k}×{v}" for k, v in types.items()) or "—",
                         li.get("requantized_from") or "—"])
        sec.add("h3", "Quantization ladder")
        sec.add("table", _Table(["level", "file type", "bits/weight", "size", "tensor types (as written)",
                                 "requantized from"], rows, cls="ladder"))
    if not tasks:
        sec.add("note", f"Tasks: {NOT_MEASURED}.")
    for task, t in tasks.items():
        data = t.get("data") or {}
        runs = t.get("runs") or {}
        comp = (t.get("comparison") or {}).get("levels") or {}
        neurons = t.get("neurons") or {}
        task_levels = [lvl for lvl in levels if lvl in runs or lvl in neurons] or list(runs)
        sec.add("h3", f"Task {task}")
        desc = [f"{data.get('examples', '—')} examples", f"data: {data.get('source', '—')}"]
        if data.get("label_counts"):
            desc.append("labels: " + ", ".join(f"{k} {v}" for k, v in data["label_counts"].items()))
        sec.add("p", " · ".join(str(x) for x in desc))
        if data.get("fallback_from"):
            sec.add("warn", f"The data of {data['fallback_from']} could not be reached; this study used "
                            f"{data.get('task', task)} ({data.get('source', 'built-in')}) instead.")
        if not task_levels:
            sec.add("note", f"Runs: {NOT_MEASURED}.")
            continue
        header = ["metric"] + [lvl + (" (ref)" if lvl == reference else "") for lvl in task_levels]
        rows = []
        order = [scoring_key, "paper" if scoring_key == "label_set" else "label_set"]
        for sk in order:
            tag = ("label-set scoring (softmax over the label words)" if sk == "label_set"
                   else "paper scoring (full-vocabulary argmax, substring match)")
            rows.append(_Group(f"Calibration · {tag}"))
            for key, label, spec in RUN_METRICS:
                if not any(((runs.get(lvl) or {}).get("metrics") or {}).get(sk, {}).get(key) for lvl in task_levels):
                    continue
                rows.append([label] + [
                    _metric_cell(((runs.get(lvl) or {}).get("metrics") or {}).get(sk, {}).get(key), spec)
                    for lvl in task_levels])
        rows.append(_Group("Neurons"))
        if neurons:
            nrow = next(iter(neurons.values()))
            rows.append([f"dead neurons ({nrow.get('neuron', 'act')}, |a| < {nrow.get('tau', '—')})"]
                        + [_per_layer_text((neurons.get(lvl) or {}).get("dead")) for lvl in task_levels])
            method = ((nrow.get("salient_detail") or {}).get("method") or "attribution")
            rows.append([f"salient neurons ({method}; ⚠ = integral not converged)"]
                        + [_salient_cell(neurons.get(lvl) or {}) for lvl in task_levels])
            rows.append([f"redundant pairs (|corr| ≥ {nrow.get('redundancy_threshold', 0.9)})"]
                        + [_per_layer_text((neurons.get(lvl) or {}).get("redundant_pairs"), ",") for lvl in task_levels])
        else:
            rows.append(["neurons"] + [_Cell("—", NOT_MEASURED) for _ in task_levels])

        def comp_cell(lvl: str, fn: Callable[[Mapping[str, Any]], _Cell]) -> _Cell:
            if lvl == reference:
                return _Cell("ref", cls="muted")
            c = comp.get(lvl)
            return fn(c) if c else _Cell("—")

        rows.append(_Group(f"Against the reference {reference}"))
        if comp:
            rows.append(["Δ accuracy vs ref (points)"] + [comp_cell(lvl, _delta_cell) for lvl in task_levels])
            rows.append(["agreement with ref"] + [comp_cell(lvl, lambda c: _Cell(
                f"{100 * c['agreement']:.1f}%",
                f"{(c.get('flips') or {}).get('changed', '—')} changed "
                f"({(c.get('flips') or {}).get('correct_to_wrong', '—')}→wrong, "
                f"{(c.get('flips') or {}).get('wrong_to_correct', '—')}→right)")) for lvl in task_levels])
            rows.append(["KL label set (mean / max)"] + [comp_cell(lvl, lambda c: _Cell(
                _fmt(c.get("kl_label_mean"), ".4f"), f"max {_fmt(c.get('kl_label_max'), '.4f')}")) for lvl in task_levels])
            rows.append(["KL full vocabulary (mean / p99)"] + [comp_cell(lvl, lambda c: _Cell(
                _fmt(c.get("kl_full_mean"), ".4f"), f"p99 {_fmt(c.get('kl_full_p99'), '.4f')}")) for lvl in task_levels])
            rows.append(["top-1 token agreement"] + [comp_cell(lvl, lambda c: _Cell(
                f"{100 * c['top1_agreement']:.1f}%" if _num(c.get("top1_agreement")) is not None else "—"))
                for lvl in task_levels])
            rows.append(["hidden state cosine / CKA"] + [comp_cell(lvl, lambda c: _Cell(
                _fmt(c.get("hidden_cosine_mean"), ".4f"), f"CKA {_fmt(c.get('hidden_cka'), '.4f')}")) for lvl in task_levels])
        else:
            rows.append(["comparison with the reference"] + [_Cell("—", NOT_MEASURED) for _ in task_levels])
        sec.add("table", _Table(header, rows, cls="metrics",
                                caption="Each column one quantization level; bracketed: 95% bootstrap interval. "
                                        "Per-layer neuron counts under the total (L = layer)."))
    sections.append(sec)

    # ---- plots
    sec = _Section("plots", "Figures")
    for task, t in tasks.items():
        runs = t.get("runs") or {}
        rel = t.get("reliability") or {}
        neurons = t.get("neurons") or {}
        ncomp = t.get("neuron_comparison") or {}
        sec.add("h3", f"Task {task}")
        figs: list[_Figure] = []
        rel_rows = {lvl: (rel.get(lvl) or {}).get(scoring_key) or [] for lvl in levels if lvl in rel}
        tag = "paper scoring" if scoring_key == "paper" else "label-set scoring"
        f = _try_figure(f"reliability-{_slug(task)}", f"Reliability diagrams, {task} ({tag})",
                        lambda: plots.reliability_png(rel_rows, colors=colors), plot_notes)
        figs.append(f)
        mets = {lvl: ((runs.get(lvl) or {}).get("metrics") or {}).get(scoring_key) or {} for lvl in levels if lvl in runs}
        figs.append(_try_figure(f"metrics-{_slug(task)}", f"Accuracy, confidence and ACE per level, {task} ({tag}; 95% intervals)",
                                lambda: plots.metric_bars_png(mets, colors=colors), plot_notes))
        if neurons:
            figs.append(_try_figure(f"dead-{_slug(task)}", f"Dead neurons per layer, {task}",
                                    lambda: plots.layer_counts_png({lvl: n.get("dead") or {} for lvl, n in neurons.items()},
                                                                   "dead neurons", colors=colors), plot_notes))
            figs.append(_try_figure(f"salient-{_slug(task)}", f"Salient neurons per layer, {task}",
                                    lambda: plots.layer_counts_png({lvl: n.get("salient") or {} for lvl, n in neurons.items()},
                                                                   "salient neurons", colors=colors), plot_notes))
            figs.append(_try_figure(f"redundancy-{_slug(task)}",
                                    f"Redundancy: neuron pairs per |corr| bin, layers pooled, {task} (the paper's Figure 4 form)",
                                    lambda: plots.redundancy_hist_png({lvl: n.get("redundancy_hist") for lvl, n in neurons.items()},
                                                                      colors=colors), plot_notes))
        if ncomp:
            figs.append(_try_figure(f"drift-{_slug(task)}", f"Activation drift vs {reference} per layer, {task}",
                                    lambda: plots.drift_png({lvl: c.get("drift") or {} for lvl, c in ncomp.items()},
                                                            colors=colors), plot_notes))
            figs.append(_try_figure(f"jaccard-{_slug(task)}", f"Salient-set overlap with {reference} per layer, {task}",
                                    lambda: plots.jaccard_png({lvl: c.get("salient_jaccard") or {} for lvl, c in ncomp.items()},
                                                              colors=colors), plot_notes))
        figs = [f for f in figs if f is not None]
        figures.extend(figs)
        if figs:
            sec.add("grid", figs)
        missing = [n for n in plot_notes if task in n]
        if not neurons:
            missing.append(f"neuron figures: {NOT_MEASURED}")
        if missing:
            sec.add("note", "; ".join(sorted(set(missing))) + ".")
    if not tasks:
        sec.add("note", f"Output-level and neuron figures: {NOT_MEASURED}.")
    sections.append(sec)

    # ---- neurons: top tokens side by side
    sec = _Section("neurons", "Neurons: what the most salient ones respond to")
    any_tokens = False
    for task, t in tasks.items():
        neurons = t.get("neurons") or {}
        cards = []
        for lvl in levels:
            n = neurons.get(lvl) or {}
            tt = n.get("top_tokens") or {}
            if not tt:
                continue
            tables = []
            ranked_by = n.get("top_tokens_ranked_by") or {}
            for layer in _layer_keys(tt):
                how = _get(ranked_by, layer) if isinstance(ranked_by, Mapping) else ranked_by
                for neuron, rows in (_get(tt, layer) or {}).items():
                    tables.append(_Table(["token", "left context", "a"], _token_rows(rows),
                                         caption=f"layer {layer} · neuron {neuron}" + (f" (by {how})" if how else ""),
                                         cls="tokens", first_col_header=False))
            cards.append((lvl, tables))
        if cards:
            any_tokens = True
            sec.add("h3", f"Task {task}: top-activating tokens")
            sec.add("cards", cards)
        qs = {lvl: (neurons.get(lvl) or {}).get("max_abs_quantiles") for lvl in levels if (neurons.get(lvl) or {}).get("max_abs_quantiles")}
        if qs:
            rows = []
            for lvl, q in qs.items():
                for layer in _layer_keys(q):
                    vals = _get(q, layer)
                    rows.append([lvl, str(layer)] + [_fmt(v, ".3g") for v in vals])
            sec.add("h3", f"Task {task}: per-neuron max |a| (distribution over neurons)")
            sec.add("table", _Table(["level", "layer", "min", "10%", "median", "90%", "max"], rows, cls="compact",
                                    caption="A dead-neuron count of zero says little alone: this is how far each layer's "
                                            "neurons are from the threshold."))
    if not any_tokens:
        sec.add("note", f"Top-activating tokens: {NOT_MEASURED}.")
    sections.append(sec)

    # ---- weights
    sec = _Section("weights", "Weights: quantization error per layer")
    if weights:
        f = _try_figure("weights-rel-rmse", f"Relative RMSE of the weights vs {reference} per layer",
                        lambda: plots.weight_error_png(weights, "rel_rmse", colors=colors), plot_notes)
        g = _try_figure("weights-sqnr", f"SQNR of the weights vs {reference} per layer",
                        lambda: plots.weight_error_png(weights, "sqnr_db", colors=colors), plot_notes)
        figs = [x for x in (f, g) if x is not None]
        figures.extend(figs)
        if figs:
            sec.add("grid", figs)
        rows = []
        for lvl in levels:
            w = weights.get(lvl)
            if not w:
                continue
            tot = w.get("total") or {}
            rows.append([_Cell(lvl, cls="strong"), "all", _fmt(tot.get("rel_rmse"), ".5f"), _fmt(tot.get("sqnr_db"), ".2f"),
                         _fmt(tot.get("cosine"), ".6f"), _fmt(tot.get("max_abs"), ".4g"), ""])
            for r in w.get("layers") or []:
                rows.append(["", str(r["layer"]), _fmt(r.get("rel_rmse"), ".5f"), _fmt(r.get("sqnr_db"), ".2f"),
                             _fmt(r.get("cosine"), ".6f"), _fmt(r.get("max_abs"), ".4g"), str(r.get("worst_tensor") or "")])
        sec.add("table", _Table(["level", "layer", "rel RMSE", "SQNR dB", "cosine", "max |ΔW|", "worst tensor"], rows,
                                cls="compact", caption=f"Dequantized weights against {reference}: rel RMSE = ‖W−R‖/‖R‖, "
                                                       "SQNR = 10·log10(‖R‖²/‖W−R‖²)."))
    else:
        sec.add("note", f"Weight error: {NOT_MEASURED}.")
    sections.append(sec)

    # ---- manifest
    sec = _Section("manifest", "Manifest")
    rows = []
    for lvl in levels:
        li = levels_info.get(lvl) or {}
        eng = li.get("engine") or {}
        devices = ", ".join(f"{d.get('name')} ({d.get('description')})" for d in eng.get("devices") or []) or "—"
        rows.append([lvl, _Cell(str(li.get("sha256") or "—"), cls="mono"), str(li.get("path") or "—"),
                     ", ".join(f"{k}×{v}" for k, v in (li.get("tensor_types") or {}).items()) or "—",
                     ", ".join(f"{k}×{v}" for k, v in (eng.get("loaded_tensor_types") or {}).items()) or "—",
                     devices, str(eng.get("offloaded_layers") if eng.get("offloaded_layers") is not None else eng.get("gpu_layers_requested", "—"))])
    details: list[tuple[str, Any]] = []
    if rows:
        details.append(("table", _Table(["level", "sha256", "file", "tensor types (file)", "tensor types (loaded)",
                                         "devices", "GPU layers"], rows, cls="manifest")))
    for task, t in tasks.items():
        data = t.get("data") or {}
        if data:
            details.append(("p", f"{task}: data {data.get('source', '—')}, sha256 {data.get('data_sha256', '—')}"
                                 + (f", fallback from {data['fallback_from']}" if data.get("fallback_from") else "")))
    defs = dict(meta.get("definitions") or {})
    if tasks and any(t.get("neuron_comparison") for t in tasks.values()):
        defs.setdefault("drift", DRIFT_DEFINITION)
        defs.setdefault("jaccard", DEAD_JACCARD_DEFINITION)
    if defs:
        details.append(("table", _Table(["term", "definition"], [[k, str(v)] for k, v in defs.items()], cls="defs")))
    tool = meta.get("tool") or {}
    if tool:
        details.append(("table", _Table(["component", "version"], [[k, str(v)] for k, v in tool.items()], cls="defs")))
    facts = [(k, meta.get(k)) for k in ("command", "created", "seconds") if meta.get(k) is not None]
    if facts:
        details.append(("table", _Table(["", ""], [[k, f"{v:.1f} s" if k == "seconds" else str(v)] for k, v in facts],
                                        cls="defs")))
    if details:
        sec.add("details", details)
    else:
        sec.add("note", f"Manifest: {NOT_MEASURED}.")
    sections.append(sec)

    header = {"model": meta.get("model") or "—", "levels": levels, "reference": reference,
              "tasks": list(meta.get("tasks") or tasks), "mode": mode, "created": meta.get("created"),
              "seconds": meta.get("seconds"), "colors": colors,
              "fallbacks": {task: (t.get("data") or {}).get("fallback_from") for task, t in tasks.items()
                            if (t.get("data") or {}).get("fallback_from")}}
    return header, sections, figures


# =============================================================================================
# HTML


CSS = """
:root{--fg:#1d2330;--muted:#6b7385;--line:#e3e6ec;--bg:#f6f7f9;--card:#fff;--accent:#0072B2;--good:#127a4a;--warn:#9a5b00}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1280px;margin:0 auto;padding:0 24px 48px}
header.top{background:linear-gradient(135deg,#12305a,#0a5c8a);color:#fff;padding:28px 24px 22px;margin-bottom:22px}
header.top .inner{max-width:1280px;margin:0 auto}
header.top h1{margin:0 0 4px;font-size:24px;font-weight:650;letter-spacing:.2px}
header.top .sub{opacity:.85;font-size:13px}
.chips{display:flex;flex-wrap:wrap;gap:8px;margin-top:14px}
.chip{background:rgba(255,255,255,.14);border:1px solid rgba(255,255,255,.25);border-radius:999px;padding:3px 11px;font-size:12.5px}
.chip b{font-weight:650}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:5px;vertical-align:0}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 22px;margin:0 0 18px;box-shadow:0 1px 2px rgba(16,24,40,.04)}
section h2{margin:0 0 12px;font-size:18px;font-weight:650}
section h3{margin:20px 0 6px;font-size:15px;font-weight:600;color:#2b3446}
section h3:first-of-type{margin-top:4px}
#what-changed{border-left:5px solid var(--accent);background:#f4f9fd}
#what-changed ul{margin:4px 0 8px;padding-left:0;list-style:none}
#what-changed li{padding:6px 0 6px 26px;position:relative;border-bottom:1px dashed #d6e4f0}
#what-changed li:last-child{border-bottom:0}
#what-changed li::before{content:"●";position:absolute;left:6px;color:#9fb3c8}
#what-changed li.sig::before{content:"▲";color:var(--warn)}
.p{margin:6px 0;color:#39414f}
.note{color:var(--muted);font-style:italic;margin:8px 0}
.warn{background:#fff6e5;border:1px solid #f3d9a4;color:#6b4500;border-radius:6px;padding:6px 10px;margin:8px 0}
.tablewrap{overflow-x:auto;margin:6px 0 4px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}
thead th{background:#f0f2f6;font-weight:600;color:#2b3446;position:sticky;top:0}
tbody tr:nth-child(even){background:#fafbfc}
tbody th{font-weight:500;color:#2b3446}
td .sub{display:block;color:var(--muted);font-size:11.5px;white-space:nowrap}
td.sig .main{color:var(--warn);font-weight:650}
td.muted{color:var(--muted)}
.strong{font-weight:650}
table.tokens th:nth-child(2){text-align:left}
td.mono,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px;word-break:break-all}
table.metrics td{min-width:140px}
.caption{color:var(--muted);font-size:12px;margin:4px 0 10px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px;align-items:start}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:8px;background:#fff}
figure img{width:100%;height:auto;display:block}
figcaption{color:#39414f;font-size:12.5px;margin-top:6px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:14px}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 12px;border-top:4px solid var(--accent)}
.card h4{margin:0 0 6px;font-size:14px}
.card .caption{margin:8px 0 2px;color:#2b3446;font-weight:600}
table.tokens td{padding:3px 6px;font-size:12px}
table.tokens td.tok{font-family:ui-monospace,Menlo,Consolas,monospace;font-weight:650;color:#0a4f7a;white-space:pre}
table.tokens td.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;color:var(--muted);text-align:left;white-space:pre-wrap;word-break:break-word}
table.defs td,table.defs th,table.ladder td,table.ladder th,table.manifest td,table.manifest th{text-align:left}
tr.group th{background:#eef3f8;color:#12305a;font-weight:650;font-size:12px;text-transform:uppercase;letter-spacing:.4px;padding-top:9px}
details summary{cursor:pointer;font-weight:600;color:var(--accent);margin-bottom:8px}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:10px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(t: _Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.headers)
    thead = f"<thead><tr>{head}</tr></thead>" if any(t.headers) else ""
    body = []
    for row in t.rows:
        if isinstance(row, _Group):
            body.append(f'<tr class="group"><th colspan="{len(t.headers)}">{_e(row.label)}</th></tr>')
            continue
        cells = []
        for i, c in enumerate(row):
            cell = c if isinstance(c, _Cell) else _Cell("" if c is None else str(c))
            tag = "th" if i == 0 and t.first_col_header else "td"
            cls = f' class="{_e(cell.cls)}"' if cell.cls else ""
            sub = f'<span class="sub">{_e(cell.sub)}</span>' if cell.sub else ""
            cells.append(f"<{tag}{cls}><span class=\"main\">{_e(cell.main)}</span>{sub}</{tag}>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f'<div class="caption">{_e(t.caption)}</div>' if t.caption else ""
    klass = f"table {t.cls}".strip()
    if t.cls == "tokens":
        return f'{cap}<table class="{_e(klass)}">{thead}<tbody>{"".join(body)}</tbody></table>'
    return (f'<div class="tablewrap"><table class="{_e(klass)}">{thead}'
            f'<tbody>{"".join(body)}</tbody></table></div>{cap}')


def _html_block(kind: str, payload: Any, colors: Mapping[str, str]) -> str:
    if kind == "h3":
        return f"<h3>{_e(payload)}</h3>"
    if kind == "p":
        return f'<p class="p">{_e(payload)}</p>'
    if kind == "note":
        return f'<p class="note">{_e(payload)}</p>'
    if kind == "warn":
        return f'<p class="warn">{_e(payload)}</p>'
    if kind == "table":
        return _html_table(payload)
    if kind == "list":
        return "<ul>" + "".join(f'<li class="{"sig" if sig else ""}">{_e(text)}</li>' for text, sig in payload) + "</ul>"
    if kind == "grid":
        return '<div class="grid">' + "".join(
            f'<figure id="fig-{_e(f.name)}"><img alt="{_e(f.caption)}" src="{_data_uri(f.png)}">'
            f"<figcaption>{_e(f.caption)}</figcaption></figure>" for f in payload) + "</div>"
    if kind == "cards":
        out = ['<div class="cards">']
        for lvl, tables in payload:
            color = colors.get(lvl, "#0072B2")
            out.append(f'<div class="card" style="border-top-color:{_e(color)}"><h4>{_e(lvl)}</h4>'
                       + "".join(_html_table(t) for t in tables) + "</div>")
        out.append("</div>")
        return "".join(out)
    if kind == "details":
        inner = "".join(_html_block(k, p, colors) for k, p in payload)
        return f"<details><summary>Model files, tensor types, definitions, versions, backend</summary>{inner}</details>"
    raise ValueError(kind)


def _html(header: Mapping[str, Any], sections: list[_Section]) -> str:
    colors = header["colors"]
    chips = ['<span class="chip">levels: ' + " ".join(
        f'<span class="dot" style="background:{_e(colors.get(lvl, "#fff"))}"></span><b>{_e(lvl)}</b>'
        + (" (ref)" if lvl == header["reference"] else "") for lvl in header["levels"]) + "</span>" if header["levels"] else "",
             f'<span class="chip">tasks: <b>{_e(", ".join(header["tasks"]) or "—")}</b></span>',
             f'<span class="chip">mode: <b>{_e(header["mode"])}</b>'
             + (" (the reference study&#x27;s protocol)" if header["mode"] == "paper" else " (ggml-probe defaults)") + "</span>"]
    if header.get("created"):
        chips.append(f'<span class="chip">{_e(header["created"])}</span>')
    if _num(header.get("seconds")) is not None:
        chips.append(f'<span class="chip">{header["seconds"]:.0f} s</span>')
    for task, src in (header.get("fallbacks") or {}).items():
        chips.append(f'<span class="chip">⚠ {_e(task)} used instead of {_e(src)}</span>')
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>ggml-probe study · {_e(header['model'])}</title>", f"<style>{CSS}</style></head><body>",
             f'<header class="top" id="header"><div class="inner"><h1>Quantization study · {_e(header["model"])}</h1>'
             f'<div class="sub">What GGUF quantization did to this model, measured through llama.cpp by ggml-probe</div>'
             f'<div class="chips">{"".join(chips)}</div></div></header><main>']
    for sec in sections:
        parts.append(f'<section id="{_e(sec.id)}"><h2>{_e(sec.title)}</h2>')
        parts.extend(_html_block(k, p, colors) for k, p in sec.blocks)
        parts.append("</section>")
    parts.append("<footer>Generated by ggml-probe. Self-contained: no scripts, no network.</footer></main></body></html>")
    return "\n".join(parts)


# =============================================================================================
# Markdown


def _md_escape(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("`", "\\`")


_NUMERIC = re.compile(r"^[−+-]?[\d.,]+(?:e[−+-]?\d+)?\s*%?$")


def _md_table(t: _Table) -> str:
    def cell(c: Any) -> str:
        if isinstance(c, _Cell):
            return _md_escape(c.main) + (f" <sub>{_md_escape(c.sub)}</sub>" if c.sub else "")
        return _md_escape("" if c is None else c)

    def numeric(col: int) -> bool:  # right-align columns of numbers, left-align text
        cells = [r[col] for r in t.rows if not isinstance(r, _Group) and col < len(r)]
        texts = [(c.main if isinstance(c, _Cell) else str(c or "")) for c in cells]
        return all(_NUMERIC.match(x) for x in texts if x and x not in ("—", "ref"))

    aligns = [":---"] + ["---:" if numeric(i) else ":---" for i in range(1, len(t.headers))]
    lines = ["| " + " | ".join(_md_escape(h) or " " for h in t.headers) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + (f"**{_md_escape(row.label)}**" + " |" * (len(t.headers) - 1) if isinstance(row, _Group)
                      else " | ".join(cell(c) for c in row)) + " |" for row in t.rows]
    out = "\n".join(lines)
    return (f"*{_md_escape(t.caption)}*\n\n{out}" if t.cls == "tokens" and t.caption
            else out + (f"\n\n*{_md_escape(t.caption)}*" if t.caption else ""))


def _md_block(kind: str, payload: Any, plot_dir: str) -> str:
    if kind == "h3":
        return f"### {payload}"
    if kind in ("p",):
        return str(payload)
    if kind == "note":
        return f"_{payload}_"
    if kind == "warn":
        return f"> **Note:** {payload}"
    if kind == "table":
        return _md_table(payload)
    if kind == "list":
        return "\n".join(f"- {'**▲** ' if sig else ''}{text}" for text, sig in payload)
    if kind == "grid":
        return "\n\n".join(f"![{f.caption}]({plot_dir}/{f.name}.png)\n\n*{f.caption}*" for f in payload)
    if kind == "cards":
        out = []
        for lvl, tables in payload:
            out.append(f"#### {lvl}")
            out.extend(_md_table(t) for t in tables)
        return "\n\n".join(out)
    if kind == "details":
        inner = "\n\n".join(_md_block(k, p, plot_dir) for k, p in payload)
        return f"<details><summary>Model files, tensor types, definitions, versions, backend</summary>\n\n{inner}\n\n</details>"
    raise ValueError(kind)


def _markdown(header: Mapping[str, Any], sections: list[_Section], plot_dir: str) -> str:
    lines = [f"# Quantization study · {header['model']}", "",
             f"**Levels:** {', '.join(lvl + (' (reference)' if lvl == header['reference'] else '') for lvl in header['levels']) or '—'}  ",
             f"**Tasks:** {', '.join(header['tasks']) or '—'}  ",
             f"**Mode:** {header['mode']}" + (" (the reference study's protocol)" if header["mode"] == "paper" else " (ggml-probe defaults)")
             + "  "]
    if header.get("created"):
        lines.append(f"**Created:** {header['created']}  ")
    for task, src in (header.get("fallbacks") or {}).items():
        lines.append(f"**Data:** {task} was used instead of {src} (unreachable)  ")
    for sec in sections:
        lines += ["", f"## {sec.title}", ""]
        for k, p in sec.blocks:
            lines += [_md_block(k, p, plot_dir), ""]
    return "\n".join(lines).rstrip() + "\n"


# =============================================================================================
# entry point


def render_report(study: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write out_dir/report.html (self-contained), out_dir/report.md and its figures in out_dir/plots/.

    Every file is written atomically. Missing or empty sections of `study` give a short
    "not measured in this study" note. Returns {"html": path, "md": path, "plots": folder,
    "plot:NAME": path per figure}.
    """
    out_dir = Path(out_dir)
    header, sections, figures = _build(study)
    plot_dir = out_dir / "plots"
    paths: dict[str, Path] = {}
    for f in figures:
        p = plot_dir / f"{f.name}.png"
        with atomic_output(p) as tmp:
            tmp.write_bytes(f.png)
        paths[f"plot:{f.name}"] = p
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    with atomic_output(html_path) as tmp:
        tmp.write_text(_html(header, sections), encoding="utf-8")
    with atomic_output(md_path) as tmp:
        tmp.write_text(_markdown(header, sections, "plots"), encoding="utf-8")
    paths.update({"html": html_path, "md": md_path, "plots": plot_dir})
    return paths


def load_study(path: Path) -> dict[str, Any]:
    """Read a study.json (per-layer keys stay strings; the report accepts both)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
