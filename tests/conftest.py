"""Shared test set-up: one thread per process (2-core machines; see docs/performance.md),
and a real single-node SLURM for the tests that ask for it (tests/slurm_cluster.py)."""

import os

import pytest
import torch

torch.set_num_threads(1)


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
