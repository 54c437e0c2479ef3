"""The results store: one SQLite file, no server.

Tables:
- runs:    run_id (hash of the canonical config) | status | config JSON | seed | code and
           library versions | timings | summary JSON | error
- metrics: long form (run_id, step, epoch, layer, metric, value); run-level metrics have
           layer "" (avg_rank, train_acc, ...)
- spectra: (run_id, step, epoch, layer, singular values as float64 bytes)

A run's metrics and its final status are written in one transaction, so a killed
process never leaves a run marked done with half its rows. Only one process writes (the
sweep driver or `rankbias train`); workers return `RunResult`s.

    from rankbias.store import Store
    store = Store("results.db")
    runs = store.runs()            # one row per run, config fields as columns
    metrics = store.metrics()      # tidy long form
    runs = load_runs("results.db") # the same, in one call
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rankbias.utils import RankbiasError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,          -- pending | running | done | diverged | failed
    config TEXT NOT NULL,          -- canonical JSON of RunConfig
    seed INTEGER,
    code_version TEXT,
    library_versions TEXT,         -- JSON
    provenance TEXT,               -- JSON: device, threads, ...
    summary TEXT,                  -- JSON: init/final average rank, accuracy, ...
    error TEXT,
    diverged_step INTEGER,
    epochs INTEGER,
    steps INTEGER,
    created REAL,
    started REAL,
    finished REAL,
    wall_s REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, epoch INTEGER NOT NULL,
    layer TEXT NOT NULL, metric TEXT NOT NULL, value REAL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics (run_id, metric);
CREATE TABLE IF NOT EXISTS spectra (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, epoch INTEGER NOT NULL,
    layer TEXT NOT NULL, sigma BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS spectra_run ON spectra (run_id);
"""

FINISHED = ("done", "diverged")  # a rerun of these configs is skipped


class Store:
    """A SQLite results file. Safe to read while another process writes (WAL mode)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise RankbiasError(f"folder {parent} does not exist: create it or choose another "
                                "--store path")
        try:
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise RankbiasError(f"{self.path} is not a rankbias results store ({err})") from err

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- writing ------------------------------------------------------------------------
    def status(self, run_id: str) -> str | None:
        row = self.db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row[0] if row else None

    def mark(self, run_id: str, config: dict, status: str, error: str | None = None) -> None:
        """Record a run as pending/running/failed without results (keeps its creation time)."""
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT INTO runs (run_id, status, config, seed, created, started, error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                "status=excluded.status, error=excluded.error, "
                "started=COALESCE(excluded.started, runs.started)",
                (run_id, status, _canonical(config), config.get("seed"), now,
                 now if status == "running" else None, error))

    def save_result(self, result) -> None:
        """Write a finished `RunResult` (rows, spectra, status) in one transaction."""
        p = result.provenance
        with self.db:
            self.db.execute("DELETE FROM metrics WHERE run_id=?", (result.run_id,))
            self.db.execute("DELETE FROM spectra WHERE run_id=?", (result.run_id,))
            self.db.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
                ((result.run_id, s, e, layer, m, v) for s, e, layer, m, v in result.rows))
            self.db.executemany(
                "INSERT INTO spectra VALUES (?, ?, ?, ?, ?)",
                ((result.run_id, s, e, layer, np.asarray(sig, np.float64).tobytes())
                 for s, e, layer, sig in result.spectra))
            self.db.execute(
                "INSERT INTO runs (run_id, status, config, seed, code_version, "
                "library_versions, provenance, summary, error, diverged_step, epochs, steps, "
                "created, started, finished, wall_s) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE "
                "SET status=excluded.status, config=excluded.config, seed=excluded.seed, "
                "code_version=excluded.code_version, library_versions=excluded.library_versions,"
                " provenance=excluded.provenance, summary=excluded.summary, "
                "error=excluded.error, diverged_step=excluded.diverged_step, "
                "epochs=excluded.epochs, steps=excluded.steps, started=excluded.started, "
                "finished=excluded.finished, wall_s=excluded.wall_s",
                (result.run_id, result.status, _canonical(result.config),
                 result.config.get("seed"), p.get("code_version"),
                 json.dumps(p.get("library_versions", {})), json.dumps(p),
                 json.dumps(result.summary), result.error, result.diverged_step, result.epochs,
                 result.steps, result.started, result.started, result.finished, result.wall_s))

    # --- reading ------------------------------------------------------------------------
    def runs(self, status: str | Sequence[str] | None = None) -> pd.DataFrame:
        """One row per run: id, status, summary numbers and every config field as a column."""
        query, args = "SELECT * FROM runs", ()
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            query += f" WHERE status IN ({','.join('?' * len(statuses))})"
            args = tuple(statuses)
        frame = pd.read_sql_query(query + " ORDER BY created, run_id", self.db, params=args)
        configs = pd.DataFrame([json.loads(c) for c in frame["config"]], index=frame.index)
        summaries = pd.DataFrame([_summary_numbers(s) for s in frame["summary"]],
                                 index=frame.index)
        keep = ["run_id", "status", "error", "diverged_step", "steps", "wall_s", "code_version"]
        done = frame[["epochs"]].rename(columns={"epochs": "epochs_done"})
        configs = configs.drop(columns=["seed"], errors="ignore")
        return pd.concat([frame[keep], done, summaries, configs, frame[["seed"]]], axis=1)

    def metrics(self, run_ids: Iterable[str] | None = None,
                metrics: Iterable[str] | None = None, layer: str | None = None) -> pd.DataFrame:
        """Tidy long-form metrics: run_id, step, epoch, layer, metric, value."""
        clauses, args = [], []
        for column, values in (("run_id", run_ids), ("metric", metrics)):
            if values is not None:
                values = list(values)
                clauses.append(f"{column} IN ({','.join('?' * len(values))})")
                args += values
        if layer is not None:
            clauses.append("layer = ?")
            args.append(layer)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        return pd.read_sql_query(f"SELECT * FROM metrics{where} ORDER BY run_id, step, layer",
                                 self.db, params=args)

    def spectra(self, run_id: str, step: int | None = None) -> dict[tuple[int, str], np.ndarray]:
        """Singular values by (step, layer) for one run (one step, or all)."""
        query, args = "SELECT step, layer, sigma FROM spectra WHERE run_id=?", [run_id]
        if step is not None:
            query += " AND step=?"
            args.append(step)
        return {(s, layer): np.frombuffer(blob, dtype=np.float64)
                for s, layer, blob in self.db.execute(query, args)}


def _canonical(config: dict) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _summary_numbers(text: str | None) -> dict:
    keys = ("init_avg_rank", "final_avg_rank", "train_acc", "test_acc")
    summary = json.loads(text) if isinstance(text, str) else {}
    return {k: summary.get(k) for k in keys}


def load_runs(path: str | os.PathLike) -> pd.DataFrame:
    """All runs of the store at `path`, one row each (see `Store.runs`)."""
    with open_store(path, must_exist=True) as store:
        return store.runs()


def load_metrics(path: str | os.PathLike, run_ids: Iterable[str] | None = None,
                 metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Tidy long-form metrics of the store at `path` (see `Store.metrics`)."""
    with open_store(path, must_exist=True) as store:
        return store.metrics(run_ids, metrics)


def checkpoint_dir_for(store_path: str | os.PathLike) -> Path:
    """Where runs recorded in this store keep their checkpoints: checkpoints/ beside it."""
    return Path(store_path).resolve().parent / "checkpoints"


def open_store(path: str | os.PathLike, must_exist: bool = False) -> Store:
    if must_exist and not os.path.isfile(path):
        raise RankbiasError(f"no results store at {path}: run `rankbias train` or "
                            "`rankbias sweep` with --store first")
    return Store(path)
