"""The SLURM backend without a cluster: the dry run, bad input, the task's checkpointing
(under submitit's local executor) and the reading of squeue. The backend itself is proven
on a real SLURM in tests/test_slurm_cluster.py."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from rankbias.cli.main import main
from rankbias.runs.backends.tasks import execute_task
from rankbias.training.config import RunConfig

TINY = {"model": "mlp", "model_args": {"depth": 2, "width": 16}, "dataset": "digits",
        "dataset_args": {"subset": 300}, "epochs": 3, "device": "cpu"}
GRID = {"base": TINY, "grid": {"batch_size": [16, 32], "lr": [0.1, 0.2]}}
SCRIPT = "job script (what sbatch gets):\n"


def write_yaml(path, spec) -> str:
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_dry_run_prints_the_stacks_the_array_and_its_script(tmp_path, capsys):
    pytest.importorskip("submitit")
    path = write_yaml(tmp_path / "grid.yaml", GRID)
    store = tmp_path / "s.db"
    assert main(["sweep", path, "--store", str(store), "--backend", "slurm", "--dry-run",
                 "--slurm-parallelism", "2", "--slurm-partition", "gpu",
                 "--slurm-gpus-per-task", "1", "--slurm-time", "30", "--slurm-mem", "8G",
                 "--slurm-account", "lab", "--slurm-qos", "high", "--slurm-opt",
                 "constraint=a100", "--slurm-opt", "exclusive"]) == 0
    out = capsys.readouterr().out
    head, script = out.split(SCRIPT)
    assert "one job array of 2 tasks" in head  # one stack per batch size, 2 runs each
    for cfg in [RunConfig.from_dict({**TINY, "batch_size": b, "lr": lr})
                for b in (16, 32) for lr in (0.1, 0.2)]:
        assert cfg.run_id() in head
    lines = set(script.splitlines())
    folder = tmp_path / "s-slurm"
    for line in ["#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --time=30", "#SBATCH --mem=8G", "#SBATCH --account=lab",
                 "#SBATCH --qos=high", "#SBATCH --constraint=a100", "#SBATCH --exclusive",
                 "#SBATCH --signal=USR2@90", f"#SBATCH --output={folder}/%A_%a_0_log.out"]:
        assert line in lines
    assert any(sys.executable in line and "submitit.core._submit" in line for line in lines)
    assert not store.exists() and not folder.exists()  # a dry run writes nothing


@pytest.mark.parametrize("flags,words", [
    (["--run-timeout", "10"], "--slurm-time"),
    (["--slurm-time", "0"], "--slurm-time must be"),
    (["--slurm-parallelism", "0"], "--slurm-parallelism must be"),
    (["--slurm-opt", "=x"], "--slurm-opt takes"),
])
def test_bad_slurm_input_exits_2_and_writes_nothing(tmp_path, capsys, flags, words):
    path = write_yaml(tmp_path / "grid.yaml", GRID)
    store = tmp_path / "s.db"
    assert main(["sweep", path, "--store", str(store), "--backend", "slurm", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not store.exists()


def test_no_submitit_or_no_sbatch_is_one_line_saying_what_to_do(tmp_path, capsys, monkeypatch):
    path = write_yaml(tmp_path / "grid.yaml", GRID)
    store, out = tmp_path / "s.db", tmp_path / "out"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "submitit", None)  # as if not installed
        assert main(["sweep", path, "--store", str(store), "--backend", "slurm"]) == 2
        assert "pip install 'rankbias[slurm]'" in capsys.readouterr().err
    pytest.importorskip("submitit")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert main(["sweep", path, "--store", str(store), "--backend", "slurm"]) == 2
    assert "sbatch" in capsys.readouterr().err
    assert main(["reproduce", "4", "--out", str(out), "--backend", "slurm"]) == 2
    assert "login node" in capsys.readouterr().err
    assert not store.exists() and not out.exists()


def test_checkpoint_stops_requeueing_a_task_after_two_attempts_without_progress(tmp_path):
    pytest.importorskip("submitit")
    from submitit.helpers import DelayedSubmission

    from rankbias.runs.backends.slurm import SlurmTask, _mtime

    configs = [RunConfig.from_dict(TINY).to_dict()]
    paths = SlurmTask._paths(configs, str(tmp_path))

    def signalled(task: SlurmTask, epochs: int) -> DelayedSubmission | None:
        """The attempt `task` starts, trains `epochs` epochs and is signalled."""
        task.at_start = {p: _mtime(p) for p in paths}  # what __call__ notes when it starts
        for epoch in range(epochs):
            time.sleep(0.01)  # a later mtime than the last attempt's
            paths[0].write_bytes(f"epoch {epoch}'s checkpoint".encode())
        return task.checkpoint(configs, str(tmp_path))

    again = signalled(SlurmTask(), 0)  # signalled before its first epoch: requeued once
    assert isinstance(again, DelayedSubmission) and again.args == (configs, str(tmp_path))
    assert isinstance(again.function, SlurmTask) and again.function.stalled == 1
    assert signalled(again.function, 0) is None  # twice in a row: the limit is too short
    progressed = signalled(again.function, 2)
    assert progressed.function.stalled == 0  # an epoch since: the count starts again
    assert signalled(progressed.function, 0).function.stalled == 1
    assert signalled(SlurmTask(stalled=1), 1).function.stalled == 0


def test_preempted_task_resumes_bit_identically_under_submitits_local_executor(tmp_path):
    """SIGUSR2 (what SLURM sends before a time limit or on preemption) in the middle of a
    stack: submitit checkpoints and requeues the task; it resumes from its members'
    checkpoints and ends with the numbers of an uninterrupted run."""
    submitit = pytest.importorskip("submitit")
    from rankbias.runs.backends.slurm import SlurmTask

    configs = [RunConfig.from_dict({**TINY, "epochs": 120, "track_every": 20, "lr": lr}).to_dict()
               for lr in (0.1, 0.2)]
    ckpt = tmp_path / "ckpt"
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(SlurmTask(), configs, str(ckpt))
    deadline = time.monotonic() + 300
    while not any(ckpt.glob("*.pt")):  # the members wrote their first epoch's checkpoint
        assert time.monotonic() < deadline and not job.done(), job.stderr()
        time.sleep(0.05)
    # SIGUSR2 to the task itself, as SLURM signals the job step (submitit's local
    # job._interrupt() signals its controller process, which does not pass USR2 on)
    for pid in _children(int(job.job_id)):
        os.kill(pid, signal.SIGUSR2)
    results = job.result()
    assert "2 runs, 2 resume from their checkpoints" in job.stdout()
    reference = execute_task(configs, None)
    assert [r.run_id for r in results] == [r.run_id for r in reference]
    for ours, theirs in zip(results, reference):
        assert ours.status == theirs.status == "done"
        assert ours.config == theirs.config  # as sent (the task's own checkpoint_every not kept)
        assert [row for row in ours.rows if row[3] != "wall_s"] == \
            [row for row in theirs.rows if row[3] != "wall_s"]


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            pass
    return found


def test_squeue_answers_are_read_per_array_task(tmp_path, monkeypatch):
    from rankbias.runs.backends.slurm import describe_states, job_states

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text(
        "#!/bin/sh\ncase \"$*\" in *-j\\ 99*) echo 'slurm_load_jobs error: Invalid job id "
        "specified' >&2; exit 1;; esac\nprintf '7_0|COMPLETED\\n7_1|RUNNING\\n7_2|PENDING\\n'\n")
    (fake / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    assert job_states(["7_1", "7_2"]) == {"7_0": "COMPLETED", "7_1": "RUNNING",
                                          "7_2": "PENDING"}
    assert job_states(["99_0"]) == {}  # forgotten by the controller: ended
    assert job_states([]) == {}
    assert describe_states(["7_1", "7_5"]) == {"7_1": "RUNNING", "7_5": "ENDED"}


def test_a_job_killed_without_a_result_is_submitted_again_then_failed(tmp_path, monkeypatch):
    """A job that leaves squeue with no result file (killed by SLURM: a node failure, a
    requeue that raced its step's end) is submitted again, twice at most, its runs resuming
    from their checkpoints; then its runs fail, naming the job and its log."""
    from rankbias.runs.backends import slurm
    from rankbias.runs.backends.tasks import TaskQueue
    from rankbias.runs.store import Store

    submitted = []

    def fake_submit(tasks, checkpoint_dir, options, folder):
        submitted.append([[c.run_id() for c in task] for task in tasks])
        return [f"{len(submitted)}_0"]

    monkeypatch.setattr(slurm, "submit", fake_submit)
    monkeypatch.setattr(slurm, "job_states", lambda ids: {})  # every job gone from squeue
    monkeypatch.setattr(slurm, "describe_states", lambda ids: {i: "FAILED" for i in ids})
    monkeypatch.setattr(slurm, "RESULT_GRACE_S", 0.0)
    monkeypatch.setattr(slurm, "SQUEUE_S", 0.0)
    monkeypatch.setattr(slurm, "CHECK_S", 0.0)
    configs = [RunConfig(**TINY, lr=lr) for lr in (0.1, 0.2)]
    recorded = []
    with Store(tmp_path / "s.db") as store:
        driver = slurm.SlurmDriver(TaskQueue(store, [configs]), str(tmp_path / "ckpt"),
                                   slurm.SlurmOptions(), recorded.append, tmp_path / "jobs")
        driver.run()
    ids = sorted(c.run_id() for c in configs)
    assert [sorted(task) for tasks in submitted for task in tasks] == [ids] * 3
    assert [r.status for r in recorded] == ["failed", "failed"]
    assert all("SLURM job 3_0 ended (FAILED) without a result" in r.error for r in recorded)
