"""The SLURM backend on a real single-node SLURM (the `slurm_cluster` fixture of conftest.py:
munged, slurmctld and slurmd on this machine; skipped where they cannot start).

Nothing here waits for a fixed time: every wait is for a condition (a file, a job state, a
store row) with a generous deadline.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_slurm import SCRIPT, TINY, write_yaml

from rankbias.cli.main import main
from rankbias.runs.slurm_jobs import recorded_jobs
from rankbias.runs.store import Store, checkpoint_dir_for
from rankbias.runs.sweep import load_sweep, run_sweep
from rankbias.training.config import RunConfig

DEADLINE_S = 600.0


def wait_for(condition, what: str, deadline_s: float = DEADLINE_S, every: float = 0.2):
    """condition()'s first truthy value, polled; fails the test after `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {deadline_s:.0f} s for {what}")
        time.sleep(every)


def squeue() -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} of every job the controller knows."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r"],
                         capture_output=True, text=True, check=True).stdout
    return {i: (s, r) for i, s, r in (line.split("|") for line in out.split())}


def release_requeued_jobs() -> None:
    """SLURM holds a requeued job for about two minutes (Reason=BeginTime) before it may
    start again; let it start now. This changes when the task runs again, not what it does."""
    for job_id, (state, reason) in squeue().items():
        if state == "PENDING" and reason == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                           capture_output=True)


def metrics(store: Path):
    """Every metric row but the timings, in a fixed order."""
    with Store(store) as s:
        return s.metrics().query("metric != 'wall_s'").reset_index(drop=True)


def runs_in(store: Path):
    with Store(store) as s:
        return s.runs()


def jobs_in(store: Path) -> dict:
    """The store's recorded SLURM jobs ({} before the driver made the store)."""
    if not store.exists():
        return {}
    with Store(store) as s:
        return recorded_jobs(s)


def sweep_command(path: str, store: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "rankbias.cli.main", "sweep", path, "--store", str(store),
            "--no-progress", *flags]


def successes(folder: Path) -> Counter:
    """How many times each run id came back in a successful task result in `folder`."""
    from submitit.core.utils import pickle_load

    counts: Counter = Counter()
    for path in folder.glob("*_result.pkl"):
        outcome, value = pickle_load(path)
        if outcome == "success":
            counts.update(r.run_id for r in value)
    return counts


def test_a_grid_through_slurm_has_the_local_backends_run_ids_and_numbers(slurm_cluster,
                                                                         tmp_path, capsys):
    path = write_yaml(tmp_path / "grid.yaml",
                      {"base": TINY, "grid": {"batch_size": [16, 32], "lr": [0.1, 0.2]}})
    store = tmp_path / "s.db"
    flags = ["--backend", "slurm", "--slurm-parallelism", "2", "--slurm-time", "10"]
    assert main(["sweep", path, "--store", str(store), "--dry-run", *flags]) == 0
    script = capsys.readouterr().out.split(SCRIPT)[1]
    assert main(["sweep", path, "--store", str(store), "--format", "json", "--no-progress",
                 *flags]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["executed"], summary["failed"]) == (4, 0)
    submitted = list((tmp_path / "s-slurm").glob("*_submission.sh"))
    assert len(submitted) == 1 and submitted[0].read_text() == script  # the dry run's script
    assert "#SBATCH --array=0-1%2" in script
    local = run_sweep(load_sweep(path), tmp_path / "local.db", workers=2, progress=False)
    assert (local.executed, local.failed) == (4, 0)
    ours, theirs = runs_in(store), runs_in(tmp_path / "local.db")
    assert sorted(ours.run_id) == sorted(theirs.run_id) and set(ours.status) == {"done"}
    assert len(metrics(store)) > 0 and metrics(store).equals(metrics(tmp_path / "local.db"))
    assert jobs_in(store) == {}  # results in: no job left to wait for


def test_a_job_sbatch_refuses_is_one_line_and_leaves_the_runs_pending(slurm_cluster,
                                                                     tmp_path, capsys):
    path = write_yaml(tmp_path / "grid.yaml", {"base": TINY, "grid": {"lr": [0.1, 0.2]}})
    store = tmp_path / "s.db"
    assert main(["sweep", path, "--store", str(store), "--backend", "slurm",
                 "--slurm-partition", "nosuch", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sbatch refused" in err[0] and "nosuch" in err[0]
    assert set(runs_in(store).status) == {"pending"} and jobs_in(store) == {}


def test_killed_driver_and_cancelled_job_then_a_rerun_trains_every_run_once(slurm_cluster,
                                                                            tmp_path, capsys):
    """Three stacks, one task at a time. The driver is SIGKILLed while task 0 trains; task 0
    then finishes with no driver to collect it; task 1 is cancelled midway (scancel); task 2
    is still queued or running. The same command again reads task 0's result, submits task
    1's runs again (resuming from their checkpoints), waits for task 2, and every run is
    done, each trained to the end once."""
    spec = {"base": {**TINY, "epochs": 400, "track_every": 50, "batch_size": 16,
                     "dataset_args": {"subset": 600}},
            "grid": {"model_args.width": [16, 20, 24], "lr": [0.1, 0.2]}}  # 3 stacks of 2
    path = write_yaml(tmp_path / "grid.yaml", spec)
    store, folder = tmp_path / "s.db", tmp_path / "s-slurm"
    ckpt = checkpoint_dir_for(store)
    flags = ["--backend", "slurm", "--slurm-parallelism", "1", "--slurm-time", "30"]
    driver = subprocess.Popen(sweep_command(path, store, *flags), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    jobs = wait_for(lambda: len(jobs_in(store)) == 6 and jobs_in(store), "the six job ids")
    tasks = {}  # array task -> (its job id, its runs)
    for run_id, (job, _) in jobs.items():
        tasks.setdefault(int(job.split("_")[1]), (job, []))[1].append(run_id)
    (job0, runs0), (job1, runs1), (job2, runs2) = tasks[0], tasks[1], tasks[2]

    def checkpointed(runs: list[str]) -> bool:
        return all((ckpt / f"{r}.pt").exists() for r in runs)

    wait_for(lambda: checkpointed(runs0), "task 0 to write its first checkpoints")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    wait_for(lambda: (folder / f"{job0}_0_result.pkl").exists(), "task 0 to finish")
    wait_for(lambda: checkpointed(runs1), "task 1 to write its first checkpoints")
    subprocess.run(["scancel", job1], check=True)
    wait_for(lambda: squeue().get(job1, ("CANCELLED",))[0] == "CANCELLED", "the cancel")
    assert not (folder / f"{job1}_0_result.pkl").exists()  # cancelled midway, not after

    assert main(["runs", "--store", str(store)]) == 0  # unfinished runs show their job
    table = {line.split()[0]: line.split()[1:4] for line in
             capsys.readouterr().out.splitlines()[1:]}
    assert all(table[r] == ["running", job0, "COMPLETED"] for r in runs0)
    assert all(table[r] == ["running", job1, "CANCELLED"] for r in runs1)
    assert all(table[r][1] == job2 and table[r][2] in ("PENDING", "RUNNING", "COMPLETED")
               for r in runs2)  # queued or running now (done, should this process lag)

    assert main(["sweep", path, "--store", str(store), "--format", "json", "--no-progress",
                 *flags]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["total"], summary["executed"], summary["failed"]) == (6, 6, 0)
    runs = runs_in(store)
    assert len(runs) == 6 and set(runs.status) == {"done"}
    assert successes(folder) == Counter({r: 1 for r in runs.run_id})  # each trained once
    scripts = sorted(folder.glob("*_submission.sh"))
    assert len(scripts) == 2 and "--array=0-2%1" in scripts[0].read_text()
    assert "--array" not in scripts[1].read_text()  # only task 1's runs went again: one job
    again = scripts[1].name.split("_")[0]
    assert "2 runs, 2 resume from their checkpoints" in (folder / f"{again}_0_log.out"
                                                         ).read_text()
    with Store(store) as s:
        rows = s.metrics()
    assert not rows.duplicated(["run_id", "step", "layer", "metric"]).any()
    assert jobs_in(store) == {}


def _epochs_for(base: dict, seconds: float) -> int:
    """Epochs of a stack of two `base` runs that take about `seconds` on this machine now,
    measured in this process, in tens (the tracking interval)."""
    from rankbias.training.ensemble import train_ensemble

    probe = [RunConfig.from_dict({**base, "epochs": 20, "lr": lr}) for lr in (0.1, 0.2)]
    started = time.perf_counter()
    train_ensemble(probe)
    per_epoch = (time.perf_counter() - started) / 20
    return 10 * math.ceil(seconds / per_epoch / 10)


def test_a_task_past_its_time_limit_requeues_and_resumes_bit_identically(slurm_cluster,
                                                                        tmp_path):
    """A one-minute limit, signalled 10 s before it. SLURM's controller checks limits every
    30 s and signals at the first check that finds at most 10 + 30 s left (measured here:
    it signals early, never late), so SIGUSR2 comes 20 to 50 s into the task: late enough
    for a loaded node to import torch and write the first checkpoints, before the end of a
    stack that trains ~60 s. submitit requeues the task, which resumes from the members'
    checkpoints and ends with the numbers of the local backend. Should this machine run the
    task faster than measured, and the task finish before the signal, the epochs double."""
    base = {**TINY, "dataset_args": {"subset": 1000}, "batch_size": 8, "track_every": 10}
    epochs = _epochs_for(base, seconds=60)
    for attempt in range(3):
        spec = {"base": {**base, "epochs": epochs}, "grid": {"lr": [0.1, 0.2]}}
        path = write_yaml(tmp_path / f"grid{attempt}.yaml", spec)
        store, folder = tmp_path / f"s{attempt}.db", tmp_path / f"s{attempt}-slurm"
        driver = subprocess.Popen(
            sweep_command(path, store, "--backend", "slurm", "--slurm-parallelism", "1",
                          "--slurm-time", "1", "--slurm-signal-delay", "10"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        local = subprocess.Popen(  # the reference, on the other core meanwhile
            sweep_command(path, tmp_path / f"local{attempt}.db", "--workers", "1"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def ended(driver=driver) -> bool:
            release_requeued_jobs()
            return driver.poll() is not None

        wait_for(ended, "the sweep through SLURM to end", every=0.5)
        assert driver.returncode == 0, driver.stderr.read()
        assert local.wait(timeout=DEADLINE_S) == 0, local.stderr.read()
        log = "".join(p.read_text() for p in folder.glob("*_log.out"))
        if "2 runs, 2 resume from their checkpoints" in log:
            break
        epochs *= 2  # finished before the signal: this machine ran faster than measured
    else:
        pytest.fail("the task never reached its time limit")
    assert "Requeued job" in "".join(p.read_text() for p in folder.glob("*_log.*"))
    assert runs_in(store).status.tolist() == ["done", "done"]
    assert metrics(store).equals(metrics(tmp_path / f"local{attempt}.db"))
