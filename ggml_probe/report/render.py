"""The study report's entry point: report.html (self-contained), report.md and plots/*.png from a study dict.

    from ggml_probe.report.render import render_report
    paths = render_report(study, Path("study-out"))   # report.html, report.md, plots/*.png

The rooms of report/: values (reading and formatting numbers), changes (what_changed: the rules for the
largest changes), model (the sections built from study.json into plain data), html_page and markdown_page
(the two renderings of that model), plots (the figures), terminal (rich tables for the CLI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..fsutil import atomic_output
from .html_page import to_html
from .markdown_page import to_markdown
from .model import build_report


def render_report(study: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write out_dir/report.html (self-contained), out_dir/report.md and its figures in out_dir/plots/.

    Every file is written atomically. Missing or empty sections of `study` give a short
    "not measured in this study" note. Returns {"html": path, "md": path, "plots": folder,
    "plot:NAME": path per figure}.
    """
    out_dir = Path(out_dir)
    report = build_report(study)
    plot_dir = out_dir / "plots"
    paths: dict[str, Path] = {}
    for f in report.figures:
        p = plot_dir / f"{f.name}.png"
        with atomic_output(p) as tmp:
            tmp.write_bytes(f.png)
        paths[f"plot:{f.name}"] = p
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    with atomic_output(html_path) as tmp:
        tmp.write_text(to_html(report), encoding="utf-8")
    with atomic_output(md_path) as tmp:
        tmp.write_text(to_markdown(report, "plots"), encoding="utf-8")
    paths.update({"html": html_path, "md": md_path, "plots": plot_dir})
    return paths


def load_study(path: Path) -> dict[str, Any]:
    """Read a study.json (per-layer keys stay strings; the report accepts both)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
