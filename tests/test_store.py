"""The store: 0.1.0 stores keep working, runs are claimed atomically, JSON is strict."""

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys

import pytest

from rankbias.runs.store import Store, owner_id
from rankbias.runs.sweep import run_sweep
from rankbias.training.config import RunConfig
from rankbias.training.train import train_run

TINY = dict(model_args={"depth": 2, "width": 16}, dataset_args={"subset": 200}, epochs=2,
            batch_size=32, device="cpu")

V010_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT NOT NULL, config TEXT NOT NULL,
    seed INTEGER, code_version TEXT, library_versions TEXT, provenance TEXT, summary TEXT,
    error TEXT, diverged_step INTEGER, epochs INTEGER, steps INTEGER, created REAL,
    started REAL, finished REAL, wall_s REAL);
CREATE TABLE metrics (run_id TEXT NOT NULL, step INTEGER NOT NULL, epoch INTEGER NOT NULL,
    layer TEXT NOT NULL, metric TEXT NOT NULL, value REAL);
CREATE TABLE spectra (run_id TEXT NOT NULL, step INTEGER NOT NULL, epoch INTEGER NOT NULL,
    layer TEXT NOT NULL, sigma BLOB NOT NULL);
"""


def write_v010_store(path, runs):
    """A store as rankbias 0.1.0 wrote it: ids hashed from the config as spelled."""
    db = sqlite3.connect(path)
    db.executescript(V010_SCHEMA)
    for old_id, config, status, finished in runs:
        db.execute("INSERT INTO runs (run_id, status, config, seed, summary, finished) "
                   "VALUES (?, ?, ?, 0, '{}', ?)", (old_id, status, json.dumps(config), finished))
        db.execute("INSERT INTO metrics VALUES (?, 0, 0, '', 'avg_rank', ?)", (old_id, finished))
    db.commit()
    db.close()


def test_a_010_store_is_rekeyed_and_its_runs_are_matched(tmp_path):
    spelled = {**TINY, "momentum": 0, "model_args": {"depth": 2, "width": 16}}
    path = tmp_path / "old.db"
    write_v010_store(path, [("aaaaaaaaaaaaaaaa", spelled, "done", 2.0),
                            ("bbbbbbbbbbbbbbbb", {**spelled, "momentum": 0.0}, "failed", 1.0),
                            ("cccccccccccccccc", {"model": "no-such-model"}, "done", 1.0)])
    cfg = RunConfig.from_dict(TINY)
    with Store(path) as store:
        runs = store.runs().set_index("run_id")
        assert set(runs.index) == {cfg.run_id(), "cccccccccccccccc"}  # one run, one id
        assert runs.loc[cfg.run_id(), "status"] == "done"  # the finished twin is kept
        assert store.metrics(run_ids=[cfg.run_id()]).value.tolist() == [2.0]
    summary = run_sweep([cfg], path, workers=1, progress=False)
    assert (summary.skipped, summary.executed) == (1, 0)  # not trained again


def test_claims_are_exclusive_until_finished_or_lapsed(tmp_path):
    cfg = RunConfig(**TINY).to_dict()
    with Store(tmp_path / "s.db") as store:
        assert store.claim("r1", cfg, owner="host-a:1")
        assert not store.claim("r1", cfg, owner="host-b:2")  # held by a live driver
        assert store.claim("r1", cfg, owner="host-a:1")  # its own claim, again
        assert store.claim("r2", cfg, owner="host-a:1", lease_s=-1)
        assert store.claim("r2", cfg, owner="host-b:2")  # the lease ran out
        finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout.strip()
        dead = f"{owner_id().rpartition(':')[0]}:{finished}"
        assert store.claim("r3", cfg, owner=dead)
        assert store.claim("r3", cfg, owner="host-b:2")  # its driver on this host is gone
        store.release(["r3"], owner="host-b:2")
        assert store.status("r3") == "pending"
        result = train_run(RunConfig(**TINY))
        store.save_result(result)
        assert not store.claim(result.run_id, cfg)  # finished: never claimed again


def _open_store(path: str, start, results) -> None:
    start.wait()
    try:
        Store(path).close()
        results.put("ok")
    except Exception as err:  # the test reports whatever went wrong
        results.put(repr(err))


def test_drivers_opening_one_new_store_at_once_all_get_it(tmp_path):
    """Switching a new file to WAL needs it alone, and SQLite refuses that at once (no busy
    wait) when another process is opening it too: a store opened by two drivers at the
    same moment once failed as "not a rankbias results store (database is locked)" (about
    1 pair in 40 here). Four processes open each of 20 new stores together."""
    context = multiprocessing.get_context("fork")
    for i in range(20):
        start, results = context.Event(), context.Queue()
        procs = [context.Process(target=_open_store, args=(str(tmp_path / f"{i}.db"), start,
                                                            results)) for _ in range(4)]
        for proc in procs:
            proc.start()
        start.set()
        outcomes = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join()
        assert outcomes == ["ok"] * 4, outcomes


def test_two_sweeps_on_one_store_train_each_run_once(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"base": TINY,
                                "grid": {"weight_decay": [0.0, 0.005, 0.01]},
                                "seeds": [0, 1]}))
    store = tmp_path / "s.db"
    cmd = [sys.executable, "-m", "rankbias.cli.main", "sweep", str(grid), "--store", str(store),
           "--workers", "1", "--ensemble", "off", "--no-progress", "--format", "json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sum(s["executed"] for s in summaries) == 6  # each run trained by one of them
    assert all(s["executed"] + s["by_others"] + s["skipped"] == 6 for s in summaries)
    with Store(store) as db:
        assert set(db.runs().status) == {"done"}
        per_run = db.metrics(metrics=["avg_rank"]).groupby("run_id").size()
        assert len(per_run) == 6 and per_run.nunique() == 1  # none recorded twice


def test_run_timeout_fails_the_run_and_the_sweep_goes_on(tmp_path):
    slow = RunConfig(**{**TINY, "epochs": 2000, "dataset_args": {}})
    quick = RunConfig(**TINY)
    summary = run_sweep([slow, quick], tmp_path / "s.db", workers=1, ensemble="off",
                        run_timeout=3, progress=False)
    assert (summary.executed, summary.failed) == (2, 1)
    with Store(tmp_path / "s.db") as store:
        runs = store.runs().set_index("run_id")
    assert runs.loc[slow.run_id(), "status"] == "failed"
    assert "timed out after 3 s" in runs.loc[slow.run_id(), "error"]
    assert runs.loc[quick.run_id(), "status"] == "done"


def test_available_cpus_honours_cgroup_quota_and_slurm(tmp_path, monkeypatch):
    from rankbias.utils import available_cpus

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: at least one worker
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert available_cpus(tmp_path) == 1


def test_readers_are_not_blocked_by_a_writing_sweep(tmp_path, capsys):
    """`rankbias runs` and `rankbias report` complete while another connection holds the
    store's write lock in an open transaction (as a sweep does while it saves a run); they
    see the last committed state. A writer in that position would wait for the lock."""
    from rankbias.cli.main import main

    path = tmp_path / "s.db"
    with Store(path) as store:
        store.save_result(train_run(RunConfig(**TINY)))
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE runs SET status='failed'")  # not committed: readers never see it
    try:
        assert main(["runs", "--store", str(path), "--format", "json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [r["status"] for r in listed] == ["done"]
        assert main(["report", "--store", str(path), "--out", str(tmp_path / "r")]) == 0
        assert (tmp_path / "r" / "report.html").exists()
        with Store(path, readonly=True) as reader:
            assert reader.runs().status.tolist() == ["done"]
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader.db.execute("DELETE FROM runs")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
