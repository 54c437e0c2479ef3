"""Rewrite the README's reproduction table from a quick reproduction.

    python .ci/readme_table.py              # runs `rankbias reproduce --scale quick` first
    python .ci/readme_table.py --from out/  # or takes out/claims.md of an earlier run

The table between the markers `<!-- claims:begin -->` and `<!-- claims:end -->` becomes
the run's claims.md (what `rankbias reproduce` writes), with its scale, date and wall time,
so the README never shows numbers that no run printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", default=None,
                        help="folder of an earlier `rankbias reproduce --scale quick`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.source or tmp)
        if args.source is None:
            subprocess.run(["rankbias", "reproduce", "--scale", "quick", "--out", tmp,
                            "--no-progress"], check=True)
        document = json.loads((folder / "claims.json").read_text())
        table = (folder / "claims.md").read_text()
    if document["scale"] != "quick":
        sys.exit(f"{folder} holds a {document['scale']} reproduction, not the quick one")
    when = time.strftime("%Y-%m-%d", time.localtime((folder / "claims.json").stat().st_mtime)) \
        if args.source else time.strftime("%Y-%m-%d")
    block = (f"{BEGIN}\n_Printed by `rankbias reproduce --scale quick` on {when}: "
             f"{document['sweep']['total']} runs, {document['wall_s']:.0f} s. Regenerate with "
             f"`python .ci/readme_table.py`._\n\n{table}{END}")
    text = README.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{README} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    README.write_text(head + block + rest.split(END, 1)[1])
    print(f"rewrote the reproduction table of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
