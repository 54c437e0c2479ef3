"""The one SGD loop: how a step is taken and how an epoch is cut into batches. The trainer,
compress's fine-tuning, the theory's trajectory recorder and the reproduction's theorem
check all train through it, so they share one batching rule and one update order.

    optimizer = make_optimizer(model, cfg)          # the run's torch.optim optimizer
    loss_fn = loss_function(cfg.loss, classes)
    for idx in epoch_batches(len(x), cfg.batch_size, order, batch_norm=has_batch_norm(model)):
        loss = sgd_step(model, optimizer, loss_fn, x[idx], y[idx])
    for xb, yb in itertools.islice(batch_stream(x, y, 8, order), 500):   # 500 full batches
        sgd_step(model, optimizer, loss_fn, xb, yb)

Choices that matter for the science (docs/theory.md, docs/conventions.md):
- plain `torch.optim.SGD(lr, momentum, weight_decay)`: W <- (1 - lr*wd) W - lr*G;
- in-memory tensors indexed by a seeded permutation each epoch (no DataLoader: small
  batches are bound by per-step overhead);
- `drop_last=False` keeps the last partial batch (the trainer); `True` gives every step
  exactly B examples (the theory: rank(G) <= B*m needs B to be the batch's size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

EVAL_CHUNK = 2048  # examples per forward pass when evaluating (bounded memory)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The run's optimizer (`cfg`: a RunConfig), weight decay on all parameters (the
    authors) or on weight matrices only: SGD (the paper's), Adam (L2: wd*p added to the
    gradient before the adaptive scaling) or AdamW (decoupled: p <- p - lr*wd*p), Adam's
    defaults otherwise."""
    if cfg.wd_scope == "all":
        groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    else:
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def loss_function(name: str, num_classes: int) -> LossFn:
    """"ce": cross-entropy; "mse": squared error on one-hot targets, summed over classes."""
    if name == "mse":
        def mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            target = F.one_hot(y, num_classes).to(logits.dtype)
            return ((logits - target) ** 2).sum(dim=1).mean()
        return mse
    return F.cross_entropy


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def batch_starts(n: int, batch_size: int, drop_last: bool, batch_norm: bool) -> list[int]:
    """Start index of every mini-batch of an epoch.

    A last batch of one example is dropped when the model has BatchNorm (train-mode
    BatchNorm cannot normalize a single example).
    """
    last = n - batch_size if drop_last else n - (2 if batch_norm else 1)
    return list(range(0, last + 1, batch_size))


def epoch_batches(n: int, batch_size: int, order: torch.Generator, drop_last: bool = False,
                  batch_norm: bool = False, device: torch.device | None = None
                  ) -> list[torch.Tensor]:
    """The row indices of each mini-batch of one epoch: a fresh permutation from `order`
    (drawn on the CPU, so the same on every device) cut at `batch_starts`."""
    perm = torch.randperm(n, generator=order).to(device or "cpu")
    return [perm[start:start + batch_size]
            for start in batch_starts(n, batch_size, drop_last, batch_norm)]


def batch_stream(x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Generator
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Full batches (x, y) of exactly `batch_size` examples, epoch after epoch, without end
    (take as many steps as needed with itertools.islice)."""
    while True:
        for idx in epoch_batches(len(x), batch_size, order, drop_last=True):
            yield x[idx], y[idx]


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
             x: torch.Tensor, y: torch.Tensor,
             after_backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One optimizer step on the batch (x, y); returns its loss (on the device: no host
    round-trip). `after_backward(loss)` sees the gradients before the step (the gradient
    rank, a snapshot, a finiteness check that raises to skip the step)."""
    loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward(loss)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
             ) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode (BatchNorm uses its running statistics)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), EVAL_CHUNK):
        logits = model(x[start:start + EVAL_CHUNK])
        target = y[start:start + EVAL_CHUNK]
        total_loss += float(loss_fn(logits, target)) * len(target)
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return total_loss / len(x), correct / len(x)
