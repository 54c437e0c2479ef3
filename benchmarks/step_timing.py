"""Shared by the gpu_* benchmarks (not a benchmark itself): time the training steps of a
stack or of one run exactly as train_ensemble / train_run take them, without tracking.

The data are synthetic: Gaussian inputs of the given shape and random labels, resident on
the device (a step costs the same whatever the pixels are; no data set to download).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import rankbias.training.ensemble
from rankbias.data import Dataset
from rankbias.training.config import RunConfig
from rankbias.training.ensemble import _Ensemble
from rankbias.training.train import Run, resolve_device


def random_dataset(n_train: int, input_shape: tuple[int, ...], num_classes: int = 10
                   ) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + 16, *input_shape, generator=gen)
    y = torch.randint(0, num_classes, (n_train + 16,), generator=gen)
    return Dataset(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:],
                   y_test=y[n_train:], num_classes=num_classes, input_shape=input_shape,
                   name="random", source="benchmarks/step_timing.py")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_parser(doc: str, steps: int, epochs: int, k: int | None = None
                  ) -> argparse.ArgumentParser:
    """The options every gpu_* benchmark takes (and --k for those that time a stack)."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if k is not None:
        parser.add_argument("--k", type=int, default=k, help="runs in the stack")
    parser.add_argument("--steps", type=int, default=steps, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=epochs,
                        help="timed epochs (after 1 warm-up)")
    parser.add_argument("--device", default="auto")
    return parser


def members(k: int, device: torch.device, **config) -> list[RunConfig]:
    """K runs of one config that differ in lr, weight decay and seed (a stack's members)."""
    return [RunConfig(**config, lr=0.01 * (1 + i % 4), weight_decay=5e-4 * (1 + i % 3), seed=i,
                      device=str(device)) for i in range(k)]


def _timed(epoch: Callable[[], None], device: torch.device, epochs: int) -> float:
    """Seconds of `epochs` calls of `epoch` after one warm-up call (CUDA graph capture,
    lazy initialisation), the device synchronised on both ends."""
    epoch()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(epochs):
        epoch()
    synchronize(device)
    return time.perf_counter() - start


def stack_steps_per_second(configs: list[RunConfig], data: Dataset, epochs: int
                           ) -> tuple[float, int]:
    """(stack-steps/s, steps per epoch) of the members trained as one stack by the generic
    engine (as on CUDA; on CPU too, so that a CPU run checks the GPU path), after one
    warm-up epoch (CUDA graph capture, lazy initialisation)."""
    rankbias.training.ensemble.handwritten_mlp = lambda cfg: False
    ensemble = _Ensemble(configs, data, None)
    ensemble._stack_members()
    seconds = _timed(ensemble._train_epoch, ensemble.device, epochs)
    assert len(ensemble.alive) == len(configs), "a member diverged"
    return epochs * len(ensemble.starts) / seconds, len(ensemble.starts)


def run_steps_per_second(cfg: RunConfig, data: Dataset, epochs: int) -> tuple[float, int]:
    """(steps/s, steps per epoch) of one run as train_run trains it (on CUDA: channels_last
    for conv nets, the step in a CUDA graph), after one warm-up epoch."""
    run = Run(cfg, data, resolve_device(cfg.device))
    return epochs * len(run.starts) / _timed(run.train_epoch, run.device, epochs), len(run.starts)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} thread), torch {torch.__version__}"
