"""K small-batch ConvNet runs: one lockstep ensemble (the generic engine,
rankbias.training.stack) vs one train_run after another, and the stack's two conv paths
against each other: on CPU its ConvNet runs every conv as one bmm (training/conv_stack.py);
before 0.3 vmap ran them as grouped convs (oneDNN), timed here by turning the first off.

ConvNet (width 32, depth 2, BatchNorm) on digits at B = 8 (--batch-size), members with
different lr / weight decay / seed, the same epochs each way, one thread, all timed in
this run (best of --repeats). The ensemble's members are not bitwise equal to their single
runs (batched kernels round differently); the script prints how far they end up: the
largest relative difference of any recorded value, and of the final average rank and the
train / test accuracies.

    python benchmarks/ensemble_convnet.py [--epochs 2] [--k 8] [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse

import torch
from ensemble import best_time

import rankbias.training.stack as stack
from rankbias.data import load_dataset
from rankbias.training.config import RunConfig
from rankbias.training.ensemble import train_ensemble
from rankbias.training.train import train_run

LRS = (0.02, 0.05, 0.1, 0.2)
WDS = (1e-3, 5e-3)


def configs(k: int, epochs: int, batch_size: int = 8) -> list[RunConfig]:
    return [RunConfig(model="convnet", batch_size=batch_size, lr=LRS[i % len(LRS)],
                      weight_decay=WDS[i // len(LRS) % 2], seed=i, epochs=epochs,
                      track_every=epochs, device="cpu")
            for i in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    train_ensemble(configs(2, 1), data)  # warm-up: first-call costs of torch, vmap, oneDNN
    train_run(configs(1, 1)[0], data)
    print(f"ConvNet width 32, digits ({len(data.x_train)} train), B={args.batch_size}, "
          f"{args.epochs} epochs, K={args.k}, threads=1, best of {args.repeats}")
    grid = configs(args.k, args.epochs, args.batch_size)
    seq_s, singles = best_time(lambda: [train_run(c, data) for c in grid], args.repeats)
    ens_s, results = best_time(lambda: train_ensemble(grid, data), args.repeats)
    bmm_forward, stack.stacked_forward = stack.stacked_forward, lambda template: None
    grouped_s, _ = best_time(lambda: train_ensemble(grid, data), args.repeats)
    stack.stacked_forward = bmm_forward
    steps = singles[0].steps
    assert all(r.status == s.status == "done" and r.steps == steps
               for r, s in zip(results, singles))
    worst = max(abs(a[4] - b[4]) / max(abs(b[4]), 1e-12)
                for r, s in zip(results, singles) for a, b in zip(r.rows, s.rows)
                if a[3] != "wall_s")
    final = {key: max(abs(r.summary[key] - s.summary[key]) for r, s in zip(results, singles))
             for key in ("final_avg_rank", "train_acc", "test_acc")}
    print(f"sequential: {seq_s:.2f} s ({args.k * steps / seq_s:.0f} run-steps/s); ensemble: "
          f"{ens_s:.2f} s ({args.k * steps / ens_s:.0f} run-steps/s); {steps} steps per run; "
          f"the stack with grouped convs (vmap): {grouped_s:.2f} s, {grouped_s / ens_s:.2f}x "
          "the bmm stack's time")
    print(f"members vs single runs: largest relative difference of a recorded value "
          f"{worst:.1e}; final avg rank within {final['final_avg_rank']:.2f}, train acc within "
          f"{final['train_acc']:.4f}, test acc within {final['test_acc']:.4f}")
    by_lr: dict[float, float] = {}
    for r, s in zip(results, singles):
        lr = r.config["lr"]
        by_lr[lr] = max(by_lr.get(lr, 0.0), abs(r.summary["train_acc"] - s.summary["train_acc"]))
    print("train acc difference by lr (chaotic runs drift apart): " +
          ", ".join(f"lr {lr:g}: {d:.4f}" for lr, d in sorted(by_lr.items())))
    print(f"RESULT ensemble_convnet value={seq_s / ens_s:.2f} target=>=2")


if __name__ == "__main__":
    main()
