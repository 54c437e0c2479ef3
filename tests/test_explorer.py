"""The explorer page: its data against the store, and the page itself in headless Chromium.

The browser tests drive Debian's chromium with Selenium (`apt-get install chromium
chromium-driver`, `pip install -e ".[browser]"`); where either is missing they skip with the
reason, and the rest of this file still runs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from rankbias.cli.main import main
from rankbias.report import explorer
from rankbias.runs.store import Store
from rankbias.training.config import RunConfig
from rankbias.training.train import train_run
from rankbias.utils import RankbiasError

TINY = {"epochs": 3, "lr": 0.1, "model_args": {"depth": 2, "width": 16},
        "dataset_args": {"subset": 300}, "device": "cpu"}
CLAIMS = [
    {"id": "batch_size", "claim": 4, "statement": "rank rises with B", "verdict": "pass",
     "rule": "strictly increasing", "reason": "gap 33 vs 3 x spread 1.7",
     "evidence": {"counts": {"runs": 9, "done": 9},
                  "groups": {"all": [{"value": 8, "mean": 29.58, "n": 3},
                                     {"value": 32, "mean": 53.17, "n": 3}]},
                  "ratios": [0.998, 1.012], "note": "a < b", "empty": {}}},
    {"id": "no_weight_decay", "claim": 6, "statement": "no bias without wd",
     "verdict": "inconclusive", "rule": "change <= 5%", "reason": "too few runs",
     "evidence": {"max_relative_change": float("nan")}},
]


def _train(store: Store, **values) -> str:
    result = train_run(RunConfig.from_dict({**TINY, **values}))
    store.save_result(result)
    return result.run_id


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Four real runs (B in {16, 64} x wd in {0, 5e-3}), one failed run; the page written."""
    pytest.importorskip("plotly", reason="the explorer needs plotly (pip install plotly)")
    folder = tmp_path_factory.mktemp("explorer")
    path = folder / "results.db"
    with Store(path) as store:
        for b in (16, 64):
            for wd in (0.0, 5e-3):
                _train(store, batch_size=b, weight_decay=wd)
        failed = RunConfig.from_dict({**TINY, "batch_size": 16, "lr": 0.3})
        store.mark(failed.run_id(), failed.to_dict(), "failed", "RuntimeError: boom <b>")
        runs, metrics = store.runs(), store.metrics()
    page = explorer.write_explorer(folder / "out" / "report.html", path, "tiny <store>",
                                   claims=CLAIMS)
    return {"path": path, "page": page, "runs": runs, "metrics": metrics,
            "failed": failed.run_id()}


# --- the data, against the store ------------------------------------------------------------
def test_data_matches_the_store(site):
    with Store(site["path"]) as store:
        data = explorer.explorer_data(store)
    runs, metrics = site["runs"], site["metrics"]
    assert data["runs"]["run_id"] == list(runs["run_id"])
    assert sorted(data["runs"]["status"]) == ["done"] * 4 + ["failed"]
    assert data["layers"] == ["blocks.0.fc.weight", "blocks.1.fc.weight", "head.weight"]
    for i, run_id in enumerate(data["runs"]["run_id"]):
        curve = data["curves"][i]
        rows = metrics[metrics["run_id"] == run_id]
        if run_id == site["failed"]:
            assert curve is None and data["runs"]["spectra"][i] is None
            assert "boom" in data["runs"]["error"][i]
            continue
        avg = rows[(rows["layer"] == "") & (rows["metric"] == "avg_rank")]
        assert curve["s"] == avg["step"].tolist() and curve["e"] == avg["epoch"].tolist()
        np.testing.assert_allclose(curve["r"], avg["value"], rtol=1e-3)
        for j, layer in enumerate(data["layers"]):
            ranks = rows[(rows["layer"] == layer) & (rows["metric"] == "rank@0.001")]
            assert curve["L"][str(j)] == ranks["value"].astype(int).tolist()
        assert data["runs"]["tol"][i] == 1e-3
    fields = [f for f, _ in data["fields"]]
    assert fields[:7] == ["model", "dataset", "batch_size", "lr", "weight_decay", "seed",
                          "status"]
    assert "device" not in fields  # the same in every run and never a picker field
    json.dumps(data, allow_nan=False)  # strict JSON


def test_spectra_are_the_normalized_singular_values(site):
    """sigma / ||sigma||_2 per step and layer; counting values above tol gives the stored
    rank (the paper's measure, computed independently by the tracker)."""
    run_id = site["runs"].loc[site["runs"]["status"] == "done", "run_id"].iloc[0]
    with Store(site["path"]) as store:
        text = explorer.spectra_script(explorer.spectra_payload(store, run_id))
        stored = store.spectra(run_id)
    assert text.startswith("rankbiasSpectra({") and text.endswith("});\n")
    payload = json.loads(text[len("rankbiasSpectra("):-len(");\n")])  # what the page gets
    ranks = site["metrics"].query("run_id == @run_id and metric == 'rank@0.001'")
    assert payload["run"] == run_id and payload["steps"] == sorted({s for s, _ in stored})
    assert len(payload["steps"]) == 4  # init + 3 epochs
    assert list(payload["layers"]) == ["blocks.0.fc.weight", "blocks.1.fc.weight",
                                       "head.weight"]
    for layer, series in payload["layers"].items():
        for step, values in zip(payload["steps"], series):
            sigma = stored[(step, layer)]
            expected = sigma / np.linalg.norm(sigma)
            np.testing.assert_allclose(values, expected, rtol=1e-4)
            rank = ranks.query("step == @step and layer == @layer")["value"].item()
            assert sum(v > 1e-3 for v in values) == rank


def test_evidence_is_a_table_of_fields_not_json():
    rows = dict(explorer.evidence_rows(CLAIMS[0]["evidence"]))
    assert rows["counts › runs"] == "9" and rows["counts › done"] == "9"
    assert rows["ratios"] == "0.998, 1.012"
    assert rows["note"] == "a &lt; b" and rows["empty"] == "none"
    table = rows["groups › all"]
    assert table.count("<tr>") == 3 and "<th>mean</th>" in table and "<td>53.17</td>" in table
    assert "{" not in "".join(rows.values())
    html = explorer.claims_html(CLAIMS)
    assert html.count('class="claim"') == 2 and "verdict-inconclusive" in html
    assert "<td>–</td>" in html  # NaN evidence shows as a dash


def test_page_is_self_contained(site):
    text = site["page"].read_text()
    for name in explorer.PLOTS:
        assert text.count(f'data-rankbias-plot="{name}"') == 1
    assert not re.search(r"<script[^>]+src=|<link|<img[^>]+src=\"http|@import", text)
    assert "tiny &lt;store&gt;" in text and "a &lt; b" in text
    data = json.loads(re.search(r'id="rankbias-data">(.*?)</script>', text, re.S).group(1))
    assert data["spectraDir"] == "report_files"
    files = sorted(p.name for p in (site["page"].parent / "report_files" / "spectra").iterdir())
    done = site["runs"][site["runs"]["status"] == "done"]["run_id"]
    assert files == sorted(f"{r}.js" for r in done)


def test_rewrite_replaces_the_spectra_folder(site, tmp_path):
    page = tmp_path / "r.html"
    explorer.write_explorer(page, site["path"], "t")
    stale = tmp_path / "r_files" / "spectra" / "gone.js"
    stale.write_text("old")
    explorer.write_explorer(page, site["path"], "t")
    assert not stale.exists() and len(list(stale.parent.iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r_files"]  # no temp left


def test_missing_store_is_a_user_error(tmp_path):
    with pytest.raises(RankbiasError, match="no results store"):
        explorer.write_explorer(tmp_path / "r.html", tmp_path / "none.db", "t")
    assert list(tmp_path.iterdir()) == []


def test_without_plotly_the_static_page_is_written(site, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(explorer, "_plotly_js", lambda: None)  # as where plotly is missing
    page = explorer.write_explorer(tmp_path / "r.html", site["path"], "t", claims=CLAIMS)
    text = page.read_text()
    assert "<script" not in text and "Claim 4: batch_size" in text and "verdict-pass" in text
    assert "needs the plotly package" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    with pytest.raises(RankbiasError, match="needs the plotly package"):
        explorer.make_server(site["path"], "127.0.0.1", 0)


def test_empty_store_gives_an_empty_page(tmp_path):
    pytest.importorskip("plotly", reason="the explorer needs plotly (pip install plotly)")
    Store(tmp_path / "empty.db").close()
    page = explorer.write_explorer(tmp_path / "r.html", tmp_path / "empty.db", "empty")
    assert 'data-rankbias-plot="rank-curves"' in page.read_text()


# --- rankbias serve ----------------------------------------------------------------------------
@pytest.fixture()
def server(site, tmp_path):
    """A live server on an ephemeral port of 127.0.0.1, over a copy of the store."""
    path = tmp_path / "live.db"
    with Store(site["path"]) as source, Store(path) as target:
        source.db.backup(target.db)
    httpd = explorer.make_server(path, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}/", "path": path}
    httpd.shutdown()
    httpd.server_close()


def _get(url: str) -> tuple[int, str]:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
    try:
        with direct.open(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def test_serve_shows_new_runs_on_reload(server):
    status, first = _get(server["url"])
    assert status == 200 and 'data-rankbias-plot="spectrum"' in first
    with Store(server["path"]) as store:
        new = _train(store, batch_size=32, weight_decay=5e-3, epochs=1)
    status, second = _get(server["url"])
    assert new not in first and new in second
    status, script = _get(f"{server['url']}report_files/spectra/{new}.js")
    assert status == 200 and script.startswith("rankbiasSpectra(") and new in script
    assert _get(f"{server['url']}report_files/spectra/nope.js")[0] == 404
    assert _get(f"{server['url']}etc/passwd")[0] == 404


def test_serve_port_in_use_is_one_line_error(site, capsys):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(RankbiasError, match=f"port {port} on 127.0.0.1 is in use"):
            explorer.make_server(site["path"], "127.0.0.1", port)
        assert main(["serve", "--store", str(site["path"]), "--port", str(port)]) == 2
    assert "in use: choose another with --port" in capsys.readouterr().err


def test_serve_ctrl_c_exits_quietly(site, monkeypatch, capsys):
    def interrupted(self, *args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(explorer.http.server.ThreadingHTTPServer, "serve_forever", interrupted)
    assert main(["serve", "--store", str(site["path"]), "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "serving" in err and "http://127.0.0.1:" in err and err.endswith("stopped\n")


def test_serve_bad_input(tmp_path, capsys):
    assert main(["serve", "--store", str(tmp_path / "none.db"), "--port", "0"]) == 2
    assert main(["serve", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "no results store" in err and "--port must be in 0..65535" in err


# --- in a real browser -------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000")
# Per plot: markers drawn (SVG path.point) and line vertices drawn (M/L commands of the
# traces' path.js-line), counted in the rendered page, not in the data handed to Plotly.
RENDERED = """
const out = {};
for (const el of document.querySelectorAll('[data-rankbias-plot]')) {
  const layer = el.querySelector('.scatterlayer');
  const lines = layer ? [...layer.querySelectorAll('path.js-line')] : [];
  out[el.dataset.rankbiasPlot] = {
    markers: layer ? layer.querySelectorAll('path.point').length : 0,
    vertices: lines.map(p => ((p.getAttribute('d') || '').match(/[ML]/g) || []).length)
                   .reduce((a, b) => a + b, 0),
    paths: lines.map(p => p.getAttribute('d')).join('|'),
  };
}
return out;
"""
PLOTTED_RUNS = """
const ids = JSON.parse(document.getElementById('rankbias-data').textContent).runs.run_id;
const el = document.querySelector('[data-rankbias-plot="' + arguments[0] + '"]');
return [...new Set(el.data.flatMap(t => t.customdata || []).filter(i => i !== null))]
  .map(i => ids[i]).sort();
"""


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return 'selenium is not installed (pip install -e ".[browser]")'
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install {package})"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    profile = tempfile.TemporaryDirectory(prefix="rankbias-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile.name}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    profile.cleanup()


def _until(check, timeout: float = 30.0):
    """Poll `check()` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {check}")
        time.sleep(0.05)
    return value


def _wait(driver, script: str, *args, timeout: float = 30.0):
    """Poll a JavaScript expression until it is truthy; return its value."""
    return _until(lambda: driver.execute_script(script, *args), timeout)


SETTLED = "return window.rankbiasBusy === false"  # every queued plot drawn
SPECTRUM_DRAWN = ("return window.rankbiasReady && window.rankbiasBusy === false && document"
                  ".querySelector('[data-rankbias-plot=spectrum] .scatterlayer path.point')")


def _open(driver, url: str) -> list[str]:
    """Load the page until the spectrum is drawn; return the URLs the page requested."""
    driver.get_log("performance")  # drop what came before
    driver.get_log("browser")
    driver.get(url)
    _wait(driver, SPECTRUM_DRAWN)
    return _requests(driver, url)


def _requests(driver, url: str) -> list[str]:
    """Every request made for the document at `url` (Chrome DevTools' network log); those
    of the browser's own start page are not the page's."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if (message["method"] == "Network.requestWillBeSent"
                and message["params"].get("documentURL") == url):
            urls.append(message["params"]["request"]["url"])
    return urls


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _tracking_points(site, run_ids) -> int:
    m = site["metrics"]
    return int(((m["metric"] == "avg_rank") & (m["layer"] == "") & m["run_id"].isin(run_ids))
               .sum())


@pytest.mark.browser
def test_page_renders_offline_without_errors(site, browser):
    url = site["page"].as_uri()
    requests = _open(browser, url)
    assert requests[0] == url
    assert any(r.endswith(".js") and "/report_files/spectra/" in r for r in requests)
    assert all(r.startswith(("file:", "data:")) for r in requests), requests  # no network
    assert _severe(browser) == []
    names = browser.execute_script(
        "return [...document.querySelectorAll('[data-rankbias-plot]')]"
        ".map(e => e.dataset.rankbiasPlot)")
    assert sorted(names) == sorted(explorer.PLOTS)  # one element per plot
    drawn = browser.execute_script(RENDERED)
    for name in explorer.PLOTS:
        assert drawn[name]["markers"] + drawn[name]["vertices"] > 0, name
    done = site["runs"][site["runs"]["status"] == "done"]
    # every tracking point of every run, one vertex each; one marker per done run
    assert drawn["rank-curves"]["vertices"] == _tracking_points(site, done["run_id"])
    for param in ("batch_size", "lr", "weight_decay"):
        assert drawn[f"final-vs-{param}"]["markers"] == len(done)
    assert drawn["final-vs-bound_scale"]["markers"] == int((done["weight_decay"] > 0).sum())
    assert "evidence of batch_size" in browser.page_source
    assert _severe(browser) == []


@pytest.mark.browser
def test_picker_changes_the_plotted_runs(site, browser):
    from selenium.webdriver.common.by import By

    _open(browser, site["page"].as_uri())
    done = site["runs"][site["runs"]["status"] == "done"]
    assert browser.execute_script(PLOTTED_RUNS, "rank-curves") == sorted(done["run_id"])
    browser.find_element(By.CSS_SELECTOR,
                         'fieldset[data-field="batch_size"] input[value="64"]').click()
    kept = done[done["batch_size"] != 64]["run_id"]
    vertices = _tracking_points(site, kept)
    assert 0 < vertices < _tracking_points(site, done["run_id"])
    _wait(browser, SETTLED)
    assert browser.execute_script(RENDERED)["rank-curves"]["vertices"] == vertices
    assert browser.execute_script(PLOTTED_RUNS, "rank-curves") == sorted(kept)
    assert browser.execute_script(PLOTTED_RUNS, "final-vs-batch_size") == sorted(kept)
    assert browser.execute_script(RENDERED)["final-vs-lr"]["markers"] == len(kept)
    # the failed run (B = 16) stays chosen, with nothing to draw
    assert browser.find_element(By.ID, "chosen-count").text.startswith("3 of 5 runs chosen")
    browser.find_element(By.CSS_SELECTOR, 'fieldset[data-field="batch_size"] button').click()
    _wait(browser, SETTLED)
    assert browser.execute_script(PLOTTED_RUNS, "rank-curves") == sorted(done["run_id"])
    assert browser.find_element(By.ID, "chosen-count").text.startswith("5 of 5 runs chosen")
    assert _severe(browser) == []


@pytest.mark.browser
def test_slider_moves_the_spectrum(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    _open(browser, site["page"].as_uri())
    runs = site["runs"]
    index = int(np.flatnonzero((runs["batch_size"] == 16) & (runs["weight_decay"] > 0)
                               & (runs["status"] == "done"))[0])
    run_id, layer = runs["run_id"].iloc[index], "blocks.0.fc.weight"
    Select(browser.find_element(By.ID, "focus-run")).select_by_value(str(index))
    _wait(browser, "return document.querySelector('[data-rankbias-plot=spectrum]')"
                   ".dataset.point.startsWith(arguments[0])", run_id)
    Select(browser.find_element(By.ID, "focus-layer")).select_by_value(layer)
    with Store(site["path"]) as store:
        stored = store.spectra(run_id)
    steps = sorted({step for step, name in stored if name == layer})
    ranks = site["metrics"].query("run_id == @run_id and layer == @layer "
                                  "and metric == 'rank@0.001'").set_index("step")["value"]
    slider = browser.find_element(By.ID, "point-slider")
    seen = []
    for key, step in ((Keys.HOME, steps[0]), (Keys.END, steps[-1])):
        slider.send_keys(key)
        _wait(browser, "return document.querySelector('[data-rankbias-plot=spectrum]')"
                       ".dataset.point === arguments[0]", f"{run_id}/{layer}/{step}")
        plotted = browser.execute_script(
            "return document.querySelector('[data-rankbias-plot=spectrum]').data"
            ".filter(t => t.mode === 'lines+markers')[0].y")
        sigma = stored[(step, layer)]
        np.testing.assert_allclose(plotted, sigma / np.linalg.norm(sigma), rtol=1e-4)
        drawn = browser.execute_script(RENDERED)["spectrum"]
        assert drawn["markers"] == len(sigma)
        title = browser.find_element(By.CSS_SELECTOR,
                                     '[data-rankbias-plot="spectrum"] .gtitle').text
        assert f"rank {int(ranks[step])} of {len(sigma)}" in title
        seen.append(drawn["paths"])
    assert seen[0] != seen[1]  # the drawn spectrum moved with the slider
    assert _severe(browser) == []


@pytest.mark.browser
def test_served_page_in_the_browser(server, browser):
    requests = _open(browser, server["url"])
    assert all(r.startswith((server["url"], "data:")) for r in requests), requests
    assert _severe(browser) == []
    count = "return document.getElementById('chosen-count').textContent"
    assert browser.execute_script(count).startswith("5 of 5 runs")
    with Store(server["path"]) as store:
        _train(store, batch_size=32, weight_decay=5e-3, epochs=1)
    _open(browser, server["url"])
    assert browser.execute_script(count).startswith("6 of 6 runs")
    assert _severe(browser) == []
