"""Figures (rankbias.report.plots), the static page and the report of a store, on a small
store of real training runs."""

from __future__ import annotations

import base64
import importlib.util
import re

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest

from rankbias.cli.main import main
from rankbias.report import plots, report, static_page
from rankbias.runs.store import Store
from rankbias.training.config import RunConfig
from rankbias.training.train import train_run
from rankbias.utils import RankbiasError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"epochs": 3, "lr": 0.1, "model_args": {"depth": 2, "width": 16},
        "dataset_args": {"subset": 300}}
DIVERGING = {**TINY, "batch_size": 16, "weight_decay": 5e-3, "lr": 1e4}  # NaN loss at once


def _train_into(store: Store, values: dict) -> str:
    result = train_run(RunConfig.from_dict(values))
    store.save_result(result)
    return result.run_id


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """B in {16, 64} x wd in {0, 5e-3} x 2 seeds, one diverged and one failed run."""
    folder = tmp_path_factory.mktemp("report")
    path = folder / "results.db"
    with Store(path) as store:
        for b in (16, 64):
            for wd in (0.0, 5e-3):
                for seed in (0, 1):
                    _train_into(store, {**TINY, "batch_size": b, "weight_decay": wd,
                                        "seed": seed})
        diverged = _train_into(store, DIVERGING)
        failed = RunConfig.from_dict({**TINY, "batch_size": 16, "weight_decay": 5e-3,
                                      "lr": 0.2})
        store.mark(failed.run_id(), failed.to_dict(), "failed", "RuntimeError: boom <b>")
        runs, metrics = store.runs(), store.metrics()
    html = report.report_store(path, folder / "out", progress=False)
    return {"path": path, "folder": folder, "runs": runs, "metrics": metrics, "html": html,
            "diverged": diverged, "failed": failed.run_id()}


def assert_png(path) -> None:
    """A real, non-trivial, non-blank PNG image."""
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    assert len(data) > 5_000, (path, len(data))
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.var() > 0, path


def test_store_has_the_runs_the_tests_expect(data):
    counts = data["runs"]["status"].value_counts().to_dict()
    assert counts == {"done": 8, "diverged": 1, "failed": 1}


def test_every_figure_function(data, tmp_path):
    runs, metrics = data["runs"], data["metrics"]
    wd = runs[runs["weight_decay"] > 0]
    some = runs[runs["status"] == "done"]
    by_b = {f"B={b}": some[(some["batch_size"] == b) & (some["weight_decay"] > 0)]
            ["run_id"].iloc[0] for b in (16, 64)}
    layer = next(name for name in metrics["layer"].unique() if name.startswith("blocks"))
    paths = [
        plots.plot_rank_curves(wd, metrics, "batch_size", tmp_path / "rank.png"),
        plots.plot_final_vs_param(runs, "weight_decay", tmp_path / "final.png",
                                   hue="batch_size"),
        plots.plot_final_vs_param(wd, "batch_size", tmp_path / "final_b.png"),
        plots.plot_layer_heatmap(metrics, some["run_id"].iloc[0], tmp_path / "heat.png"),
        plots.plot_spectra(data["path"], by_b, layer, tmp_path / "spectra.png"),
        plots.plot_accuracy_curves(wd, metrics, "batch_size", tmp_path / "acc.png"),
        plots.plot_rank_vs_accuracy(runs, tmp_path / "rank_acc.png"),
        plots.plot_weight_change(runs[runs["batch_size"] == 16], metrics, "weight_decay",
                                  tmp_path / "wchange.png"),
    ]
    for path in paths:
        assert path.exists()
        assert_png(path)
    assert plt.get_fignums() == []  # every figure closed


def test_curves_leave_out_diverged_runs_and_say_so(data, tmp_path, monkeypatch):
    seen = []
    close = plt.close

    def spy(fig):
        for ax in fig.axes:
            legend = ax.get_legend()
            seen.append((ax.get_title(), [t.get_text() for t in legend.get_texts()]
                         if legend else []))
        close(fig)

    monkeypatch.setattr(plt, "close", spy)
    runs = data["runs"]
    group = runs[(runs["batch_size"] == 16) & (runs["weight_decay"] == 5e-3)]  # lr 0.1 / 1e4
    plots.plot_rank_curves(group, data["metrics"], "lr", tmp_path / "r.png")
    title, labels = seen[0]
    assert "1 diverged" in title and "1 failed" in title
    assert labels == ["lr=0.1 (n=2)"]  # the diverged lr=1e4 run has no curve


def test_no_finished_runs_to_plot_is_a_clear_error(data, tmp_path):
    runs = data["runs"]
    with pytest.raises(RankbiasError, match="no finished run"):
        plots.plot_rank_curves(runs[runs["status"] != "done"], data["metrics"], "lr",
                                tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    assert plt.get_fignums() == []


def test_report_store_writes_figures_and_self_contained_html(data):
    out = data["html"].parent
    assert data["html"] == out / "report.html"
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    for expected in ("e0-batch_size-0-rank.png", "e0-batch_size-0-accuracy.png",
                     "e0-batch_size-0-weight-change.png", "e0-batch_size-final.png",
                     "e0-weight_decay-final.png", "e0-heatmap.png", "e0-spectra.png",
                     "e0-rank-vs-acc.png"):
        assert expected in names
    for path in pngs:
        assert_png(path)
    text = data["html"].read_text()
    assert 'src="http' not in text and "<link" not in text  # the explorer: scripts inline
    assert not re.search(r"<script[^>]*\ssrc=", text)
    explorer = importlib.util.find_spec("plotly") is not None  # else the static page
    assert ('data-rankbias-plot="spectrum"' in text) == explorer
    sources = re.findall(r'<img src="([^"]*)"', text)
    assert len(sources) == len(pngs)
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert data["diverged"] in text and data["failed"] in text  # listed in the runs table
    assert "1 diverged" in text and "boom &lt;b&gt;" in text  # errors are escaped
    assert "final average rank vs batch size B" in text


def test_write_html_sections_tables_verdicts(tmp_path, data):
    image = next(data["html"].parent.glob("*.png"))
    sections = [
        {"title": "Claim A <1>", "text": "a < b & c", "images": [image], "verdict": "pass"},
        {"title": "Claim B", "table": [{"B": 8, "rank": 3.14159}, {"B": 16, "note": "x"}],
         "verdict": "fail"},
        {"title": "Claim C", "verdict": "inconclusive"},
        {"title": "Plain"},
    ]
    path = static_page.write_html(tmp_path / "sub" / "claims.html", "Claims & checks", sections)
    text = path.read_text()
    for title in ("Claim A &lt;1&gt;", "Claim B", "Claim C", "Plain"):
        assert f"<h2>{title}" in text
    for verdict in ("pass", "fail", "inconclusive"):
        assert f"verdict-{verdict}" in text
    assert "a &lt; b &amp; c" in text and "<td>3.142</td>" in text and "<th>note</th>" in text
    assert "generated" in text and "torch" in text and "matplotlib" in text
    assert [p.name for p in path.parent.iterdir()] == ["claims.html"]  # no temp file left


@pytest.mark.parametrize("section,match", [
    ({"title": "x", "verdict": "maybe"}, "verdict"),
    ({"title": "x", "imgs": []}, "title"),
    ({"title": "x", "images": ["/no/such.png"]}, "cannot read"),
])
def test_write_html_bad_sections_leave_nothing(tmp_path, section, match):
    with pytest.raises(RankbiasError, match=match):
        static_page.write_html(tmp_path / "r.html", "t", [section])
    assert list(tmp_path.iterdir()) == []


def test_report_store_without_variation(tmp_path):
    with Store(tmp_path / "one.db") as store:
        _train_into(store, {**TINY, "epochs": 1, "batch_size": 64})
    html = report.report_store(tmp_path / "one.db", tmp_path / "out", progress=False)
    names = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert names == {"e0-batch_size-0-rank.png", "e0-batch_size-0-accuracy.png",
                     "e0-batch_size-0-weight-change.png", "e0-heatmap.png",
                     "e0-rank-vs-acc.png"}  # no final-vs-param or spectra comparison
    assert html.exists()


def test_report_store_empty_or_missing_store(tmp_path):
    Store(tmp_path / "empty.db").close()
    with pytest.raises(RankbiasError, match="no finished runs"):
        report.report_store(tmp_path / "empty.db", tmp_path / "out")
    with pytest.raises(RankbiasError, match="no results store"):
        report.report_store(tmp_path / "missing.db", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_report(data, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["report", "--store", str(data["path"]), "--out", str(out),
                 "--max-groups", "1"]) == 0
    captured = capsys.readouterr()
    assert (out / "report.html").exists() and "report.html" in captured.out
    lines = captured.err.splitlines()  # one progress line per figure
    assert len(lines) == len(list(out.glob("*.png")))
    assert all(line.startswith("report: wrote ") for line in lines)
    for bad in (["--store", str(tmp_path / "nope.db")], ["--max-groups", "0"]):
        assert main(["report", "--out", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err
