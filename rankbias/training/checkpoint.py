"""The checkpoint of one run: one file, written atomically, read back with weights only.

    {"format": "rankbias-checkpoint", "version": 1, "run_id", "config" (the normal form of
     the RunConfig), "model_spec" (name, input shape, classes, options: enough to rebuild
     the model), "model", "optimizer" (state_dicts), "order_rng", "epoch",
     "step", "elapsed", "low_accuracy_points", "tracker" (the metrics so far)}

`rankbias train --resume`, a resumed sweep (single runs and stacks alike), `rankbias
analyze` and `rankbias compress` all read this format; see docs/conventions.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rankbias.training.config import RunConfig
from rankbias.utils import RankbiasError, atomic_path

CHECKPOINT_FORMAT = "rankbias-checkpoint"


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write a run's state (`train.Run.state_dict()`), atomically: a crash mid-write leaves
    the previous checkpoint as it was."""
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "version": 1, **state}, tmp)


def load_checkpoint(path: str | os.PathLike, run_id: str) -> dict:
    """The checkpoint at `path`, which must belong to run `run_id`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RankbiasError(f"cannot read checkpoint {path} ({type(err).__name__}): delete it "
                            "to start the run again") from err
    if not is_checkpoint(state):
        raise RankbiasError(f"{path} is not a rankbias checkpoint")
    if checkpoint_run_id(state) != run_id:
        raise RankbiasError(f"checkpoint {path} belongs to another config (run "
                            f"{state.get('run_id')}, not {run_id}); use another --checkpoint-dir")
    return state


def is_checkpoint(obj: object) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def checkpoint_run_id(state: Mapping) -> str | None:
    """The run a checkpoint belongs to, by its config's normal form (0.1.0 checkpoints
    carry an id of the config as spelled)."""
    try:
        return RunConfig.from_dict(dict(state["config"])).run_id()
    except (RankbiasError, KeyError, TypeError):
        return state.get("run_id")


def model_from_checkpoint(checkpoint: Mapping) -> nn.Module:
    """Rebuild the model of a rankbias checkpoint and load its weights."""
    from rankbias.models import create_model

    spec = checkpoint["model_spec"]
    model = create_model(spec["name"], tuple(spec["input_shape"]), spec["num_classes"],
                         **spec.get("options", {}))
    model.load_state_dict(checkpoint["model"])
    return model


def checkpoint_path(folder: str | os.PathLike | None, run_id: str) -> Path | None:
    """Where run `run_id` keeps its checkpoint in `folder` (None: it keeps none)."""
    return Path(folder) / f"{run_id}.pt" if folder else None
