"""Where a reproduction's training time went: core-seconds per model and optimizer, read from
the stacks' start and end times in its results.db (the members of one stack share both), and
the training span. Compare two reproductions (e.g. before and after a change, or default
against AVX2 kernels) in one call. The quick reproduction's target, 5 minutes on 2 cores,
is 600 core-seconds for training and the claims' evaluation together.

    python benchmarks/quick_breakdown.py out/results.db other-out/results.db
"""

from __future__ import annotations

import argparse
import collections
import json
import sqlite3
from pathlib import Path


def breakdown(path: str) -> tuple[float, dict[str, float]]:
    """(training span in s, {model/optimizer: core-seconds}) of one results.db."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT config, started, finished FROM runs WHERE status = 'done'"
                          ).fetchall()
    # A stack's members share its start time exactly; each records its own finish a few
    # microseconds apart, so the stack is identified by its start and ends at the last one.
    stacks: dict[float, tuple[float, str]] = {}
    for config, started, finished in rows:
        cfg = json.loads(config)
        end = max(finished, stacks.get(started, (finished, ""))[0])
        stacks[started] = (end, f"{cfg['model']}/{cfg['optimizer']}")
    seconds: dict[str, float] = collections.defaultdict(float)
    for started, (finished, key) in stacks.items():
        seconds[key] += finished - started
    span = max(f for f, _ in stacks.values()) - min(stacks)
    return span, dict(sorted(seconds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", help="results.db files")
    stores = parser.parse_args().stores
    for path in stores:
        if not Path(path).is_file():
            parser.error(f"no results.db at {path}: give the results.db of a reproduction "
                         "(e.g. out/results.db)")
    for path in stores:
        span, seconds = breakdown(path)
        parts = ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
        print(f"{path}: span {span:.0f} s; core-seconds {sum(seconds.values()):.0f} ({parts})")
        # 5 minutes on 2 cores is 600 core-seconds, the claims' evaluation included.
        print(f"RESULT training_core_seconds value={sum(seconds.values()):.0f} target=<600")


if __name__ == "__main__":
    main()
