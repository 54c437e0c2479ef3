"""Rewrite the README's reproduction sections from reproductions' claims.json.

    python .ci/readme_table.py                        # runs `rankbias reproduce --scale quick`
    python .ci/readme_table.py --from out/            # or takes out/claims.json of a run
    python .ci/readme_table.py --from out/ --full full-out/   # and the full-scale section

Between `<!-- claims:begin -->` and `<!-- claims:end -->` (and `<!-- full:begin -->` ...
`<!-- full:end -->`) the README gets the findings and the verdict table that
rankbias.claims.writeup writes from the run's claims.json, with its date and wall time, so
the README never shows words or numbers that no run printed. The claims.json files are kept
beside the docs (docs/results/, without the per-run rows) so that the text can be checked
against them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"


def block(folder: Path, scale: str, marker: str, when: str) -> str:
    from rankbias.claims.writeup import claims_markdown

    document = json.loads((folder / "claims.json").read_text())
    if document["scale"] != scale:
        sys.exit(f"{folder} holds a {document['scale']} reproduction, not the {scale} one")
    kept = {**document, "claims": [{**c, "evidence": {k: v for k, v in c["evidence"].items()
                                                      if k not in ("rows", "runs")}}
                                   for c in document["claims"]]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{scale}_claims.json").write_text(json.dumps(kept, indent=1) + "\n")
    note = (f"_Written from `rankbias reproduce --scale {scale}` of {when} "
            f"(docs/results/{scale}_claims.json). Regenerate with `python .ci/readme_table.py`._")
    return f"<!-- {marker}:begin -->\n{note}\n\n{claims_markdown(document)}<!-- {marker}:end -->"


def replace(text: str, marker: str, new: str) -> str:
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if begin not in text or end not in text:
        sys.exit(f"{README} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    return head + new + rest.split(end, 1)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", default=None,
                        help="folder of an earlier `rankbias reproduce --scale quick`")
    parser.add_argument("--full", default=None,
                        help="folder of a `rankbias reproduce --scale full`")
    args = parser.parse_args()
    text = README.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.source or tmp)
        if args.source is None:
            subprocess.run(["rankbias", "reproduce", "--scale", "quick", "--out", tmp,
                            "--no-progress"], check=True)
        when = _date(folder / "claims.json")
        text = replace(text, "claims", block(folder, "quick", "claims", when))
    if args.full:
        full = Path(args.full)
        text = replace(text, "full", block(full, "full", "full", _date(full / "claims.json")))
    README.write_text(text)
    print(f"rewrote the reproduction sections of {README}")
    return 0


def _date(path: Path) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))


if __name__ == "__main__":
    sys.exit(main())
