"""`report.html`: one self-contained page (figures embedded as base64, no external assets)
with a section per experiment: its summary tables, figures and verdicts."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import markdown

from batchlab.atomic import atomic_write
from batchlab.experiments.outputs import load_claims

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.reproduced{color:#1a7f37;font-weight:bold}.not_reproduced{color:#cf222e;font-weight:bold}
.inconclusive{color:#9a6700;font-weight:bold}section{border-top:2px solid #ddd;margin-top:2em}
code{background:#f6f8fa;padding:1px 4px}
"""


def write_report(out: Path, names: list[str], timings: dict[str, float] | None = None,
                 preset: str = "quick") -> Path:
    timings = timings or {}
    parts = [f"<h1>batchlab report ({html.escape(preset)} preset)</h1>"]
    overview = ["<table><tr><th>experiment</th><th>claim</th><th>verdict</th></tr>"]
    sections = []
    for n in names:
        d = out / n
        if not d.exists():
            continue
        claims = load_claims(d / "claims.json") if (d / "claims.json").exists() else []
        for c in claims:
            overview.append(
                f"<tr><td><a href='#{n}'>{n}</a></td><td>{html.escape(c['claim'])}</td>"
                f"<td class='{c['verdict']}'>{c['verdict']}</td></tr>")
        body = markdown.markdown((d / "summary.md").read_text(), extensions=["tables"]) \
            if (d / "summary.md").exists() else ""
        for v in ("not_reproduced", "reproduced", "inconclusive"):
            body = body.replace(f"<strong>{v}</strong>", f"<span class='{v}'>{v}</span>")
        imgs = "".join(
            f"<figure><img alt='{p.name}' src='data:image/png;base64,"
            f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{p.name}</figcaption></figure>"
            for p in sorted(d.glob("*.png")))
        t = f" — {timings[n]:.0f}s" if n in timings else ""
        sections.append(f"<section id='{n}'><h2>{n}{t}</h2>{body}{imgs}</section>")
    overview.append("</table>")
    parts.append("<h2>All claims</h2>" + "".join(overview))
    parts.extend(sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>batchlab report</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "report.html"
    atomic_write(path, page)
    return path
