"""Wall time of `rankbias reproduce --scale quick`, with and without ensembles.

Both into fresh output folders in this run, all cores (2 workers here), no progress bars;
the verdicts of both must agree.

    python benchmarks/reproduce_quick.py
"""

from __future__ import annotations

import io
import tempfile
import time

from rankbias.claims.pipeline import reproduce


def timed(folder: str, ensemble: str) -> tuple[float, list[str]]:
    start = time.perf_counter()
    document = reproduce(scale="quick", out=folder, ensemble=ensemble, progress=False,
                         stdout=io.StringIO())
    return time.perf_counter() - start, [c["verdict"] for c in document["claims"]]


def main() -> None:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        off, verdicts_off = timed(a, "off")
        auto, verdicts_auto = timed(b, "auto")
    assert verdicts_off == verdicts_auto, (verdicts_off, verdicts_auto)
    print(f"reproduce --scale quick: {off:.0f} s with --ensemble off, {auto:.0f} s with "
          f"--ensemble auto; verdicts {verdicts_auto}")
    print(f"RESULT reproduce_quick_ensemble_speedup value={off / auto:.2f} target=>=1")
    print(f"RESULT reproduce_quick value={auto:.0f} target=<=600")


if __name__ == "__main__":
    main()
