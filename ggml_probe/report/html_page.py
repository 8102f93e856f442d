"""The report as one self-contained HTML page: inline CSS, figures as base64 PNG data URIs, no JavaScript.

    from ggml_probe.report.html_page import to_html
    page = to_html(build_report(study))
"""

from __future__ import annotations

import base64
import html
from typing import Any, Mapping

from .model import Cell, Group, Report, Table
from .values import num


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


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.headers)
    thead = f"<thead><tr>{head}</tr></thead>" if any(t.headers) else ""
    body = []
    for row in t.rows:
        if isinstance(row, Group):
            body.append(f'<tr class="group"><th colspan="{len(t.headers)}">{_e(row.label)}</th></tr>')
            continue
        cells = []
        for i, c in enumerate(row):
            cell = c if isinstance(c, Cell) else Cell("" if c is None else str(c))
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
    if kind == "figures":
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


def to_html(report: Report) -> str:
    """The whole page: one self-contained HTML document (inline CSS, figures as data URIs, no scripts)."""
    header, sections = report.header, report.sections
    colors = header["colors"]
    chips = ['<span class="chip">levels: ' + " ".join(
        f'<span class="dot" style="background:{_e(colors.get(lvl, "#fff"))}"></span><b>{_e(lvl)}</b>'
        + (" (ref)" if lvl == header["reference"] else "") for lvl in header["levels"]) + "</span>" if header["levels"] else "",
             f'<span class="chip">tasks: <b>{_e(", ".join(header["tasks"]) or "—")}</b></span>',
             f'<span class="chip">mode: <b>{_e(header["mode"])}</b>'
             + (" (the reference study&#x27;s protocol)" if header["mode"] == "paper" else " (ggml-probe defaults)") + "</span>"]
    if header.get("created"):
        chips.append(f'<span class="chip">{_e(header["created"])}</span>')
    if num(header.get("seconds")) is not None:
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
