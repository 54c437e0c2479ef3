"""Which SLURM job trains which run: the `slurm_jobs` table of the results store.

    run_id | job_id ("1234_5": array 1234, task 5) | folder (the job folder, where the
    job's result and logs land) | submitted (time)

The driver writes a row for every run it submits, right after sbatch answers, and deletes
it once the run's result is in the store; so the rows are the runs whose jobs may still
be queued, running, or finished without a driver to collect them. A rerun of the sweep
reads them to wait for those jobs instead of submitting the runs twice, and `rankbias runs`
to show each unfinished run's job. The table is created on first write, so stores that
never used SLURM stay as they are (and a reader never writes).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from rankbias.runs.store import Store

TABLE = """CREATE TABLE IF NOT EXISTS slurm_jobs (
    run_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, folder TEXT NOT NULL, submitted REAL NOT NULL
)"""


def _exists(store: Store) -> bool:
    return store.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                            "name='slurm_jobs'").fetchone() is not None


def record_jobs(store: Store, rows: Iterable[tuple[str, str, str]]) -> None:
    """Remember (run_id, job_id, folder) for each run just submitted."""
    now = time.time()
    with store.transaction():
        store.db.execute(TABLE)
        store.db.executemany(
            "INSERT INTO slurm_jobs (run_id, job_id, folder, submitted) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(run_id) DO UPDATE SET job_id=excluded.job_id, "
            "folder=excluded.folder, submitted=excluded.submitted",
            ((run_id, job_id, folder, now) for run_id, job_id, folder in rows))


def recorded_jobs(store: Store, run_ids: Iterable[str] | None = None
                  ) -> dict[str, tuple[str, str]]:
    """{run_id: (job_id, folder)} of the runs with a recorded job (all, or those asked)."""
    if not _exists(store):
        return {}
    rows = store.db.execute("SELECT run_id, job_id, folder FROM slurm_jobs").fetchall()
    wanted = None if run_ids is None else set(run_ids)
    return {r: (j, f) for r, j, f in rows if wanted is None or r in wanted}


def forget_jobs(store: Store, run_ids: Iterable[str]) -> None:
    """Drop the rows of these runs (their result is in the store, or their job is gone)."""
    run_ids = list(run_ids)
    if not run_ids or not _exists(store):
        return
    with store.transaction():
        store.db.executemany("DELETE FROM slurm_jobs WHERE run_id=?", ((r,) for r in run_ids))
