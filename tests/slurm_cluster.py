"""A real single-node SLURM for the tests: munged, slurmctld and slurmd on this machine.

Debian's `slurm-wlm` and `munge` packages (the `.ci/run` script installs them), run as root:

    python tests/slurm_cluster.py          # start one by hand, print its SLURM_CONF, Ctrl-C stops

The configuration lives in a temporary folder (state, spool, pid and log files too), the
ports are free ones picked at start, and the daemons run in the foreground as children of
this process, so stopping them is killing their PIDs: nothing is left behind and nothing
global is touched, except munged, which is started (as the munge user) only when none
answers yet and then stopped too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")
START_S = 120.0  # the node is idle within seconds here; a slow CI machine gets more


def missing() -> str | None:
    """Why a cluster cannot start here (None: it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    absent = [name for name in DAEMONS if shutil.which(name) is None
              and not Path("/usr/sbin", name).exists()]
    if absent:
        return f"{', '.join(absent)} not installed: apt-get install slurm-wlm munge"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """One node (this machine, all its cores), one default partition `debug`."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="rankbias-slurm-"))
        self.conf = self.folder / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- start ------------------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        try:
            self._start_munge()
            self._write_conf()
            for daemon in ("slurmctld", "slurmd"):
                log = open(self.folder / f"{daemon}.out", "w")
                # -D: foreground, so the PID is ours to stop; -c: no state from before
                self.processes.append(subprocess.Popen(
                    [_binary(daemon), "-D", "-c", "-f", str(self.conf)], env=self.env,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _munge_answers(self) -> bool:
        try:
            token = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            return token.returncode == 0 and subprocess.run(
                ["unmunge"], input=token.stdout, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munge(self) -> None:
        if self._munge_answers():
            return  # a munged already runs here (the system's): use it, leave it alone
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o600)
        run = Path("/run/munge")
        run.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        # -F: foreground, so this process holds its PID; as the munge user, as munged wants
        self.processes.append(subprocess.Popen(
            ["runuser", "-u", "munge", "--", _binary("munged"), "-F"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 30
        while not self._munge_answers():
            if time.monotonic() > deadline:
                raise RuntimeError("munged did not answer within 30 s")
            time.sleep(0.2)

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir()
        f = self.folder
        lines = [
            "ClusterName=rankbias-test",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            # a node that missed a heartbeat (a loaded 2-core machine) comes back by itself
            "ReturnToService=2", "SlurmdTimeout=300",
            # finished jobs stay visible to squeue for 5 minutes, as on most clusters
            "MinJobAge=300",
            # scancel sends SIGTERM, which submitit ignores (a preempted task requeues on
            # SIGUSR2), and SIGKILL KillWait seconds later: 2 s, so a cancel takes effect
            # while the tests watch (clusters use 30-120 s)
            "KillWait=2",
            f"StateSaveLocation={f / 'state'}", f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}", f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'slurmctld.log'}", f"SlurmdLogFile={f / 'slurmd.log'}",
            f"NodeName={self.host} CPUs={os.cpu_count()} RealMemory=1024 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited with {process.returncode}: "
                                       f"see {self.folder}")
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env,
                                   capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node was not idle within {START_S:.0f} s: see {self.folder}")

    # --- stop -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started, by their PIDs
        (slurmd first, while slurmctld still answers it, munged last)."""
        if any(p.poll() is None for p in self.processes[-2:]):
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env,
                           capture_output=True, timeout=30)
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
        self.processes.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    reason = missing()
    if reason:
        raise SystemExit(f"cannot start a cluster: {reason}")
    cluster = SlurmCluster().start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops it cleanly
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for stop_signal in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not
            signal.signal(stop_signal, signal.SIG_IGN)      # cut the clean-up short
        cluster.stop()
