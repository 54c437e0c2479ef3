"""Trainer overhead: a plain PyTorch loop (no tracking) vs `train_run` tracking every epoch.

Same model (MLP-BN 6x100), data (digits), batch size, steps and seed on both sides, one
thread, timed in this run (best of --repeats, sides alternated). The rankbias side also
evaluates train/test loss and accuracy and runs one SVD per matrix at every epoch.

    python benchmarks/train_overhead.py [--epochs 5] [--batch-size 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from rankbias.data import load_dataset
from rankbias.models import create_model
from rankbias.training.config import RunConfig
from rankbias.training.sgd import batch_starts
from rankbias.training.train import train_run


def plain_loop(cfg: RunConfig, data) -> float:
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, data.input_shape, data.num_classes, **cfg.model_args)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    starts = batch_starts(len(data.x_train), cfg.batch_size, False, True)
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(data.x_train), generator=order)
        for s in starts:
            idx = perm[s:s + cfg.batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def ours(cfg: RunConfig, data) -> float:
    start = time.perf_counter()
    result = train_run(cfg, data=data)
    assert result.status == "done"
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as train_run does, so both sides do the same arithmetic
    cfg = RunConfig(model="mlp", model_args={"depth": 6, "width": 100}, batch_size=args.batch_size,
                    lr=0.1, weight_decay=5e-3, epochs=args.epochs, track_every=1)
    data = load_dataset("digits")
    plain, tracked = [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(cfg, data))
        tracked.append(ours(cfg, data))
    steps = cfg.epochs * len(batch_starts(len(data.x_train), cfg.batch_size, False, True))
    print(f"{steps} steps, B={cfg.batch_size}, MLP-BN 6x100 on digits, tracking every epoch")
    print(f"plain PyTorch loop: {min(plain):.3f} s ({steps / min(plain):.0f} steps/s)")
    print(f"rankbias train_run: {min(tracked):.3f} s ({steps / min(tracked):.0f} steps/s)")
    print(f"RESULT train_overhead value={min(tracked) / min(plain):.3f} target=<=1.10")


if __name__ == "__main__":
    main()
