"""Sweep throughput: 2 local worker processes vs 1 on a 2-core machine.

The same sweep (MLP-BN 6x100, digits, B=8, different seeds) as a fresh `rankbias sweep`
process per side, each in its own empty folder, ensembles off, timed in this run from
process start to exit (imports and worker start-up, ~3 s, included on both sides: runs of
a few seconds each are needed for that fixed cost not to hide the throughput).

    python benchmarks/workers.py [--runs 8] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def timed_sweep(spec: dict, workers: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sweep.yaml"
        path.write_text(yaml.safe_dump(spec))
        command = [sys.executable, "-m", "rankbias.cli.main", "sweep", str(path), "--store",
                   str(Path(folder) / "results.db"), "--workers", str(workers), "--ensemble",
                   "off", "--no-progress", "--format", "json"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - start
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["executed"] == len(spec["seeds"]) and summary["failed"] == 0, summary
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    spec = {"base": {"model": "mlp", "batch_size": 8, "lr": 0.1, "weight_decay": 5e-3,
                     "epochs": args.epochs}, "seeds": list(range(args.runs))}
    one = timed_sweep(spec, 1)
    two = timed_sweep(spec, 2)
    print(f"{args.runs} runs of {args.epochs} epochs: 1 worker {one:.1f} s "
          f"({args.runs / one * 60:.1f} runs/min), 2 workers {two:.1f} s "
          f"({args.runs / two * 60:.1f} runs/min)")
    print(f"RESULT workers value={one / two:.2f} target=>=1.8")


if __name__ == "__main__":
    main()
