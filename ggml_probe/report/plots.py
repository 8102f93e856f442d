"""The study report's figures, each a function returning PNG bytes (matplotlib, Agg backend).

Inputs are the plain JSON-ready pieces of a study dict (see model.py), not files, so a figure
can be drawn from a study.json alone. Every function draws each quantization level in the same colour
(`level_colors`), so a reader can follow one level from figure to figure. A function given nothing to
draw raises ValueError; the report shows a "not measured" note instead of calling it.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

from ..analysis.neurons import DRIFT_NAME

# Colour-blind-safe palette (Okabe & Ito), in level order: reference first.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
DPI = 110
FIGSIZE = (5.6, 2.9)  # every single-panel figure: equal sizes render at equal scale side by side


def level_colors(levels: Sequence[str]) -> dict[str, str]:
    """One fixed colour per level, in the order given."""
    return {lvl: PALETTE[i % len(PALETTE)] for i, lvl in enumerate(levels)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False,
        "axes.grid": True, "grid.alpha": 0.25, "legend.frameon": False,
    })
    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _layers_of(per_level: Mapping[str, Mapping[Any, Any]]) -> list[int]:
    return sorted({int(k) for d in per_level.values() for k in d})


def _get(d: Mapping[Any, Any], layer: int):
    """A per-layer value whether the dict's keys are ints or (after JSON) strings."""
    if layer in d:
        return d[layer]
    return d.get(str(layer))


def _legend_outside(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _per_layer_setup(by_level: Mapping[str, Mapping[Any, Any]], nothing: str,
                     colors: Mapping[str, str] | None):
    """Levels that have per-layer data, their colours, the union of their layers, and a fresh figure."""
    levels = [lvl for lvl, d in by_level.items() if d]
    if not levels:
        raise ValueError(nothing)
    colors = colors or level_colors(levels)
    layers = _layers_of({lvl: by_level[lvl] for lvl in levels})
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    return levels, colors, layers, fig, ax


def _grouped_bars(ax, layers: list[int], series: Mapping[str, list], colors: Mapping[str, str],
                  errors: Mapping[str, list] | None = None) -> None:
    n = max(1, len(series))
    width = 0.8 / n
    for i, (lvl, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(layers))]
        ys = [v if _finite(v) else 0.0 for v in values]
        yerr = None
        if errors and lvl in errors:
            yerr = [[e[0] for e in errors[lvl]], [e[1] for e in errors[lvl]]]
        bars = ax.bar(xs, ys, width=width * 0.92, color=colors[lvl], label=lvl, yerr=yerr, capsize=3,
                      error_kw={"elinewidth": 1, "ecolor": "#333"})
        for b, v in zip(bars, values):
            if not _finite(v):
                ax.annotate("n/a", (b.get_x() + b.get_width() / 2, 0), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([str(x) for x in layers])


# ---------------------------------------------------------------------------------------------
# output level


def reliability_png(bins_by_level: Mapping[str, Sequence[Mapping[str, Any]]], title: str = "",
                    colors: Mapping[str, str] | None = None) -> bytes:
    """Reliability diagrams, one panel per level, from ReliabilityBins.rows() lists.

    Top: accuracy per confidence bin (bars spanning the bin), the diagonal of perfect calibration, and
    a dot at (mean confidence, accuracy); bottom: examples per bin.
    """
    levels = [lvl for lvl, rows in bins_by_level.items() if rows]
    if not levels:
        raise ValueError("no reliability bins to plot")
    colors = colors or level_colors(levels)
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(levels), figsize=(3.1 * len(levels), 3.9), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    for i, lvl in enumerate(levels):
        rows = [r for r in bins_by_level[lvl] if r.get("count")]
        top, bottom = axes[0, i], axes[1, i]
        lo = [r["lo"] for r in rows]
        width = [max((r["hi"] - r["lo"]), 0.01) for r in rows]
        acc = [r["accuracy"] for r in rows]
        top.plot([0, 1], [0, 1], "--", color="#888", linewidth=1)
        top.bar(lo, acc, width=width, align="edge", color=colors.get(lvl, PALETTE[0]), alpha=0.55,
                edgecolor="white", linewidth=0.6)
        top.plot([r["mean_confidence"] for r in rows], acc, "o", color="#222", markersize=3)
        n = sum(r["count"] for r in rows)
        gap = sum(r["count"] * abs(r["accuracy"] - r["mean_confidence"]) for r in rows) / n if n else float("nan")
        top.set_title(f"{lvl}  (n={n}, weighted gap {gap:.3f})")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1.02)
        bottom.bar(lo, [r["count"] for r in rows], width=width, align="edge", color=colors.get(lvl, PALETTE[0]))
        bottom.set_xlabel("confidence")
        if i == 0:
            top.set_ylabel("accuracy")
            bottom.set_ylabel("count")
    if title:
        fig.suptitle(title, y=1.0)
    return _png(fig)


METRIC_LABELS = {"accuracy": "accuracy", "mean_confidence": "mean confidence", "ace_paper": "ACE (paper)",
                 "ece": "ECE", "brier": "Brier", "nll": "NLL"}


def metric_bars_png(metrics_by_level: Mapping[str, Mapping[str, Any]],
                    metrics: Sequence[str] = ("accuracy", "mean_confidence", "ace_paper"),
                    title: str = "", colors: Mapping[str, str] | None = None) -> bytes:
    """One panel per metric, one bar per level with its 95% bootstrap interval as an error bar.

    metrics_by_level: {level: {metric: {"value", "ci_low", "ci_high"}}} (a run's label_set or paper dict).
    """
    levels = [lvl for lvl, m in metrics_by_level.items() if m]
    shown = [m for m in metrics if any(_finite((metrics_by_level[lvl].get(m) or {}).get("value")) for lvl in levels)]
    if not levels or not shown:
        raise ValueError("no metrics to plot")
    colors = colors or level_colors(levels)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(2.9 * len(shown), 2.8), squeeze=False)
    for ax, name in zip(axes[0], shown):
        vals, errs = [], [[], []]
        for lvl in levels:
            m = metrics_by_level[lvl].get(name) or {}
            v = m.get("value")
            vals.append(v if _finite(v) else 0.0)
            lo, hi = m.get("ci_low"), m.get("ci_high")
            # A bootstrap interval need not contain a biased statistic's value (ACE, ECE: percentile or BCa,
            # either leaves it out when the bias exceeds the spread): clip the error bar at 0.
            errs[0].append(max(0.0, v - lo) if _finite(lo) and _finite(v) else 0.0)
            errs[1].append(max(0.0, hi - v) if _finite(hi) and _finite(v) else 0.0)
        ax.bar(range(len(levels)), vals, color=[colors[lvl] for lvl in levels], yerr=errs, capsize=4,
               error_kw={"elinewidth": 1, "ecolor": "#333"})
        for x, v in enumerate(vals):
            ax.annotate(f"{v:.3f}", (x, v), textcoords="offset points", xytext=(8, 2), fontsize=7, color="#333")
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels(levels)
        ax.set_title(METRIC_LABELS.get(name, name))
        if name in ("accuracy", "mean_confidence", "ace_paper", "ece"):
            ax.set_ylim(0, 1)
    if title:
        fig.suptitle(title, y=1.02)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# neurons


def layer_counts_png(counts_by_level: Mapping[str, Mapping[Any, Any]], ylabel: str, title: str = "",
                     colors: Mapping[str, str] | None = None) -> bytes:
    """Grouped bars: a count per analysed layer (x) for each level, e.g. dead or salient neurons."""
    levels, colors, layers, fig, ax = _per_layer_setup(counts_by_level, "no per-layer counts to plot", colors)
    series = {lvl: [_get(counts_by_level[lvl], layer) for layer in layers] for lvl in levels}
    _grouped_bars(ax, layers, series, colors)
    for lvl_i, (lvl, values) in enumerate(series.items()):
        for j, v in enumerate(values):
            if _finite(v):
                n = len(series)
                x = j + (lvl_i - (n - 1) / 2) * 0.8 / n
                ax.annotate(f"{v:g}", (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    _legend_outside(ax)
    top = max([v for vals in series.values() for v in vals if _finite(v)] + [0])
    ax.set_ylim(0, max(1.0, top * 1.18))
    if title:
        ax.set_title(title)
    return _png(fig)


CORR_BIN_LABELS = [f"{i / 10:.1f}" for i in range(10)]


def redundancy_hist_png(hist_by_level: Mapping[str, Sequence[int]], title: str = "",
                        colors: Mapping[str, str] | None = None) -> bytes:
    """The paper's Figure 4 form: neuron pairs per |corr| bin (0.1 wide, 0..1), log-scaled counts."""
    levels = [lvl for lvl, h in hist_by_level.items() if h is not None and len(h) and sum(h) > 0]
    if not levels:
        raise ValueError("no redundancy histograms to plot")
    colors = colors or level_colors(levels)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    n = len(levels)
    width = 0.8 / n
    for i, lvl in enumerate(levels):
        h = list(hist_by_level[lvl])
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(h))]
        # log axis: a zero count is drawn as nothing, which is what it is
        ax.bar(xs, [c if c > 0 else float("nan") for c in h], width=width * 0.92, color=colors[lvl], label=lvl)
    ax.set_yscale("log")
    ax.set_xticks(range(10))
    ax.set_xticklabels([f"[{i / 10:.1f},{(i + 1) / 10:.1f})" if i < 9 else "[0.9,1.0]" for i in range(10)],
                       rotation=30, fontsize=7)
    ax.set_xlabel("|Pearson correlation| of a neuron pair")
    ax.set_ylabel("neuron pairs (log)")
    _legend_outside(ax)
    if title:
        ax.set_title(title)
    return _png(fig)


def drift_png(drift_by_level: Mapping[str, Mapping[Any, Mapping[str, float]]], title: str = "",
              colors: Mapping[str, str] | None = None) -> bytes:
    """Per-layer activation drift (DRIFT_NAME, analysis.neurons.activation_drift) of each level against the
    reference: mean over neurons (bar) and max (marker)."""
    levels, colors, layers, fig, ax = _per_layer_setup(drift_by_level, "no activation drift to plot", colors)
    means = {lvl: [(_get(drift_by_level[lvl], layer) or {}).get("mean") for layer in layers] for lvl in levels}
    _grouped_bars(ax, layers, means, colors)
    n = len(levels)
    for i, lvl in enumerate(levels):
        maxes = [(_get(drift_by_level[lvl], layer) or {}).get("max") for layer in layers]
        xs = [j + (i - (n - 1) / 2) * 0.8 / n for j in range(len(layers))]
        pts = [(x, m) for x, m in zip(xs, maxes) if _finite(m)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "v", color=colors[lvl], markeredgecolor="#222",
                    markersize=6, linestyle="none", label=f"{lvl} max")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{DRIFT_NAME} (bar: mean, ▼: max; log)")
    _legend_outside(ax)
    if title:
        ax.set_title(title)
    return _png(fig)


def jaccard_png(jaccard_by_level: Mapping[str, Mapping[Any, float]], title: str = "",
                colors: Mapping[str, str] | None = None) -> bytes:
    """Salient-set overlap with the reference: Jaccard index per layer (0 = disjoint, 1 = identical)."""
    levels, colors, layers, fig, ax = _per_layer_setup(jaccard_by_level, "no salient-set overlap to plot", colors)
    series = {lvl: [_get(jaccard_by_level[lvl], layer) for layer in layers] for lvl in levels}
    _grouped_bars(ax, layers, series, colors)
    ax.set_ylim(0, 1.08)
    ax.axhline(1.0, color="#888", linestyle="--", linewidth=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("Jaccard vs reference")
    _legend_outside(ax)
    if title:
        ax.set_title(title)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# weights


def weight_error_png(weights: Mapping[str, Mapping[str, Any]], metric: str = "rel_rmse", title: str = "",
                     colors: Mapping[str, str] | None = None) -> bytes:
    """Weight error per layer (rel RMSE, log scale; or SQNR in dB), one line per level."""
    levels = [lvl for lvl, w in weights.items()
              if any(_finite(r.get(metric)) for r in (w or {}).get("layers", []))]
    if not levels:
        raise ValueError("no per-layer weight error to plot")
    colors = colors or level_colors(levels)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    all_layers: set[int] = set()
    for lvl in levels:
        rows = sorted((r for r in weights[lvl]["layers"] if _finite(r.get(metric))), key=lambda r: r["layer"])
        xs = [r["layer"] for r in rows]
        all_layers.update(xs)
        ax.plot(xs, [r[metric] for r in rows], "o-", color=colors[lvl], label=lvl, markersize=4)
    if metric == "rel_rmse":
        ax.set_yscale("log")
        ax.set_ylabel("relative RMSE ‖ΔW‖/‖W‖ (log)")
    elif metric == "sqnr_db":
        ax.set_ylabel("SQNR (dB, higher is better)")
    else:
        ax.set_ylabel(metric)
    if len(all_layers) <= 12:
        ax.set_xticks(sorted(all_layers))
    ax.set_xlabel("layer")
    _legend_outside(ax)
    if title:
        ax.set_title(title)
    return _png(fig)


def pareto_png(levels: Mapping[str, Mapping[str, Any]], frontier: Sequence[str], pick: str | None,
               colors: Mapping[str, str] | None = None, budget_kld: float | None = None) -> bytes:
    """Size (MiB) against mean text KLD per level: the Pareto frontier joined, the budget as a line, the
    pick ringed. The reference sits at KLD 0."""
    pts = {lvl: (d["size_bytes"] / 2**20, d["kld_mean"]) for lvl, d in levels.items()
           if _finite(d.get("size_bytes")) and _finite(d.get("kld_mean"))}
    if len(pts) < 2:
        raise ValueError("fewer than two levels with a size and a text KLD")
    colors = colors or level_colors(list(pts))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    front = sorted((pts[lvl] for lvl in frontier if lvl in pts), key=lambda p: p[0])
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], color="#888", lw=1, zorder=1, label="Pareto frontier")
    for lvl, (x, y) in pts.items():
        ax.scatter([x], [y], color=colors.get(lvl, "#333"), s=36, zorder=2)
        ax.annotate(lvl, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if pick in pts:
        ax.scatter([pts[pick][0]], [pts[pick][1]], s=160, facecolors="none", edgecolors="#c0392b", lw=1.6, zorder=3,
                   label=f"pick: {pick}")
    if budget_kld is not None:
        ax.axhline(budget_kld, color="#c0392b", ls="--", lw=0.8, label=f"budget: mean KLD ≤ {budget_kld:g}")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean text KLD vs reference (nats)")
    _legend_outside(ax)
    return _png(fig)
