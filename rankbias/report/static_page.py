"""A self-contained static HTML page of sections: text, tables and PNG figures embedded as
base64 data URIs, so the one file can be mailed or archived.

    from rankbias.report.static_page import write_html
    write_html("claims.html", "Claims & checks", [
        {"title": "Claim 4", "verdict": "pass", "text": "...", "images": ["claim04.png"]}])

The interactive explorer (rankbias.report.explorer) shows such sections as its static figures, and
is replaced by this page where the plotly package is missing.
"""

from __future__ import annotations

import base64
import html
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rankbias.utils import RankbiasError, atomic_path, code_version, library_versions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VERDICT_COLORS = {"pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#b26a00"}
SECTION_KEYS = {"title", "text", "images", "table", "verdict"}

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.4}
header{border-bottom:1px solid #ccc;margin-bottom:1em}
.meta{color:#555;font-size:.9em}
section{border-top:1px solid #eee;padding-top:.5em;margin-top:1.5em}
.text{white-space:pre-wrap}
figure{display:inline-block;margin:.5em}
img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.8em;color:#666}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}
.badge{color:#fff;border-radius:4px;padding:1px 8px;font-size:.75em;vertical-align:middle}
"""


def esc(value) -> str:
    """Text as HTML: <, >, & and both quotes escaped."""
    return html.escape(str(value), quote=True)


def badge(verdict: str | None) -> str:
    """A verdict as a coloured label ("" for none; one this page does not know in grey)."""
    if verdict is None:
        return ""
    color = VERDICT_COLORS.get(verdict, "#555")
    return (f'<span class="badge verdict-{esc(verdict)}" style="background:{color}">'
            f"{esc(verdict)}</span>")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return esc(f"{value:.4g}")
    return esc(value)


def _table_html(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_html(path: str | os.PathLike) -> str:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RankbiasError(f"cannot read image {path}: {err.strerror}") from err
    if not data.startswith(PNG_MAGIC):
        raise RankbiasError(f"{path} is not a PNG file")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{esc(path.name)}">'
            f"<figcaption>{esc(path.name)}</figcaption></figure>")


def section_html(index: int, section: dict) -> str:
    """One section (see write_html) as <section id="s{index}">."""
    unknown = set(section) - SECTION_KEYS
    if unknown or "title" not in section:
        raise RankbiasError(f"a report section needs a title and may only have "
                            f"{', '.join(sorted(SECTION_KEYS))}; got {sorted(section)}")
    if section.get("verdict") not in (None, *VERDICT_COLORS):
        raise RankbiasError(f"verdict must be one of {', '.join(VERDICT_COLORS)}, "
                            f"got {section['verdict']!r}")
    parts = [f'<section id="s{index}"><h2>{esc(section["title"])} '
             f'{badge(section.get("verdict"))}</h2>']
    if section.get("text"):
        parts.append(f'<p class="text">{esc(section["text"])}</p>')
    if section.get("table"):
        parts.append(_table_html(section["table"]))
    parts += [_image_html(image) for image in section.get("images") or []]
    return "\n".join(parts) + "</section>"


def _header_html(title: str) -> str:
    import matplotlib as mpl

    versions = {**library_versions(), "pandas": pd.__version__, "matplotlib": mpl.__version__}
    libs = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (f"<header><h1>{esc(title)}</h1><p class='meta'>generated "
            f"{esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by rankbias "
            f"{esc(code_version())}<br>{esc(libs)}</p></header>")


def _toc_html(sections: list[dict]) -> str:
    items = "".join(f'<li><a href="#s{i}">{esc(s.get("title", ""))}</a> '
                    f'{badge(s.get("verdict"))}</li>' for i, s in enumerate(sections))
    return f"<nav><ol>{items}</ol></nav>"


def write_html(path: str | os.PathLike, title: str, sections: list[dict]) -> Path:
    """Write a self-contained HTML page (images embedded as base64 data URIs), atomically.

    Each section: {"title", "text" (plain text), "images" (PNG paths), "table" (list of
    dict rows), "verdict" ("pass" | "fail" | "inconclusive")}; all but title optional.
    """
    body = "\n".join(section_html(i, s) for i, s in enumerate(sections))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n"
            f"{_header_html(title)}\n{_toc_html(sections)}\n{body}\n</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)
