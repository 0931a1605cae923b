"""Render a report folder's index.html from results.json: every figure with a caption saying
what is predicted and what was measured, and the headline table of predictions beside measurements."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def fmt_number(v: Any) -> str:
    """Numbers for tables: 4 significant digits, scientific outside [1e-3, 1e4); None as a dash."""
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def _fmt(v: Any) -> str:
    return html.escape(fmt_number(v))


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
figure{display:inline-block;width:48%;margin:0.5%;vertical-align:top}
figure img{width:100%} figcaption{font-size:0.85em;color:#444}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0} td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3} .note{font-size:0.85em;color:#555}
"""


def render_index(results: dict[str, Any], sections: list[dict[str, Any]]) -> str:
    """sections: [{"title", "text", "tables": [html], "figures": [{"name", "caption"}]}]."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>taskvec report</title><style>{CSS}</style></head><body>"]
    parts.append("<h1>taskvec report</h1>")
    meta = results.get("meta", {})
    parts.append(
        "<p class='note'>"
        + html.escape(
            f"taskvec {meta.get('taskvec_version', '?')} · created {meta.get('created', '?')} · "
            f"base {meta.get('base', '?')} · tasks {', '.join(results.get('tasks', []))}"
        )
        + "</p>"
    )
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec['title'])}</h2>")
        if sec.get("text"):
            parts.append(f"<p>{html.escape(sec['text'])}</p>")
        parts.extend(sec.get("tables", []))
        for fig in sec.get("figures", []):
            name = html.escape(fig["name"])
            parts.append(
                f"<figure><a href='{name}.pdf'><img src='{name}.png' alt='{name}'></a>"
                f"<figcaption>{html.escape(fig['caption'])}</figcaption></figure>"
            )
    parts.append("<p class='note'>Every number is in results.json. Figures: PNG shown, PDF linked.</p></body></html>")
    return "\n".join(parts)


def write_index(out_dir: str | Path, results: dict[str, Any], sections: list[dict[str, Any]]) -> Path:
    from .io import atomic_write_text

    return atomic_write_text(Path(out_dir) / "index.html", render_index(results, sections))
