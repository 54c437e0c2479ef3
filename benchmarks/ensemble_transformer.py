"""K small transformer runs on modular-addition: one lockstep ensemble (the generic engine,
rankbias.training.stack: vmap over the stacked members) vs one train_run after another, on
a grid of batch sizes.

The claims' quick model (depth 1, width 32, 4 heads) on modular-addition p = 23 with 80% of
the pairs for training (423 examples), plain SGD with decay on the weight matrices, members
with different lr / weight decay / seed, the same steps both ways at every B, one thread,
both sides timed in this run (best of --repeats). Tracking at the start and the end only,
so the ratio is the training step's. Members are not bitwise equal to their single runs
(vmapped kernels round differently); the script prints how far their final ranks and
accuracies end up.

    python benchmarks/ensemble_transformer.py [--batch-sizes 8 32 128] [--k 8] [--steps 600]
"""

from __future__ import annotations

import argparse
import math

import torch
from ensemble import best_time

from rankbias.data import load_dataset
from rankbias.training.config import RunConfig
from rankbias.training.ensemble import train_ensemble
from rankbias.training.train import train_run

LRS = (0.02, 0.035, 0.05, 0.07)
WDS = (0.02, 0.05)
DATA = dict(p=23, train_fraction=0.8)


def configs(k: int, batch_size: int, epochs: int) -> list[RunConfig]:
    return [RunConfig(model="transformer", model_args=dict(depth=1, width=32, heads=4),
                      dataset="modular-addition", dataset_args=DATA, batch_size=batch_size,
                      lr=LRS[i % len(LRS)], weight_decay=WDS[i // len(LRS) % 2],
                      wd_scope="weights", seed=i, epochs=epochs, track_every=epochs,
                      device="cpu")
            for i in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600, help="SGD steps per run (about)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("modular-addition", **DATA)
    train_ensemble(configs(2, 8, 1), data)  # warm-up: first-call costs of torch and vmap
    train_run(configs(1, 8, 1)[0], data)
    print(f"transformer depth 1, width 32, 4 heads; modular-addition p=23 "
          f"({len(data.x_train)} train); K={args.k}; threads=1; best of {args.repeats}")
    for batch in args.batch_sizes:
        epochs = max(1, round(args.steps / math.ceil(len(data.x_train) / batch)))
        grid = configs(args.k, batch, epochs)
        seq_s, singles = best_time(lambda g=grid: [train_run(c, data) for c in g], args.repeats)
        ens_s, results = best_time(lambda g=grid: train_ensemble(g, data), args.repeats)
        steps = singles[0].steps
        assert all(r.status == s.status and r.steps == steps for r, s in zip(results, singles))
        final = {key: max(abs(r.summary[key] - s.summary[key])
                          for r, s in zip(results, singles))
                 for key in ("final_avg_rank", "final_avg_qk_rank", "train_acc", "test_acc")}
        print(f"B={batch}: {steps} steps per run; sequential {seq_s:.2f} s "
              f"({args.k * steps / seq_s:.0f} run-steps/s), ensemble {ens_s:.2f} s "
              f"({args.k * steps / ens_s:.0f} run-steps/s); members vs single runs: "
              + ", ".join(f"{k} within {v:.3g}" for k, v in final.items()))
        print(f"RESULT ensemble_transformer_B{batch} value={seq_s / ens_s:.2f} target=>=2")


if __name__ == "__main__":
    main()
