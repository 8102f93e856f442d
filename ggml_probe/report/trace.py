"""The divergence trace shown: its figure (error vs layer per sublayer, and the KL with blocks ≤ k quantized)
and its terminal table. Input: one level's trace dict (pipeline.trace.run_trace), e.g. from study.json."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping

from rich.markup import escape
from rich.table import Table

from .plots import FIGSIZE, _finite, _legend_outside, _png, _pyplot
from .values import fmt

if TYPE_CHECKING:
    from rich.console import Console

# One colour per sublayer (Okabe & Ito), fixed across levels and figures.
SUBLAYER_COLORS = {"kqv_out": "#56B4E9", "attn_out": "#0072B2", "ffn_out": "#E69F00", "l_out": "#000000"}
SUBLAYER_LABELS = {"kqv_out": "attention heads (kqv_out)", "attn_out": "attention output (attn_out)",
                   "ffn_out": "FFN output (ffn_out)", "l_out": "residual stream (l_out)"}


def trace_png(trace: Mapping[str, Any], title: str = "") -> bytes:
    """Top: relative error vs the reference per block, one line per sublayer (log scale). Bottom: the KL with
    the embedding and blocks ≤ k quantized (the rest at the reference's precision), with the full model's KL."""
    layers = trace.get("layers") or []
    subs = [s for s in trace.get("sublayers") or SUBLAYER_COLORS
            if any(_finite((r.get(s) or {}).get("rel_err")) and r[s]["rel_err"] > 0 for r in layers)]
    kl_rows = [r for r in layers if _finite(r.get("kl_upto"))]
    if not subs and not kl_rows:
        raise ValueError("no per-block error or KL to plot")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator  # matplotlib is loaded by _pyplot (Agg backend first)

    panels = 2 if kl_rows else 1
    fig, axes = plt.subplots(panels, 1, figsize=(FIGSIZE[0], FIGSIZE[1] * (1.6 if panels == 2 else 1)), sharex=True)
    axes = list(axes) if panels == 2 else [axes]
    ax = axes[0]
    for sub in subs:
        pts = [(r["layer"], r[sub]["rel_err"]) for r in layers if _finite((r.get(sub) or {}).get("rel_err"))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=SUBLAYER_COLORS.get(sub, "#888"),
                label=SUBLAYER_LABELS.get(sub, sub))
    if subs:
        ax.set_yscale("log")
    ax.set_ylabel("rel. error ‖q−r‖/‖r‖")
    _legend_outside(ax)
    if title:
        ax.set_title(title)
    if kl_rows:
        ax = axes[1]
        ax.plot([r["layer"] for r in kl_rows], [r["kl_upto"] for r in kl_rows], "o-", ms=3, color="#D55E00",
                label="KL, blocks ≤ k quantized")
        full = (trace.get("kl") or {}).get("full")
        if _finite(full):
            ax.axhline(full, color="#D55E00", ls="--", lw=0.8, label=f"KL, all quantized: {full:.4g}")
        ax.set_ylabel("KL vs reference (nats)")
        _legend_outside(ax)
    axes[-1].set_xlabel("block k")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def print_trace_summary(console: "Console", trace: Mapping[str, Any]) -> None:
    """`ggml-probe trace`: per block, each sublayer's relative error (and the residual stream's cosine) and
    the KL with blocks ≤ k quantized with its step; then the KL's parts and where the error enters."""
    kl = trace.get("kl") or {}
    head = (f"{escape(str(trace['model']))} vs {escape(str(trace['reference']))} · {trace['chunks']} chunks of "
            f"{trace['ctx']} tokens · relative error ‖q−r‖/‖r‖ (mean over tokens)")
    table = Table(title=head, title_justify="left")
    subs = list(trace.get("sublayers") or [])
    has_kl = any(r.get("kl_upto") is not None for r in trace.get("layers") or [])
    cols = ["block", *subs, "l_out cos"] + (["KL ≤ k", "Δ KL"] if has_kl else [])
    for col in cols:
        table.add_column(col, justify="right")
    for r in trace.get("layers") or []:
        cells = [str(r["layer"])] + [fmt((r.get(s) or {}).get("rel_err"), ".4f") for s in subs]
        cells.append(fmt((r.get("l_out") or {}).get("cos"), ".5f"))
        if has_kl:
            cells += [fmt(r.get("kl_upto"), ".5f"), fmt(r.get("kl_step"), "+.5f")]
        table.add_row(*cells)
    console.print(table)
    if kl.get("full") is not None:
        console.print(f"KL of the quantized model: {kl['full']:.5f} ±{kl.get('full_se') or 0:.5f} nats per token "
                      f"(max {fmt(kl.get('full_max'), '.4f')}, {kl.get('tokens')} tokens)")
    steps = trace.get("kl_steps") or []
    if len(steps) > 2:  # a single block's step is its table row; the embedding, spans and the output are not
        parts = ", ".join(f"{s['part']} {s['step']:+.5f}" for s in steps if not re.fullmatch(r"block \d+", s["part"]))
        console.print(f"KL steps (Δ KL of each part): {parts}")
    summary = trace.get("summary") or {}
    top = summary.get("largest_kl_step")
    if top and len(steps) > 2:
        share = f" ({100 * top['share']:.0f}% of the KL)" if top.get("share") is not None else ""
        console.print(f"the error enters most at {top['part']}: KL step {top['step']:+.5f}{share}")
    first, last = summary.get("l_out_rel_err_first"), summary.get("l_out_rel_err_last")
    if first and last and first["layer"] != last["layer"]:
        console.print(f"residual stream: relative error {first['rel_err']:.4f} after block {first['layer']}, "
                      f"{last['rel_err']:.4f} after block {last['layer']}")
