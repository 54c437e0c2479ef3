"""Shared test set-up: one thread per process (2-core machines; see docs/performance.md)."""

import torch

torch.set_num_threads(1)
