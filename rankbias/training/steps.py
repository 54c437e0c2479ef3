"""The training step on the device: divergence found without a host round-trip per step,
and the step captured in a CUDA graph where its shapes are static.

    watch = FiniteWatch(k, device)          # one slot per run (1 for a single run)
    step = GraphedStep(one_sgd_step, enabled=device.type == "cuda")
    watch.reset(base_step)                  # at the start of an epoch
    for idx in batches:
        step(idx)                           # one_sgd_step(idx) calls watch.update(losses)
    bad = watch.first_nonfinite()           # once per epoch / tracking point: host sync

Why: on a GPU, `loss.item()` after every step waits for the step to finish, so the host
cannot queue the next one; a small net is then bound by that round-trip (docs/performance.md,
"GPU"). Instead each run
counts, on the device, its leading steps with a finite loss since `reset`; the first
non-finite step is `base_step + count`, exactly the step a per-step check stops at. The
steps after it run on NaN weights (wasted work, never measured: the caller stops the run
at that step before any tracking or checkpoint sees the weights).

Everything here runs on CPU too (the graph is then simply not used), so the logic is
tested without a GPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn


class FiniteWatch:
    """Per run: has every loss since `reset` been finite, and how many steps in a row were.

    On a GPU the counters live on the device (no synchronisation per step). On the CPU a
    loss is already on the host: reading it costs under a microsecond, against ~10 of the
    three tensor ops, so the counters are Python's there (the same answers).
    """

    def __init__(self, k: int, device: torch.device, on_host: bool | None = None) -> None:
        self.on_host = device.type == "cpu" if on_host is None else on_host
        self.ok = [True] * k if self.on_host else torch.ones(k, dtype=torch.bool, device=device)
        self.count = [0] * k if self.on_host else torch.zeros(k, dtype=torch.int64,
                                                              device=device)
        self.base = 0

    def reset(self, base_step: int) -> None:
        """Start counting at `base_step` (in place: a captured graph keeps its tensors)."""
        if self.on_host:
            self.ok, self.count = [True] * len(self.ok), [0] * len(self.count)
        else:
            self.ok.fill_(True)
            self.count.zero_()
        self.base = base_step

    def update(self, losses: torch.Tensor) -> None:
        """Record one step's loss of every run ((k,) or a scalar when k = 1)."""
        if not self.on_host:
            self.ok.logical_and_(torch.isfinite(losses.detach()))  # a scalar broadcasts
            self.count.add_(self.ok)
            return
        values = losses.tolist()
        for j, value in enumerate(values if isinstance(values, list) else [values] * len(self.ok)):
            self.ok[j] = self.ok[j] and math.isfinite(value)
            self.count[j] += self.ok[j]

    def first_nonfinite(self) -> list[int | None]:
        """Per run, the step whose loss was the first non-finite one since `reset`, or None.
        Reads the device (one synchronisation)."""
        ok = self.ok if self.on_host else self.ok.tolist()
        count = self.count if self.on_host else self.count.tolist()
        return [None if good else self.base + n for good, n in zip(ok, count)]


class GraphedStep:
    """`step(*inputs)` as a CUDA graph replay once its shapes have settled.

    `fn(*inputs)` must read its inputs only from the tensors it is given and change state
    in place (parameters, optimizer buffers, a FiniteWatch): it is captured once, and each
    later call copies the new inputs into the captured ones and replays. The first
    `warmup` calls run eagerly on a side stream, as torch.cuda.graphs asks (lazy
    initialisation of cuBLAS/cuDNN, the optimizer's momentum buffers). Calls with inputs
    of other shapes (the last partial batch) run eagerly. Disabled (CPU, or after a failed
    capture, with one warning) it simply calls `fn`. `reset()` forgets the graph: call it
    when something the graph baked in changes (a Python float such as the lr of
    torch.optim.SGD, or the tensors themselves).
    """

    def __init__(self, fn: Callable[..., None], enabled: bool, warmup: int = 3) -> None:
        self.fn = fn
        self.enabled = enabled
        self.warmup = warmup
        self.reset()

    def reset(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[torch.Tensor] = []
        self.shapes: list[torch.Size] | None = None
        self.eager_calls = 0

    def __call__(self, *inputs: torch.Tensor) -> None:
        if not self.enabled:
            return self.fn(*inputs)
        shapes = [t.shape for t in inputs]
        if self.shapes is not None and shapes != self.shapes:
            return self.fn(*inputs)
        if self.graph is None and self.eager_calls < self.warmup:
            self.shapes = shapes
            self.eager_calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return None
        if self.graph is None and not self._capture(inputs):
            return self.fn(*inputs)
        for static, t in zip(self.static, inputs):
            static.copy_(t)
        self.graph.replay()
        return None

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Capture fn (nothing runs during a capture); False, with one warning, on failure."""
        self.static = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.fn(*self.static)
        except Exception as err:  # any capture problem: train eagerly, the same numbers
            warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); "
                          "training eagerly", RuntimeWarning, stacklevel=3)
            self.enabled = False
            return False
        self.graph = graph
        return True


def has_conv2d(model: nn.Module) -> bool:
    """Whether a model has 2-D convolutions (the models a channels_last layout can speed up)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def uses_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether a model trains faster in channels_last: 2-D convs on CUDA (cuDNN's NHWC
    kernels; docs/performance.md, "GPU")."""
    return device.type == "cuda" and has_conv2d(model)
