"""The SLURM backend: one job array per sweep, one array task per stack of runs (submitit).

    rankbias sweep grid.yaml --backend slurm --slurm-partition gpu --slurm-gpus-per-task 1 \\
        --slurm-time 240 --slurm-parallelism 8
    rankbias sweep grid.yaml --backend slurm --dry-run    # the stacks and the job script

- The driver (on a login node) claims the runs in the store, groups them into stacks as
  the other backends do (`group_tasks`) and submits one array whose task i trains stack i
  (`SlurmTask`), at most --slurm-parallelism at once. The job ids are recorded in the
  store beside the claimed runs (`rankbias.runs.slurm_jobs`).
- A task writes each member's checkpoint every epoch into the checkpoint folder, which
  every node must see. Before the time limit (--slurm-signal-delay) or on preemption SLURM
  sends SIGUSR2; submitit then calls `SlurmTask.checkpoint` and requeues the same task,
  which resumes from those checkpoints bit-identically.
- submitit pickles a task's results into the job folder; the driver reads them there and
  alone writes the store (never SQLite on a network file system from many nodes). They
  stay on disk, so a driver that dies loses nothing: rerun the same command and runs whose
  job is still queued or running are waited for, runs whose job finished meanwhile are read
  from its result, runs whose job is gone without one are submitted again (and resume).
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rankbias.runs.backends.tasks import POLL_S, TaskQueue, execute_task, failed_result
from rankbias.runs.slurm_jobs import forget_jobs, record_jobs, recorded_jobs
from rankbias.training.checkpoint import checkpoint_path
from rankbias.training.config import RunConfig
from rankbias.training.train import RunResult
from rankbias.utils import RankbiasError

# Job states in which a task may still produce its result. PREEMPTED counts: with
# PreemptMode=REQUEUE it is the step before PENDING (with CANCEL, the job leaves squeue
# after MinJobAge and counts as gone then).
LIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
        "SUSPENDED", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "STOPPED",
        "RESV_DEL_HOLD", "PREEMPTED"}
CHECK_S = 1.0  # how often the driver looks for result files (a stat per task in flight)
SQUEUE_S = 10.0  # how often it asks squeue (the controller serves every user: not often)
RESULT_GRACE_S = 15.0  # a result written just before the job left squeue may show late (NFS)
# Requeues after a time-out that submitit allows a task. Each must make progress (see
# SlurmTask.checkpoint), so this only caps what a very long stack may need.
MAX_TIMEOUT_REQUEUES = 1000
# Times a task whose job ended without a result (killed by SLURM: a node failure, a requeue
# that raced the step's end, memory) is submitted again; its runs resume from their
# checkpoints. A task that raises writes its error as a result and is not retried.
RESUBMITS = 2
# Attempts in a row signalled before any member wrote a checkpoint, after which a task is
# not requeued (SlurmTask.checkpoint).
STALLED_ATTEMPTS = 2


@dataclass
class SlurmOptions:
    """What every array task asks SLURM for (the --slurm-* flags)."""

    partition: str | None = None
    time_min: int = 60  # per task; at the limit it checkpoints and is requeued
    cpus_per_task: int = 1  # a stack trains on one torch thread (docs/performance.md)
    gpus_per_task: int = 0  # 1 on a GPU partition: one stack per GPU
    mem: str | None = None  # e.g. 16G (default: the partition's)
    account: str | None = None
    qos: str | None = None
    parallelism: int = 16  # array tasks running at once (the %N of --array)
    signal_delay_s: int = 90  # SIGUSR2 this long (to 30 s more) before the time limit
    extra: dict = field(default_factory=dict)  # more #SBATCH lines: {key: value or True}
    folder: str | None = None  # job scripts, logs, results (default <store>-slurm/)

    def check(self) -> SlurmOptions:
        for name, flag, least in (("time_min", "time", 1), ("cpus_per_task", "cpus-per-task", 1),
                                  ("gpus_per_task", "gpus-per-task", 0),
                                  ("parallelism", "parallelism", 1),
                                  ("signal_delay_s", "signal-delay", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise RankbiasError(f"--slurm-{flag} must be a whole number >= {least}, got "
                                    f"{value!r}")
        return self

    def parameters(self) -> dict:
        """submitit's SlurmExecutor parameters (its names for the #SBATCH options)."""
        # wckey None: submitit's default adds --wckey=submitit, which a cluster that
        # enforces WCKeys would refuse; without it SLURM uses the user's default.
        p = {"job_name": "rankbias", "time": self.time_min, "cpus_per_task": self.cpus_per_task,
             "array_parallelism": self.parallelism, "signal_delay_s": self.signal_delay_s,
             "wckey": None}
        for key in ("partition", "mem", "account", "qos"):
            if getattr(self, key):
                p[key] = getattr(self, key)
        if self.gpus_per_task:
            p["gpus_per_task"] = self.gpus_per_task
        if self.extra:
            p["additional_parameters"] = dict(self.extra)
        return p


def slurm_dir_for(store_path: str | os.PathLike) -> Path:
    """The default job folder: `<name>-slurm/` beside the store (results.db -> results-slurm/)."""
    path = Path(store_path).resolve()
    return path.parent / f"{path.stem}-slurm"


def check_slurm(submitting: bool = True) -> None:
    """One-line errors, before anything is written, where this machine cannot submit."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise RankbiasError("the slurm backend needs submitit: pip install 'rankbias[slurm]'"
                            ) from None
    missing = [c for c in ("sbatch", "squeue", "srun") if shutil.which(c) is None]
    if submitting and missing:
        raise RankbiasError(f"{', '.join(missing)} not found on PATH: run the sweep on a SLURM "
                            "login node (--dry-run shows the job script anywhere)")


def prepare(options: SlurmOptions | None, run_timeout: float | None = None) -> SlurmOptions:
    """Every check of --backend slurm, made before anything is written: the options, the
    flags that do not apply, submitit and the SLURM commands."""
    options = (options or SlurmOptions()).check()
    if run_timeout is not None:
        raise RankbiasError("--run-timeout does not apply to --backend slurm: a task's limit "
                            "is --slurm-time (at which it checkpoints and requeues)")
    check_slurm()
    return options


# --- what an array task runs ------------------------------------------------------------------
class SlurmTask:
    """One array task: a stack of runs (or one run), each from its checkpoint if it has one.

    A module-level class, so its pickle names it and the job imports rankbias itself. Members
    checkpoint every epoch (their own checkpoint_every if set): `checkpoint_every` is not part
    of a run's identity and does not change its numbers. `stalled` counts the attempts in a
    row, before this one, that were signalled before any member wrote a checkpoint.
    """

    def __init__(self, stalled: int = 0) -> None:
        self.stalled = stalled

    def __call__(self, configs: list[dict], checkpoint_dir: str) -> list[RunResult]:
        import torch

        torch.set_num_threads(1)  # as the local workers: small stacks are fastest on one
        paths = self._paths(configs, checkpoint_dir)
        self.at_start = {p: _mtime(p) for p in paths}
        found = sum(t is not None for t in self.at_start.values())
        print(f"rankbias: {len(configs)} runs, {found} resume from their checkpoints in "
              f"{checkpoint_dir}", flush=True)
        every = [{**c, "checkpoint_every": c.get("checkpoint_every") or 1} for c in configs]
        results = execute_task(every, checkpoint_dir)
        by_id = {RunConfig.from_dict(c).run_id(): c for c in configs}
        for result in results:  # the config as the driver sent it (checkpoint_every too)
            result.config = by_id.get(result.run_id, result.config)
        return results

    def checkpoint(self, configs: list[dict], checkpoint_dir: str):
        """submitit calls this on SIGUSR2 (time limit near, or preemption), then requeues
        what it returns: the same task, which resumes from the members' checkpoints.

        An attempt in which no member wrote a checkpoint made no progress. Once may be
        chance: a preemption, or a time-limit signal that came early (the controller checks
        limits every 30 s), before a loaded node had imported torch and trained an epoch.
        Twice in a row means the time limit is shorter than an epoch: None stops the
        requeues, and the runs fail saying so."""
        from submitit.helpers import DelayedSubmission

        at_start = getattr(self, "at_start", None)
        progressed = at_start is not None and any(_mtime(p) != t for p, t in at_start.items())
        stalled = 0 if progressed else self.stalled + 1
        if stalled >= STALLED_ATTEMPTS:
            print(f"rankbias: no checkpoint written in {stalled} attempts in a row: not "
                  "requeued; raise --slurm-time above the time of one epoch", flush=True)
            return None
        return DelayedSubmission(SlurmTask(stalled), configs, checkpoint_dir)

    @staticmethod
    def _paths(configs: list[dict], checkpoint_dir: str) -> list[Path]:
        return [checkpoint_path(checkpoint_dir, RunConfig.from_dict(c).run_id())
                for c in configs]


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


# --- the job script and the submission --------------------------------------------------------
def job_script(options: SlurmOptions, tasks: int, folder: str | os.PathLike) -> str:
    """The sbatch script of an array of `tasks` tasks, exactly as submitit writes it (one
    task: a plain job, as submitit submits it)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder).expanduser().absolute()
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder,
                               map_count=tasks if tasks > 1 else None, **options.parameters())


def submit(tasks: list[list[RunConfig]], checkpoint_dir: str, options: SlurmOptions,
           folder: str | os.PathLike) -> list[str]:
    """Submit one array, task i training tasks[i]; return the job id of each task."""
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)
    try:
        # submitit echoes a failed sbatch's stderr; the error below says it in one line
        with contextlib.redirect_stderr(io.StringIO()):
            executor.update_parameters(**options.parameters())
            jobs = executor.map_array(SlurmTask(), [[c.to_dict() for c in t] for t in tasks],
                                      [checkpoint_dir] * len(tasks))
    except Exception as err:  # sbatch's refusal, or an option it does not know
        raise RankbiasError(f"sbatch refused the job array: {_first_complaint(err)}") from err
    return [job.job_id for job in jobs]


def _first_complaint(err: Exception) -> str:
    """The line of sbatch's stderr that says what is wrong (not its "Try sbatch --help")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    words = ("error", "invalid", "unrecognized", "unknown", "not ")
    return next((line for line in lines if any(w in line.lower() for w in words)
                 and not line.startswith("Try ")), lines[0] if lines else repr(err))


def result_file(folder: str | os.PathLike, job_id: str) -> Path:
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id, task_id=0).result_pickle


def log_file(folder: str | os.PathLike, job_id: str) -> Path:
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id, task_id=0).stderr


# --- job states ----------------------------------------------------------------------------
def job_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    """{job id: state} of the jobs SLURM still knows (squeue lists finished ones for
    MinJobAge, ~5 minutes); a job missing from it has ended. None where squeue failed."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return {}
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(arrays),
                               "-o", "%i|%T"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:  # every id unknown to the controller: all ended long ago
        return {} if "Invalid job id" in done.stderr else None
    return dict(line.split("|", 1) for line in done.stdout.split() if "|" in line)


def describe_states(job_ids: Iterable[str]) -> dict[str, str]:
    """States for people (`rankbias runs`): squeue's, else sacct's for jobs it forgot,
    else ENDED; `unknown` where SLURM cannot be asked from here."""
    job_ids = set(job_ids)
    states = job_states(job_ids) if shutil.which("squeue") else None
    if states is None:
        return {j: "unknown" for j in job_ids}
    gone = sorted(job_ids - set(states))
    if gone and shutil.which("sacct"):
        try:
            out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j",
                                  ",".join(gone)], capture_output=True, text=True, timeout=60)
            states.update(line.split("|")[:2] for line in out.stdout.split("\n")
                          if line.count("|") == 1 and out.returncode == 0)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {j: (states.get(j) or "ENDED").split()[0] for j in job_ids}


# --- the driver ----------------------------------------------------------------------------
@dataclass
class _Job:
    folder: str
    runs: dict[str, RunConfig] = field(default_factory=dict)  # the runs it trains for us
    over_since: float | None = None  # when squeue first showed it ended
    resubmits: int = 0  # times its runs were submitted again after a job ended resultless


class SlurmDriver:
    """Submits the queue's tasks and collects their results (see the module's docstring)."""

    def __init__(self, queue: TaskQueue, checkpoint_dir: str, options: SlurmOptions,
                 record: Callable[[RunResult], None], folder: str | os.PathLike) -> None:
        self.queue, self.store, self.record = queue, queue.store, record
        self.checkpoint_dir, self.options = checkpoint_dir, options
        self.folder = str(Path(folder).expanduser().absolute())
        self.jobs: dict[str, _Job] = {}
        self.polled = 0.0

    def run(self) -> None:
        try:
            while True:
                tasks = []
                while (task := self.queue.next()) is not None:
                    tasks.append(task)
                if tasks:
                    self._start(tasks)
                if not self.jobs:
                    if not self.queue.waiting():
                        if not self.queue.pending:
                            return
                        continue
                    time.sleep(POLL_S)  # runs held by another driver: wait for them
                    self.queue.renew()
                    continue
                time.sleep(CHECK_S)
                self.queue.renew()
                self._collect()
        except KeyboardInterrupt:
            if self.jobs:
                arrays = " ".join(sorted({j.split("_")[0] for j in self.jobs}))
                print(f"rankbias: the SLURM jobs keep running; rerun the same command to "
                      f"collect their results, or cancel them: scancel {arrays}",
                      file=sys.stderr)
            raise

    def _start(self, tasks: list[list[RunConfig]]) -> None:
        """Adopt the runs whose recorded job may still give their result; submit the rest."""
        run_ids = [c.run_id() for task in tasks for c in task]
        recorded = recorded_jobs(self.store, run_ids)
        states = job_states({job for job, _ in recorded.values()})
        if states is None:
            raise RankbiasError("squeue failed: cannot tell which recorded jobs still run; "
                                "check `squeue` works here, then rerun")
        fresh, stale = [], []
        for task in tasks:
            left = []
            for cfg in task:
                job_id, folder = recorded.get(cfg.run_id(), (None, None))
                if job_id and (states.get(job_id) in LIVE or result_file(folder, job_id).exists()):
                    self.jobs.setdefault(job_id, _Job(folder)).runs[cfg.run_id()] = cfg
                else:
                    left.append(cfg)
                    stale += [cfg.run_id()] if job_id else []
            if left:
                fresh.append(left)
        forget_jobs(self.store, stale)
        if fresh:
            self._submit(fresh)

    def _submit(self, tasks: list[list[RunConfig]], resubmits: int = 0) -> None:
        ids = submit(tasks, self.checkpoint_dir, self.options, self.folder)
        record_jobs(self.store, [(c.run_id(), job_id, self.folder)
                                 for task, job_id in zip(tasks, ids) for c in task])
        for task, job_id in zip(tasks, ids):
            self.jobs[job_id] = _Job(self.folder, {c.run_id(): c for c in task},
                                     resubmits=resubmits)
        tasks_text = f"{len(ids)} array tasks" if len(ids) > 1 else "1 task"
        print(f"rankbias: submitted SLURM job {ids[0].split('_')[0]} ({tasks_text}, "
              f"{sum(map(len, tasks))} runs); logs in {self.folder}", file=sys.stderr)

    def _collect(self) -> None:
        """Record the results that arrived; fail the runs of jobs that ended without one."""
        now = time.monotonic()
        states = None
        if now - self.polled >= SQUEUE_S:
            states, self.polled = job_states(self.jobs), now
        for job_id, job in list(self.jobs.items()):
            path = result_file(job.folder, job_id)
            if path.exists():
                self._finish(job_id, _read_result(path, job, job_id))
            elif states is not None and states.get(job_id) in LIVE:
                job.over_since = None
            elif states is not None:
                job.over_since = job.over_since or now
                if now - job.over_since >= RESULT_GRACE_S:
                    state = describe_states([job_id])[job_id]
                    why = (f"SLURM job {job_id} ended ({state}) without a result; its log: "
                           f"{log_file(job.folder, job_id)}")
                    if job.resubmits < RESUBMITS:  # killed, not failed: try again
                        print(f"rankbias: {why}; submitted again, its runs resume from their "
                              "checkpoints", file=sys.stderr)
                        del self.jobs[job_id]
                        self._submit([list(job.runs.values())], job.resubmits + 1)
                    else:
                        self._finish(job_id, [failed_result(c, why) for c in job.runs.values()])

    def _finish(self, job_id: str, results: list[RunResult]) -> None:
        job = self.jobs.pop(job_id)
        returned = {r.run_id: r for r in results if r.run_id in job.runs}  # adopted jobs
        for run_id, cfg in job.runs.items():  # may train runs that are no longer ours
            self.record(returned.get(run_id) or failed_result(
                cfg, f"SLURM job {job_id} returned no result for this run; its log: "
                     f"{log_file(job.folder, job_id)}"))
        forget_jobs(self.store, job.runs)


def _read_result(path: Path, job: _Job, job_id: str) -> list[RunResult]:
    """The task's RunResults from submitit's result file (failed ones if the job raised)."""
    from submitit.core.utils import pickle_load

    try:
        outcome, value = pickle_load(path)
    except Exception as err:  # unreadable: a partial copy, another submitit version
        outcome, value = "error", f"cannot read {path}: {type(err).__name__}: {err}"
    if outcome == "success":
        return value
    last = [line for line in str(value).strip().splitlines() if line.strip()][-1:] or ["?"]
    why = f"SLURM job {job_id} failed: {last[0].strip()}; its log: {log_file(job.folder, job_id)}"
    return [failed_result(c, why) for c in job.runs.values()]


def run_tasks_on_slurm(queue: TaskQueue, checkpoint_dir: str, options: SlurmOptions,
                       record: Callable[[RunResult], None], folder: str | os.PathLike) -> None:
    """Train the queue's tasks as SLURM array tasks until none is left or held elsewhere."""
    SlurmDriver(queue, checkpoint_dir, options, record, folder).run()
