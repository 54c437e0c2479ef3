"""A ConvNet grid swept with `--ensemble auto` against `--ensemble off`: speed and numbers.

The claim-4 ConvNet design at quick scale (digits, width 32, B in {16, 32, 64}, lr 0.5,
wd 0.05, 30 epochs, 8 seeds), swept twice into fresh stores with all cores as workers:
once with compatible runs stacked (the default), once one run at a time. Both must hold
the same run ids; stacked members are not bitwise equal to their single twins (rankbias/
stack.py), so the numbers the verdicts use are compared: per setting (B), the mean over
seeds of the final average rank (within 0.5) and of the train and test accuracy (within
0.005).

    python benchmarks/ensemble_sweep.py [--seeds 8] [--epochs 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rankbias.store import Store
from rankbias.sweep import expand, run_sweep


def sweep(configs, folder: Path, ensemble: str):
    start = time.perf_counter()
    run_sweep(configs, folder / f"{ensemble}.db", ensemble=ensemble, progress=False)
    seconds = time.perf_counter() - start
    with Store(folder / f"{ensemble}.db") as store:
        runs = store.runs()
    return seconds, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    configs = expand({"base": {"model": "convnet", "model_args": {"width": 32, "depth": 2},
                               "dataset": "digits", "lr": 0.5, "weight_decay": 0.05,
                               "schedule": "multistep", "milestones": [15, 22],
                               "epochs": args.epochs, "track_every": 3},
                      "grid": {"batch_size": [16, 32, 64]}, "seeds": list(range(args.seeds))})
    with tempfile.TemporaryDirectory() as tmp:
        off, single = sweep(configs, Path(tmp), "off")
        auto, stacked = sweep(configs, Path(tmp), "auto")
    assert set(single.run_id) == set(stacked.run_id) == {c.run_id() for c in configs}
    columns = ["final_avg_rank", "train_acc", "test_acc"]
    means = {name: runs.groupby("batch_size")[columns].mean()
             for name, runs in (("off", single), ("auto", stacked))}
    gap = (means["auto"] - means["off"]).abs().max()
    print(means["off"].round(4).to_string())
    print(means["auto"].round(4).to_string())
    print(f"{len(configs)} runs: {off:.0f} s one at a time, {auto:.0f} s stacked; largest "
          f"difference of a setting's mean: rank {gap['final_avg_rank']:.3f} (within 0.5), "
          f"train acc {gap['train_acc']:.4f}, test acc {gap['test_acc']:.4f} (within 0.005)")
    print(f"RESULT ensemble_sweep_convnet value={off / auto:.2f} target=>=2")


if __name__ == "__main__":
    main()
