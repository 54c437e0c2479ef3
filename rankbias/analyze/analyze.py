"""`rankbias analyze`: the rank of every weight matrix of a saved model or checkpoint.

    rankbias analyze model.pt --tol 1e-3 --tol 0.05 --format json
    rankbias analyze gpt2/ --split-qkv --attention-products --device auto
    rankbias analyze model.safetensors --include '*.mlp.*' --exclude '*.h.0.*'

Reads a torch.save file (a state_dict; a rankbias checkpoint, whose model is rebuilt so the
paper's selection of hidden matrices applies; a full pickled model only with trust=True,
since unpickling runs code), a .safetensors file, or a Hugging Face folder, single or
sharded (rankbias/analyze/sources.py). Tensors are read one at a time and only those
analyzed; rankbias/analyze/matrices.py says which are matrices and what each is for, and
rankbias/analyze/spectra.py computes their singular values.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

import numpy as np
import torch
from torch import nn

from rankbias.analyze import matrices as mx
from rankbias.analyze.report import Analysis, format_analysis
from rankbias.analyze.sources import (
    TensorSource,
    memory_source,
    open_tensor_files,
    read_torch_file,
    state_dict_of,
    torch_file_source,
)
from rankbias.analyze.spectra import attention_spectra, resolve_device, singular_values
from rankbias.metrics.layers import attention_layers, classifier_name, weight_matrices
from rankbias.metrics.spectral import SpectralSummary, summarize_many, summary_from_singular_values
from rankbias.training.checkpoint import is_checkpoint, model_from_checkpoint
from rankbias.utils import RankbiasError, atomic_path


def load_model_or_state(path: str | os.PathLike, trust: bool = False
                        ) -> nn.Module | Mapping[str, torch.Tensor]:
    """Load what `torch.save` wrote: a module, a rankbias checkpoint's model or a state_dict."""
    obj = read_torch_file(path, trust)
    return _model_of(obj) or state_dict_of(obj, path)


def _model_of(obj) -> nn.Module | None:
    if isinstance(obj, nn.Module):
        return obj
    if is_checkpoint(obj):
        return model_from_checkpoint(obj)
    if isinstance(obj, Mapping) and obj.get("format") == "rankbias-compressed":
        from rankbias.compress.compress import dense_equivalent  # factor pairs as their products

        return dense_equivalent(obj)
    return None


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


# --- a checkpoint on disk ---------------------------------------------------------------------
def module_source(model: nn.Module, description: str
                  ) -> tuple[TensorSource, dict[str, str], dict[str, tuple[int, int, int]]]:
    """A model's state_dict as a source, the roles its modules give (the classifier: the
    last nn.Linear registered) and its attention layers' heads."""
    head, state = classifier_name(model), model.state_dict()
    known: dict[str, str] = {}
    for name in weight_matrices(model, True, True):
        tensor = name.split(":")[0]  # an in-projection's parts come from one tensor
        known[tensor] = ("classifier" if tensor == f"{head}.weight" else
                         mx.role_of(tensor, state[tensor].ndim, state[tensor].shape))
    heads = {name: (layout.n_heads, layout.n_kv_heads, layout.head_dim)
             for name, layout in attention_layers(model).items()}
    return memory_source(state, description), known, heads


def open_source(path: str | os.PathLike, trust: bool = False):
    """(source, known roles or None, attention heads by layer) of whatever `path` holds."""
    source = open_tensor_files(path)
    if source is not None:
        return source, None, {}
    obj = read_torch_file(path, trust)
    model = _model_of(obj)
    if model is not None:
        return module_source(model, f"model in {path}")
    return torch_file_source(path, obj, trust), None, {}


def analyze_path(path: str | os.PathLike, tols: Sequence[float] = (1e-3,),
                 relative: bool = False, include_all: bool = False,
                 include: Sequence[str] = (), exclude: Sequence[str] = (),
                 split_qkv: bool = False, attention_products: bool = False,
                 device: str = "cpu", progress: bool | None = False,
                 trust: bool = False, workers: int = 1) -> Analysis:
    """Analyze the checkpoint at `path` (file or Hugging Face folder), reading one tensor at
    a time. Raises `RankbiasError` when it holds no matrix to analyze."""
    for tol in tols:
        if not tol >= 0:
            raise RankbiasError(f"--tol must be >= 0, got {tol}")
    where = resolve_device(device)
    source, known, layer_heads = open_source(path, trust)
    chosen = mx.plan(source.entries, source.config, include_all, include, exclude, split_qkv,
                     attention_products, known, layer_heads, source.ordered)
    sigmas = {m.name: s for m, s in singular_values(chosen.matrices, source, where, progress,
                                                    workers=workers)}
    summaries = {m.name: summary_from_singular_values(sigmas[m.name], m.shape, tols, relative)
                 for m in chosen.matrices}
    result = Analysis(source.description, summaries,
                      {m.name: m.role for m in chosen.matrices},
                      {m.name: m.entry.name for m in chosen.matrices},
                      {m.name for m in chosen.matrices if m.transposed},
                      chosen.skipped, chosen.left_out, notes=chosen.attention_notes)
    for layer, kind, sigma, shape in attention_spectra(chosen.attention, source, where,
                                                       progress):
        for head, values in enumerate(sigma):
            result.products.append({
                "name": f"{layer.name}.head{head}.{kind}", "layer": layer.name, "head": head,
                "kind": kind, "summary": summary_from_singular_values(values, shape, tols,
                                                                      relative)})
    return result


def analyze_file(path: str | os.PathLike, tols: Sequence[float] = (1e-3,), relative: bool = False,
                 fmt: str = "table", spectra_path: str | None = None, include_all: bool = False,
                 trust: bool = False, out: TextIO = sys.stdout, include: Sequence[str] = (),
                 exclude: Sequence[str] = (), split_qkv: bool = False,
                 attention_products: bool = False, device: str = "cpu",
                 progress: bool | None = False, workers: int = 1
                 ) -> dict[str, SpectralSummary]:
    """Analyze `path`, print per-layer metrics in `fmt`, optionally save the spectra (the
    products' too, under their names); return the summaries of the averaged matrices."""
    if fmt not in ("table", "csv", "json"):
        raise RankbiasError(f"unknown format {fmt!r}: use table, csv or json")
    result = analyze_path(path, tols, relative, include_all, include, exclude, split_qkv,
                          attention_products, device, progress, trust, workers)
    text = format_analysis(result, tols, fmt)
    if spectra_path:
        spectra = {name: s.singular_values for name, s in result.summaries.items()}
        spectra.update({p["name"]: p["summary"].singular_values for p in result.products})
        with atomic_path(spectra_path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **spectra)
    out.write(text)
    return result.summaries
