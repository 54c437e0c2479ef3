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

    from rankbias.runs.store import Store
    store = Store("results.db")
    runs = store.runs()            # one row per run, config fields as columns
    metrics = store.metrics()      # tidy long form
    runs = load_runs("results.db") # the same, in one call
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rankbias.utils import RankbiasError, to_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,          -- pending | running | done | diverged | stopped | failed
    config TEXT NOT NULL,          -- JSON of the normal form of the RunConfig
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
    wall_s REAL,
    owner TEXT,                    -- host:pid of the driver training it (status running)
    lease_until REAL               -- its claim lapses then unless renewed
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
# 1: rankbias 0.1.0 (run ids hashed the raw config); 2: ids of the normal form, claims.
SCHEMA_VERSION = 2
FINISHED = ("done", "diverged", "stopped")  # a rerun of these configs is skipped
LEASE_S = 120.0  # a claim not renewed for this long is taken to be a crashed driver's
LOCK_WAIT_S = 60.0  # how long to wait for another process's write lock


class Store:
    """A SQLite results file. Safe to read while another process writes (WAL mode), and
    to share between drivers on one machine: a run is claimed before it is trained.

    Keep it on a local disk: SQLite's locking is unreliable on network file systems. A
    cluster sweep (Ray) writes it from the driver alone; only checkpoints need a shared
    file system.
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = False) -> None:
        """Open (or create) the store at `path` for writing; `readonly`: open an existing
        store to read it, never taking the write lock, so that a sweep writing it cannot
        block a reader (report, fit, serve, runs)."""
        self.path = str(path)
        self.readonly = readonly
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise RankbiasError(f"folder {parent} does not exist: create it or choose another "
                                "--store path")
        try:
            if readonly:
                self.db = self._reader()
            else:
                # Autocommit; every write is an explicit BEGIN IMMEDIATE transaction.
                self.db = sqlite3.connect(self.path, timeout=LOCK_WAIT_S, isolation_level=None)
                self._write_ahead_log()
                self._create_and_migrate()
        except sqlite3.DatabaseError as err:
            if "locked" in str(err):
                raise RankbiasError(f"{self.path} stayed locked by another process for "
                                    f"{LOCK_WAIT_S:.0f} s: stop it or choose another --store"
                                    ) from err
            raise RankbiasError(f"{self.path} is not a rankbias results store ({err})") from err

    def _reader(self) -> sqlite3.Connection:
        """A read-only connection (`mode=ro`: no write lock, no migration). A store of an
        older schema is migrated once by a writer first; WAL lets the reader see the last
        committed state while a writer holds its transaction."""
        uri = f"file:{Path(self.path).resolve().as_posix()}?mode=ro"
        db = sqlite3.connect(uri, uri=True, timeout=LOCK_WAIT_S, isolation_level=None)
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if "runs" in tables and version >= SCHEMA_VERSION:
            return db
        db.close()
        Store(self.path).close()  # an older (or empty) store: bring it up to date once
        return sqlite3.connect(uri, uri=True, timeout=LOCK_WAIT_S, isolation_level=None)

    def _write_ahead_log(self) -> None:
        """Switch the file to WAL mode. The switch needs the file to itself, and SQLite
        answers "database is locked" at once, without its busy wait, while another driver
        opens the same new store: wait for that here."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; it takes the write lock at once (no upgrade deadlocks)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _create_and_migrate(self) -> None:
        with self.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
            for column, kind in (("owner", "TEXT"), ("lease_until", "REAL")):
                if column not in columns:  # a 0.1.0 store
                    self.db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                self._rekey_runs()
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _rekey_runs(self) -> None:
        """Give every run the id of its config's normal form (0.1.0 hashed the config as
        spelled), so a new sweep finds the runs an old one trained. Of several old runs
        with one normal form (e.g. momentum 0 and 0.0) the finished, else the latest, is
        kept. A config this version cannot read is left as it was."""
        from rankbias.training.config import RunConfig

        best: dict[str, tuple] = {}  # new id -> (preference, old id, normal form)
        readable = []
        rows = self.db.execute("SELECT run_id, config, status, finished FROM runs").fetchall()
        for run_id, config, status, finished in rows:
            try:
                cfg = RunConfig.from_dict(json.loads(config))
            except (RankbiasError, ValueError, TypeError):
                continue
            readable.append(run_id)
            preference = (status in FINISHED, finished or 0.0)
            if cfg.run_id() not in best or preference > best[cfg.run_id()][0]:
                best[cfg.run_id()] = (preference, run_id, cfg.to_dict())
        kept = {old for _, old, _ in best.values()}
        superseded = [run_id for run_id in readable if run_id not in kept]
        for run_id in superseded:
            for table in ("runs", "metrics", "spectra"):
                self.db.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
        for new_id, (_, old_id, config) in best.items():
            for table in ("runs", "metrics", "spectra"):
                self.db.execute(f"UPDATE {table} SET run_id=? WHERE run_id=?", (new_id, old_id))
            self.db.execute("UPDATE runs SET config=? WHERE run_id=?",
                            (_canonical(config), new_id))

    # --- writing ------------------------------------------------------------------------
    def status(self, run_id: str) -> str | None:
        row = self.db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row[0] if row else None

    def statuses(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT run_id, status FROM runs"))

    def add_pending(self, configs: Iterable) -> None:
        """Record configs not in the store yet as pending (never touches existing runs)."""
        now = time.time()
        with self.transaction():
            self.db.executemany(
                "INSERT OR IGNORE INTO runs (run_id, status, config, seed, created) "
                "VALUES (?, 'pending', ?, ?, ?)",
                ((c.run_id(), _canonical(c.to_dict()), c.seed, now) for c in configs))

    def claim(self, run_id: str, config: dict, owner: str | None = None,
              lease_s: float = LEASE_S) -> bool:
        """Take a run for training, atomically: True when it was free (new, pending,
        failed, or running under a claim that lapsed or whose driver on this machine is
        dead), False when it is finished or another live driver has it."""
        owner, now = owner or owner_id(), time.time()
        with self.transaction():
            row = self.db.execute("SELECT status, owner, lease_until FROM runs WHERE run_id=?",
                                  (run_id,)).fetchone()
            if row is not None:
                status, holder, lease_until = row
                if status in FINISHED:
                    return False
                if status == "running" and holder != owner and not _lapsed(holder, lease_until,
                                                                            now):
                    return False
            self.db.execute(
                "INSERT INTO runs (run_id, status, config, seed, created, started, owner, "
                "lease_until) VALUES (?, 'running', ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO "
                "UPDATE SET status='running', error=NULL, started=excluded.started, "
                "owner=excluded.owner, lease_until=excluded.lease_until",
                (run_id, _canonical(config), config.get("seed"), now, now, owner,
                 now + lease_s))
        return True

    def renew(self, run_ids: Iterable[str], owner: str | None = None,
              lease_s: float = LEASE_S) -> None:
        """Extend this driver's claims on runs still in training."""
        owner, until = owner or owner_id(), time.time() + lease_s
        with self.transaction():
            self.db.executemany(
                "UPDATE runs SET lease_until=? WHERE run_id=? AND owner=? AND status='running'",
                ((until, run_id, owner) for run_id in run_ids))

    def release(self, run_ids: Iterable[str], owner: str | None = None) -> None:
        """Give back claims without a result (Ctrl-C): the runs are pending again."""
        owner = owner or owner_id()
        with self.transaction():
            self.db.executemany(
                "UPDATE runs SET status='pending', owner=NULL, lease_until=NULL "
                "WHERE run_id=? AND owner=? AND status='running'",
                ((run_id, owner) for run_id in run_ids))

    def mark(self, run_id: str, config: dict, status: str, error: str | None = None) -> None:
        """Record a run as pending/running/failed without results (keeps its creation time)."""
        now = time.time()
        with self.transaction():
            self.db.execute(
                "INSERT INTO runs (run_id, status, config, seed, created, started, error, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                "status=excluded.status, error=excluded.error, owner=excluded.owner, "
                "lease_until=NULL, started=COALESCE(excluded.started, runs.started)",
                (run_id, status, _canonical(config), config.get("seed"), now,
                 now if status == "running" else None, error,
                 owner_id() if status == "running" else None))

    def save_result(self, result) -> None:
        """Write a finished `RunResult` (rows, spectra, status) in one transaction."""
        p = result.provenance
        with self.transaction():
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
                "finished=excluded.finished, wall_s=excluded.wall_s, owner=NULL, "
                "lease_until=NULL",
                (result.run_id, result.status, _canonical(result.config),
                 result.config.get("seed"), p.get("code_version"),
                 to_json(p.get("library_versions", {})), to_json(p),
                 to_json(result.summary), result.error, result.diverged_step, result.epochs,
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

    def summary(self, run_id: str) -> dict | None:
        """The summary of one run (its headline numbers), None when it has none."""
        row = self.db.execute("SELECT summary FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def spectra_counts(self) -> dict[str, int]:
        """How many spectra each run has stored (runs without any are absent)."""
        return dict(self.db.execute("SELECT run_id, COUNT(*) FROM spectra GROUP BY run_id"))

    def spectra_rows(self, run_id: str) -> list[tuple[int, int, str, np.ndarray]]:
        """(step, epoch, layer, singular values) of one run, by step and layer."""
        rows = self.db.execute("SELECT step, epoch, layer, sigma FROM spectra WHERE run_id=? "
                               "ORDER BY step, layer", (run_id,))
        return [(s, e, layer, np.frombuffer(blob, dtype=np.float64)) for s, e, layer, blob in rows]

    def epoch_of_step(self, run_id: str, step: int) -> int | None:
        """The epoch at which a run recorded its spectra of `step`."""
        return self.db.execute("SELECT MAX(epoch) FROM spectra WHERE run_id=? AND step=?",
                               (run_id, step)).fetchone()[0]

    def spectra(self, run_id: str, step: int | None = None) -> dict[tuple[int, str], np.ndarray]:
        """Singular values by (step, layer) for one run (one step, or all)."""
        query, args = "SELECT step, layer, sigma FROM spectra WHERE run_id=?", [run_id]
        if step is not None:
            query += " AND step=?"
            args.append(step)
        return {(s, layer): np.frombuffer(blob, dtype=np.float64)
                for s, layer, blob in self.db.execute(query, args)}


def _canonical(config: dict) -> str:
    return to_json(config, sort_keys=True, separators=(",", ":"))


def owner_id() -> str:
    """Who claims runs: this process, as host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _lapsed(owner: str | None, lease_until: float | None, now: float) -> bool:
    """A claim is void when its lease ran out, or when its driver ran on this machine and
    is gone (a SIGKILLed sweep's runs are free at once, not after the lease)."""
    if owner is None or lease_until is None or lease_until < now:
        return True
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _summary_numbers(text: str | None) -> dict:
    keys = ("init_avg_rank", "final_avg_rank", "train_acc", "test_acc", "decay_budget",
            "final_avg_qk_rank", "final_avg_ov_rank")  # the last two: models with attention
    summary = json.loads(text) if isinstance(text, str) else {}
    return {k: summary.get(k) for k in keys}


def load_runs(path: str | os.PathLike) -> pd.DataFrame:
    """All runs of the store at `path`, one row each (see `Store.runs`)."""
    with open_store(path, readonly=True) as store:
        return store.runs()


def load_metrics(path: str | os.PathLike, run_ids: Iterable[str] | None = None,
                 metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Tidy long-form metrics of the store at `path` (see `Store.metrics`)."""
    with open_store(path, readonly=True) as store:
        return store.metrics(run_ids, metrics)


def checkpoint_dir_for(store_path: str | os.PathLike) -> Path:
    """Where the runs of this store keep their checkpoints: `<name>-checkpoints/` beside
    it (results.db -> results-checkpoints/), so two stores in one folder never share
    checkpoints; reusing another folder is explicit (--checkpoint-dir)."""
    path = Path(store_path).resolve()
    return path.parent / f"{path.stem}-checkpoints"


def open_store(path: str | os.PathLike, must_exist: bool = False,
               readonly: bool = False) -> Store:
    """The store at `path`; `must_exist`: a missing file is an error, not a new store;
    `readonly`: an existing store, opened to read without ever taking its write lock."""
    if (must_exist or readonly) and not os.path.isfile(path):
        raise RankbiasError(f"no results store at {path}: run `rankbias train` or "
                            "`rankbias sweep` with --store first")
    return Store(path, readonly=readonly)
