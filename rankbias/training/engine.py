"""The interface every stack engine offers: what the lockstep loop (training/ensemble.py)
calls, checked by tests/test_ensemble.py for each engine.

    engine = ModelStack(models, configs, device) or MLPStack(models, configs, device)
    engine.set_lr([cfg.lr_at(epoch) for cfg in configs])
    losses = engine.step(x, y)          # x (K, b, *input_shape), y (K, b) -> (K,)
    engine.keep([0, 2])                 # members 1 and 3 left (diverged, stopped)
    engine.load_into(0, model, steps)   # member 0 -> an ordinary nn.Module
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class StackEngine(Protocol):
    """K runs of one architecture trained as one computation, each with its own lr, weight
    decay, optimizer state and BatchNorm statistics."""

    #: whether the loop must enable autograd around `step` (else it runs in inference mode)
    autograd: bool
    #: whether a CUDA graph of `step` stays correct: every tensor `step` reads is updated in
    #: place (set_lr included), so a replay sees the new values
    graphable: bool

    def set_lr(self, lrs: list[float]) -> None:
        """Each member's learning rate from now on."""

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every member; returns the per-member losses (K,)."""

    def keep(self, positions: list[int]) -> None:
        """Keep only these stack positions."""

    def load_into(self, position: int, model: nn.Module, steps: int,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy member `position` (and, with `optimizer`, its optimizer state) into an
        ordinary model of the same architecture."""
