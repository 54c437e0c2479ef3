"""Wall time of `rankbias reproduce --scale quick` on this machine, for a GPU machine.

Runs the whole quick reproduction into a fresh folder (every claim, all the CPUs this
process may use as workers, `device: auto`, so CUDA where there is one) and prints its
verdicts. The target is the 2-core CPU machine's time, measured there with the same
command (benchmarks/README.md): a GPU should not be slower.

    python benchmarks/gpu_reproduce_quick.py [--cpu-seconds 264] [--workers N]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

from rankbias.claims.pipeline import reproduce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-seconds", type=float, default=264,
                        help="the 2-core CPU machine's time for the same command")
    parser.add_argument("--workers", type=int, default=None, help="default: every CPU")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        document = reproduce(scale="quick", out=folder, workers=args.workers, progress=False,
                             stdout=io.StringIO())
        seconds = time.perf_counter() - start
    verdicts = {c["id"]: c["verdict"] for c in document["claims"]}
    print(f"reproduce --scale quick: {seconds:.0f} s; verdicts {verdicts}")
    print(f"RESULT gpu_reproduce_quick value={seconds:.0f} target=<={args.cpu_seconds:.0f}")


if __name__ == "__main__":
    main()
