"""Sweep throughput: 2 local worker processes vs 1 on a 2-core machine.

The same 6 runs (MLP-BN 6x100, digits, B=8, different seeds) through `run_sweep` with
--workers 1 and --workers 2, each into a fresh store, ensembles off, timed in this run
(worker start-up included on both sides).

    python benchmarks/workers.py [--runs 6] [--epochs 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rankbias.config import RunConfig
from rankbias.sweep import run_sweep


def timed_sweep(configs: list[RunConfig], workers: int, folder: Path) -> float:
    start = time.perf_counter()
    summary = run_sweep(configs, folder / f"w{workers}.db", workers=workers, ensemble="off",
                        progress=False)
    assert summary.executed == len(configs) and summary.failed == 0
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    configs = [RunConfig(model="mlp", batch_size=8, lr=0.1, weight_decay=5e-3,
                         epochs=args.epochs, seed=seed) for seed in range(args.runs)]
    with tempfile.TemporaryDirectory() as folder:
        one = timed_sweep(configs, 1, Path(folder))
        two = timed_sweep(configs, 2, Path(folder))
    print(f"{args.runs} runs of {args.epochs} epochs: 1 worker {one:.1f} s "
          f"({args.runs / one * 60:.1f} runs/min), 2 workers {two:.1f} s "
          f"({args.runs / two * 60:.1f} runs/min)")
    print(f"RESULT workers value={one / two:.2f} target=>=1.8")


if __name__ == "__main__":
    main()
