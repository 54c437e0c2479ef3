"""The interactive explorer of a results store: one HTML page drawn with Plotly.

    rankbias report --store results.db --out report/   # report/report.html + report_files/
    rankbias serve --store results.db --port 8000       # live: reload to see new runs

    from rankbias.report.explorer import write_explorer
    write_explorer("report/report.html", "results.db", "my runs", claims=claims)

The page works offline from file://, with no network request. Plotly's bundled JavaScript,
the page's own script and the data of every run (its config, summary, and the average and
per-layer rank at each tracking point) are inside the HTML file, loaded once. The singular
values are larger (every layer at every tracking point), so each run's are in
`report_files/spectra/<run>.js` beside the page and are loaded by a <script> element when
that run is first shown: a file:// page may not fetch() files but may load scripts.

On the page: a run picker (model, data set, B, lr, wd, seed, status, and any other config
field that varies), rank curves of the chosen runs (average, or one layer), every layer of
one run, the spectrum sigma_i(W / ||W||_F) of one layer with a slider over the tracking
points and the tolerance line (the rank is the number of values above it), final rank
against B, lr, wd and the bound's scale B / (lr * wd), the claims table with each claim's
evidence as a table, and the static PNG figures. Each plot's element carries
data-rankbias-plot="<name>".
"""

from __future__ import annotations

import errno
import functools
import http.server
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import numpy as np

from rankbias.report.explorer_data import (
    explorer_data,
    spectra_file,
    spectra_payload,
    spectra_script,
)
from rankbias.report.static_page import badge, esc, section_html, write_html
from rankbias.runs.store import open_store
from rankbias.utils import RankbiasError, atomic_path, current_umask, plain

ASSETS = Path(__file__).parent / "assets"
PLOTS = ("rank-curves", "layer-curves", "spectrum", "final-vs-batch_size", "final-vs-lr",
         "final-vs-weight_decay", "final-vs-bound_scale")
MISSING_PLOTLY = "the explorer needs the plotly package (pip install plotly)"
MAX_EVIDENCE_ROWS = 60  # rows of a list of records shown in the claims table (all in JSON)


# --- the page ---------------------------------------------------------------------------------
def _cell(value) -> str:
    """A value of a claim's evidence as short text."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "–"}[value]
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def _records_table(records: list[dict]) -> str:
    columns = list(dict.fromkeys(key for record in records for key in record))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(_cell(r.get(c)))}</td>" for c in columns)
                   + "</tr>" for r in records[:MAX_EVIDENCE_ROWS])
    more = (f'<p class="note">first {MAX_EVIDENCE_ROWS} of {len(records)} rows; all are in '
            "claims.json</p>" if len(records) > MAX_EVIDENCE_ROWS else "")
    return f'<table class="records"><tr>{head}</tr>{body}</table>{more}'


def evidence_rows(value, key: str = "") -> list[tuple[str, str]]:
    """A claim's evidence as (field, HTML) rows: nested dicts become dotted field names,
    lists of records become small tables, lists of numbers one line."""
    if isinstance(value, dict):
        if not value:
            return [(key, "none")] if key else []
        rows = []
        for name, item in value.items():
            rows += evidence_rows(item, f"{key} › {name}" if key else str(name))
        return rows
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [(key, _records_table(value))]
    if isinstance(value, list):
        return [(key, esc(", ".join(_cell(v) for v in value)) or "none")]
    return [(key, esc(_cell(value)))]


def claims_html(claims: list[dict]) -> str:
    """The claims table: one row per claim, its evidence as a table of fields below it."""
    rows = []
    for c in claims:
        evidence = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>"
                           for k, v in evidence_rows(c.get("evidence") or {}))
        rows.append(
            f'<tr class="claim" id="claim-{esc(c.get("id", ""))}"><td>{esc(c.get("claim", ""))}'
            f'</td><td>{esc(c.get("id", ""))}</td><td>{badge(c.get("verdict", ""))}</td>'
            f'<td>{esc(c.get("statement", ""))}</td><td>{esc(c.get("rule", ""))}</td>'
            f'<td>{esc(c.get("reason", ""))}</td></tr>'
            f'<tr class="evidence"><td></td><td colspan="5"><details><summary>evidence of '
            f'{esc(c.get("id", ""))}</summary><table class="fields">{evidence}</table>'
            "</details></td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("#", "id", "verdict", "claim",
                                             "rule (stated in advance)", "result"))
    return f'<table class="claims"><tr>{head}</tr>{"".join(rows)}</table>'


def _figures_html(figures: list[dict]) -> str:
    """The static figures (PNG, for papers): the report's sections, images embedded."""
    return "\n".join(section_html(i, section) for i, section in enumerate(figures))


def _plot(name: str, css: str = "plot") -> str:
    return f'<div class="{css}" data-rankbias-plot="{name}"></div>'


def explorer_page(data: dict, title: str, claims: list[dict] | None = None,
                  figures: list[dict] | None = None, spectra_dir: str = "report_files") -> str:
    """The whole page as text: Plotly, the data and the page's script inline."""
    plotly_js = _plotly_js()
    if plotly_js is None:
        raise RankbiasError(MISSING_PLOTLY)
    runs = data["runs"]["run_id"]
    nav = [("runs", "Runs"), ("curves", "Rank curves"), ("spectrum", "Spectrum"),
           ("final", "Final rank")]
    parts = [
        f'<header><h1>{esc(title)}</h1><p class="meta">store {esc(data["store"])}: '
        f'{len(runs)} runs · generated {esc(data["generated"])} by rankbias '
        f'{esc(data["version"])}</p></header>',
        '<section id="runs"><h2>Runs</h2><div id="picker"></div>'
        '<p class="controls"><label>colour by <select id="color-by"></select></label> '
        '<span id="chosen-count"></span></p><div id="run-table" class="scroll"></div>'
        "</section>",
        '<section id="curves"><h2>Rank over training</h2><p class="controls">'
        '<label>rank of <select id="curve-layer"></select></label> <span class="note">'
        "one line per chosen run; click a line to show that run below</span></p>"
        + _plot("rank-curves") + _plot("layer-curves") + "</section>",
        '<section id="spectrum"><h2>Spectrum of one layer</h2><p class="controls">'
        '<label>run <select id="focus-run"></select></label> '
        '<label>layer <select id="focus-layer"></select></label></p><p class="controls">'
        '<label>tracking point <input type="range" id="point-slider" min="0" max="0" '
        'value="0"></label> <span id="point-label"></span></p>'
        + _plot("spectrum") + "</section>",
        '<section id="final"><h2>Final rank against the hyperparameters</h2><p class="note">'
        "Theorem 3.4: the rank bound is m·B·log(2/ε)/(μ·wd) (wd = PyTorch's weight_decay = "
        "2λ): lower with smaller B, larger lr and larger wd. Done runs of the chosen ones; "
        'one dot per run.</p><div class="grid">'
        + "".join(_plot(f"final-vs-{p}", "plot small")
                  for p in ("batch_size", "lr", "weight_decay", "bound_scale"))
        + "</div></section>",
    ]
    if claims:
        nav.append(("claims", "Claims"))
        parts.append(f'<section id="claims"><h2>Claims</h2>{claims_html(claims)}</section>')
    if figures:
        nav.append(("static", "Static figures"))
        parts.append('<section id="static"><h2>Static figures</h2><p class="note">The same '
                     "runs as PNG figures (for papers), as the files beside this page.</p>"
                     f"{_figures_html(figures)}</section>")
    links = "".join(f'<a href="#{key}">{label}</a>' for key, label in nav)
    payload = json.dumps({**data, "spectraDir": spectra_dir}, allow_nan=False,
                         separators=(",", ":")).replace("</", "<\\/")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{(ASSETS / 'explorer.css').read_text()}</style>"
        f"</head><body>\n<nav>{links}</nav>\n<main>\n" + "\n".join(parts) + "\n</main>\n"
        f'<script type="application/json" id="rankbias-data">{payload}</script>\n'
        f"<script>{plotly_js}</script>\n"
        f"<script>{(ASSETS / 'explorer.js').read_text()}</script>\n</body></html>\n")


@functools.cache
def _plotly_js() -> str | None:
    """Plotly's bundled plotly.min.js, or None where the plotly package is missing."""
    try:
        import plotly.offline
    except ImportError:
        return None
    return plotly.offline.get_plotlyjs()


def write_explorer(path: str | os.PathLike, store_path: str | os.PathLike, title: str,
                   claims: list[dict] | None = None, figures: list[dict] | None = None) -> Path:
    """Write the explorer of a store to `path` and each run's spectra beside it.

    `claims`: entries of claims.json (id, claim, statement, verdict, rule, reason,
    evidence); `figures`: report sections ({"title", "text", "images", "table"}) shown as
    the static figures. The spectra go to <stem>_files/spectra/, replaced as a whole.
    Without the plotly package (a machine with no package registry) the static page of
    the figures is written instead, with a warning. Returns `path`.
    """
    path = Path(path)
    if _plotly_js() is None:
        print(f"warning: {MISSING_PLOTLY}; wrote the static report instead", file=sys.stderr)
        sections = list(figures or []) or [
            {"title": f"Claim {c.get('claim', '')}: {c.get('id', '')}",
             "verdict": c.get("verdict"), "text": f"{c.get('statement', '')}\n"
                                                  f"{c.get('reason', '')}"}
            for c in claims or []]
        return write_html(path, title, sections)
    folder = path.parent / f"{path.stem}_files"
    with open_store(store_path, readonly=True) as store:
        data = explorer_data(store)
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=path.parent))
        # a folder as any other (mkdtemp makes it private)
        os.chmod(fresh, 0o777 & ~current_umask())
        try:
            (fresh / "spectra").mkdir()
            names = data["runs"]["spectra"]
            for run_id, name in zip(data["runs"]["run_id"], names):
                if name:
                    (fresh / "spectra" / name).write_text(
                        spectra_script(spectra_payload(store, run_id)), encoding="utf-8")
            page = explorer_page(data, title, plain(claims) if claims else None, figures,
                                 folder.name)
            with atomic_path(path) as tmp:
                tmp.write_text(page, encoding="utf-8")
                _replace_folder(fresh, folder)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
    return path


def _replace_folder(fresh: Path, folder: Path) -> None:
    """Put `fresh` where `folder` is (a renamed swap: never a half-written folder there)."""
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(fresh, folder)
    shutil.rmtree(old, ignore_errors=True)


# --- rankbias serve ----------------------------------------------------------------------------
def _claims_beside(store_path: Path) -> list[dict] | None:
    """claims.json in the store's folder (where `rankbias reproduce` writes both), if any."""
    try:
        document = json.loads((store_path.parent / "claims.json").read_text())
        return document.get("claims") or None
    except (OSError, ValueError, AttributeError):
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET / : the page, its data read from the store now; GET /report_files/spectra/X.js."""

    store_path: Path
    title: str

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        route = self.path.split("?", 1)[0]
        try:
            if route in ("/", "/index.html", "/report.html"):
                with open_store(self.store_path, readonly=True) as store:
                    data = explorer_data(store)
                page = explorer_page(data, self.title, plain(_claims_beside(self.store_path)))
                self._send(200, "text/html; charset=utf-8", page)
            elif route.startswith("/report_files/spectra/"):
                self._send_spectra(route.rsplit("/", 1)[1])
            elif route == "/favicon.ico":
                self._send(204, "image/x-icon", "")
            else:
                self._send(404, "text/plain", "not found\n")
        except RankbiasError as err:
            self._send(500, "text/plain; charset=utf-8", f"rankbias serve: {err}\n")

    def _send_spectra(self, name: str) -> None:
        with open_store(self.store_path, readonly=True) as store:
            run_id = next((r for r in store.spectra_counts() if spectra_file(r) == name), None)
            if run_id is None:
                self._send(404, "text/plain", "no such run\n")
                return
            text = spectra_script(spectra_payload(store, run_id))
        self._send(200, "text/javascript; charset=utf-8", text)

    def _send(self, code: int, kind: str, text: str) -> None:
        body = text.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a reload shows the newest runs
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # quiet: no line per request
        pass


def make_server(store_path: str | os.PathLike, host: str = "127.0.0.1",
                port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server of the explorer of `store_path` (port 0: any free port)."""
    store_path = Path(store_path).resolve()
    open_store(store_path, readonly=True).close()
    if _plotly_js() is None:
        raise RankbiasError(MISSING_PLOTLY)
    handler = type("Handler", (_Handler,), {"store_path": store_path,
                                            "title": f"rankbias: {store_path.name} (live)"})
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise RankbiasError(f"port {port} on {host} is in use: choose another with "
                                "--port") from err
        raise RankbiasError(f"cannot listen on {host}:{port}: {err.strerror}") from err


def serve(store_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          out: TextIO | None = None) -> None:
    """Serve the explorer of a store until Ctrl-C; every page load reads the store anew."""
    out = out or sys.stderr
    server = make_server(store_path, host, port)
    shown = f"[{host}]" if ":" in host else host
    out.write(f"serving {store_path} at http://{shown}:{server.server_address[1]}/ "
              "(reload the page to see new runs; Ctrl-C stops)\n")
    out.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        out.write("stopped\n")
    finally:
        server.server_close()


