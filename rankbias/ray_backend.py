"""The Ray backend of `rankbias sweep`: each task a Ray task; only the driver writes the store.

`address=None` starts a local Ray node with `workers` CPUs; `address="auto"` or
"ray://host:10001" joins an existing cluster (see the README for SLURM). On a cluster with
GPUs each task asks for one GPU.
"""

from __future__ import annotations

from collections.abc import Callable

from rankbias.config import RunConfig
from rankbias.train import RunResult
from rankbias.utils import RankbiasError


def _remote_execute(configs: list[dict], ckpt_dir: str | None) -> list[RunResult]:
    import torch

    from rankbias.sweep import execute_task

    torch.set_num_threads(1)
    return execute_task(configs, ckpt_dir)


def run_tasks_on_ray(tasks: list[list[RunConfig]], ckpt_dir: str, workers: int,
                     address: str | None, record: Callable[[RunResult], None]) -> None:
    try:
        import ray
    except ImportError:
        raise RankbiasError("the ray backend needs Ray: pip install 'rankbias[ray]'") from None
    from rankbias.sweep import failed_result

    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        # Checkpoints live on the driver's disk; on a multi-node cluster they are only
        # useful with a shared file system, which is the usual SLURM set-up.
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_remote_execute)
        refs = {remote.remote([c.to_dict() for c in task], ckpt_dir): task for task in tasks}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                task = refs.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as err:  # worker crash, node loss, OOM kill
                    message = f"{type(err).__name__}: {err}".splitlines()[0]
                    results = [failed_result(c, f"ray task failed: {message}") for c in task]
                for result in results:
                    record(result)
    finally:
        if started_here:
            ray.shutdown()
