"""`rankbias compress`: factorize each low-rank layer at its rank, into a smaller model.

    rankbias compress checkpoints/RUN.pt --out small.pt --tol 1e-3
    rankbias compress checkpoints/RUN.pt --out small.pt --max-acc-drop 0.01 --format json
    rankbias analyze small.pt                        # factor pairs as the products they stand for

    model = rankbias.load_compressed("small.pt")     # an nn.Module, read weights-only

How a layer is factorized, and how parameters and FLOPs are counted: rankbias/compress/lowrank.py.
This module: the rule that picks the ranks, the
saved file, the source model and its data, and the command.

The rank r of a layer comes from one rule:
- `tol`: the paper's rank, #{i : sigma_i(W / ||W||_F) > tol} (the same SVD and the same
  function as `rankbias analyze`, so the ranks are the ones it prints);
- `energy`: the smallest r with sum_{i<=r} sigma_i^2 >= energy * sum sigma^2;
- `max_acc_drop`: the largest tolerance of `TOLERANCE_GRID` (one for every layer) whose
  model loses at most that much test accuracy against the dense model, by bisection (the
  parameter count falls monotonically along the grid; accuracy is checked, not assumed).

`finetune_epochs`: a short fine-tune of the factorized model with the run's own SGD settings
(from the checkpoint), kept only when it does not lower the test accuracy (both reported).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

import numpy as np
import torch
from torch import nn

from rankbias.compress.lowrank import (
    Layer,
    choose_ranks,
    count_flops,
    count_params,
    factorize,
    low_rank_like,
    plan_layers,
    set_submodule,
)
from rankbias.training.checkpoint import is_checkpoint, model_from_checkpoint
from rankbias.utils import RankbiasError, atomic_path, text_table, to_json

COMPRESSED_FORMAT = "rankbias-compressed"
# Tolerances tried by --max-acc-drop (and the compression claim): 1e-4 ... 0.5, log-spaced.
# Above 0.5 at most 3 singular values of a unit-Frobenius matrix can pass.
TOLERANCE_GRID = tuple(float(t) for t in np.geomspace(1e-4, 0.5, 32))


# --- the saved artifact --------------------------------------------------------------------
def save_compressed(model: nn.Module, factorized: Mapping[str, int], path: str | os.PathLike,
                    extra: Mapping | None = None) -> None:
    """Write `model` (made by `factorize`) as weights only: tensors, numbers and strings."""
    spec = getattr(model, "spec", None)
    if not spec:
        raise RankbiasError("only models built by rankbias.create_model (with a .spec) can be "
                            "saved: load_compressed rebuilds the model from it")
    payload = {"format": COMPRESSED_FORMAT, "version": 1,
               "model_spec": {"name": spec["name"], "input_shape": list(spec["input_shape"]),
                              "num_classes": spec["num_classes"],
                              "options": dict(spec.get("options", {}))},
               "factorized": dict(factorized),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _read_weights(path: str | os.PathLike, what: str) -> object:
    if not os.path.isfile(path):
        raise RankbiasError(f"no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise RankbiasError(f"{path} holds pickled Python objects, not only weights; "
                                f"{what} reads weights only") from err
        raise RankbiasError(f"cannot read {path}: corrupt or not a PyTorch file") from err
    except Exception as err:  # zip, EOF and stream errors all mean the same to a user
        raise RankbiasError(f"cannot read {path}: corrupt, truncated or not a PyTorch file "
                            f"({type(err).__name__})") from err


def build_compressed(payload: Mapping) -> nn.Module:
    """The model of a loaded compressed file: the dense model rebuilt from its spec, the
    factorized layers swapped in, the weights loaded. In eval mode."""
    from rankbias.models import create_model

    try:
        spec = payload["model_spec"]
        model = create_model(spec["name"], tuple(spec["input_shape"]), spec["num_classes"],
                             **spec.get("options", {}))
        for name, rank in payload["factorized"].items():
            set_submodule(model, name, low_rank_like(model.get_submodule(name), int(rank)))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, AttributeError, TypeError, RuntimeError) as err:
        raise RankbiasError(f"a malformed {COMPRESSED_FORMAT} file: "
                            f"{type(err).__name__}: {err}".splitlines()[0]) from err
    return model.eval()


def load_compressed(path: str | os.PathLike) -> nn.Module:
    """The model `rankbias compress` saved at `path`, read with weights_only=True.

        model = rankbias.load_compressed("small.pt")
        logits = model(x)
    """
    payload = _read_weights(path, "load_compressed")
    if not isinstance(payload, Mapping) or payload.get("format") != COMPRESSED_FORMAT:
        raise RankbiasError(f"{path} is not a file written by rankbias compress")
    return build_compressed(payload)


def dense_equivalent(payload: Mapping) -> nn.Module:
    """The dense model a compressed file stands for, in float64: every factor pair
    multiplied out under its original layer name (what `rankbias analyze` measures)."""
    from rankbias.models import create_model

    small = build_compressed(payload).double()
    spec, factorized = payload["model_spec"], payload["factorized"]
    dense = create_model(spec["name"], tuple(spec["input_shape"]), spec["num_classes"],
                         **spec.get("options", {})).double()
    state = {}
    for key, value in small.state_dict().items():
        owner, _, part = key.rpartition(".")[0].rpartition(".")
        if not (owner in factorized and part in ("first", "second")):
            state[key] = value
    for name in factorized:
        pair = small.get_submodule(name)
        state[f"{name}.weight"] = pair.product()
        if pair.second.bias is not None:
            state[f"{name}.bias"] = pair.second.bias.detach()
    dense.load_state_dict(state)
    return dense.eval()


# --- the source model and its data ---------------------------------------------------------
def load_source(path: str | os.PathLike, trust: bool = False) -> tuple[nn.Module, dict | None]:
    """The dense model of a rankbias checkpoint and its run config (or a full saved model,
    only with trust=True, and no config)."""
    if os.path.isdir(path) or str(path).endswith((".safetensors", ".index.json")):
        # A Hugging Face checkpoint has no rankbias model spec to rebuild the factorized
        # model from, nor a data set to check its accuracy on: refused, not half-done.
        raise RankbiasError(f"{path}: rankbias compress does not read Hugging Face folders or "
                            "safetensors files (it rebuilds rankbias models and checks them on "
                            "their data set); `rankbias analyze PATH` reports their ranks")
    try:
        obj = _read_weights(path, "compress without --trust")
    except RankbiasError as err:
        if not (trust and "pickled" in str(err)):
            raise RankbiasError(f"{err} (a full saved model you trust: add --trust)"
                                if "pickled" in str(err) else str(err)) from err
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:
            raise RankbiasError(f"cannot unpickle {path}: {err2}".splitlines()[0]) from err2
    if isinstance(obj, nn.Module):
        return obj.float().eval(), None
    if is_checkpoint(obj):
        return model_from_checkpoint(obj).eval(), dict(obj.get("config") or {}) or None
    if isinstance(obj, Mapping) and obj.get("format") == COMPRESSED_FORMAT:
        raise RankbiasError(f"{path} is already compressed: compress the original checkpoint")
    raise RankbiasError(f"{path} is not a rankbias checkpoint: compress needs the model's "
                        "architecture (a checkpoint of rankbias train, or a full saved model "
                        "with --trust); a plain state_dict does not have it")


def source_data(model: nn.Module, config: dict | None, dataset: str | None = None,
                dataset_args: Mapping | None = None):
    """The run's own data set (from its config), or `dataset` when given."""
    from rankbias.data import load_dataset

    if dataset is None and not config:
        raise RankbiasError("this model has no run config to read its data set from: name "
                            "one with --dataset")
    seed = (config or {}).get("seed", 0)
    if dataset is None:
        data = load_dataset(config["dataset"], seed=seed, **config.get("dataset_args", {}))
    else:
        data = load_dataset(dataset, seed=seed, **dict(dataset_args or {}))
    spec = getattr(model, "spec", None)
    if spec and tuple(spec["input_shape"]) != tuple(data.input_shape):
        raise RankbiasError(f"data set {data.name} has inputs of shape {data.input_shape}, the "
                            f"model was built for {tuple(spec['input_shape'])}")
    return data


def finetune(model: nn.Module, data, config: dict, epochs: int, progress: bool = True) -> None:
    """`epochs` epochs of SGD on the training split with the run's own settings: batch size,
    momentum, weight decay (and its scope), loss, and the learning rate the run ended with
    (its schedule at the last epoch). Weight decay now acts on the two factors."""
    from tqdm import tqdm

    from rankbias.training.config import RunConfig
    from rankbias.training.sgd import (
        epoch_batches,
        has_batch_norm,
        loss_function,
        make_optimizer,
        sgd_step,
    )

    cfg = RunConfig.from_dict(config)
    cfg = cfg.replace(lr=cfg.lr_at(cfg.epochs - 1))
    optimizer = make_optimizer(model, cfg)
    loss_fn = loss_function(cfg.loss, data.num_classes)
    order = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    x, y = data.x_train.to(device), data.y_train.to(device)

    def finite(loss: torch.Tensor) -> None:  # raised before the step: the weights stay finite
        if not math.isfinite(loss.item()):
            raise RankbiasError("fine-tuning diverged (NaN/Inf loss): use fewer "
                                "--finetune-epochs, or none")

    model.train()
    for _ in tqdm(range(epochs), desc="fine-tune", unit="epoch", file=sys.stderr,
                  disable=not progress):
        for idx in epoch_batches(len(x), cfg.batch_size, order, cfg.drop_last,
                                 has_batch_norm(model), device):
            sgd_step(model, optimizer, loss_fn, x[idx], y[idx], after_backward=finite)
    model.eval()


# --- the whole command ---------------------------------------------------------------------
def accuracy(model: nn.Module, data) -> float:
    from rankbias.training.sgd import evaluate

    device = next(model.parameters()).device
    return evaluate(model, data.x_test.to(device), data.y_test.to(device),
                    nn.functional.cross_entropy)[1]


def search_tolerance(accuracy_at: Callable[[float], float], floor: float,
                     grid: Sequence[float] = TOLERANCE_GRID) -> float | None:
    """The largest tolerance of `grid` found by bisection whose accuracy is >= `floor`, or
    None when even the smallest misses it. Bisection assumes accuracy falls as the
    tolerance grows; the tolerance returned was evaluated, so it meets the floor anyway."""
    grid = sorted(grid)
    good, bad = -1, len(grid)  # indices known to pass / to fail (-1: the dense model)
    while bad - good > 1:
        middle = (good + bad) // 2
        if accuracy_at(grid[middle]) >= floor:
            good = middle
        else:
            bad = middle
    return grid[good] if good >= 0 else None


def compress(model: nn.Module, data, tol: float | None = None, energy: float | None = None,
             max_acc_drop: float | None = None, include_all: bool = False,
             config: dict | None = None, finetune_epochs: int = 0, progress: bool = True,
             grid: Sequence[float] = TOLERANCE_GRID) -> dict:
    """Factorize `model` under one rule; return the report and the small model.

    The returned dict has the keys of `rankbias compress --format json` plus "model" (the
    small nn.Module) and "factorized" ({module name: rank}). test_acc_after here is the
    in-memory model's; `compress_file` replaces it by what the saved file scores.
    """
    rules = [r for r in (tol, energy, max_acc_drop) if r is not None]
    if len(rules) != 1:
        raise RankbiasError("give exactly one of --tol, --energy, --max-acc-drop")
    if tol is not None and not tol >= 0:
        raise RankbiasError(f"--tol must be >= 0, got {tol}")
    if energy is not None and not 0 < energy <= 1:
        raise RankbiasError(f"--energy must be in (0, 1], got {energy}")
    if max_acc_drop is not None and not 0 <= max_acc_drop <= 1:
        raise RankbiasError(f"--max-acc-drop must be in [0, 1], got {max_acc_drop}")
    if finetune_epochs < 0:
        raise RankbiasError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    if finetune_epochs and not config:
        raise RankbiasError("--finetune-epochs needs the run's optimizer settings: compress a "
                            "checkpoint of rankbias train")
    model = model.eval()
    layers = plan_layers(model, include_all)
    acc_before = accuracy(model, data)
    search = None
    if max_acc_drop is not None:
        floor = acc_before - max_acc_drop - 1e-12  # accuracies are fractions k/n
        tried: dict[tuple, float] = {}  # ranks -> accuracy: tolerances with equal ranks

        def accuracy_at(t: float) -> float:
            ranks = choose_ranks(layers, tol=t)
            key = tuple(ranks.values())
            if key not in tried:
                tried[key] = accuracy(factorize(model, layers, ranks)[0], data)
            return tried[key]

        found = search_tolerance(accuracy_at, floor, grid)
        tol = 0.0 if found is None else found
        search = {"max_acc_drop": max_acc_drop, "floor": acc_before - max_acc_drop,
                  "grid": [min(grid), max(grid), len(grid)], "models_evaluated": len(tried),
                  "met": found is not None}
    ranks = choose_ranks(layers, tol=tol, energy=energy)
    small, factorized = factorize(model, layers, ranks)
    acc_factorized = accuracy(small, data)
    report = {
        "params_before": count_params(model), "params_after": count_params(small),
        "flops_before": count_flops(model, data.input_shape),
        "flops_after": count_flops(small, data.input_shape),
        "test_acc_before": acc_before, "test_acc_after": acc_factorized,
        "tol": tol, "energy": energy, "search": search, "dataset": data.name,
        "layers": [_layer_row(layer, ranks[layer.name], factorized) for layer in layers],
        "finetune": None, "model": small, "factorized": factorized,
    }
    if finetune_epochs:  # kept only if it does not lower test accuracy (no budget is lost)
        tuned = copy.deepcopy(small)
        finetune(tuned, data, config, finetune_epochs, progress)
        acc_tuned = accuracy(tuned, data)
        kept = acc_tuned >= acc_factorized
        report["finetune"] = {"epochs": finetune_epochs, "test_acc_before_finetune":
                              acc_factorized, "test_acc_finetuned": acc_tuned, "kept": kept}
        if kept:
            report["model"], report["test_acc_after"] = tuned, acc_tuned
    return report


def _layer_row(layer: Layer, rank: int, factorized: Mapping[str, int]) -> dict:
    done = factorized.get(layer.module)
    m, n = layer.shape
    row = {"name": layer.name, "shape": [m, n], "rank": rank,
           "rel_error": layer.rel_error(done) if done else 0.0,
           "factorized": done is not None, "params_before": m * n,
           "params_after": done * (m + n) if done else m * n}
    if layer.note:
        row["note"] = layer.note
    elif not done:
        row["note"] = "kept dense: r (m + n) >= m n saves nothing"
    elif done != rank:
        row["note"] = f"rank {rank}: stored as rank {done}"
    return row


def compress_file(path: str | os.PathLike, out: str | os.PathLike, tol: float | None = None,
                  energy: float | None = None, max_acc_drop: float | None = None,
                  dataset: str | None = None, dataset_args: Mapping | None = None,
                  finetune_epochs: int = 0, include_all: bool = False, trust: bool = False,
                  fmt: str = "text", progress: bool = True,
                  stdout: TextIO | None = None) -> dict:
    """`rankbias compress`: compress the model at `path`, save it to `out`, print the report.

    test_acc_after is measured on the file as saved, reloaded with `load_compressed`.
    """
    stdout = stdout or sys.stdout
    if fmt not in ("text", "json"):
        raise RankbiasError(f"unknown format {fmt!r}: use text or json")
    if tol is None and energy is None and max_acc_drop is None:
        tol = 1e-3
    model, config = load_source(path, trust)
    data = source_data(model, config, dataset, dataset_args)
    report = compress(model, data, tol, energy, max_acc_drop, include_all, config,
                      finetune_epochs, progress)
    small, factorized = report.pop("model"), report.pop("factorized")
    rule = {k: report[k] for k in ("tol", "energy")} | {"max_acc_drop": max_acc_drop}
    save_compressed(small, factorized, out, {
        "source": {"path": str(path), "run_id": (config or {}).get("run_id")},
        "config": config, "rule": rule, "include_all": include_all})
    report["test_acc_after"] = accuracy(load_compressed(out), data)
    report["out"] = str(out)
    stdout.write(format_report(report, fmt))
    return report


def format_report(report: Mapping, fmt: str = "text") -> str:
    if fmt == "json":
        return to_json(report) + "\n"
    rows = [["layer", "shape", "rank", "rel_error", "params", "stored as"]]
    for row in report["layers"]:
        m, n = row["shape"]
        stored = (f"{n} -> {row['params_after'] // (m + n)} -> {m}" if row["factorized"]
                  else row.get("note", "dense"))
        rows.append([row["name"], f"{m}x{n}", str(row["rank"]), f"{row['rel_error']:.4f}",
                     f"{row['params_before']:,} -> {row['params_after']:,}", stored])
    before, after = report["params_before"], report["params_after"]
    rule = (f"tol {report['tol']:g}" if report["energy"] is None
            else f"energy {report['energy']:g}")
    if report.get("search"):
        s = report["search"]
        rule += (f" (the largest of {s['grid'][2]} tolerances keeping test accuracy >= "
                 f"{s['floor']:.4f})" if s["met"] else
                 f" (no tolerance kept test accuracy >= {s['floor']:.4f}: nothing factorized)")
    tuned, ft = "", report.get("finetune")
    if ft and ft["kept"]:
        tuned = (f" after {ft['epochs']} fine-tune epochs (before: "
                 f"{ft['test_acc_before_finetune']:.4f})")
    elif ft:
        tuned = (f" (fine-tuning {ft['epochs']} epochs lowered it to "
                 f"{ft['test_acc_finetuned']:.4f}: the weights before it are kept)")
    return (text_table(rows)
            + f"{rule}: params {before:,} -> {after:,} ({after / before:.1%}), FLOPs "
              f"{report['flops_before']:,} -> {report['flops_after']:,} "
              f"({report['flops_after'] / max(report['flops_before'], 1):.1%}) per example; "
              f"test accuracy on {report['dataset']} {report['test_acc_before']:.4f} -> "
              f"{report['test_acc_after']:.4f}{tuned}; wrote {report.get('out', '-')}\n")
