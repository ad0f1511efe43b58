"""A batch's curation view as one self-contained HTML page: OUT/report.html.

The same ranked rows as summary.csv, with each case's overview image (written by `detect`), a link to its
findings.json and the checks that say when a score should be read with care. No torch (the batch's main process
never loads it), no script and nothing fetched from the network: the page opens from a file share or an archive as
it is.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from urllib.parse import quote

from .volumes import COVERAGE_WARN_SHARE

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fdecea; }
.warn { color: #a15c00; }
img { width: 240px; height: auto; display: block; }
.note { color: #555; max-width: 60em; }
"""

COLUMNS = ["rank", "overview", "case", "volume p-value", "volume score", "findings", "top finding", "checks", "status",
           "seconds"]


def is_failed(row: dict) -> bool:
    """A case neither done now ("ok") nor complete from an earlier run ("skipped")."""
    return row["status"] not in ("ok", "skipped")


def status_counts(rows: list[dict]) -> dict[str, int]:
    """Cases done, already complete and failed: what the command's last line and the page's header say."""
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    for row in rows:
        counts["failed" if is_failed(row) else row["status"]] += 1
    return counts


def _number(value, digits: int = 2) -> str:
    """A p-value or score as text with `digits` significant digits; '' for a missing value."""
    if value in ("", None):
        return ""
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def _link(case: str, name: str) -> str:
    """A URL relative to OUT for a file of the case's folder, whatever characters the case name holds."""
    return quote(f"{case}/{name}")


def _top_finding(row: dict) -> str:
    """The top finding's p-value, volume, position and the member that flagged it, as HTML (the page stays ASCII)."""
    if row.get("top_finding_p_value") in ("", None):
        return ""
    parts = [f"p {html.escape(_number(row['top_finding_p_value']))}"]
    if row.get("top_finding_volume_mm3") not in ("", None):
        parts.append(f"{float(row['top_finding_volume_mm3']):.0f} mm&sup3;")
    if row.get("top_finding_ras_mm"):
        parts.append(f"RAS {html.escape(str(row['top_finding_ras_mm']))} mm")
    if row.get("top_finding_flagged_by"):
        parts.append(f"flagged by {html.escape(str(row['top_finding_flagged_by']))}")
    return ", ".join(parts)


def _checks(row: dict) -> str:
    """The reference check and the field-of-view share, where they call for care."""
    notes = []
    unlike = row.get("slices_unlike_reference")
    if unlike not in ("", None) and int(unlike) > 0:
        notes.append(f"{int(unlike)} slice(s) unlike the model's normal reference")
    outside = row.get("body_outside_field_of_view_pct")
    if outside not in ("", None) and float(outside) >= COVERAGE_WARN_SHARE * 100:  # detect's warning
        notes.append(f"{float(outside):g}% of the body outside the field of view")
    return "<br>".join(f'<span class="warn">{html.escape(n)}</span>' for n in notes)


def _row(row: dict, overview: bool) -> str:
    """One case's row. A case done or skipped as complete has its folder (findings.json, and overview.png when the
    batch writes overviews, which its settings hash covers); nothing is looked up on disk, so the page costs no file
    system calls however many cases it lists."""
    case = str(row["case"])
    failed = is_failed(row)
    image = ""
    if overview and not failed:
        src = _link(case, "overview.png")
        image = f'<a href="{src}"><img src="{src}" alt="overview of {html.escape(case)}" loading="lazy"></a>'
    name = html.escape(case)
    if not failed:
        name = f'<a href="{_link(case, "findings.json")}">{name}</a>'
    name += f'<br><small>{html.escape(str(row.get("input", "")))}</small>'
    status = html.escape(str(row["status"]))
    if row.get("error"):
        status += f"<br><small>{html.escape(str(row['error']))}</small>"
    cells = [f'<td class="num">{row["rank"]}</td>', f"<td>{image}</td>", f"<td>{name}</td>",
             f'<td class="num">{_number(row.get("volume_p_value"))}</td>',
             f'<td class="num">{_number(row.get("volume_score"), 4)}</td>',
             f'<td class="num">{html.escape(str(row.get("findings", "")))}</td>',
             f"<td>{_top_finding(row)}</td>", f"<td>{_checks(row)}</td>", f"<td>{status}</td>",
             f'<td class="num">{html.escape(str(row.get("seconds", "")))}</td>']
    opening = '<tr class="failed">' if failed else "<tr>"
    return opening + "".join(cells) + "</tr>"


def render_report(ranked: list[dict], model: str | None = None, overview: bool = True) -> str:
    """The page for rows already ranked (each with its 'rank'), as summary.csv holds them."""
    from . import __version__

    counts = status_counts(ranked)
    header = "".join(f"<th>{c}</th>" for c in COLUMNS)
    rows = "\n".join(_row(r, overview) for r in ranked)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>MedAnomaly batch: {len(ranked)} case(s)</title>
<style>{STYLE}</style></head>
<body>
<h1>MedAnomaly batch: {len(ranked)} case(s) ranked by how unusual they are</h1>
<p>Model: <b>{html.escape(model or "the default")}</b> &middot; medanomaly {html.escape(__version__)} &middot;
{counts["ok"]} done, {counts["skipped"]} already complete, {counts["failed"]} failed &middot; written
{time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}</p>
<p class="note">Ranked by volume p-value, smallest first: the chance that a normal scan of this length has a finding
as strong as the case's strongest, under the model's calibration on normal CT. Failed cases come last. A research
tool, not a medical device. The same rows are in <a href="summary.csv">summary.csv</a>.</p>
<table>
<thead><tr>{header}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
</body></html>
"""


def write_report(ranked: list[dict], output: Path, model: str | None = None, overview: bool = True) -> Path:
    """OUT/report.html for ranked rows, written atomically (a reader never sees half a page)."""
    path = output / "report.html"
    tmp = output / f".report.html.tmp{os.getpid()}"
    # ASCII whatever the case names and errors hold: other characters as character references, which every browser
    # reads whatever the locale of the machine that opens the page
    tmp.write_bytes(render_report(ranked, model, overview).encode("ascii", "xmlcharrefreplace"))
    os.replace(tmp, path)
    return path
