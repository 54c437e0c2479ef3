"""The verdicts of several quick reproductions (e.g. under different CPU kernels) must agree.

    python .ci/compare_verdicts.py ci-out/native/claims.json ci-out/avx2/claims.json ...

Prints one line per claim with each run's verdict; exits 1 when any claim differs.
"""

import json
import sys


def main(paths: list[str]) -> int:
    runs = [{c["id"]: c["verdict"] for c in json.load(open(p))["claims"]} for p in paths]
    differ = [name for name in runs[0] if len({r.get(name) for r in runs}) > 1]
    for name in runs[0]:
        print(f"{name:20s} " + "  ".join(f"{r.get(name, '-'):12s}" for r in runs)
              + ("  <- differs" if name in differ else ""))
    if differ or any(set(r) != set(runs[0]) for r in runs):
        print(f"verdicts differ between {', '.join(paths)}: {', '.join(differ)}")
        return 1
    print(f"same verdicts in all {len(paths)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
