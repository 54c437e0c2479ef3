"""The explorer of a 1,000-run store: page size, time to write, time to first render.

    python benchmarks/explorer.py [--runs 1000] [--keep DIR]

Builds a synthetic store through `Store.save_result` (what the sweep driver writes): a grid
of 8 batch sizes x 5 learning rates x 5 weight decays x 5 seeds, 31 tracking points, five
64-wide matrices (MLP 4 x 64 + head), every metric the tracker records, and spectra whose
ranks are computed from them. Then writes the explorer, opens it from file:// in headless
Chromium (when Selenium and Debian's chromium are here) and measures the time to the first
full render, the longest response to a picker click (the page's handler, synchronous: the
time the page is frozen) and the response to a slider move.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from rankbias.metrics.spectral import rank_from_singular_values
from rankbias.report.explorer import write_explorer
from rankbias.runs.store import Store
from rankbias.training.train import RunResult

LAYERS = [f"blocks.{i}.fc.weight" for i in range(4)] + ["head.weight"]
GRID = {"batch_size": [4, 8, 16, 32, 64, 128, 256, 512], "lr": [0.05, 0.1, 0.2, 0.5, 1.0],
        "weight_decay": [0.0, 1e-3, 5e-3, 1e-2, 2e-2], "seed": [0, 1, 2, 3, 4]}
EPOCHS = 30


def synthetic_result(batch_size: int, lr: float, weight_decay: float, seed: int) -> RunResult:
    """A run whose spectra decay faster with lr*wd/B over training (the paper's trend)."""
    rng = np.random.default_rng(seed * 7919 + batch_size)
    config = {"model": "mlp", "model_args": {"depth": 4, "width": 64}, "dataset": "digits",
              "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
              "epochs": EPOCHS, "tolerances": [1e-3]}
    run_id = f"{batch_size}-{lr:g}-{weight_decay:g}-{seed}".replace(".", "p")
    strength = 4e3 * lr * weight_decay / batch_size
    rows, spectra, averages = [], [], []
    for epoch in range(EPOCHS + 1):
        step = epoch * 100
        ranks = []
        for layer in LAYERS:
            n = 10 if layer == "head.weight" else 64
            decay = 0.02 + strength * epoch / EPOCHS * (1 + 0.1 * rng.standard_normal())
            sigma = np.exp(-decay * np.arange(n)) * (1 + 0.05 * rng.random(n))
            sigma = np.sort(sigma)[::-1]
            rank = rank_from_singular_values(sigma, 1e-3)
            fro = float(np.linalg.norm(sigma))
            ranks.append(rank)
            values = {"rank@0.001": rank, "stable_rank": fro**2 / sigma[0]**2,
                      "effective_rank": float(np.exp(-np.sum((p := sigma / sigma.sum())
                                                             * np.log(p + 1e-300)))),
                      "nuclear_fro_ratio": sigma.sum() / fro, "fro_norm": fro,
                      "spectral_norm": sigma[0]}
            if epoch:
                values["weight_change"] = 0.1 / (1 + epoch)
            rows += [(step, epoch, layer, k, float(v)) for k, v in values.items()]
            spectra.append((step, epoch, layer, sigma))
        avg = float(np.mean(ranks[:-1]))  # the hidden layers, not the head
        averages.append(avg)
        point = {"avg_rank": avg, "avg_rank@0.001": avg, "train_acc": 0.9, "test_acc": 0.85,
                 "train_loss": 0.3, "test_loss": 0.4, "lr": lr, "wall_s": 0.1}
        if epoch:
            point["avg_weight_change"] = 0.1 / (1 + epoch)
        rows += [(step, epoch, "", k, float(v)) for k, v in point.items()]
    return RunResult(run_id=run_id, config=config, status="done", epochs=EPOCHS,
                     steps=EPOCHS * 100, rows=rows, spectra=spectra,
                     summary={"init_avg_rank": averages[0], "final_avg_rank": averages[-1],
                              "train_acc": 0.9, "test_acc": 0.85},
                     provenance={"code_version": "synthetic"}, started=0.0, finished=1.0)


def build_store(path: Path, runs: int) -> None:
    grid = list(itertools.product(*GRID.values()))[:runs]
    with Store(path) as store:
        for values in grid:
            store.save_result(synthetic_result(*values))


def render_times(page: Path) -> dict | None:
    """Open the page in headless Chromium; None where Selenium or chromium is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        return None
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            start = time.perf_counter()
            driver.get(page.as_uri())
            ready = None
            while ready is None and time.perf_counter() - start < 120:
                ready = driver.execute_script("return window.rankbiasReady || null")
                time.sleep(0.02)
            wall = time.perf_counter() - start
            # Picker clicks and a slider move: the time to every plot redrawn, and the
            # longest task meanwhile (Chrome's Long Tasks API): how long the page froze.
            clicks = driver.execute_script("""
                return (async () => {
                  const tasks = [];
                  new PerformanceObserver((list) => tasks.push(...list.getEntries()))
                    .observe({ type: "longtask" });
                  const settled = () => new Promise((resolve) => {
                    const poll = () => (window.rankbiasBusy ? setTimeout(poll, 5) : resolve());
                    poll();
                  });
                  const out = [];
                  for (const [field, value] of [["batch_size", "512"], ["batch_size", "512"],
                                                ["seed", "0"], ["seed", "0"]]) {
                    tasks.length = 0;
                    const start = performance.now();
                    document.querySelector(
                      `fieldset[data-field="${field}"] input[value="${value}"]`).click();
                    await settled();
                    await new Promise((resolve) => setTimeout(resolve, 100));
                    out.push([performance.now() - start - 100,
                              Math.max(0, ...tasks.map((t) => t.duration))]);
                  }
                  return out;
                })();""")
            slider = driver.execute_script("""
                const s = document.getElementById('point-slider');
                const t = performance.now();
                s.value = '0';
                s.dispatchEvent(new Event('input'));
                return performance.now() - t;""")
            heap = driver.execute_script("return performance.memory.usedJSHeapSize")
        finally:
            driver.quit()
    return {"first_render_ms": ready, "load_wall_s": wall,
            "click_redrawn_ms": [c[0] for c in clicks], "click_longest_task_ms":
            [c[1] for c in clicks], "slider_ms": slider, "heap_mib": heap / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--keep", default=None, help="build in this folder and keep it")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="rankbias-explorer-"))
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "results.db"
    if not store.exists():
        start = time.perf_counter()
        build_store(store, args.runs)
        print(f"synthetic store: {args.runs} runs in {time.perf_counter() - start:.1f} s, "
              f"{store.stat().st_size / 2**20:.0f} MiB")
    start = time.perf_counter()
    page = write_explorer(folder / "report.html", store, f"{args.runs} synthetic runs")
    written = time.perf_counter() - start
    spectra = list((folder / "report_files" / "spectra").iterdir())
    size = page.stat().st_size
    text = page.read_text()
    data = text[text.index('id="rankbias-data">'):text.index("</script>")]
    print(f"write_explorer: {written:.1f} s; report.html {size / 2**20:.2f} MiB (data "
          f"{len(data) / 2**20:.2f} MiB, {len(data) / args.runs / 1024:.2f} KiB per run); "
          f"spectra: {len(spectra)} files, "
          f"{sum(p.stat().st_size for p in spectra) / len(spectra) / 1024:.0f} KiB each")
    times = render_times(page)
    if times is None:
        print("no Selenium or /usr/bin/chromium: render times not measured")
        print(f"RESULT explorer_page_mib value={size / 2**20:.2f} target=<=10")
        return
    print(json.dumps({k: np.round(v, 1).tolist() for k, v in times.items()}))
    print(f"RESULT explorer_longest_task_ms value={max(times['click_longest_task_ms']):.0f} "
          "target=<=300")
    print(f"RESULT explorer_first_render_ms value={times['first_render_ms']:.0f} "
          "target=<=5000")


if __name__ == "__main__":
    main()
