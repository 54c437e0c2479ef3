"""Process-wide state that training changes, set in one place and always put back.

    with process_state(flush_denormal=True, threads=1):   # a run or a stack trains
        ...
    with process_state(seed=cfg.seed):                     # a run's init draws its numbers
        model = create_model(...)

torch, numpy and Python keep their random generators, thread count and denormal mode per
process. A library that sets them and leaves them set changes what the user's code does
next (and a stack of runs that reseeded the global generators per member would leave the
last member's state behind), so every change is made by this context manager, which
restores what was there before, whatever it was.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def flushes_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero now (torch has no getter: an
    op whose exact result is denormal shows it)."""
    return bool((torch.tensor([1e-39]) * torch.tensor([1.0])).item() == 0.0)


@contextlib.contextmanager
def process_state(seed: int | None = None, threads: int | None = None,
                  flush_denormal: bool | None = None) -> Iterator[None]:
    """Inside the block: Python's, numpy's and torch's (CPU and CUDA) global generators
    seeded with `seed`; `threads` torch threads; denormals flushed or not. Each setting
    left as None is not touched; each one given is restored on exit."""
    with contextlib.ExitStack() as stack:
        if seed is not None:
            stack.enter_context(_seeded(seed))
        if threads is not None:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, before)
        if flush_denormal is not None:
            before_flush = flushes_denormals()
            torch.set_flush_denormal(flush_denormal)
            stack.callback(torch.set_flush_denormal, before_flush)
        yield


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    python, numpy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
