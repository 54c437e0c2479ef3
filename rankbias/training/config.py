"""The configuration of one training run: one typed object, every field explained.

Field names are a contract: sweep files and experiment files use them as they are.

    from rankbias.training.config import RunConfig
    cfg = RunConfig(model="mlp", batch_size=8, lr=0.5, weight_decay=5e-3, epochs=50)
    cfg = RunConfig.from_dict(yaml.safe_load(open("run.yaml")))
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from rankbias.utils import RankbiasError
from rankbias.validate import is_int, is_real

AUTHORS_MILESTONES = (60, 100, 200)  # lr x gamma at these epochs in the authors' runs
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "multistep", "cosine")
LOSSES = ("ce", "mse")
WD_SCOPES = ("all", "weights")
# The fields whose value is one of a fixed set (`rankbias train` offers them as choices).
CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "loss": LOSSES, "wd_scope": WD_SCOPES}


@dataclass
class RunConfig:
    """One training run. A field's comment (the lines right above it and the end of its
    line) is its help in `rankbias train --help`: one flag per field, see config_flags.py."""

    model: str = "mlp"  # a name from rankbias.list_models()
    model_args: dict = field(default_factory=dict)  # options of create_model (depth, width...)
    dataset: str = "digits"  # a name from rankbias.list_datasets()
    dataset_args: dict = field(default_factory=dict)  # root, subset, pad_to, channels, ...
    batch_size: int = 8  # B: the smaller, the lower the rank (Theorem 3.4: bound ~ B)
    lr: float = 0.1  # mu: the larger, the lower the rank (bound ~ 1/mu)
    # PyTorch convention: W <- (1 - lr*wd) W - lr*G, so weight_decay = 2*lambda of the paper.
    weight_decay: float = 5e-3
    # sgd (the paper's; momentum below) | adam (L2 weight decay added to the gradient) |
    # adamw (decoupled weight decay). The theory and its checks are for plain SGD only.
    optimizer: str = "sgd"
    momentum: float = 0.0  # SGD momentum; the paper's analysis and runs use plain SGD (0)
    schedule: str = "constant"  # constant | multistep | cosine
    milestones: list[int] | None = None  # multistep epochs; None = the authors' 60/100/200
    gamma: float = 0.2  # multistep factor (the authors': 0.2)
    epochs: int = 100  # passes over the training set
    loss: str = "ce"  # ce (cross-entropy) | mse (on one-hot targets, summed over classes)
    wd_scope: str = "all"  # all parameters (as the authors) | weights (matrices only)
    seed: int = 0  # model init and data order; the same seed gives the same numbers
    track_every: int = 1  # epochs between rank measurements (init and final always measured)
    tolerances: list[float] = field(default_factory=lambda: [1e-3])  # rank thresholds
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    checkpoint_every: int = 0  # epochs between checkpoints; 0 = only the final one
    early_stop: bool = True  # the authors' rule: train acc <= 0.15 at 3 tracking points > ep 50
    drop_last: bool = False  # drop the last partial batch of each epoch
    track_gradient_rank: bool = False  # record mini-batch gradient ranks (Lemma 3.1)
    gradient_rank_steps: int = 3  # steps sampled per tracking point for the gradient ranks

    def __post_init__(self) -> None:
        self._normalize()

    # --- construction and validation ------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a plain dict (YAML/JSON); unknown keys are rejected by name."""
        if not isinstance(values, dict):
            raise RankbiasError("a run config must be a mapping of field: value")
        check_keys(values, cls.field_names(), "run config")
        return cls(**copy.deepcopy(values)).validated()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> RunConfig:
        return cls.from_dict(read_yaml(path) or {})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes) -> RunConfig:
        check_keys(changes, self.field_names(), "run config")
        return dataclasses.replace(self, **changes).validated()

    def to_dict(self) -> dict[str, Any]:
        """The normal form: every field, numbers typed, model options spelled out."""
        self._normalize()
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run: the normal form without the fields and data
        set options that cannot change the numbers, and without fields added after 0.1.0
        while they hold their default (so the ids of existing runs stay valid)."""
        identity = {k: v for k, v in self.to_dict().items()
                    if k not in NOT_IDENTITY and NEW_FIELDS.get(k, _UNSET) != v}
        identity["dataset_args"] = {k: v for k, v in identity["dataset_args"].items()
                                    if k not in DATASET_NOT_IDENTITY}
        return identity

    def run_id(self) -> str:
        """Hash of the identity: equal runs have equal ids whatever their spelling."""
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def lr_at(self, epoch: int) -> float:
        """Learning rate during epoch `epoch` (0-based)."""
        if self.schedule == "multistep":
            milestones = self.milestones or AUTHORS_MILESTONES
            return self.lr * self.gamma ** sum(epoch >= m for m in milestones)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        return self.lr

    def _normalize(self) -> None:
        """Bring every value to its one spelling, where it is valid (validated() reports
        the rest): ints for int fields (8.0 -> 8), floats for float fields (0 -> 0.0),
        model options with their defaults, data set options without theirs, milestones
        resolved, and settings that a choice makes irrelevant (gamma and milestones
        without a multistep schedule, momentum outside SGD, wd_scope at weight decay 0,
        gradient_rank_steps when gradient ranks are not tracked) at their defaults."""
        from rankbias.data import canonical_name, dataset_options
        from rankbias.models import MODELS, normalize_options

        for name in INT_FIELDS:
            setattr(self, name, _as_int(getattr(self, name)))
        for name in FLOAT_FIELDS:
            setattr(self, name, _as_float(getattr(self, name)))
        if isinstance(self.milestones, list):
            self.milestones = [_as_int(m) for m in self.milestones]
        if isinstance(self.tolerances, list):
            self.tolerances = list(dict.fromkeys(_as_float(t) for t in self.tolerances))
        if self.model in MODELS and isinstance(self.model_args, dict):
            with contextlib.suppress(RankbiasError):  # validated() says what is wrong
                self.model_args = normalize_options(self.model, self.model_args)
        with contextlib.suppress(RankbiasError):
            self.dataset = canonical_name(self.dataset)
            if isinstance(self.dataset_args, dict):
                defaults = dataset_options(self.dataset)
                self.dataset_args = {k: v for k, v in self.dataset_args.items()
                                     if k not in defaults or defaults[k] != v}
        defaults = RunConfig.__dataclass_fields__
        if self.schedule == "multistep" and self.milestones is None:
            self.milestones = list(AUTHORS_MILESTONES)
        if self.schedule in SCHEDULES and self.schedule != "multistep":
            self.milestones, self.gamma = None, defaults["gamma"].default
        if self.optimizer in ("adam", "adamw"):
            self.momentum = 0.0
        if self.weight_decay == 0.0:
            self.wd_scope = defaults["wd_scope"].default
        if self.track_gradient_rank is False:
            self.gradient_rank_steps = defaults["gradient_rank_steps"].default

    def validated(self) -> RunConfig:
        """Check every value that can be checked without data; return self, normalized."""
        from rankbias.data import dataset_options, list_datasets
        from rankbias.models import list_models, model_options

        self._normalize()
        _require(self.model in list_models(), "model",
                 f"unknown model {self.model!r}; choose from {', '.join(list_models())}")
        _require(self.dataset in list_datasets(), "dataset",
                 f"unknown data set {self.dataset!r}; choose from {', '.join(list_datasets())}")
        _require(isinstance(self.model_args, dict), "model_args", "must be a mapping")
        check_keys(self.model_args, list(model_options(self.model)), f"model_args of {self.model}")
        _require(isinstance(self.dataset_args, dict), "dataset_args", "must be a mapping")
        check_keys(self.dataset_args, list(dataset_options(self.dataset)),
                   f"dataset_args of {self.dataset}")
        _require(is_int(self.batch_size) and self.batch_size >= 1, "batch_size",
                 f"must be a positive integer, got {self.batch_size!r}")
        _require(is_real(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr!r}")
        _require(is_real(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
                 f"must be >= 0, got {self.weight_decay!r}")
        _require(self.optimizer in OPTIMIZERS, "optimizer",
                 f"must be {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _require(is_real(self.momentum) and 0 <= self.momentum < 1, "momentum",
                 f"must be in [0, 1), got {self.momentum!r}")
        _require(self.schedule in SCHEDULES, "schedule",
                 f"must be constant, multistep or cosine, got {self.schedule!r}")
        _require(self.milestones is None or (
            isinstance(self.milestones, list)
            and all(is_int(m) and m > 0 for m in self.milestones)),
            "milestones", f"must be a list of positive epochs, got {self.milestones!r}")
        _require(is_real(self.gamma) and 0 < self.gamma <= 1, "gamma",
                 f"must be in (0, 1], got {self.gamma!r}")
        _require(is_int(self.epochs) and self.epochs >= 1, "epochs",
                 f"must be a positive integer, got {self.epochs!r}")
        _require(self.loss in LOSSES, "loss", f"must be ce or mse, got {self.loss!r}")
        _require(self.wd_scope in WD_SCOPES, "wd_scope",
                 f"must be all or weights, got {self.wd_scope!r}")
        _require(is_int(self.seed) and self.seed >= 0, "seed",
                 f"must be a non-negative integer, got {self.seed!r}")
        _require(is_int(self.track_every) and self.track_every >= 1, "track_every",
                 f"must be a positive integer (epochs), got {self.track_every!r}")
        _require(isinstance(self.tolerances, list) and self.tolerances
                 and all(is_real(t) and t > 0 for t in self.tolerances), "tolerances",
                 f"must be a non-empty list of positive numbers, got {self.tolerances!r}")
        _require(isinstance(self.device, str) and (
            self.device in ("auto", "cpu") or self.device.startswith("cuda")), "device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}")
        _require(is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
                 "checkpoint_every", f"must be >= 0, got {self.checkpoint_every!r}")
        _require(is_int(self.gradient_rank_steps) and self.gradient_rank_steps >= 1,
                 "gradient_rank_steps", f"must be >= 1, got {self.gradient_rank_steps!r}")
        for flag in ("early_stop", "drop_last", "track_gradient_rank"):
            _require(isinstance(getattr(self, flag), bool), flag, "must be true or false")
        return self


_UNSET = object()
# Fields that cannot change a run's numbers: not part of its identity (a CPU rerun of a
# GPU run, or one with more checkpoints, is the same experiment).
NOT_IDENTITY = ("device", "checkpoint_every")
DATASET_NOT_IDENTITY = ("root",)  # where the files are, not what they hold
# Fields added after 0.1.0, with the default that every earlier run had.
NEW_FIELDS = {"optimizer": "sgd"}
INT_FIELDS = ("batch_size", "epochs", "seed", "track_every", "checkpoint_every",
              "gradient_rank_steps")
FLOAT_FIELDS = ("lr", "weight_decay", "momentum", "gamma")


def _as_int(value):
    """An integral float as int (8.0 -> 8); anything else unchanged for validated()."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _as_float(value):
    """An int as float (0 -> 0.0); bools and anything else unchanged for validated()."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise RankbiasError(f"{key}: {message}")


def check_keys(values: dict, allowed: list[str], what: str) -> None:
    """Reject unknown keys, naming them and the closest valid one."""
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RankbiasError(f"unknown key {key!r} in {what}{hint}")


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last one silently: a design would change without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}: remove one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; a missing or malformed file, or one with a key given twice, is a
    one-line RankbiasError."""
    try:
        with open(path) as fh:
            return yaml.load(fh, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise RankbiasError(f"no such file: {path}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None)
        what = f": {problem}" if problem and "duplicate key" in problem else ""
        raise RankbiasError(f"{path} is not valid YAML{where}{what}") from None
