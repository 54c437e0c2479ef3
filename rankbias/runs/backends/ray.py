"""The Ray backend: each task a Ray task; only the driver writes the store.

`address=None` starts a local Ray node with `workers` CPUs; `address="auto"` or
"ray://host:10001" joins an existing cluster (see the README for SLURM). On a cluster with
GPUs each task asks for one GPU. Workers resolve the device themselves (`device: auto`
picks the GPU they were given), so a CPU-only driver can drive a GPU cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rankbias.runs.backends.tasks import POLL_S, RENEW_S, TaskQueue, execute_task, failed_result
from rankbias.training.train import RunResult
from rankbias.utils import RankbiasError


def _remote_execute(configs: list[dict], ckpt_dir: str | None) -> list[RunResult]:
    import torch

    torch.set_num_threads(1)
    return execute_task(configs, ckpt_dir)


def run_tasks_on_ray(queue: TaskQueue, ckpt_dir: str, workers: int, address: str | None,
                     record: Callable[[RunResult], None], run_timeout: float | None = None
                     ) -> None:
    """Train the queue's tasks as Ray tasks, at most as many in flight as the cluster has
    slots (claims are taken when a task is submitted, so other drivers share the rest)."""
    try:
        import ray
    except ImportError:
        raise RankbiasError("the ray backend needs Ray: pip install 'rankbias[ray]'") from None

    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        slots = int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", workers))
        # Checkpoints are written by the workers: on a multi-node cluster, put them on a
        # shared file system (--checkpoint-dir), the usual SLURM set-up.
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_remote_execute)
        refs: dict = {}  # ref -> (task, deadline)
        while True:
            while len(refs) < max(1, slots) and (task := queue.next()) is not None:
                deadline = time.monotonic() + run_timeout if run_timeout else float("inf")
                refs[remote.remote([c.to_dict() for c in task], ckpt_dir)] = (task, deadline)
            if not refs:
                if not queue.waiting():
                    if not queue.pending:
                        return
                    continue
                time.sleep(POLL_S)
                queue.renew()
                continue
            done, _ = ray.wait(list(refs), num_returns=1, timeout=RENEW_S)
            queue.renew()
            for ref in done:
                task, _ = refs.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as err:  # worker crash, node loss, OOM kill
                    message = f"{type(err).__name__}: {err}".splitlines()[0]
                    results = [failed_result(c, f"ray task failed: {message}") for c in task]
                for result in results:
                    record(result)
            for ref, (task, deadline) in list(refs.items()):
                if time.monotonic() >= deadline:
                    ray.cancel(ref, force=True)
                    del refs[ref]
                    for cfg in task:
                        record(failed_result(cfg, f"timed out after {run_timeout:g} s "
                                                  "(--run-timeout); the Ray task was cancelled"))
    finally:
        if started_here:
            ray.shutdown()
