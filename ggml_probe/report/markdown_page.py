"""The report as Markdown: the same sections and tables as the HTML page, figures linked from plots/.

    from ggml_probe.report.markdown_page import to_markdown
    text = to_markdown(build_report(study), "plots")
"""

from __future__ import annotations

import re
from typing import Any

from .model import Cell, Group, Report, Table


def _md_escape(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("`", "\\`")


_NUMERIC = re.compile(r"^[−+-]?[\d.,]+(?:e[−+-]?\d+)?\s*%?$")


def _md_table(t: Table) -> str:
    def cell(c: Any) -> str:
        if isinstance(c, Cell):
            return _md_escape(c.main) + (f" <sub>{_md_escape(c.sub)}</sub>" if c.sub else "")
        return _md_escape("" if c is None else c)

    def numeric(col: int) -> bool:  # right-align columns of numbers, left-align text
        cells = [r[col] for r in t.rows if not isinstance(r, Group) and col < len(r)]
        texts = [(c.main if isinstance(c, Cell) else str(c or "")) for c in cells]
        return all(_NUMERIC.match(x) for x in texts if x and x not in ("—", "ref"))

    aligns = [":---"] + ["---:" if numeric(i) else ":---" for i in range(1, len(t.headers))]
    lines = ["| " + " | ".join(_md_escape(h) or " " for h in t.headers) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + (f"**{_md_escape(row.label)}**" + " |" * (len(t.headers) - 1) if isinstance(row, Group)
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
    if kind == "figures":
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


def to_markdown(report: Report, plot_dir: str = "plots") -> str:
    """The report as Markdown; figures are linked as PLOT_DIR/NAME.png (written beside it by render_report)."""
    header, sections = report.header, report.sections
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
