"""The report's data model: a study dict (study.json) turned into plain sections of tables, figures and text.

    from ggml_probe.report.model import build_report
    report = build_report(study)   # Report(header, sections, figures); html_page / markdown_page render it

The study dict has the sections "study", "levels", "tasks", "weights" and "what_changed"; any of them may be
missing or empty, and the section then says "not measured in this study" instead of failing. Both renderings
(HTML and Markdown) show exactly what is built here; nothing is computed there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..analysis.neurons import DRIFT_DEFINITION, DRIFT_NAME
from . import plots
from .changes import what_changed
from .trace import trace_png
from .values import fmt, get, interval, layer_keys, num, quoted_piece, shows_accuracy_norm, signed, significant, size, slug, visible

NOT_MEASURED = "not measured in this study"

JACCARD_DEFINITION = ("dead/salient Jaccard: |A ∩ B| / |A ∪ B| of the neuron-id sets of a level and the reference "
                      "(1 when both are empty)")
# Resampled ACE and ECE are biased upward on small samples; how a level's own interval shows that depends on the
# interval the study recorded: BCa (calibration_summary's "interval") or, in a study.json from before, percentile.
SMALL_SAMPLE_BIAS = ("ACE and ECE are biased upward on small samples (a resample repeats examples, and the noise "
                     "that adds to each bin's accuracy − confidence raises its absolute value on average)")
PERCENTILE_BIAS = (f"{SMALL_SAMPLE_BIAS}, so a level's own percentile interval of them can sit almost wholly above "
                   "the value")
BCA_BIAS = (f"{SMALL_SAMPLE_BIAS}; a level's own interval is the bias-corrected (BCa) bootstrap one, which moves the "
            "resampled values' percentiles against that bias, so it can sit lopsided around the value, or beyond it "
            "when the bias exceeds the spread")

# Metrics of a run's label_set / paper dicts, in table order: (key, label, format)
RUN_METRICS = (("accuracy", "accuracy", ".3f"), ("mean_confidence", "mean confidence", ".3f"),
               ("ace_paper", "ACE (paper)", ".3f"), ("ece", "ECE", ".3f"), ("brier", "Brier", ".3f"),
               ("nll", "NLL (nats)", ".3f"))
# Shown under accuracy when a task has choices or answers of several tokens (values.shows_accuracy_norm)
ACCURACY_NORM_LABEL = "acc_norm (lm-evaluation-harness: log-likelihood per character)"
# Paired changes shown against the reference besides accuracy: (key, label)
PAIRED_ROWS = (("ace_paper", "Δ ACE (paper)"), ("ece", "Δ ECE"), ("brier", "Δ Brier"),
               ("mean_confidence", "Δ mean confidence"))

TARGET_KINDS = {"label": "the label chosen under label-set scoring",
                "answer": "the model's own next token (full-vocabulary argmax)",
                "gold": "the gold label's token"}


# =============================================================================================
# blocks


@dataclass
class Cell:
    """A value with an optional smaller second line (an interval, a note)."""

    main: str
    sub: str = ""
    cls: str = ""

    def text(self) -> str:
        return f"{self.main} {self.sub}".strip()


@dataclass
class Group:
    """A full-width row naming the group of rows under it."""

    label: str


@dataclass
class Table:
    headers: list[str]
    rows: list[Any]  # list[Cell | str] per row, or a Group
    caption: str = ""
    cls: str = ""
    first_col_header: bool = True


@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


@dataclass
class Section:
    id: str
    title: str
    # ("h3"|"p"|"note"|"warn"|"table"|"figures"|"list"|"cards"|"details", payload)
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def add(self, kind: str, payload: Any) -> None:
        self.blocks.append((kind, payload))


@dataclass
class Report:
    header: dict[str, Any]
    sections: list[Section]
    figures: list[Figure]


@dataclass
class _Study:
    """The parts of a study dict every section reads."""

    meta: dict[str, Any]
    levels_info: dict[str, Any]
    tasks: dict[str, Any]
    weights: dict[str, Any]
    levels: list[str]
    reference: str | None
    colors: dict[str, str]
    mode: str
    scoring: str
    figures: list[Figure] = field(default_factory=list)
    plot_notes: list[str] = field(default_factory=list)

    def figure(self, name: str, caption: str, draw: Callable[[], bytes]) -> Figure | None:
        """A figure, or None and a note saying why it is missing."""
        try:
            fig = Figure(name, draw(), caption)
        except ValueError as exc:  # nothing to draw: the section says so instead
            self.plot_notes.append(f"{caption}: {exc}")
            return None
        except (KeyError, TypeError, IndexError) as exc:  # malformed input: say so, never lose the whole report
            self.plot_notes.append(f"{caption}: could not be drawn ({type(exc).__name__}: {exc})")
            return None
        self.figures.append(fig)
        return fig


def build_report(study: Mapping[str, Any]) -> Report:
    """Every section of the report from a study dict; the renderers only lay it out."""
    meta = dict(study.get("study") or {})
    levels_info = dict(study.get("levels") or {})
    tasks = dict(study.get("tasks") or {})
    levels = list(meta.get("quants") or levels_info or [])
    for t in tasks.values():
        levels += [lvl for lvl in (t.get("runs") or {}) if lvl not in levels]
    mode = meta.get("mode") or "default"
    s = _Study(meta=meta, levels_info=levels_info, tasks=tasks, weights=dict(study.get("weights") or {}), levels=levels,
               reference=meta.get("reference") or (levels[0] if levels else None), colors=plots.level_colors(levels),
               mode=mode, scoring="paper" if mode == "paper" else "label_set")
    changes = study.get("what_changed")
    # the pick first after what changed: "which level should I run?" is the question most readers bring
    sections = [_what_changed_section(s, what_changed(study) if changes is None else changes),
                _pick_section(s, study.get("pick") or {}), _tables_section(s),
                _text_kld_section(s, study.get("kld") or {}),
                _noise_floor_section(s, study.get("noise_floor") or {}), _speed_section(s, study.get("speed") or {}),
                _trace_section(s, study.get("trace") or {}),
                _figures_section(s), _neurons_section(s), _weights_section(s), _manifest_section(s)]
    header = {"model": meta.get("model") or "—", "levels": levels, "reference": s.reference,
              "tasks": list(meta.get("tasks") or tasks), "mode": mode, "created": meta.get("created"),
              "seconds": meta.get("seconds"), "colors": s.colors,
              "fallbacks": {task: (t.get("data") or {}).get("fallback_from") for task, t in tasks.items()
                            if (t.get("data") or {}).get("fallback_from")}}
    return Report(header, sections, s.figures)


# =============================================================================================
# what changed


def _what_changed_section(s: _Study, changes: Sequence[Mapping[str, Any]]) -> Section:
    sec = Section("what-changed", "What changed")
    for note in s.meta.get("notes") or []:  # what the study shrank to fit (the redundancy budget), and why
        sec.add("warn", f"{note}.")
    if not changes:
        sec.add("note", f"No comparison against a reference level: {NOT_MEASURED}.")
        return sec
    sec.add("list", [(c.get("text", ""), bool(c.get("significant"))) for c in changes])
    sec.add("p", "Computed from the numbers below; bracketed ranges are 95% bootstrap intervals. A change is "
                 "significant when the paired bootstrap interval of the difference (the same examples resampled "
                 "for both levels) excludes 0.")
    sec.add("p", _bias_note(s))
    return sec


def _reference_summary(s: _Study, task: str) -> Mapping[str, Any]:
    """The reference level's calibration summary on `task` in the study's scoring ({} when not measured)."""
    t = s.tasks.get(task) or {}
    return (((t.get("runs") or {}).get(s.reference) or {}).get("metrics") or {}).get(s.scoring) or {}


def _interval_bias(s: _Study) -> str:
    """What the small-sample bias does to a level's own interval, for the interval this study recorded."""
    recorded = any(_reference_summary(s, task).get("interval") for task in s.tasks)
    return BCA_BIAS if recorded else PERCENTILE_BIAS


def _bias_note(s: _Study) -> str:
    """The small-sample bias of ACE and what it does to a level's interval, with this study's own example when
    the reference's ACE interval is lopsided (its middle more than a quarter of its width from the value)."""
    example = ""
    for task in s.tasks:
        m = _reference_summary(s, task).get("ace_paper") or {}
        v, lo, hi = num(m.get("value")), num(m.get("ci_low")), num(m.get("ci_high"))
        if None not in (v, lo, hi) and abs((lo + hi) / 2 - v) > (hi - lo) / 4:
            example = f" (here {s.reference}'s ACE on {task} is {v:.3f} with interval [{lo:.3f}, {hi:.3f}])"
            break
    return (f"{_interval_bias(s)}{example}. Changes are therefore judged by the paired interval of the difference, "
            "in which the bias both levels share largely cancels, never by whether two levels' intervals overlap.")


# =============================================================================================
# results per level


def _metric_cell(m: Mapping[str, Any] | None, spec: str = ".3f") -> Cell:
    m = m or {}
    v = num(m.get("value"))
    if v is None:
        return Cell("—")
    lo, hi = num(m.get("ci_low")), num(m.get("ci_high"))
    return Cell(format(v, spec), f"[{format(lo, spec)}, {format(hi, spec)}]" if lo is not None and hi is not None else "")


def _change_cell(d: Mapping[str, Any] | None, scale: float = 1.0, spec: str = ".3f") -> Cell:
    d = d or {}
    v, lo, hi = num(d.get("value")), num(d.get("ci_low")), num(d.get("ci_high"))
    if v is None:
        return Cell("—")
    return Cell(signed(scale * v, spec), interval(lo, hi, scale, spec), cls="sig" if significant(lo, hi) else "")


def _per_layer_cell(d: Mapping[Any, Any] | None, spec: str = "g") -> Cell:
    if not d:
        return Cell("—")
    layers = layer_keys(d)
    total = sum(get(d, L) or 0 for L in layers)
    return Cell(format(total, spec), " · ".join(f"L{L}: {format(get(d, L), spec)}" for L in layers))


def _salient_cell(level: Mapping[str, Any]) -> Cell:
    """Salient counts per layer; a layer whose integral did not converge is marked, with its error."""
    counts = level.get("salient")
    if not counts:
        return Cell("—", level.get("salient_note") or "")  # why none (e.g. a mixture-of-experts model)
    detail = (level.get("salient_detail") or {}).get("layers") or {}
    parts, flagged = [], False
    for L in layer_keys(counts):
        d = detail.get(str(L)) or {}
        text = f"L{L}: {get(counts, L)}"
        if d.get("converged") is False:
            flagged = True
            text += (f" ⚠ not converged (mean |Σ attr − Δ log p| {d['completeness_error_mean']:.3g} nats, "
                     f"{d['converged_prompts']}/{(level.get('salient_detail') or {}).get('n_prompts')} prompts ok)")
        parts.append(text)
    total = sum(get(counts, L) or 0 for L in layer_keys(counts))
    return Cell(f"{total}" + (" ⚠" if flagged else ""), " · ".join(parts))


def _targets_cell(level: Mapping[str, Any]) -> Cell:
    """Which tokens the salient neurons were attributed to, and how many of them are not a label."""
    t = level.get("salient_targets") or {}
    tokens = t.get("tokens") or {}
    if not tokens:
        return Cell("—")
    ranked = sorted(tokens.items(), key=lambda kv: -int(kv[1]))  # most frequent first, ties in recorded order
    main = ", ".join(f"{quoted_piece(piece)} ×{count}" for piece, count in ranked)
    sub = [f"{t['not_label']} of {t.get('n', sum(int(c) for c in tokens.values()))} not a label"
           if t.get("not_label") is not None else "", TARGET_KINDS.get(t.get("kind"), str(t.get("kind") or ""))]
    return Cell(main, " · ".join(x for x in sub if x))


def _ladder_table(s: _Study) -> Table:
    rows = []
    for lvl in s.levels:
        li = s.levels_info.get(lvl) or {}
        types = li.get("tensor_types") or {}
        rows.append([Cell(lvl + (" (reference)" if lvl == s.reference else "")), li.get("file_type", "—"),
                     fmt(li.get("bits_per_weight"), ".2f"), size(li.get("size_bytes")),
                     ", ".join(f"{k}×{v}" for k, v in types.items()) or "—", li.get("requantized_from") or "—"])
    return Table(["level", "file type", "bits/weight", "size", "tensor types (as written)", "requantized from"],
                 rows, cls="ladder")


def _metrics_table(s: _Study, t: Mapping[str, Any], task_levels: list[str]) -> Table:
    runs = t.get("runs") or {}
    comp = (t.get("comparison") or {}).get("levels") or {}
    neurons = t.get("neurons") or {}
    header = ["metric"] + [lvl + (" (ref)" if lvl == s.reference else "") for lvl in task_levels]
    rows: list[Any] = []

    def run_metric(lvl: str, sk: str, key: str):
        return (((runs.get(lvl) or {}).get("metrics") or {}).get(sk) or {}).get(key)

    for sk in (s.scoring, "paper" if s.scoring == "label_set" else "label_set"):
        rows.append(Group("Calibration · " + ("label-set scoring (softmax over the label words)" if sk == "label_set"
                                              else "paper scoring (full-vocabulary argmax, substring match)")))
        for key, label, spec in RUN_METRICS:
            if any(run_metric(lvl, sk, key) for lvl in task_levels):
                rows.append([label] + [_metric_cell(run_metric(lvl, sk, key), spec) for lvl in task_levels])
            if key == "accuracy" and sk == "label_set" and any(
                    shows_accuracy_norm((runs.get(lvl) or {}).get("metrics")) for lvl in task_levels):
                rows.append([ACCURACY_NORM_LABEL] + [_metric_cell(run_metric(lvl, sk, "accuracy_norm"), spec)
                                                     for lvl in task_levels])

    rows.append(Group("Neurons"))
    if neurons:
        first = next(iter(neurons.values()))
        rows.append([f"dead neurons ({first.get('neuron', 'act')}, |a| < {first.get('tau', '—')})"]
                    + [_per_layer_cell((neurons.get(lvl) or {}).get("dead")) for lvl in task_levels])
        method = (first.get("salient_detail") or {}).get("method") or "attribution"
        rows.append([f"salient neurons ({method}; ⚠ = integral not converged)"]
                    + [_salient_cell(neurons.get(lvl) or {}) for lvl in task_levels])
        if any((neurons.get(lvl) or {}).get("salient_targets") for lvl in task_levels):
            rows.append(["attributed tokens (what the salient neurons explain)"]
                        + [_targets_cell(neurons.get(lvl) or {}) for lvl in task_levels])
        rows.append([f"redundant pairs (|corr| ≥ {first.get('redundancy_threshold', 0.9)})"]
                    + [_per_layer_cell((neurons.get(lvl) or {}).get("redundant_pairs"), ",") for lvl in task_levels])
    else:
        rows.append(["neurons"] + [Cell("—", NOT_MEASURED) for _ in task_levels])

    def vs_ref(lvl: str, fn: Callable[[Mapping[str, Any]], Cell]) -> Cell:
        if lvl == s.reference:
            return Cell("ref", cls="muted")
        c = comp.get(lvl)
        return fn(c) if c else Cell("—")

    def paired(c: Mapping[str, Any], key: str, sk: str | None = None) -> Mapping[str, Any] | None:
        return ((c.get("paired_deltas") or {}).get(sk or s.scoring) or {}).get(key)

    rows.append(Group(f"Against the reference {s.reference}"))
    if not comp:
        rows.append(["comparison with the reference"] + [Cell("—", NOT_MEASURED) for _ in task_levels])
        return Table(header, rows, cls="metrics", caption=_METRICS_CAPTION)
    rows.append(["Δ accuracy vs ref (points, label-set)"] + [vs_ref(lvl, lambda c: _change_cell(
        paired(c, "accuracy", "label_set") or c.get("accuracy_delta"), 100, ".1f")) for lvl in task_levels])
    tag = "paper scoring" if s.scoring == "paper" else "label-set"
    for key, label in PAIRED_ROWS:
        if any(paired(comp.get(lvl) or {}, key) for lvl in task_levels):
            rows.append([f"{label} vs ref ({tag}, paired)"] + [vs_ref(lvl, lambda c, key=key: _change_cell(paired(c, key)))
                                                               for lvl in task_levels])
    rows.append(["agreement with ref"] + [vs_ref(lvl, lambda c: Cell(
        f"{100 * c['agreement']:.1f}%",
        f"{(c.get('flips') or {}).get('changed', '—')} changed "
        f"({(c.get('flips') or {}).get('correct_to_wrong', '—')}→wrong, "
        f"{(c.get('flips') or {}).get('wrong_to_correct', '—')}→right)")) for lvl in task_levels])
    rows.append(["KL label set (mean / max)"] + [vs_ref(lvl, lambda c: Cell(
        fmt(c.get("kl_label_mean"), ".4f"), f"max {fmt(c.get('kl_label_max'), '.4f')}")) for lvl in task_levels])
    rows.append(["KL full vocabulary (mean / p99)"] + [vs_ref(lvl, lambda c: Cell(
        fmt(c.get("kl_full_mean"), ".4f"), f"p99 {fmt(c.get('kl_full_p99'), '.4f')}")) for lvl in task_levels])
    rows.append(["top-1 token agreement"] + [vs_ref(lvl, lambda c: Cell(
        f"{100 * c['top1_agreement']:.1f}%" if num(c.get("top1_agreement")) is not None else "—")) for lvl in task_levels])
    rows.append(["hidden state cosine / CKA"] + [vs_ref(lvl, lambda c: Cell(
        fmt(c.get("hidden_cosine_mean"), ".4f"), f"CKA {fmt(c.get('hidden_cka'), '.4f')}")) for lvl in task_levels])
    return Table(header, rows, cls="metrics", caption=_METRICS_CAPTION)


_METRICS_CAPTION = ("Each column one quantization level; bracketed: 95% bootstrap interval (changes: paired, the "
                    "same examples resampled for both levels; highlighted when it excludes 0). "
                    "Per-layer neuron counts under the total (L = layer).")


def _neuron_comparison_table(s: _Study, t: Mapping[str, Any]) -> Table | None:
    """Per level and layer: dead-set and salient-set Jaccard and the activation drift against the reference."""
    ncomp = t.get("neuron_comparison") or {}
    moe = any((c or {}).get("routing_agreement") for c in ncomp.values())  # mixture of experts
    rows = []
    for lvl in [x for x in s.levels if x in ncomp] + [x for x in ncomp if x not in s.levels]:
        c = ncomp[lvl] or {}
        dead, sal, drift = c.get("dead_jaccard") or {}, c.get("salient_jaccard") or {}, c.get("drift") or {}
        for i, layer in enumerate(layer_keys(dead, sal, drift)):
            d = get(drift, layer) or {}
            rows.append([Cell(lvl if i == 0 else "", cls="strong"), str(layer), fmt(get(dead, layer), ".2f"),
                         fmt(get(sal, layer), ".2f"), fmt(d.get("mean"), ".4g"), fmt(d.get("max"), ".4g"),
                         str(d.get("neurons", "—"))])
            if moe:
                rows[-1].append(fmt((get(c.get("routing_agreement") or {}, layer) or {}).get("share"), ".3f"))
    if not rows:
        return None
    return Table(["level", "layer", "dead-set Jaccard", "salient-set Jaccard", f"{DRIFT_NAME}: mean", "max",
                  "neurons"] + (["routing agreement"] if moe else []), rows, cls="compact",
                 caption=f"Against {s.reference} over the same prompts' tokens. {DRIFT_NAME}: per neuron |mean_level − "
                         "mean_ref| / std_ref; mean and max over the neurons whose reference varies (counted under "
                         "'neurons'); neuron_drift under Manifest › definitions."
                         + (" Mixture of experts: drift over each level's own routed tokens (it mixes routing "
                            "changes with activation changes); routing agreement: the share of tokens routed to "
                            "the reference's top-k experts." if moe else ""))


def _tables_section(s: _Study) -> Section:
    sec = Section("tables", "Results per quantization level")
    if s.levels_info:
        sec.add("h3", "Quantization ladder")
        sec.add("table", _ladder_table(s))
    if not s.tasks:
        sec.add("note", f"Tasks: {NOT_MEASURED}.")
    for task, t in s.tasks.items():
        data = t.get("data") or {}
        runs, neurons = t.get("runs") or {}, t.get("neurons") or {}
        task_levels = [lvl for lvl in s.levels if lvl in runs or lvl in neurons] or list(runs)
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
        sec.add("table", _metrics_table(s, t, task_levels))
        table = _neuron_comparison_table(s, t)
        if table is not None:
            sec.add("h3", f"Task {task}: neurons against {s.reference}")
            sec.add("table", table)
    return sec


# =============================================================================================
# the pick


def _pick_section(s: _Study, pick: Mapping[str, Any]) -> Section:
    sec = Section("pick", "Which level to run")
    if not pick:
        sec.add("note", f"The pick: {NOT_MEASURED} (it needs the text KLD).")
        return sec
    result = pick.get("result") or {}
    budget = result.get("budget") or {}
    if result.get("pick"):
        sec.add("p", f"Pick: {result['pick']} — {result['reasons'][0].removeprefix(result['pick'] + ': ')}")
    else:
        sec.add("warn", f"No level fits: {(result.get('reasons') or ['—'])[0]}")
    rows = []
    for lvl in s.levels:
        d = (pick.get("levels") or {}).get(lvl)
        verdict = (result.get("levels") or {}).get(lvl) or {}
        if d is None:
            continue
        ref = d.get("reference")
        acc, ci = d.get("accuracy_delta"), d.get("accuracy_delta_ci")
        rows.append([Cell(lvl, cls="strong"), size(d.get("size_bytes")), fmt(d.get("bits_per_weight"), ".2f"),
                     "ref" if ref else fmt(d.get("kld_mean"), ".5f"), "ref" if ref else fmt(d.get("kld_p99"), ".4f"),
                     "ref" if ref else (fmt(100 * d["same_top_p"], ".2f") if d.get("same_top_p") is not None else "—"),
                     "ref" if ref else (Cell(signed(acc, ".1f"), interval(ci[0] / 100, ci[1] / 100, 100) if ci else "")
                                        if acc is not None else "—"),
                     "✓" if verdict.get("on_frontier") else "dominated by " + ", ".join(verdict.get("dominated_by") or []),
                     "✓" if verdict.get("meets_budget") else "; ".join(f["text"] for f in verdict.get("failures") or [])])
    fig = s.figure("pareto", "File size against mean text KLD: the Pareto frontier, the budget and the pick",
                   lambda: plots.pareto_png(pick.get("levels") or {}, result.get("frontier") or [], result.get("pick"),
                                            colors=s.colors, budget_kld=budget.get("max_kld")))
    if fig is not None:
        sec.add("figures", [fig])
    limits = [f"{name} ≤ {budget[key]}" for key, name in (("max_kld", "mean KLD"), ("max_p99_kld", "p99 KLD"),
                                                          ("max_accuracy_drop", "accuracy drop (points)"))
              if budget.get(key) is not None]
    sec.add("table", Table(["level", "size", "bits/weight", "KLD mean", "KLD p99", "same top p %", "accuracy Δ points",
                            "Pareto frontier", "within budget"], rows,
                           caption="Budget: " + ", ".join(limits + [
                               f"memory {size(budget.get('memory_bytes'))} ({budget.get('memory_source')}) for the file "
                               f"plus a {pick.get('run_ctx')}-token context"]) + ". Accuracy: the worst change over the "
                               "tasks, with its paired interval."))
    if len(result.get("reasons") or []) > 1:
        sec.add("list", [(text, False) for text in result["reasons"][1:]])
    return sec


# =============================================================================================
# text KLD (llama-perplexity's statistics)


def _text_kld_section(s: _Study, kld: Mapping[str, Any]) -> Section:
    sec = Section("text-kld", "Text KLD against the reference (llama-perplexity's statistics)")
    if not kld:
        sec.add("note", f"Text KLD: {NOT_MEASURED}.")
        return sec
    if kld.get("note"):
        sec.add("warn", f"Text KLD was not measured: {kld['note']}")
        return sec
    sec.add("p", f"Text: {kld.get('text_source', '—')} · {kld.get('chunks')} chunks of {kld.get('ctx')} tokens, the "
                 f"second half of each scored · reference {kld.get('reference')} · base {kld.get('base_source')}")
    rows = []
    for lvl in s.levels:
        m = (kld.get("models") or {}).get(lvl)
        if not m:
            continue
        rows.append([Cell(lvl, cls="strong"), str(m.get("n_tokens")),
                     Cell(fmt(m.get("ppl"), ".4f"), f"± {fmt(m.get('ppl_se'), '.4f')}"),
                     Cell(fmt(m.get("ln_ppl_ratio"), "+.5f"), f"± {fmt(m.get('ln_ppl_ratio_se'), '.5f')}"),
                     Cell(fmt(m.get("kld_mean"), ".5f"), f"± {fmt(m.get('kld_mean_se'), '.5f')}"),
                     fmt(m.get("kld_median"), ".5f"), fmt(m.get("kld_p99"), ".4f"), fmt(m.get("kld_p999"), ".4f"),
                     fmt(m.get("kld_max"), ".4f"),
                     Cell(fmt(100 * m["rms_dp"], ".3f") if m.get("rms_dp") is not None else "—",
                          f"± {fmt(100 * m['rms_dp_se'], '.3f')}" if m.get("rms_dp_se") is not None else ""),
                     Cell(fmt(100 * m["same_top_p"], ".2f") if m.get("same_top_p") is not None else "—",
                          f"± {fmt(100 * m['same_top_p_se'], '.2f')}" if m.get("same_top_p_se") is not None else "")])
    sec.add("table", Table(["level", "tokens", "PPL", "ln(PPL/PPL ref)", "KLD mean", "KLD median", "KLD p99",
                            "KLD p99.9", "KLD max", "RMS Δp %", "same top p %"], rows,
                           caption="Definitions as llama-perplexity --kl-divergence prints them; ± is its standard "
                                   "error (ln PPL ratio: covariance-aware)."))
    return sec


# =============================================================================================
# where the error enters (the divergence trace)


def _trace_section(s: _Study, trace: Mapping[str, Any]) -> Section:
    sec = Section("trace", "Where the error enters")
    levels = trace.get("levels") or {}
    if not levels:
        sec.add("warn" if trace.get("note") else "note",
                f"The divergence trace was not measured: {trace['note']}" if trace.get("note")
                else f"The divergence trace: {NOT_MEASURED}.")
        return sec
    first = next(iter(levels.values()))
    sec.add("p", f"Text: {trace.get('text_source', '—')} · {first.get('chunks')} chunk(s) of {first.get('ctx')} "
                 f"tokens · reference {first.get('reference')}. Per block, the relative error ‖q−r‖/‖r‖ (mean over "
                 "tokens) of the attention heads' output (kqv_out), the attention output (attn_out), the FFN output "
                 "(ffn_out) and the residual stream after the block (l_out); and the KL of the output when the "
                 "embedding and blocks ≤ k run quantized and the rest at the reference's precision (the reference "
                 "model with its residual stream after block k replaced by the level's): its steps add up to the "
                 "level's own KL.")
    for lvl in s.levels:
        t = levels.get(lvl)
        if not t:
            continue
        sec.add("h3", f"{lvl} against {t.get('reference')}")
        kl, summary = t.get("kl") or {}, t.get("summary") or {}
        top = summary.get("largest_kl_step")
        facts = [f"KL of {lvl}: {fmt(kl.get('full'), '.5f')} ± {fmt(kl.get('full_se'), '.5f')} nats per token "
                 f"({kl.get('tokens')} tokens)"]
        if top:
            share = f", {100 * top['share']:.0f}% of the KL" if top.get("share") is not None else ""
            facts.append(f"the error enters most at {top['part']} (KL step {fmt(top['step'], '+.5f')}{share})")
        ends = [p for p in (t.get("kl_steps") or []) if p["part"] == "token embedding" or "output" in p["part"]]
        facts += [f"{p['part']}: KL step {fmt(p['step'], '+.5f')}" for p in ends]
        a, b = summary.get("l_out_rel_err_first"), summary.get("l_out_rel_err_last")
        if a and b and a["layer"] != b["layer"]:
            facts.append(f"the residual stream's relative error grows from {fmt(a['rel_err'], '.4f')} after block "
                         f"{a['layer']} to {fmt(b['rel_err'], '.4f')} after block {b['layer']}")
        rise = summary.get("l_out_largest_rise")
        if rise and rise["rise"] > 0:
            facts.append(f"it grows most at block {rise['layer']} (the residual stream's relative error "
                         f"{fmt(rise['from'], '.4f')} → {fmt(rise['to'], '.4f')})")
        sec.add("list", [(f, False) for f in facts])
        fig = s.figure(f"trace-{slug(lvl)}", f"Where the error enters, {lvl} vs {t.get('reference')}: relative error "
                       "per block and sublayer; KL with blocks ≤ k quantized", lambda: trace_png(t))
        if fig is not None:
            sec.add("figures", [fig])
        subs = list(t.get("sublayers") or [])
        rows = [[str(r["layer"])] + [fmt((r.get(sub) or {}).get("rel_err"), ".4f") for sub in subs]
                + [fmt((r.get("l_out") or {}).get("cos"), ".5f"), fmt(r.get("kl_upto"), ".5f"),
                   fmt(r.get("kl_step"), "+.5f")] for r in t.get("layers") or []]
        sec.add("table", Table(["block", *subs, "l_out cos", "KL ≤ k", "Δ KL"], rows, cls="compact",
                               caption="rel. error ‖q−r‖/‖r‖ per sublayer (mean over tokens), the residual stream's "
                                       "cosine, the KL with blocks ≤ k quantized and its step from the block before."))
    missing = [n for n in s.plot_notes if n.startswith("Where the error enters")]
    if missing:
        sec.add("note", "; ".join(missing) + ".")
    return sec


# =============================================================================================
# noise floor


# The answer-level metrics shown for every level's own batch-layout noise.
LEVEL_LAYOUT_METRICS = ("flips", "kl_label_mean", "kl_full_mean", "kl_full_p99", "top1_changed", "ace_paper_delta",
                        "ece_delta")


def _floor_value(metric: str, v: float | None) -> str:
    if v is None:
        return "—"
    if metric.endswith("count_delta") or metric == "flips":
        return f"{v:.0f}"
    return f"{v:.3g}"


def _floor_table(effects: Mapping[str, Mapping[str, float]], floor: Mapping[str, Mapping[str, Any]],
                 definitions: Mapping[str, str], caption: str) -> Table:
    names = list(effects)
    rows = []
    for metric, f in floor.items():
        rows.append([Cell(metric, definitions.get(metric, "")),
                     *[_floor_value(metric, (effects.get(n) or {}).get(metric)) for n in names],
                     Cell(_floor_value(metric, f.get("value")), cls="strong")])
    return Table(["metric", *names, "floor (max)"], rows, caption=caption)


def _noise_floor_section(s: _Study, floor: Mapping[str, Any]) -> Section:
    sec = Section("noise-floor", "Noise floor: the reference against itself")
    if not floor:
        sec.add("note", f"The noise floor: {NOT_MEASURED}.")
        return sec
    ref = floor.get("reference")
    sec.add("p", f"{ref} run again on the same examples under changes that carry no quantization, each compared with "
                 f"{ref}'s own run by the same comparison a quantization level gets; the floor of a metric is its "
                 "largest change over them. A quantization effect no larger than the floor cannot be told from "
                 "the noise of the decode itself (what changed says so).")
    defs = floor.get("definitions") or {}
    for task, t in (floor.get("tasks") or {}).items():
        sec.add("h3", task)
        settings = "; ".join(f"{n}: {v}" for n, v in (t.get("settings") or {}).items())
        sec.add("table", _floor_table(t.get("effects") or {}, t.get("floor") or {}, defs,
                                      f"Each column: {ref} under one change against its own run ({settings})."))
        levels = t.get("levels") or {}
        if levels:
            setting = next(iter(levels.values())).get("setting", "")
            # the calibration metrics what changed judges by: paper scoring's in a paper-mode study
            shown = [f"paper.{m}" if s.mode == "paper" and m in ("ace_paper_delta", "ece_delta") else m
                     for m in LEVEL_LAYOUT_METRICS]
            rows = [[Cell(m, defs.get(m, "")), *[_floor_value(m, (e.get("effects") or {}).get(m)) for e in levels.values()]]
                    for m in shown]
            sec.add("table", Table(["metric", *levels], rows, caption=(
                f"Each level against its own run under the other batch layout ({setting}): quantized weights make "
                "llama.cpp quantize the activations too, per batch shape, so a level's own layout noise can exceed "
                f"{ref}'s. What changed judges each level's change against the larger of the two.")))
    text = floor.get("text_kld")
    if text:
        sec.add("h3", "text KLD")
        sec.add("table", _floor_table(text.get("effects") or {}, text.get("floor") or {}, defs,
                                      f"{ref} scored against its own text-KLD base (computed at the study's settings) "
                                      "under each change; the base stores log-probabilities in llama-perplexity's "
                                      "16-bit form, so even unchanged settings leave a small KLD."))
    return sec


# =============================================================================================
# speed


def _speed_section(s: _Study, speed: Mapping[str, Any]) -> Section:
    sec = Section("speed", "Speed and memory per level")
    if not speed:
        sec.add("note", f"Speed: {NOT_MEASURED}.")
        return sec
    st = speed.get("settings") or {}
    rows = []
    for lvl in s.levels:
        d = (speed.get("levels") or {}).get(lvl)
        if not d:
            continue
        mem = d.get("memory") or {}
        rows.append([Cell(lvl, cls="strong"), size(d.get("file_bytes")), fmt(d.get("bits_per_weight"), ".2f"),
                     Cell(fmt(d.get("pp_tokens_per_s"), ".1f"), f"± {fmt(d.get('pp_tokens_per_s_sd'), '.1f')}"),
                     Cell(fmt(d.get("tg_tokens_per_s"), ".1f"), f"± {fmt(d.get('tg_tokens_per_s_sd'), '.1f')}"),
                     size(mem.get("llama_bytes")), size(mem.get("peak_rss_bytes"))])
    system = speed.get("system") or {}
    sec.add("table", Table(["level", "file", "bits/weight", f"pp{st.get('n_prompt')} tokens/s",
                            f"tg{st.get('n_gen')} tokens/s", "llama.cpp memory", "peak RSS"], rows,
                           caption=f"llama-bench's protocol (ggml-probe bench): a warm-up, then {st.get('reps')} "
                                   f"repetitions, mean ± sd; {st.get('threads')} threads, flash attention "
                                   f"{'on' if st.get('flash_attn') else 'off'}, {system.get('cpu_count')} CPUs seen. "
                                   "llama.cpp memory: weights + KV cache + compute buffers of the larger test; peak "
                                   "RSS: the process's, reset before each level where Linux allows."))
    return sec


# =============================================================================================
# figures


def _figures_section(s: _Study) -> Section:
    sec = Section("plots", "Figures")
    tag = "paper scoring" if s.scoring == "paper" else "label-set scoring"
    for task, t in s.tasks.items():
        runs, rel = t.get("runs") or {}, t.get("reliability") or {}
        neurons, ncomp = t.get("neurons") or {}, t.get("neuron_comparison") or {}
        sec.add("h3", f"Task {task}")
        name = slug(task)
        rel_rows = {lvl: (rel.get(lvl) or {}).get(s.scoring) or [] for lvl in s.levels if lvl in rel}
        mets = {lvl: ((runs.get(lvl) or {}).get("metrics") or {}).get(s.scoring) or {} for lvl in s.levels if lvl in runs}
        figs = [s.figure(f"reliability-{name}", f"Reliability diagrams, {task} ({tag})",
                         lambda: plots.reliability_png(rel_rows, colors=s.colors)),
                s.figure(f"metrics-{name}", f"Accuracy, confidence and ACE per level, {task} ({tag}; 95% intervals)",
                         lambda: plots.metric_bars_png(mets, colors=s.colors))]
        if neurons:
            figs += [
                s.figure(f"dead-{name}", f"Dead neurons per layer, {task}", lambda: plots.layer_counts_png(
                    {lvl: n.get("dead") or {} for lvl, n in neurons.items()}, "dead neurons", colors=s.colors)),
                s.figure(f"salient-{name}", f"Salient neurons per layer, {task}", lambda: plots.layer_counts_png(
                    {lvl: n.get("salient") or {} for lvl, n in neurons.items()}, "salient neurons", colors=s.colors)),
                s.figure(f"redundancy-{name}",
                         f"Redundancy: neuron pairs per |corr| bin, layers pooled, {task} (the paper's Figure 4 form)",
                         lambda: plots.redundancy_hist_png({lvl: n.get("redundancy_hist") for lvl, n in neurons.items()},
                                                           colors=s.colors))]
        if ncomp:
            figs += [
                s.figure(f"drift-{name}", f"Activation {DRIFT_NAME} vs {s.reference} per layer, {task}",
                         lambda: plots.drift_png({lvl: c.get("drift") or {} for lvl, c in ncomp.items()}, colors=s.colors)),
                s.figure(f"jaccard-{name}", f"Salient-set overlap with {s.reference} per layer, {task}",
                         lambda: plots.jaccard_png({lvl: c.get("salient_jaccard") or {} for lvl, c in ncomp.items()},
                                                   colors=s.colors))]
        figs = [f for f in figs if f is not None]
        if figs:
            sec.add("figures", figs)
        missing = [n for n in s.plot_notes if task in n]
        if not neurons:
            missing.append(f"neuron figures: {NOT_MEASURED}")
        if missing:
            sec.add("note", "; ".join(sorted(set(missing))) + ".")
    if not s.tasks:
        sec.add("note", f"Output-level and neuron figures: {NOT_MEASURED}.")
    return sec


# =============================================================================================
# neurons: what the most salient ones respond to


def _token_rows(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Top-activation rows [token, context, a], identical (token, context) pairs merged as ×n."""
    merged: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        merged.setdefault((str(r[0]), str(r[1])), []).append(float(r[2]))
    return [[Cell(visible(tok), cls="tok"), Cell("…" + visible(ctx) if ctx else "(start of prompt)", cls="ctx"),
             Cell(fmt(max(vals), ".2f"), f"×{len(vals)}" if len(vals) > 1 else "")]
            for (tok, ctx), vals in merged.items()]


def _neurons_section(s: _Study) -> Section:
    sec = Section("neurons", "Neurons: what the most salient ones respond to")
    any_tokens = False
    for task, t in s.tasks.items():
        neurons = t.get("neurons") or {}
        cards = []
        for lvl in s.levels:
            n = neurons.get(lvl) or {}
            tt = n.get("top_tokens") or {}
            if not tt:
                continue
            tables = []
            ranked_by = n.get("top_tokens_ranked_by") or {}
            for layer in layer_keys(tt):
                how = get(ranked_by, layer) if isinstance(ranked_by, Mapping) else ranked_by
                for neuron, rows in (get(tt, layer) or {}).items():
                    tables.append(Table(["token", "left context", "a"], _token_rows(rows),
                                        caption=f"layer {layer} · neuron {neuron}" + (f" (by {how})" if how else ""),
                                        cls="tokens", first_col_header=False))
            cards.append((lvl, tables))
        if cards:
            any_tokens = True
            sec.add("h3", f"Task {task}: top-activating tokens")
            sec.add("cards", cards)
        qs = {lvl: (neurons.get(lvl) or {}).get("max_abs_quantiles") for lvl in s.levels
              if (neurons.get(lvl) or {}).get("max_abs_quantiles")}
        if qs:
            rows = [[lvl, str(layer)] + [fmt(v, ".3g") for v in get(q, layer)] for lvl, q in qs.items()
                    for layer in layer_keys(q)]
            sec.add("h3", f"Task {task}: per-neuron max |a| (distribution over neurons)")
            sec.add("table", Table(["level", "layer", "min", "10%", "median", "90%", "max"], rows, cls="compact",
                                   caption="A dead-neuron count of zero says little alone: this is how far each "
                                           "layer's neurons are from the threshold."))
    if not any_tokens:
        sec.add("note", f"Top-activating tokens: {NOT_MEASURED}.")
    return sec


# =============================================================================================
# weights


def _weights_section(s: _Study) -> Section:
    sec = Section("weights", "Weights: quantization error per layer")
    if not s.weights:
        sec.add("note", f"Weight error: {NOT_MEASURED}.")
        return sec
    figs = [s.figure("weights-rel-rmse", f"Relative RMSE of the weights vs {s.reference} per layer",
                     lambda: plots.weight_error_png(s.weights, "rel_rmse", colors=s.colors)),
            s.figure("weights-sqnr", f"SQNR of the weights vs {s.reference} per layer",
                     lambda: plots.weight_error_png(s.weights, "sqnr_db", colors=s.colors))]
    figs = [f for f in figs if f is not None]
    if figs:
        sec.add("figures", figs)
    rows = []
    for lvl in s.levels:
        w = s.weights.get(lvl)
        if not w:
            continue
        tot = w.get("total") or {}
        rows.append([Cell(lvl, cls="strong"), "all", fmt(tot.get("rel_rmse"), ".5f"), fmt(tot.get("sqnr_db"), ".2f"),
                     fmt(tot.get("cosine"), ".6f"), fmt(tot.get("max_abs"), ".4g"), ""])
        for r in w.get("layers") or []:
            rows.append(["", str(r["layer"]), fmt(r.get("rel_rmse"), ".5f"), fmt(r.get("sqnr_db"), ".2f"),
                         fmt(r.get("cosine"), ".6f"), fmt(r.get("max_abs"), ".4g"), str(r.get("worst_tensor") or "")])
    sec.add("table", Table(["level", "layer", "rel RMSE", "SQNR dB", "cosine", "max |ΔW|", "worst tensor"], rows,
                           cls="compact", caption=f"Dequantized weights against {s.reference}: rel RMSE = ‖W−R‖/‖R‖, "
                                                  "SQNR = 10·log10(‖R‖²/‖W−R‖²)."))
    return sec


# =============================================================================================
# manifest


def _definitions(s: _Study) -> dict[str, str]:
    """The study's definitions, plus those of the comparisons it shows when an older study.json lacks them."""
    defs = {k: str(v) for k, v in (s.meta.get("definitions") or {}).items()}
    if any(t.get("neuron_comparison") for t in s.tasks.values()):
        if not any("drift" in k for k in defs):
            defs["neuron_drift"] = DRIFT_DEFINITION
        defs.setdefault("jaccard", JACCARD_DEFINITION)
    for t in s.tasks.values():
        for c in ((t.get("comparison") or {}).get("levels") or {}).values():
            paired = (c.get("paired_deltas") or {}).get("definition")
            if paired:
                defs.setdefault("paired_delta", str(paired))
    if any((((t.get("runs") or {}).get(s.reference) or {}).get("metrics")) for t in s.tasks.values()):
        recorded = [str(_reference_summary(s, task).get("interval") or "") for task in s.tasks]
        defs.setdefault("bootstrap_interval", next((r for r in recorded if r), "95% percentile bootstrap interval"))
        defs.setdefault("interval_bias", _interval_bias(s) + ".")
    return defs


def _manifest_section(s: _Study) -> Section:
    sec = Section("manifest", "Manifest")
    rows = []
    for lvl in s.levels:
        li = s.levels_info.get(lvl) or {}
        eng = li.get("engine") or {}
        devices = ", ".join(f"{d.get('name')} ({d.get('description')})" for d in eng.get("devices") or []) or "—"
        # the layers llama.cpp offloaded: its own "N/M" figure when it logs one, else the manifest's count (0 on CPU)
        gpu = eng.get("offloaded_layers") if eng.get("offloaded_layers") is not None else eng.get("gpu_layers_requested", "—")
        rows.append([lvl, Cell(str(li.get("sha256") or "—"), cls="mono"), str(li.get("path") or "—"),
                     ", ".join(f"{k}×{v}" for k, v in (li.get("tensor_types") or {}).items()) or "—",
                     ", ".join(f"{k}×{v}" for k, v in (eng.get("loaded_tensor_types") or {}).items()) or "—",
                     devices, str(gpu)])
    details: list[tuple[str, Any]] = []
    if rows:
        details.append(("table", Table(["level", "sha256", "file", "tensor types (file)", "tensor types (loaded)",
                                        "devices", "GPU layers offloaded"], rows, cls="manifest")))
    for task, t in s.tasks.items():
        data = t.get("data") or {}
        if data:
            details.append(("p", f"{task}: data {data.get('source', '—')}, sha256 {data.get('data_sha256', '—')}"
                                 + (f", fallback from {data['fallback_from']}" if data.get("fallback_from") else "")))
    defs = _definitions(s)
    if defs:
        details.append(("table", Table(["term", "definition"], [[k, v] for k, v in defs.items()], cls="defs")))
    tool = s.meta.get("tool") or {}
    if tool:
        details.append(("table", Table(["component", "version"], [[k, str(v)] for k, v in tool.items()], cls="defs")))
    facts = [(k, s.meta.get(k)) for k in ("command", "created", "seconds") if s.meta.get(k) is not None]
    if facts:
        details.append(("table", Table(["", ""], [[k, f"{v:.1f} s" if k == "seconds" else str(v)] for k, v in facts],
                                       cls="defs")))
    if details:
        sec.add("details", details)
    else:
        sec.add("note", f"Manifest: {NOT_MEASURED}.")
    return sec
