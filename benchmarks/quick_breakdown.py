"""Where a reproduction's training time went: core-seconds per model and optimizer, read from
the stacks' start and end times in its results.db (the members of one stack share both), and
the training span. Compare two reproductions (e.g. before and after a change, or default
against AVX2 kernels) in one call. The quick reproduction's target, 5 minutes on 2 cores,
is 600 core-seconds for training and the claims' evaluation together. --claims also
splits the core-seconds by claim (a stack's time shared among its members by their steps,
a run that several claims use shared equally among them): what each design costs.

    python benchmarks/quick_breakdown.py out/results.db other-out/results.db
    python benchmarks/quick_breakdown.py out/results.db --claims
"""

from __future__ import annotations

import argparse
import collections
import json
import sqlite3
from pathlib import Path


def stacks(path: str) -> dict[float, list[tuple[str, dict, float, int]]]:
    """The finished runs of one results.db by stack: {start: [(run_id, config, finished,
    steps)]}. A stack's members share its start time exactly; each records its own finish
    a few microseconds apart, so the stack ends at the last one."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT run_id, config, started, finished, steps FROM runs "
                          "WHERE status = 'done'").fetchall()
    grouped: dict[float, list[tuple[str, dict, float, int]]] = collections.defaultdict(list)
    for run_id, config, started, finished, steps in rows:
        grouped[started].append((run_id, json.loads(config), finished, steps))
    return grouped


def breakdown(grouped: dict) -> tuple[float, dict[str, float]]:
    """(training span in s, {model/optimizer: core-seconds}) of `stacks(path)`."""
    seconds: dict[str, float] = collections.defaultdict(float)
    for started, members in grouped.items():
        cfg = members[0][1]
        seconds[f"{cfg['model']}/{cfg['optimizer']}"] += max(m[2] for m in members) - started
    span = max(m[2] for members in grouped.values() for m in members) - min(grouped)
    return span, dict(sorted(seconds.items()))


def by_claim(grouped: dict, scale: str) -> dict[str, float]:
    """{experiment id: core-seconds} of the built-in experiments at `scale`."""
    from rankbias.claims.pipeline import list_experiments

    users: dict[str, list[str]] = collections.defaultdict(list)
    for experiment in list_experiments(scale):
        for cfg in experiment.configs:
            users[cfg.run_id()].append(experiment.id)
    seconds: dict[str, float] = collections.defaultdict(float)
    for started, members in grouped.items():
        duration = max(m[2] for m in members) - started
        total_steps = sum(m[3] for m in members) or 1
        for run_id, _, _, steps in members:
            claims = users.get(run_id, ["(no built-in experiment)"])
            for claim in claims:
                seconds[claim] += duration * steps / total_steps / len(claims)
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", help="results.db files")
    parser.add_argument("--claims", action="store_true",
                        help="also the core-seconds of each claim's design")
    parser.add_argument("--scale", default="quick", choices=["quick", "full", "paper"],
                        help="the scale the reproduction ran (for --claims; default quick)")
    args = parser.parse_args()
    stores = args.stores
    for path in stores:
        if not Path(path).is_file():
            parser.error(f"no results.db at {path}: give the results.db of a reproduction "
                         "(e.g. out/results.db)")
    for path in stores:
        grouped = stacks(path)
        span, seconds = breakdown(grouped)
        parts = ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
        print(f"{path}: span {span:.0f} s; core-seconds {sum(seconds.values()):.0f} ({parts})")
        # 5 minutes on 2 cores is 600 core-seconds, the claims' evaluation included.
        print(f"RESULT training_core_seconds value={sum(seconds.values()):.0f} target=<600")
        if args.claims:
            for claim, value in by_claim(grouped, args.scale).items():
                print(f"  {claim:28s} {value:6.1f}")


if __name__ == "__main__":
    main()
