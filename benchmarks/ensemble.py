"""K small-batch runs: one lockstep ensemble (train_ensemble) vs one train_run after another.

MLP-BN 6x100 on digits at B = 8, members with different lr / weight decay / seed, the same
number of epochs (so of steps) both ways, one thread, both timed in this run (best of
--repeats, the same for both: the machine may be shared). The sequential time of K = 32 is
extrapolated from the K = 8 sequential time per run (32 single runs would add minutes to
measure the same per-run cost). Each ensemble member's rows are also compared with those of
its single run where both were run. `--engine generic` trains the MLPs with the generic
engine (rankbias.training.stack.ModelStack) instead of the hand-written MLP stack, to show why the
latter is kept on CPU. ATEN_CPU_CAPABILITY=avx2 / =default in the environment stand in for
other CPUs (docs/performance.md, "Different CPUs, different trajectories").

    python benchmarks/ensemble.py [--epochs 3] [--sizes 8 32] [--repeats 2] [--engine auto]
"""

from __future__ import annotations

import argparse
import time

import torch

import rankbias.training.ensemble
from rankbias.data import load_dataset
from rankbias.training.config import RunConfig
from rankbias.training.ensemble import train_ensemble
from rankbias.training.train import train_run

LRS = (0.05, 0.1, 0.2, 0.4)
WDS = (1e-3, 5e-3)


def configs(k: int, epochs: int) -> list[RunConfig]:
    """K MLP-BN 6x100 members spread over lr, weight decay and seed."""
    return [RunConfig(model="mlp", model_args=dict(depth=6, width=100, batch_norm=True),
                      batch_size=8, lr=LRS[i % len(LRS)], weight_decay=WDS[i // len(LRS) % 2],
                      seed=i, epochs=epochs, track_every=epochs, device="cpu")
            for i in range(k)]


def best_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def deviation(a, b) -> float:
    """Largest relative difference between two runs' recorded values (wall_s aside)."""
    pairs = [(x[4], y[4]) for x, y in zip(a.rows, b.rows) if x[3] != "wall_s"]
    assert len(a.rows) == len(b.rows)
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engine", choices=["auto", "generic"], default="auto",
                        help="auto: the hand-written MLP stack on CPU; generic: ModelStack")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.engine == "generic":
        rankbias.training.ensemble.handwritten_mlp = lambda cfg: False
    data = load_dataset("digits")  # loaded once, outside the timings
    train_ensemble(configs(2, 1), data)  # warm-up: first-call costs of torch and MKL
    train_run(configs(1, 1)[0], data)
    base = min(args.sizes)
    print(f"MLP-BN 6x100, digits ({len(data.x_train)} train), B=8, {args.epochs} epochs, "
          f"threads=1, best of {args.repeats}, engine {args.engine}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    seq_s, singles = best_time(lambda: [train_run(c, data) for c in configs(base, args.epochs)],
                               args.repeats)
    per_run, steps = seq_s / base, singles[0].steps
    print(f"sequential K={base}: {seq_s:.2f} s ({per_run:.3f} s/run, {steps} steps/run, "
          f"{steps / per_run:.0f} steps/s)")
    speedups = {}
    for k in args.sizes:
        ens_s, results = best_time(lambda k=k: train_ensemble(configs(k, args.epochs), data),
                                   args.repeats)
        assert all(r.status == "done" and r.steps == steps for r in results)
        worst = max(deviation(a, b) for a, b in zip(results, singles))
        seq_k = per_run * k
        how = "measured" if k == base else f"extrapolated from K={base}"
        speedups[k] = seq_k / ens_s
        print(f"K={k}: ensemble {ens_s:.2f} s ({k * steps / ens_s:.0f} member-steps/s), "
              f"sequential {seq_k:.2f} s ({how}), speedup {speedups[k]:.1f}x; max relative "
              f"deviation from the single runs: {worst:.1e} ({min(k, base)} compared)")
    suffix = "" if args.engine == "auto" else f"_{args.engine}"
    for k in args.sizes:
        if k != 8:
            print(f"RESULT ensemble{suffix}_k{k} value={speedups[k]:.2f}")
    print(f"RESULT ensemble{suffix} value={speedups.get(8, speedups[base]):.2f} target=>=4")


if __name__ == "__main__":
    main()
