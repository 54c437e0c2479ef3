"""`rankbias analyze`: the rank of every weight matrix of a saved model or checkpoint.

Accepts a state_dict, a full pickled model (only with trust=True: unpickling runs code from
the file) or a rankbias checkpoint (the model is rebuilt, so the paper's selection of hidden
matrices applies).
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

import numpy as np
import torch
from torch import nn

from rankbias.metrics.layers import weight_matrices
from rankbias.metrics.spectral import SpectralSummary, summarize_many
from rankbias.training.checkpoint import is_checkpoint, model_from_checkpoint
from rankbias.utils import RankbiasError, atomic_path, text_table, to_json


def load_model_or_state(path: str | os.PathLike, trust: bool = False
                        ) -> nn.Module | Mapping[str, torch.Tensor]:
    """Load what `torch.save` wrote: a module, a rankbias checkpoint's model or a state_dict."""
    if not os.path.isfile(path):
        raise RankbiasError(f"no such file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a class to allow: bad bytes
            raise RankbiasError(f"cannot read {path}: corrupt or not a PyTorch file") from err
        if not trust:
            raise RankbiasError(f"{path} holds pickled Python objects (a full saved model?); "
                                "rerun with --trust if you trust where it came from") from err
        obj = _load_trusted(path)
    except Exception as err:  # zip, EOF and stream errors all mean the same to a user
        raise RankbiasError(f"cannot read {path}: corrupt, truncated or not a PyTorch file "
                            f"({type(err).__name__})") from err
    return _model_or_state(obj, path)


def _load_trusted(path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise RankbiasError(f"cannot unpickle {path}: {err}".splitlines()[0]) from err


def _model_or_state(obj, path) -> nn.Module | Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj
    if is_checkpoint(obj):
        return model_from_checkpoint(obj)
    if isinstance(obj, Mapping) and obj.get("format") == "rankbias-compressed":
        from rankbias.compress.compress import dense_equivalent  # factor pairs as their products

        return dense_equivalent(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise RankbiasError(f"{path} holds no model, state_dict or rankbias checkpoint")


def analyze(source: nn.Module | Mapping[str, torch.Tensor], tols: Sequence[float] = (1e-3,),
            relative: bool = False, include_all: bool = False) -> dict[str, SpectralSummary]:
    """Summaries of the selected weight matrices of a model or state_dict, in model order."""
    matrices = weight_matrices(source, include_classifier=include_all,
                               include_shortcuts=include_all)
    if not matrices:
        raise RankbiasError("found no weight matrix (no Linear, Conv or attention weights)")
    return summarize_many(matrices, tols, relative)


def average_rank(summaries: Mapping[str, SpectralSummary], tol: float | None = None) -> float:
    """The paper's average rank: the plain mean over the selected matrices."""
    return float(np.mean([s.rank(tol) for s in summaries.values()]))


def analyze_file(path: str | os.PathLike, tols: Sequence[float] = (1e-3,), relative: bool = False,
                 fmt: str = "table", spectra_path: str | None = None, include_all: bool = False,
                 trust: bool = False, out: TextIO = sys.stdout) -> dict[str, SpectralSummary]:
    """Load `path`, print per-layer metrics in `fmt`, optionally save the spectra."""
    for tol in tols:
        if not tol >= 0:
            raise RankbiasError(f"--tol must be >= 0, got {tol}")
    source = load_model_or_state(path, trust)
    summaries = analyze(source, tols, relative, include_all)
    left_out = [name for name in weight_matrices(source, True, True) if name not in summaries]
    if spectra_path:
        with atomic_path(spectra_path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **{name: s.singular_values for name, s in summaries.items()})
    out.write(format_summaries(summaries, tols, fmt, left_out))
    return summaries


def format_summaries(summaries: Mapping[str, SpectralSummary], tols: Sequence[float],
                     fmt: str, left_out: Sequence[str] = ()) -> str:
    """The per-layer table (table, csv or json). `left_out`: matrices the paper's
    selection dropped (classifier, 1x1 shortcuts), named so the average says what it
    covers."""
    rows = [{"name": name, **s.as_dict()} for name, s in summaries.items()]
    averages = {repr(t): average_rank(summaries, t) for t in tols}
    if fmt == "json":
        return to_json({"layers": rows, "average_rank": averages[repr(tols[0])],
                        "average_ranks": averages, "tolerances": list(tols),
                        "matrices_averaged": len(rows), "left_out": list(left_out)}) + "\n"
    columns = ["name", "shape"] + [f"rank@{t:g}" for t in tols] + [
        "stable_rank", "effective_rank", "fro_norm", "spectral_norm"]
    table = [[r["name"], "x".join(map(str, r["shape"]))] + [r["ranks"][repr(t)] for t in tols]
             + [r["stable_rank"], r["effective_rank"], r["fro_norm"], r["spectral_norm"]]
             for r in rows]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(table)
        return buffer.getvalue()
    if fmt != "table":
        raise RankbiasError(f"unknown format {fmt!r}: use table, csv or json")
    text = [[c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float) else str(c)
             for c in row] for row in table]
    per_tol = ", ".join(f"{averages[repr(t)]:.2f} (tol {t:g})" for t in tols)
    note = (f"; left out (the paper's selection, --all includes them): {', '.join(left_out)}"
            if left_out else "")
    return (text_table([columns, *text])
            + f"average rank over {len(rows)} matrices: {per_tol}{note}\n")
