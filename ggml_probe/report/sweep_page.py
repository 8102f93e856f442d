"""The merged report of a sweep (sweep.json): per model the pick and its reasons, quality against bits per
weight across models (one figure, models as lines), redundant neuron pairs per model and level side by side
(the reference study's Figure 4), and every cell's status and figures.

    from ggml_probe.report.sweep_page import render_sweep_report
    render_sweep_report(json.load(open("sweeps/x/sweep.json")), Path("sweeps/x"))   # report.html, report.md, plots/

The sections are the study report's blocks (model.Section, Table, Figure), rendered by the same HTML and
Markdown block writers, so the two reports look alike.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping

from ..fsutil import atomic_output
from .html_page import CSS, _html_block
from .markdown_page import _md_block
from .model import Figure, Section, Table
from .plots import FIGSIZE, PALETTE, _png, _pyplot
from .values import num

NOT_MEASURED = "not measured in this sweep"


def _model_colors(models: list[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}


def _ok_models(sweep: Mapping[str, Any]) -> dict[str, dict]:
    return {m: s for m, s in (sweep.get("models") or {}).items() if not s.get("error")}


def quality_png(models: Mapping[str, Mapping[str, Any]], colors: Mapping[str, str]) -> bytes:
    """Mean text KLD (left) and the accuracy change against the reference, averaged over the tasks (right),
    against bits per weight; a line per model."""
    plt = _pyplot()
    fig, (ax_kld, ax_acc) = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 2, FIGSIZE[1]))
    drawn = False
    for model, s in models.items():
        levels = sorted(s["levels"], key=lambda lvl: s["levels"][lvl]["bits_per_weight"])
        bpw = [s["levels"][lvl]["bits_per_weight"] for lvl in levels]
        kld = [0.0 if lvl == s["reference"] else s["levels"][lvl].get("kld_mean") for lvl in levels]
        pts = [(x, y) for x, y in zip(bpw, kld) if num(y) is not None]
        if pts:
            ax_kld.plot(*zip(*pts), "o-", color=colors[model], label=model)
            drawn = True
        acc = []
        for lvl in levels:
            deltas = [rows[lvl].get("accuracy_delta", 0.0 if lvl == s["reference"] else None)
                      for rows in s["tasks"].values() if lvl in rows]
            deltas = [d for d in deltas if num(d) is not None]
            acc.append(100 * sum(deltas) / len(deltas) if deltas else None)
        pts = [(x, y) for x, y in zip(bpw, acc) if y is not None]
        if pts:
            ax_acc.plot(*zip(*pts), "o-", color=colors[model], label=model)
            drawn = True
    if not drawn:
        plt.close(fig)
        raise ValueError("nothing to draw")
    ax_kld.set(xlabel="bits per weight", ylabel="mean text KLD (nats/token)", title="text KLD vs the reference")
    ax_acc.set(xlabel="bits per weight", ylabel="accuracy change (points)", title="accuracy change, mean over tasks")
    ax_acc.axhline(0, color="#888", lw=0.8)
    ax_acc.legend(loc="best", fontsize=8)
    return _png(fig)


def redundancy_png(models: Mapping[str, Mapping[str, Any]], task: str, colors: Mapping[str, str]) -> bytes:
    """Redundant pairs (summed over the analysed layers) per level, a panel per model, on one task."""
    plt = _pyplot()
    shown = {m: s for m, s in models.items() if any(r.get("redundant_pairs") for r in s["tasks"].get(task, {}).values())}
    if not shown:
        raise ValueError("nothing to draw")
    fig, axes = plt.subplots(1, len(shown), figsize=(FIGSIZE[0] * min(2, len(shown)), FIGSIZE[1]), squeeze=False)
    for ax, (model, s) in zip(axes[0], shown.items()):
        rows = s["tasks"][task]
        levels = sorted(rows, key=lambda lvl: -s["levels"][lvl]["bits_per_weight"])
        pairs = [sum((rows[lvl].get("redundant_pairs") or {}).values()) for lvl in levels]
        ax.bar(levels, pairs, color=colors[model])
        ax.set_ylim(0, max(1, max(pairs)) * 1.08)  # zero pairs read as zero, not as an empty axis
        ax.set(title=f"{model} · {task}", ylabel="redundant pairs (|corr| ≥ 0.9)")
    return _png(fig)


def build_sweep_sections(sweep: Mapping[str, Any]) -> tuple[list[Section], list[Figure]]:
    models_all = sweep.get("models") or {}
    ok = _ok_models(sweep)
    colors = _model_colors(list(models_all))
    sections, figures = [], []

    pick = Section("pick", "Which level to run, per model")
    rows = []
    for model, s in models_all.items():
        if s.get("error"):
            rows.append([model, "—", "—", f"not merged: {s['error']}"])
            continue
        reasons = " ".join(s.get("reasons") or []) or ("none fits" if not s.get("pick") else "")
        rows.append([model, s.get("reference") or "—", s.get("pick") or "none fits", reasons])
    pick.add("table", Table(["model", "reference", "pick", "why"], rows))
    sections.append(pick)

    quality = Section("quality", "Quality against bits per weight, across models")
    try:
        figures.append(Figure("sweep_quality", quality_png(ok, colors),
                              "Mean text KLD against each model's reference (left) and the accuracy change against it, "
                              "in points, averaged over the tasks (right), against bits per weight; a line per model"))
        quality.add("figures", [figures[-1]])
    except ValueError:
        quality.add("note", NOT_MEASURED)
    table_rows = []
    for model, s in ok.items():
        for lvl, e in sorted(s["levels"].items(), key=lambda kv: -kv[1]["bits_per_weight"]):
            accs = " · ".join(f"{task} {100 * rows_[lvl]['accuracy']:.1f}%" for task, rows_ in s["tasks"].items()
                              if lvl in rows_ and num(rows_[lvl].get("accuracy")) is not None)
            kld = "ref" if lvl == s["reference"] else (f"{e['kld_mean']:.4f}" if num(e.get("kld_mean")) is not None else "—")
            table_rows.append([model, lvl, f"{e['bits_per_weight']:.2f}", kld, accs or "—"])
    quality.add("table", Table(["model", "level", "bits/weight", "mean text KLD", "accuracy"], table_rows))
    sections.append(quality)

    redundant = Section("redundant", "Redundant neuron pairs per model and level")
    tasks = sorted({t for s in ok.values() for t in s["tasks"]})
    any_neurons = False
    for task in tasks:
        levels = []
        for s in ok.values():
            for lvl in sorted(s["tasks"].get(task, {}), key=lambda lvl: -s["levels"][lvl]["bits_per_weight"]):
                if lvl not in levels:
                    levels.append(lvl)
        trows = []
        for model, s in ok.items():
            rows_ = s["tasks"].get(task, {})
            layers = sorted({int(k) for r in rows_.values() for k in (r.get("redundant_pairs") or {})})
            for layer in layers:
                trows.append([model, str(layer)] + [str((rows_.get(lvl, {}).get("redundant_pairs") or {}).get(str(layer), "—"))
                                                    for lvl in levels])
        if not trows:
            continue
        any_neurons = True
        redundant.add("h3", task)
        redundant.add("table", Table(["model", "layer", *levels], trows,
                                     caption="pairs of FFN neurons of a layer whose Pearson correlation over the "
                                             "task's tokens has |corr| ≥ 0.9"))
        try:
            figures.append(Figure(f"sweep_redundant_{task}", redundancy_png(ok, task, colors),
                                  f"Redundant pairs summed over the analysed layers, per level, on {task}"))
            redundant.add("figures", [figures[-1]])
        except ValueError:
            pass
    if not any_neurons:
        redundant.add("note", NOT_MEASURED)
    sections.append(redundant)

    cells = Section("cells", "Every cell")
    crow = []
    for c in sweep.get("cells") or []:
        f = c.get("figures") or {}
        figure = (f"accuracy {100 * f['accuracy']:.1f}%" if num(f.get("accuracy")) is not None else
                  f"KLD {f['kld_mean']:.4f}" if num(f.get("kld_mean")) is not None else "—")
        crow.append([c["model"], c.get("task") or c.get("text"), c["level"], c["status"], figure,
                     f"{c.get('seconds') or 0:.1f}", c.get("error") or ""])
    cells.add("table", Table(["model", "task / text", "level", "status", "figure", "s", "error"], crow))
    sections.append(cells)
    return sections, figures


def sweep_html(sweep: Mapping[str, Any], sections: list[Section]) -> str:
    e = html.escape
    models = list(sweep.get("models") or {})
    n_cells = len(sweep.get("cells") or [])
    failed = sum(c["status"] == "failed" for c in sweep.get("cells") or [])
    chips = [f'<span class="chip">models: <b>{e(", ".join(models))}</b></span>',
             f'<span class="chip">{n_cells} cells' + (f", <b>{failed} failed</b>" if failed else "") + "</span>",
             f'<span class="chip">{e(str(sweep.get("executor", "")))}</span>']
    if num(sweep.get("seconds")) is not None:
        chips.append(f'<span class="chip">{sweep["seconds"]:.0f} s</span>')
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>ggml-probe sweep</title>", f"<style>{CSS}</style></head><body>",
             '<header class="top" id="header"><div class="inner"><h1>Quantization sweep</h1>'
             f'<div class="sub">{e(Path(str(sweep.get("spec_path", ""))).name)}: models × levels × tasks, '
             f'measured through llama.cpp by ggml-probe</div><div class="chips">{"".join(chips)}</div></div></header><main>']
    for sec in sections:
        parts.append(f'<section id="{e(sec.id)}"><h2>{e(sec.title)}</h2>')
        parts.extend(_html_block(k, p, {}) for k, p in sec.blocks)
        parts.append("</section>")
    parts.append("<footer>Generated by ggml-probe. Self-contained: no scripts, no network. Each model's own "
                 "report: &lt;model&gt;/report.html.</footer></main></body></html>")
    return "\n".join(parts)


def sweep_markdown(sweep: Mapping[str, Any], sections: list[Section], plot_dir: str = "plots") -> str:
    lines = ["# Quantization sweep", "", f"**Spec:** {Path(str(sweep.get('spec_path', ''))).name}  ",
             f"**Models:** {', '.join(sweep.get('models') or {})}  ", f"**Cells:** {len(sweep.get('cells') or [])}  "]
    for sec in sections:
        lines += ["", f"## {sec.title}", ""]
        for k, p in sec.blocks:
            lines += [_md_block(k, p, plot_dir), ""]
    return "\n".join(lines).rstrip() + "\n"


def render_sweep_report(sweep: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write out_dir/report.html (self-contained), report.md and plots/*.png, atomically."""
    out_dir = Path(out_dir)
    sections, figures = build_sweep_sections(sweep)
    paths: dict[str, Path] = {}
    for f in figures:
        p = out_dir / "plots" / f"{f.name}.png"
        with atomic_output(p) as tmp:
            tmp.write_bytes(f.png)
        paths[f"plot:{f.name}"] = p
    for name, text in (("html", sweep_html(sweep, sections)), ("md", sweep_markdown(sweep, sections))):
        p = out_dir / f"report.{name}"
        with atomic_output(p) as tmp:
            tmp.write_text(text, encoding="utf-8")
        paths[name] = p
    return paths
