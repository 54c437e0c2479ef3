"""Shared test set-up: one thread per process (2-core machines; see docs/performance.md),
the helpers of the crash tests, which stop a process at a known point of its work
(rankbias.utils.pause_point) and wait for that, never for a clock, and a real single-node
SLURM for the tests that ask for it (tests/slurm_cluster.py)."""

import os
import time
from pathlib import Path

import pytest
import torch

from rankbias.utils import PAUSE_VARIABLE

torch.set_num_threads(1)

WAIT_S = 300  # a generous deadline for a condition; never a window the test must hit


def paused_env(kind: str, count: int, token: Path | None = None, **extra: str) -> dict:
    """The environment of a child process that stops itself at `kind` number `count`."""
    spec = f"{kind}:{count}" + (f":{token}" if token else "")
    return {**os.environ, PAUSE_VARIABLE: spec, **extra}


def is_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP): state T in /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("T", "t")


def wait_until(condition, what: str, proc=None):
    """Poll `condition()` until it returns something true; fail after WAIT_S, or at once if
    `proc` (a Popen) ended first. Returns what the condition returned."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"waited {WAIT_S} s for {what}")


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and f"{marker}=".encode() in Path(f"/proc/{entry}/environ"
                                                                ).read_bytes():
                found.append(int(entry))
        except OSError:  # gone, or not ours to read
            pass
    return found


@pytest.fixture(scope="session")
def slurm_cluster():
    """munged, slurmctld and slurmd on this machine for the whole session, SLURM_CONF
    exported to every command the tests run; skipped, with the reason, where the Debian
    packages or root are missing."""
    from slurm_cluster import SlurmCluster, missing

    pytest.importorskip("submitit", reason="the slurm backend needs submitit "
                                           "(pip install -e '.[slurm]')")
    reason = missing()
    if reason:
        pytest.skip(f"no SLURM cluster: {reason}")
    cluster = SlurmCluster().start()
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
