/* rankbias explorer: wires the page's data (rankbias/report/explorer.py) to Plotly plots.
 *
 * The data is parsed once. A change of the picker redraws every plot from it with
 * Plotly.react; the runs of one colour group are one trace (lines separated by gaps), so
 * 1,000 runs are a handful of traces. A run's spectra are loaded when it is first shown,
 * by a <script> of report_files/spectra/<run>.js that calls rankbiasSpectra(payload).
 */
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("rankbias-data").textContent);
  const RUNS = DATA.runs;
  const N = RUNS.run_id.length;
  const LAYERS = DATA.layers;
  const FIELDS = DATA.fields; // [field, label] pairs of the picker
  const SHORT = Object.fromEntries(FIELDS);
  const PARAMS = {
    batch_size: "batch size B",
    lr: "learning rate μ",
    weight_decay: "weight decay wd (PyTorch, = 2λ)",
    bound_scale: "bound scale B / (μ·wd)",
  };
  const CONFIG = { displaylogo: false, responsive: true };
  const QUALITATIVE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const state = { off: {}, colorBy: null, layer: -1, focus: null, focusLayer: null, point: null };
  const spectra = {}; // run id -> payload, or {missing: true}
  const loading = {}; // run id -> true while its script loads
  let chosen = [];

  // --- small helpers -------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  const plotOf = (name) => document.querySelector(`[data-rankbias-plot="${name}"]`);
  const key = (v) => (v === null || v === undefined ? "none" : String(v));
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  const fmt = (v) => (v === null || v === undefined ? "" : typeof v === "number"
    ? String(Number(v.toPrecision(4))) : String(v));

  function numeric(field) {
    return RUNS[field] !== undefined && RUNS[field].every((v) => v === null || typeof v === "number");
  }

  function compareKeys(field) {
    if (!numeric(field)) return (a, b) => a.localeCompare(b, undefined, { numeric: true });
    return (a, b) => (a === "none") - (b === "none") || Number(a) - Number(b);
  }

  function viridis(t) {
    const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
    const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
    const c = VIRIDIS[i].map((a, j) => Math.round(a + (VIRIDIS[i + 1][j] - a) * (x - i)));
    return `rgb(${c.join(",")})`;
  }

  const label = (i) => LABELS[i];
  const LABELS = RUNS.run_id.map((_, i) => describe(i)); // once: hover text of every point

  function describe(i) {
    const parts = ["batch_size", "lr", "weight_decay"].filter((f) => f in RUNS)
      .map((f) => `${SHORT[f]}=${fmt(RUNS[f][i])}`);
    if ("seed" in RUNS) parts.push(`seed ${fmt(RUNS.seed[i])}`);
    const what = [RUNS.model && RUNS.model[i], RUNS.dataset && RUNS.dataset[i]].filter(Boolean);
    return `${parts.join(", ")} · ${what.join(" on ")} · run ${RUNS.run_id[i]} (${RUNS.status[i]})`;
  }

  function emptyLayout(title, message) {
    return {
      title: { text: title, font: { size: 14 }, x: 0.01, xanchor: "left" },
      xaxis: { visible: false },
      yaxis: { visible: false },
      annotations: [{ text: message, showarrow: false, font: { size: 14, color: "#777" } }],
    };
  }

  // --- the picker ----------------------------------------------------------------------
  function buildPicker() {
    const box = $("picker");
    for (const [field, name] of FIELDS) {
      const counts = new Map();
      for (const v of RUNS[field]) counts.set(key(v), (counts.get(key(v)) || 0) + 1);
      const values = [...counts.keys()].sort(compareKeys(field));
      state.off[field] = new Set();
      const set = document.createElement("fieldset");
      set.dataset.field = field;
      const legend = document.createElement("legend");
      legend.textContent = name;
      const all = document.createElement("button");
      all.type = "button";
      all.textContent = "all";
      all.title = "tick every value";
      all.addEventListener("click", () => {
        state.off[field].clear();
        set.querySelectorAll("input").forEach((b) => { b.checked = true; });
        update();
      });
      legend.append(all);
      set.append(legend);
      for (const value of values) {
        const row = document.createElement("label");
        const tick = document.createElement("input");
        tick.type = "checkbox";
        tick.checked = true;
        tick.value = value;
        tick.addEventListener("change", () => {
          if (tick.checked) state.off[field].delete(value); else state.off[field].add(value);
          update();
        });
        row.append(tick, ` ${value} (${counts.get(value)})`);
        set.append(row);
      }
      box.append(set);
    }
    const colorBy = $("color-by");
    for (const [field, name] of FIELDS) colorBy.add(new Option(name, field));
    const varying = (f) => f in RUNS && new Set(RUNS[f].map(key)).size > 1;
    state.colorBy = ["batch_size", "weight_decay", "lr", "model", "dataset"].find(varying)
      || (FIELDS[0] || ["status"])[0];
    colorBy.value = state.colorBy;
    colorBy.addEventListener("change", () => { state.colorBy = colorBy.value; update(); });
    const layer = $("curve-layer");
    layer.add(new Option("average over the hidden layers", "-1"));
    LAYERS.forEach((name, j) => layer.add(new Option(name, String(j))));
    layer.addEventListener("change", () => { state.layer = Number(layer.value); drawCurves(); });
  }

  function chosenRuns() {
    const picked = [];
    for (let i = 0; i < N; i++) {
      if (FIELDS.every(([f]) => !state.off[f].has(key(RUNS[f][i])))) picked.push(i);
    }
    return picked;
  }

  function groups(runs) {
    const field = state.colorBy;
    const byKey = new Map();
    for (const i of runs) {
      const k = key(RUNS[field][i]);
      if (!byKey.has(k)) byKey.set(k, []);
      byKey.get(k).push(i);
    }
    const keys = [...byKey.keys()].sort(compareKeys(field));
    const ordered = numeric(field);
    return keys.map((k, j) => ({
      name: `${SHORT[field] || field}=${k}`,
      runs: byKey.get(k),
      color: ordered ? viridis(keys.length > 1 ? (0.85 * j) / (keys.length - 1) : 0)
        : QUALITATIVE[j % QUALITATIVE.length],
    }));
  }

  function drawRunTable() {
    const cap = 300;
    const columns = [["run_id", "run"], ["status", "status"], ...FIELDS.filter(([f]) => f !== "status"),
      ["init_avg_rank", "init rank"], ["final_avg_rank", "final rank"],
      ["train_acc", "train acc"], ["test_acc", "test acc"], ["error", "error"]];
    const head = columns.map(([, name]) => `<th>${esc(name)}</th>`).join("");
    const rows = chosen.slice(0, cap).map((i) => `<tr class="run${i === state.focus ? " focus" : ""}"`
      + ` data-run="${i}">${columns.map(([f]) => `<td>${esc(fmt(RUNS[f][i]))}</td>`).join("")}</tr>`);
    $("run-table").innerHTML = `<table><tr>${head}</tr>${rows.join("")}</table>`;
    $("chosen-count").textContent = `${chosen.length} of ${N} runs chosen`
      + (chosen.length > cap ? ` (table: the first ${cap}; click a row to show that run)` : " (click a row to show that run)");
  }

  // --- rank curves -----------------------------------------------------------------------
  function drawCurves() {
    const layer = state.layer;
    const traces = [];
    for (const g of groups(chosen)) {
      const x = [], y = [], ids = [], text = [];
      let n = 0;
      for (const i of g.runs) {
        const c = DATA.curves[i];
        const ys = c && (layer < 0 ? c.r : c.L[String(layer)]);
        if (!ys) continue;
        n += 1;
        for (let k = 0; k < c.e.length; k++) {
          x.push(c.e[k]); y.push(ys[k]); ids.push(i); text.push(label(i));
        }
        x.push(null); y.push(null); ids.push(null); text.push("");
      }
      if (n) {
        traces.push({
          type: "scatter", mode: "lines", name: `${g.name} (${n} runs)`, x, y, customdata: ids,
          text, connectgaps: false, line: { color: g.color, width: 1.4, simplify: false },
          hovertemplate: "%{text}<br>epoch %{x}: rank %{y}<extra></extra>",
        });
      }
    }
    const what = layer < 0 ? "average rank over the hidden layers" : `rank of ${LAYERS[layer]}`;
    const layout = traces.length ? {
      title: { text: `${what}, one line per run`, font: { size: 14 }, x: 0.01, xanchor: "left" },
      xaxis: { title: { text: "epoch" } }, yaxis: { title: { text: "rank (σ_i/‖W‖_F > tol)" } },
      legend: { title: { text: `colour: ${SHORT[state.colorBy] || state.colorBy}` } },
      hovermode: "closest", margin: { t: 40 },
    } : emptyLayout(what, chosen.length ? "no chosen run has this layer" : "no run chosen");
    return Plotly.react(plotOf("rank-curves"), traces, layout, CONFIG);
  }

  function drawLayerCurves() {
    const i = state.focus;
    const c = i === null ? null : DATA.curves[i];
    const el = plotOf("layer-curves");
    if (!c) return Plotly.react(el, [], emptyLayout("every layer of one run", "no run to show"), CONFIG);
    const traces = Object.keys(c.L).sort((a, b) => a - b).map((j, k) => ({
      type: "scatter", mode: "lines+markers", name: LAYERS[j], x: c.e, y: c.L[j],
      line: { color: QUALITATIVE[k % QUALITATIVE.length], simplify: false }, marker: { size: 4 },
    }));
    if (c.r) {
      traces.push({ type: "scatter", mode: "lines", name: "average (hidden)", x: c.e, y: c.r,
        line: { color: "black", dash: "dash", width: 2, simplify: false } });
    }
    return Plotly.react(el, traces, {
      title: { text: `every layer of ${label(i)}`, font: { size: 13 }, x: 0.01, xanchor: "left" },
      xaxis: { title: { text: "epoch" } }, yaxis: { title: { text: `rank at tol ${RUNS.tol[i]}` } },
      shapes: pointLine(), margin: { t: 40 }, hovermode: "x unified",
    }, CONFIG);
  }

  function pointLine() {
    // a dotted vertical line at the slider's tracking point
    const payload = state.focus === null ? null : spectra[RUNS.run_id[state.focus]];
    if (!payload || !payload.epochs || state.point === null) return [];
    const epoch = payload.epochs[state.point];
    return [{ type: "line", x0: epoch, x1: epoch, yref: "paper", y0: 0, y1: 1,
      line: { color: "#999", dash: "dot" } }];
  }

  // --- the spectrum of one layer ---------------------------------------------------------
  function loadSpectra(i) {
    const run = RUNS.run_id[i];
    if (spectra[run] || loading[run]) return;
    if (!RUNS.spectra[i]) { spectra[run] = { missing: true }; return; }
    loading[run] = true;
    const script = document.createElement("script");
    script.src = `${DATA.spectraDir}/spectra/${encodeURIComponent(RUNS.spectra[i])}`;
    script.onerror = () => {
      delete loading[run];
      spectra[run] = { missing: true, file: script.src };
      if (RUNS.run_id[state.focus] === run) drawFocus();
    };
    document.head.append(script);
  }

  window.rankbiasSpectra = function (payload) {
    delete loading[payload.run];
    spectra[payload.run] = payload;
    if (state.focus !== null && RUNS.run_id[state.focus] === payload.run) drawFocus();
  };

  function defaultLayer(payload) {
    const names = Object.keys(payload.layers);
    const last = (name) => payload.layers[name].filter(Boolean).slice(-1)[0] || [];
    const longest = Math.max(...names.map((n) => last(n).length));
    const wide = names.filter((n) => last(n).length === longest);
    return wide[Math.floor((wide.length - 1) / 2)];
  }

  function focusOptions() {
    const select = $("focus-run");
    select.innerHTML = "";
    for (const i of chosen) select.add(new Option(label(i), String(i)));
    if (state.focus !== null) select.value = String(state.focus);
  }

  function defaultFocus() {
    // The longest finished run with spectra, the one of lowest final rank among equals.
    const done = chosen.filter((i) => RUNS.status[i] === "done" && RUNS.spectra[i]);
    const pool = done.length ? done : chosen;
    const points = (i) => (DATA.curves[i] ? DATA.curves[i].e.length : 0);
    const rank = (i) => RUNS.final_avg_rank[i] ?? Infinity;
    let best = pool.length ? pool[0] : null;
    for (const i of pool) {
      if (points(i) > points(best) || (points(i) === points(best) && rank(i) < rank(best))) best = i;
    }
    return best;
  }

  function setFocus(i) {
    if (i !== state.focus) state.point = null;
    state.focus = i;
    if (i !== null) $("focus-run").value = String(i);
    document.querySelectorAll("#run-table tr.run").forEach((row) => {
      row.classList.toggle("focus", Number(row.dataset.run) === i);
    });
    return drawFocus();
  }

  function drawFocus() {
    const i = state.focus;
    const payload = i === null ? null : spectra[RUNS.run_id[i]];
    if (i !== null && !payload) loadSpectra(i);
    const layerSelect = $("focus-layer");
    const slider = $("point-slider");
    if (payload && payload.layers) {
      const names = Object.keys(payload.layers);
      if (!names.includes(state.focusLayer)) state.focusLayer = defaultLayer(payload);
      if ([...layerSelect.options].map((o) => o.value).join("\n") !== names.join("\n")) {
        layerSelect.innerHTML = "";
        for (const name of names) layerSelect.add(new Option(name, name));
      }
      layerSelect.value = state.focusLayer;
      slider.max = String(payload.steps.length - 1);
      if (state.point === null || state.point > payload.steps.length - 1) {
        state.point = payload.steps.length - 1; // the end of training
      }
      slider.value = String(state.point);
      slider.disabled = false;
    } else {
      slider.disabled = true;
    }
    drawLayerCurves();
    return drawSpectrum();
  }

  function drawSpectrum() {
    const el = plotOf("spectrum");
    const i = state.focus;
    const run = i === null ? null : RUNS.run_id[i];
    const payload = run === null ? null : spectra[run];
    const title = "spectrum of one layer";
    if (i === null) return Plotly.react(el, [], emptyLayout(title, "no run chosen"), CONFIG);
    if (!payload) return Plotly.react(el, [], emptyLayout(title, "loading the spectra…"), CONFIG);
    if (payload.missing) {
      const why = payload.file ? `cannot load ${payload.file}: keep report_files/ beside the page`
        : "this run has no stored spectra";
      return Plotly.react(el, [], emptyLayout(title, why), CONFIG);
    }
    const series = payload.layers[state.focusLayer];
    const values = series[state.point];
    const tol = RUNS.tol[i];
    const epoch = payload.epochs[state.point];
    const step = payload.steps[state.point];
    $("point-label").textContent = `point ${state.point + 1} of ${payload.steps.length}: `
      + `epoch ${epoch}, step ${step}`;
    if (!values) {
      el.dataset.point = `${run}/${state.focusLayer}/${step}`;
      return Plotly.react(el, [], emptyLayout(title, `no spectrum of ${state.focusLayer} at step ${step}`), CONFIG);
    }
    const rank = (v) => v.filter((s) => s > tol).length;
    const index = (v) => v.map((_, k) => k + 1);
    const all = series.filter(Boolean).flat().filter((v) => v > 0);
    const low = Math.log10(Math.min(tol, ...all)) - 0.3;
    const high = Math.log10(Math.max(tol, ...all)) + 0.2;
    const traces = [];
    const first = series.findIndex(Boolean);
    if (first >= 0 && first !== state.point) {
      traces.push({ type: "scatter", mode: "lines", x: index(series[first]), y: series[first],
        name: `epoch ${payload.epochs[first]} (rank ${rank(series[first])})`,
        line: { color: "#bbb", dash: "dash", simplify: false }, hoverinfo: "skip" });
    }
    traces.push({ type: "scatter", mode: "lines+markers", x: index(values), y: values,
      name: `epoch ${epoch} (rank ${rank(values)})`, marker: { size: 5, color: "#1f4e9c" },
      line: { color: "#1f4e9c", simplify: false },
      hovertemplate: "σ_%{x}/‖W‖_F = %{y:.3g}<extra></extra>" });
    traces.push({ type: "scatter", mode: "lines", x: [1, values.length], y: [tol, tol],
      name: `tolerance ${tol}`, line: { color: "#c62828", dash: "dot", simplify: false },
      hoverinfo: "skip" });
    el.dataset.point = `${run}/${state.focusLayer}/${step}`;
    return Plotly.react(el, traces, {
      title: { text: `${state.focusLayer} at epoch ${epoch}: rank ${rank(values)} of ${values.length}`
        + ` (values above the line)<br><sub>${esc(label(i))}</sub>`, font: { size: 13 }, x: 0.01, xanchor: "left" },
      xaxis: { title: { text: "index i" } },
      yaxis: { type: "log", title: { text: "σ_i / ‖W‖_F" }, range: [low, high], exponentformat: "power" },
      margin: { t: 60 }, hovermode: "closest",
    }, CONFIG);
  }

  // --- final rank against B, lr, wd and the bound's scale ----------------------------------
  function xValue(param, i) {
    if (param !== "bound_scale") return RUNS[param] ? RUNS[param][i] : null;
    const b = RUNS.batch_size[i], lr = RUNS.lr[i], wd = RUNS.weight_decay[i];
    return b !== null && lr > 0 && wd > 0 ? b / (lr * wd) : null; // infinite at wd = 0
  }

  function drawFinal(param) {
    const el = plotOf(`final-vs-${param}`);
    const title = `final average rank vs ${PARAMS[param]}`;
    const done = chosen.filter((i) => RUNS.status[i] === "done" && RUNS.final_avg_rank[i] !== null);
    const xs = new Map(done.map((i) => [i, xValue(param, i)]));
    const shown = done.filter((i) => xs.get(i) !== null && xs.get(i) !== undefined);
    if (!shown.length) {
      return Plotly.react(el, [], emptyLayout(title, done.length ? "no run with a finite value"
        : "no finished run chosen"), CONFIG);
    }
    const positive = shown.map((i) => xs.get(i)).filter((x) => x > 0);
    const zeroAt = positive.length ? Math.min(...positive) / 10 ** 0.7 : 1; // where 0 is drawn
    const where = (i) => (xs.get(i) > 0 ? xs.get(i) : zeroAt);
    const traces = [];
    for (const g of groups(shown)) {
      const byX = new Map();
      for (const i of g.runs) {
        if (!byX.has(where(i))) byX.set(where(i), []);
        byX.get(where(i)).push(RUNS.final_avg_rank[i]);
      }
      const means = [...byX.keys()].sort((a, b) => a - b);
      traces.push({ type: "scatter", mode: "lines", x: means,
        y: means.map((x) => byX.get(x).reduce((a, b) => a + b, 0) / byX.get(x).length),
        line: { color: g.color, width: 1 }, showlegend: false, hoverinfo: "skip" });
      traces.push({ type: "scatter", mode: "markers", name: g.name, x: g.runs.map(where),
        y: g.runs.map((i) => RUNS.final_avg_rank[i]), customdata: g.runs,
        text: g.runs.map(label), marker: { color: g.color, size: 7, opacity: 0.8 },
        hovertemplate: `%{text}<br>final rank %{y}<extra></extra>` });
    }
    const distinct = [...new Set(shown.map(where))].sort((a, b) => a - b);
    const xaxis = { type: positive.length ? "log" : "linear", title: { text: PARAMS[param] } };
    if (distinct.length <= 12) {
      xaxis.tickvals = distinct;
      xaxis.ticktext = distinct.map((x) => (x === zeroAt && !positive.includes(x) ? "0" : fmt(x)));
    }
    const left = done.length - shown.length;
    const note = left ? `<br><sub>${left} runs with wd = 0 left out: the bound is infinite</sub>` : "";
    return Plotly.react(el, traces, {
      title: { text: title + note, font: { size: 13 }, x: 0.01, xanchor: "left" }, xaxis,
      yaxis: { title: { text: "final average rank" } }, hovermode: "closest",
      margin: { t: 60 }, legend: { font: { size: 10 } },
    }, CONFIG);
  }

  // --- wiring ------------------------------------------------------------------------------
  // Plots are drawn one per task (setTimeout), so the page answers input between two plots;
  // a newer update replaces the draws an older one still had queued.
  let queue = [];
  let finish = null;
  let idle = Promise.resolve();

  function schedule(draws) {
    queue = draws.slice();
    if (!finish) {
      window.rankbiasBusy = true;
      idle = new Promise((resolve) => { finish = resolve; });
      setTimeout(pump, 0);
    }
    return idle;
  }

  function pump() {
    const draw = queue.shift();
    if (draw) {
      draw();
      setTimeout(pump, 0);
      return;
    }
    const done = finish;
    finish = null;
    window.rankbiasBusy = false; // for tests and benchmarks: every plot is drawn
    done();
  }

  function update() {
    chosen = chosenRuns();
    drawRunTable();
    if (!chosen.includes(state.focus)) state.focus = null;
    const focus = state.focus === null ? defaultFocus() : state.focus;
    focusOptions();
    return schedule([drawCurves, () => setFocus(state.focus === null ? focus : state.focus),
      ...Object.keys(PARAMS).map((p) => () => drawFinal(p))]);
  }

  function onClickRun(name) {
    plotOf(name).on("plotly_click", (event) => {
      const i = event.points && event.points[0] && event.points[0].customdata;
      if (typeof i === "number") setFocus(i);
    });
  }

  function start() {
    buildPicker();
    $("focus-run").addEventListener("change", (e) => setFocus(Number(e.target.value)));
    $("focus-layer").addEventListener("change", (e) => { state.focusLayer = e.target.value; drawSpectrum(); });
    $("point-slider").addEventListener("input", (e) => {
      state.point = Number(e.target.value);
      drawSpectrum();
      Plotly.relayout(plotOf("layer-curves"), { shapes: pointLine() });
    });
    $("run-table").addEventListener("click", (e) => {
      const row = e.target.closest("tr.run");
      if (row) setFocus(Number(row.dataset.run));
    });
    update().then(() => {
      onClickRun("rank-curves");
      Object.keys(PARAMS).forEach((p) => onClickRun(`final-vs-${p}`));
      window.rankbiasReady = performance.now(); // for tests and benchmarks: first render done
    });
  }

  start();
})();
