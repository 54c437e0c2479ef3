"""A ConvNet grid swept with `--ensemble auto` against `--ensemble off`: speed and numbers.

The claim-4 ConvNet design at quick scale (digits, width 32, B in {16, 32, 64}, lr 0.5,
wd 0.05, 30 epochs, 32 seeds), swept into fresh stores with all cores as workers: once
with compatible runs stacked (the default), once one run at a time. Both must hold the
same run ids; the speed ratio is the RESULT.

Stacked members are not bitwise equal to their single twins (rankbias/training/stack.py), and at
lr 0.5 a rounding difference grows until twins agree only statistically, so the numbers
the verdicts use are compared per setting (B): the mean over seeds of the final average
rank (within 0.5) and of the train and test accuracy (within 0.005), with the standard
error of the paired (same run id) differences. The yardstick for "the same numbers" is
the difference another CPU makes: a third sweep runs one at a time with AVX2 kernels
(`ATEN_CPU_CAPABILITY=avx2`, in a child process: the kernels are chosen per process),
and stacked runs should differ from single runs no more than that (`--no-control` skips
it).

    python benchmarks/ensemble_sweep.py [--seeds 32] [--epochs 30] [--no-control]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from rankbias.runs.store import Store
from rankbias.runs.sweep import expand, run_sweep

COLUMNS = ["final_avg_rank", "train_acc", "test_acc"]


def grid(seeds: int, epochs: int) -> list:
    return expand({"base": {"model": "convnet", "model_args": {"width": 32, "depth": 2},
                            "dataset": "digits", "lr": 0.5, "weight_decay": 0.05,
                            "schedule": "multistep", "milestones": [15, 22],
                            "epochs": epochs, "track_every": 3},
                   "grid": {"batch_size": [16, 32, 64]}, "seeds": list(range(seeds))})


def sweep(configs, store: Path, ensemble: str) -> float:
    start = time.perf_counter()
    run_sweep(configs, store, ensemble=ensemble, progress=False)
    return time.perf_counter() - start


def runs_of(store: Path) -> pd.DataFrame:
    with Store(store) as opened:
        return opened.runs().set_index("run_id")


def compare(name: str, runs: pd.DataFrame, reference: pd.DataFrame) -> None:
    """Per setting, the mean paired difference of each verdict number, and its largest SE."""
    paired = runs[COLUMNS] - reference.loc[runs.index, COLUMNS]
    by_setting = paired.groupby(reference.loc[runs.index, "batch_size"])
    gap, noise = by_setting.mean().abs().max(), by_setting.sem().max()
    print(f"{name}: largest difference of a setting's mean (largest paired SE): rank "
          f"{gap['final_avg_rank']:.3f} ({noise['final_avg_rank']:.3f}; within 0.5), train acc "
          f"{gap['train_acc']:.4f} ({noise['train_acc']:.4f}), test acc {gap['test_acc']:.4f} "
          f"({noise['test_acc']:.4f}; within 0.005)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--no-control", action="store_true",
                        help="skip the single-run sweep with AVX2 kernels")
    parser.add_argument("--only-off", type=Path, help=argparse.SUPPRESS)  # the control child
    args = parser.parse_args()
    configs = grid(args.seeds, args.epochs)
    if args.only_off:
        sweep(configs, args.only_off, "off")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        off = sweep(configs, folder / "off.db", "off")
        auto = sweep(configs, folder / "auto.db", "auto")
        single, stacked = runs_of(folder / "off.db"), runs_of(folder / "auto.db")
        if not args.no_control:
            subprocess.run([sys.executable, __file__, "--seeds", str(args.seeds), "--epochs",
                            str(args.epochs), "--only-off", str(folder / "avx2.db")],
                           env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}, check=True)
            other_cpu = runs_of(folder / "avx2.db")
    assert set(single.index) == set(stacked.index) == {c.run_id() for c in configs}
    for name, runs in (("one at a time", single), ("stacked", stacked)):
        print(f"{name}, mean over seeds:")
        print(runs.groupby("batch_size")[COLUMNS].mean().round(4).to_string())
    print(f"{len(configs)} runs: {off:.0f} s one at a time, {auto:.0f} s stacked")
    compare("stacked - one at a time", stacked, single)
    if not args.no_control:
        compare("one at a time, AVX2 kernels - default kernels", other_cpu, single)
        compare("stacked - one at a time with AVX2 kernels", stacked, other_cpu)
    print(f"RESULT ensemble_sweep_convnet value={off / auto:.2f} target=>=2")


if __name__ == "__main__":
    main()
