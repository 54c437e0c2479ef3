"""Small shared helpers: the user-facing error type, atomic writes, run provenance."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class RankbiasError(Exception):
    """A problem with the user's input (bad option, missing file, corrupt data).

    The CLI prints its message on one line and exits with code 2, so the message must
    say what is wrong and what to do about it.
    """


def current_umask() -> int:
    """The process's umask, read from /proc (Linux) without changing it; elsewhere by
    setting and restoring it, the only portable way."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    A crash or exception leaves `path` as it was: never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode open() would have.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def plain(value: Any) -> Any:
    """`value` as strict-JSON data: non-finite floats become None, numpy and torch scalars
    and arrays become Python numbers and lists, paths and other objects their text."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def to_json(value: Any, **kwargs) -> str:
    """Strict JSON (RFC 8259): NaN and infinities are written as null, never as NaN."""
    return json.dumps(plain(value), allow_nan=False, **kwargs)


def text_table(rows: list[list[str]]) -> str:
    """Rows of strings as left-aligned columns two spaces apart (the first row a header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n"
                   for row in rows)


def natural_key(text: str) -> list:
    """Sort key that puts blocks.2 before blocks.10 (layer names in the order of the model)."""
    # re.split with a group alternates text and digit runs: odd places are the numbers
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))]


def available_cpus(cgroup: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """The CPUs this process may really use: its affinity mask (taskset, SLURM's binding),
    capped by a cgroup CPU quota (containers) and by $SLURM_CPUS_PER_TASK.
    `os.cpu_count()` counts the whole machine's and ignores all three."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    quota = _cgroup_quota(Path(cgroup))
    if quota is not None:
        count = min(count, max(1, int(quota)))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        count = min(count, int(slurm))
    return max(1, count)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs granted by a cgroup quota (v2 cpu.max, else v1 cfs files); None if unlimited."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    return None


@functools.lru_cache(maxsize=1)  # two git calls: once per process, not per run
def code_version() -> str:
    """The package version plus the git commit of the source tree, when there is one."""
    from rankbias.version import __version__

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


# Environment variables that choose the CPU kernels torch runs (docs/performance.md).
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def library_versions() -> dict[str, str]:
    """Versions of everything that can change the numbers of a run: the libraries, the
    platform, and the CPU with the kernel path torch takes on it (an AVX2 and an AVX-512
    CPU train one seed to different numbers: docs/performance.md), with any variable of
    KERNEL_VARIABLES that is set."""
    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ},
    }


@functools.cache
def cpu_model() -> str:
    """The CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) ...'), from /proc/cpuinfo on
    Linux, else what the platform says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown"


PAUSE_VARIABLE = "RANKBIAS_PAUSE_AT"


def pause_point(kind: str, count: int) -> None:
    """A fault-injection point for crash tests. With RANKBIAS_PAUSE_AT=KIND:COUNT[:TOKEN]
    in the environment, the process stops itself (SIGSTOP) when it reaches `kind` for the
    COUNT-th time ("epoch": after the checkpoint of that epoch; "results": after a sweep's
    driver saved that many results), so a test can kill it exactly there instead of racing
    a clock. With TOKEN (a file path), only the first process to get there stops: it
    creates the file. Unset (always, outside tests), this does nothing."""
    spec = os.environ.get(PAUSE_VARIABLE)
    if not spec:
        return
    wanted, _, rest = spec.partition(":")
    at, _, token = rest.partition(":")
    if wanted != kind or not at.isdigit() or int(at) != count:
        return
    if token:
        try:
            os.close(os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    import signal

    os.kill(os.getpid(), signal.SIGSTOP)
