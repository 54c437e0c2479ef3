"""Shared test set-up: one thread per process (2-core machines; see DESIGN.md)."""

import torch

torch.set_num_threads(1)
