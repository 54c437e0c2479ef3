"""The output of `rankbias analyze`: a table, CSV or JSON of the matrices it analyzed, the
tensors it skipped and why, and the attention products when asked for.

    rankbias analyze gpt2/ --format json | jq '.skipped'

JSON: {"source", "layers": [{"name", "role", "tensor", "transposed", "shape", "rank",
"ranks", "stable_rank", ...}], "average_rank", "average_ranks", "tolerances",
"matrices_averaged", "left_out", "skipped": [{"name", "shape", "reason"}],
"attention_products": [{"name", "layer", "head", "kind", "shape", "rank", ...}], "notes"}.
CSV: one row per matrix, then one per product (role product_qk or product_ov). The table:
the matrices, the average, the skipped tensors counted by reason, then the products.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rankbias.analyze.matrices import skipped_summary
from rankbias.metrics.spectral import SpectralSummary
from rankbias.utils import RankbiasError, text_table, to_json


@dataclass
class Analysis:
    """What `rankbias analyze` found: the averaged matrices and everything else, accounted."""

    source: str
    summaries: dict[str, SpectralSummary]  # the matrices of the average, in model order
    roles: dict[str, str]
    tensors: dict[str, str]  # row name -> the stored tensor it comes from
    transposed: set[str]  # rows stored in x out (Conv1D)
    skipped: list[dict]  # {"name", "shape", "reason"}
    left_out: list[str]
    products: list[dict] = field(default_factory=list)  # {"name", "layer", "head", "kind", summary}
    notes: list[str] = field(default_factory=list)


_METRICS = ["stable_rank", "effective_rank", "fro_norm", "spectral_norm"]


def _rows(result: Analysis) -> list[dict]:
    return [{"name": name, "role": result.roles[name], "tensor": result.tensors[name],
             "transposed": name in result.transposed, **s.as_dict()}
            for name, s in result.summaries.items()]


def _product_rows(result: Analysis) -> list[dict]:
    return [{"name": p["name"], "role": f"product_{p['kind']}", "layer": p["layer"],
             "head": p["head"], "kind": p["kind"], **p["summary"].as_dict()}
            for p in result.products]


def _cells(row: dict, tols: Sequence[float]) -> list:
    return ([row["name"], "x".join(map(str, row["shape"]))]
            + [row["ranks"][repr(t)] for t in tols] + [row[m] for m in _METRICS] + [row["role"]])


def _text(table: list[list]) -> list[list[str]]:
    return [[c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float) else str(c)
             for c in row] for row in table]


def format_analysis(result: Analysis, tols: Sequence[float], fmt: str) -> str:
    """The per-layer table (table, csv or json) of `result`."""
    rows, products = _rows(result), _product_rows(result)
    averages = {repr(t): float(np.mean([s.rank(t) for s in result.summaries.values()]))
                for t in tols}
    if fmt == "json":
        return to_json({"source": result.source, "layers": rows,
                        "average_rank": averages[repr(tols[0])], "average_ranks": averages,
                        "tolerances": list(tols), "matrices_averaged": len(rows),
                        "left_out": list(result.left_out), "skipped": result.skipped,
                        "attention_products": products, "notes": result.notes}) + "\n"
    columns = (["name", "shape"] + [f"rank@{t:g}" for t in tols] + _METRICS + ["role"])
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(_cells(r, tols) for r in rows + products)
        return buffer.getvalue()
    if fmt != "table":
        raise RankbiasError(f"unknown format {fmt!r}: use table, csv or json")
    per_tol = ", ".join(f"{averages[repr(t)]:.2f} (tol {t:g})" for t in tols)
    lines = [text_table([columns, *_text([_cells(r, tols) for r in rows])]),
             f"average rank over {len(rows)} matrices: {per_tol}"]
    if result.left_out:
        lines[-1] += ("; left out (the paper's selection, --all includes them): "
                      + ", ".join(result.left_out))
    lines[-1] += "\n"
    if result.transposed:
        lines.append(f"{len(result.transposed)} matrices are stored in x out (GPT-2's Conv1D) "
                     "and reported as (out, in)\n")
    lines.append(f"{skipped_summary(result.skipped)} (--format json lists them)\n"
                 if result.skipped else "no tensor skipped\n")
    if products:
        lines.append("\nattention products per head: qk = W_Q^T W_K, ov = W_O W_V\n")
        lines.append(text_table([columns, *_text([_cells(r, tols) for r in products])]))
    lines.extend(f"note: {note}\n" for note in result.notes)
    return "".join(lines)
