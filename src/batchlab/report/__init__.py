"""`report.html`: one self-contained page (figures embedded as base64, no external assets).

It leads with the answer: the four outcomes counted per source, a forest plot per source
(every primary claim's interval against its region), the accuracy and generalization gap
against batch size, and a table "finding -> verdict -> one-line evidence", grouped by source,
every finding id of the catalogue (docs/findings.md) listed (see `answers.RULE` for how a
finding's verdict follows from its claims), linking to the experiments' sections; then the
sources' numbers beside ours (`study_numbers.csv`); then every claim; then a section per
experiment with its summary tables, figures and verdicts.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import markdown

from batchlab.atomic import atomic_write
from batchlab.experiments import findings
from batchlab.experiments.outputs import load_claims
from batchlab.report import figures
from batchlab.report.answers import (
    MIXED,
    NOT_RUN,
    OUTCOMES,
    RULE,
    finding_verdicts,
    one_line,
    open_findings,
    read_numbers,
    source_counts,
    verdicts_markdown,
)

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.reproduced{color:#1a7f37;font-weight:bold}.not_reproduced{color:#cf222e;font-weight:bold}
.inconclusive,.mixed{color:#9a6700;font-weight:bold}.not-run,.untestable{color:#888}
section{border-top:2px solid #ddd;margin-top:2em}th.source{text-align:left;background:#e8eef6}
code{background:#f6f8fa;padding:1px 4px}.small{font-size:85%;color:#555}
"""
E = html.escape


def _verdict_cell(v: str) -> str:
    return f"<td class='{v.replace(' ', '-')}'>{E(v)}</td>"


def findings_table(claims: list[dict[str, Any]]) -> str:
    """The top table: every finding, grouped by source, its verdict and one line of evidence."""
    fvs = finding_verdicts(claims)
    rows = ["<table id='findings'><tr><th>finding</th><th>claim of the source</th>"
            "<th>verdict</th><th>evidence (claims it rests on: estimate [95% interval] vs "
            "region)</th><th>where</th></tr>"]
    for src, title in findings.SOURCES.items():
        rows.append(f"<tr><th class='source' colspan='5'>{E(src)} — {E(title)}</th></tr>")
        for fid, text in findings.FINDINGS.items():
            if not fid.startswith(src) or not fid[len(src):].isdigit():
                continue
            fv = fvs[fid]
            links = ", ".join(f"<a href='#{E(n)}'>{E(n)}</a>" for n in fv.experiments)
            rows.append(f"<tr><td>{E(fid)}</td><td>{E(text)}</td>{_verdict_cell(fv.verdict)}"
                        f"<td class='small'>{E(one_line(fv))}</td><td>{links}</td></tr>")
    rows.append("</table>")
    return (f"<h2>Findings and verdicts</h2>{counts_table(fvs)}<p class='small'>{E(RULE)} "
            f"The catalogue of findings: <code>docs/findings.md</code>.</p>" + "".join(rows))


def counts_table(fvs: dict[str, Any]) -> str:
    """The four outcomes (and mixed / not run) counted per source, over its findings."""
    cols = (*OUTCOMES, MIXED, NOT_RUN)
    counts = source_counts(fvs)
    out = ["<table id='counts'><tr><th>source</th>"
           + "".join(f"<th class='{c.replace(' ', '-')}'>{E(c)}</th>" for c in cols) + "</tr>"]
    total = dict.fromkeys(cols, 0)
    for src, title in findings.SOURCES.items():
        row = counts.get(src, dict.fromkeys(cols, 0))
        out.append(f"<tr><td>{E(src)} — {E(title)}</td>"
                   + "".join(f"<td>{row[c]}</td>" for c in cols) + "</tr>")
        for c in cols:
            total[c] += row[c]
    out.append("<tr><th>all</th>" + "".join(f"<th>{total[c]}</th>" for c in cols) + "</tr></table>")
    return "".join(out)


def _img(data: bytes, alt: str) -> str:
    return (f"<figure><img alt='{E(alt)}' src='data:image/png;base64,"
            f"{base64.b64encode(data).decode()}'><figcaption>{E(alt)}</figcaption></figure>")


def forest_plots(claims: list[dict[str, Any]]) -> str:
    """A forest plot per source over the claims its findings' verdicts rest on."""
    fvs = finding_verdicts(claims)
    parts = []
    for src, title in findings.SOURCES.items():
        basis = [c for fid, fv in fvs.items() if fid.startswith(src) for c in fv.basis]
        seen, rows = set(), []
        for c in basis:
            k = (c.get("experiment", ""), c["id"])
            if k not in seen and "ci" in c and "region" in c:
                seen.add(k)
                rows.append(c)
        if rows:
            parts.append(_img(figures.png(figures.forest(rows, f"{src} — {title}")),
                              f"forest plot, {src}: each claim's estimate and 95% interval "
                              f"against its region (shaded), coloured by outcome"))
    return "<h2>Every primary claim against its region</h2>" + "".join(parts) if parts else ""


def batch_figure(out: Path) -> str:
    """Accuracy and gap vs batch size, from the batch-size experiment's per-batch intervals."""
    import csv

    f = out / "batch-size" / "accuracy_by_batch.csv"
    if not f.exists():
        return ""
    rows = [{**r, "batch_size": int(r["batch_size"]),
             **{k: float(r[k]) if r[k] not in ("", None) else float("nan")
                for k in ("estimate", "lo", "hi")}} for r in csv.DictReader(f.open())]
    return _img(figures.png(figures.accuracy_vs_batch(rows)),
                "final test accuracy and generalization gap vs batch size (mean and 95% "
                "interval over seeds)")


def numbers_table(rows: list[dict[str, str]]) -> str:
    """The sources' numbers beside ours, measured at the closest setting this run has."""
    if not rows:
        return ""
    out = ["<h2 id='study-numbers'>The sources' numbers beside ours</h2><p class='small'>Study "
           "values are facts about the source's own setting (see each note for how close ours "
           "is), never targets; nothing here feeds a verdict.</p><table><tr><th>finding</th>"
           "<th>quantity</th><th>study setting</th><th>study</th><th>ours</th>"
           "<th>95% interval</th><th>our setting</th></tr>"]
    for r in rows:
        iv = f"[{r['ci_lo']}, {r['ci_hi']}]" if r.get("ci_lo") or r.get("ci_hi") else ""
        out.append("<tr>" + "".join(f"<td>{E(str(x))}</td>" for x in (
            r["finding"], r["quantity"], r["setting"], r["study_value"], r.get("measured") or "—",
            iv, r.get("match_note", ""))) + "</tr>")
    out.append("</table>")
    return "".join(out)


def write_report(out: Path, names: list[str], timings: dict[str, float] | None = None,
                 preset: str = "quick") -> Path:
    timings = timings or {}
    overview = ["<table><tr><th>experiment</th><th>finding</th><th>claim</th><th>verdict</th>"
                "</tr>"]
    sections, all_claims = [], []
    for n in names:
        d = out / n
        if not d.exists():
            continue
        claims = load_claims(d / "claims.json") if (d / "claims.json").exists() else []
        for c in claims:
            all_claims.append({"experiment": n, **c})
            role = {True: " (primary)", False: " (secondary)"}.get(c.get("primary"), "")
            overview.append(
                f"<tr><td><a href='#{E(n)}'>{E(n)}</a></td><td>{E(c.get('finding', ''))}</td>"
                f"<td>{E(c['claim'])}{role}</td>{_verdict_cell(c['verdict'])}</tr>")
        body = markdown.markdown((d / "summary.md").read_text(), extensions=["tables"]) \
            if (d / "summary.md").exists() else ""
        for v in ("not_reproduced", "reproduced", "inconclusive", "untestable"):
            body = body.replace(f"<strong>{v}</strong>", f"<span class='{v}'>{v}</span>")
        imgs = "".join(
            f"<figure><img alt='{p.name}' src='data:image/png;base64,"
            f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{p.name}</figcaption></figure>"
            for p in sorted(d.glob("*.png")))
        t = f" — {timings[n]:.0f}s" if n in timings else ""
        sections.append(f"<section id='{E(n)}'><h2>{E(n)}{t}</h2>{body}{imgs}</section>")
    overview.append("</table>")
    parts = [f"<h1>batchlab report ({E(preset)} preset)</h1>", findings_table(all_claims),
             open_table(all_claims), forest_plots(all_claims), batch_figure(out),
             numbers_table(read_numbers(out, names)), "<h2>All claims</h2>" + "".join(overview),
             *sections]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>batchlab report</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "report.html"
    atomic_write(out / "verdicts.md", verdicts_markdown(all_claims))
    atomic_write(path, page)
    return path


def open_table(claims: list[dict[str, Any]]) -> str:
    """Every finding run but not decided, with what would decide each claim it rests on."""
    todo = open_findings(finding_verdicts(claims))
    if not todo:
        return ""
    rows = ["<h3>What would decide the findings left open</h3><table><tr><th>finding</th>"
            "<th>verdict</th><th>claim</th><th>what would decide it (from the measured spread "
            "or the failed premise)</th></tr>"]
    for fid, v, claims_ in todo:
        for cid, how in claims_ or [("", "")]:
            rows.append(f"<tr><td>{E(fid)}</td>{_verdict_cell(v)}<td>{E(cid)}</td>"
                        f"<td class='small'>{E(how)}</td></tr>")
    return "".join(rows) + "</table>"
