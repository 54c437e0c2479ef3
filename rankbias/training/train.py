"""One training run: mini-batch SGD + weight decay, with the rank of every matrix tracked.

    from rankbias.training.config import RunConfig
    from rankbias.training.train import train_run
    result = train_run(RunConfig(batch_size=8, lr=0.5, weight_decay=5e-3, epochs=50))
    result.summary   # {"init_avg_rank": ..., "final_avg_rank": ..., "train_acc": ...}

Choices that matter for the science (docs/theory.md, docs/conventions.md):
- the optimizer, batches and step of training/sgd.py (plain `torch.optim.SGD`: W <-
  (1 - lr*wd) W - lr*G; a seeded permutation of in-memory tensors each epoch);
- ranks measured at initialization (step 0), every `track_every` epochs and at the final
  weights (the authors never measured their final weights);
- a NaN/Inf loss or weight stops the run as `diverged` at the exact step; no SVD sees it.
  The loss is checked on the device (rankbias.training.steps.FiniteWatch) and read once per epoch,
  so a GPU never waits for the host; on CUDA the step of full batches is replayed from a
  CUDA graph and conv nets train in channels_last.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rankbias.data import Dataset, load_dataset
from rankbias.metrics.gradient_rank import PatchCounter, gradient_ranks
from rankbias.metrics.spectral import NonFiniteError
from rankbias.metrics.tracker import RankTracker
from rankbias.models import create_model
from rankbias.training.budget import DecayLedger, step_shrink
from rankbias.training.checkpoint import load_checkpoint, save_checkpoint
from rankbias.training.collapse import EARLY_STOP_MESSAGE, POINTS_IN_A_ROW, low_points
from rankbias.training.config import RunConfig
from rankbias.training.sgd import (
    batch_starts,
    epoch_batches,
    evaluate,
    has_batch_norm,
    loss_function,
    make_optimizer,
    sgd_step,
)
from rankbias.training.state import process_state
from rankbias.training.steps import FiniteWatch, GraphedStep, uses_channels_last
from rankbias.utils import RankbiasError, code_version, library_versions, pause_point


class Diverged(Exception):
    """Non-finite loss or weights at `step`."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"{what} became NaN/Inf at step {step}")
        self.step = step


@dataclass
class RunResult:
    """Everything one run produced: what the store saves, and what workers send back."""

    run_id: str
    config: dict
    status: str  # done | diverged | stopped (the authors' early-stop rule) | failed
    epochs: int = 0  # epochs completed
    steps: int = 0
    diverged_step: int | None = None
    error: str | None = None
    rows: list = field(default_factory=list)  # (step, epoch, layer, metric, value)
    spectra: list = field(default_factory=list)  # (step, epoch, layer, float64 array)
    summary: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.finished - self.started

    def mark_diverged(self, err: Exception, step: int) -> None:
        """The run ended in a NaN/Inf (`err`), at err.step if it says, else at `step`."""
        self.status, self.error = "diverged", str(err)
        self.diverged_step = getattr(err, "step", step)

    def mark_stopped(self) -> None:
        """The run met the authors' early-stop rule (it collapsed)."""
        self.status, self.error = "stopped", EARLY_STOP_MESSAGE


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RankbiasError(f"device {name!r} asked for but CUDA is not available; use cpu")
    return torch.device(name)


def _check_weights(model: nn.Module, step: int) -> None:
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise Diverged(step, f"parameter {name}")


def _check_inputs(model: nn.Module, data: Dataset, cfg: RunConfig) -> None:
    """Token ids for a model of tokens (`input_dtype`), floats for the others: a mismatch
    is a one-line error before any run starts."""
    wanted = getattr(model, "input_dtype", None)
    if wanted is not None and data.x_train.dtype != wanted:
        raise RankbiasError(f"model {cfg.model} takes token ids, but {cfg.dataset} holds "
                            f"{data.x_train.dtype} inputs: use a sequence data set such as "
                            "modular-addition")
    if wanted is None and not data.x_train.is_floating_point():
        raise RankbiasError(f"{cfg.dataset} holds token ids, which model {cfg.model} cannot "
                            "take: use --model transformer")


class Run:
    """The state of one run in progress: model, optimizer, data order, tracker, counters.
    `train_run` drives one; `ensemble.train_ensemble` drives several in a stack (each
    member's tracking, checks and checkpoints are its Run's own)."""

    def __init__(self, cfg: RunConfig, data: Dataset | None, device: torch.device) -> None:
        self.cfg = cfg
        self.data = data or load_dataset(cfg.dataset, seed=cfg.seed, **cfg.dataset_args)
        if cfg.batch_size > len(self.data.x_train):
            raise RankbiasError(f"batch_size: {cfg.batch_size} is larger than the training set "
                                f"({len(self.data.x_train)} examples)")
        self.device = device
        with process_state(seed=cfg.seed):  # the init's draws; the caller's generators kept
            self.model = create_model(cfg.model, self.data.input_shape, self.data.num_classes,
                                      **cfg.model_args).to(device)
        _check_inputs(self.model, self.data, cfg)
        if uses_channels_last(self.model, device):
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, cfg)
        self.loss_fn = loss_function(cfg.loss, self.data.num_classes)
        self.order = torch.Generator().manual_seed(cfg.seed)  # data order, own stream
        self.tracker = RankTracker(self.model, cfg.tolerances)
        self.x_train = self.data.x_train.to(device)
        self.y_train = self.data.y_train.to(device)
        self.x_test = self.data.x_test.to(device)
        self.y_test = self.data.y_test.to(device)
        self.batch_norm = has_batch_norm(self.model)
        self.starts = batch_starts(len(self.x_train), cfg.batch_size, cfg.drop_last,
                                   self.batch_norm)
        self.epoch = 0
        self.step = 0
        self.decay = DecayLedger()  # the decay budget so far (training/budget.py)
        self.low_accuracy_points = 0  # for the authors' early-stop rule
        self.elapsed = 0.0  # training + tracking seconds, summed across resumes
        self.watch = FiniteWatch(1, device)  # leading finite-loss steps, on the device
        # The optimizer's lr is baked into a captured step: recapture when it changes.
        self.graphed = GraphedStep(self._sgd_step, enabled=device.type == "cuda")
        self.graphed_lr: float | None = None

    # --- one epoch ----------------------------------------------------------------------
    def train_epoch(self) -> None:
        lr = self.cfg.lr_at(self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if lr != self.graphed_lr:
            self.graphed.reset()
            self.graphed_lr = lr
        batches = epoch_batches(len(self.x_train), self.cfg.batch_size, self.order,
                                self.cfg.drop_last, self.batch_norm, self.device)
        self.model.train()
        self.watch.reset(self.step)
        sample = set(self._gradient_rank_steps())
        for i, idx in enumerate(batches):
            if i in sample:
                self._step_with_gradient_rank(self.x_train[idx], self.y_train[idx])
            elif len(idx) == self.cfg.batch_size:
                self.graphed(idx)
                self.step += 1
            else:  # the last partial batch: another shape, eager
                self._sgd_step(idx)
                self.step += 1
        self._stop_if_diverged()
        self.decay.add(len(batches), step_shrink(self.cfg, lr, self.optimizer))
        self.epoch += 1

    def _sgd_step(self, idx: torch.Tensor) -> None:
        """One SGD step on the training rows `idx`: device work only (no host round-trip)."""
        self.watch.update(sgd_step(self.model, self.optimizer, self.loss_fn,
                                   self.x_train[idx], self.y_train[idx]))

    def _stop_if_diverged(self) -> None:
        """Raise Diverged at the first step since the watch's reset whose loss was NaN/Inf
        (the step a per-step check would have stopped at); the later steps' NaN weights are
        never measured."""
        bad_step = self.watch.first_nonfinite()[0]
        if bad_step is not None:
            self.step = bad_step
            raise Diverged(bad_step, "the training loss")

    def _gradient_rank_steps(self) -> list[int]:
        """Batches of this epoch whose gradient rank is recorded (Lemma 3.1), evenly spaced,
        the last (possibly partial) batch always among them."""
        if not self.cfg.track_gradient_rank or not self._tracks_after(self.epoch + 1):
            return []
        n = len(self.starts)
        k = min(self.cfg.gradient_rank_steps, n)
        return sorted({round(j * (n - 1) / max(k - 1, 1)) for j in range(k)})

    def _step_with_gradient_rank(self, x: torch.Tensor, y: torch.Tensor) -> None:
        def record(loss: torch.Tensor) -> None:
            self.watch.update(loss)
            self._stop_if_diverged()  # a tracking point: reading the device is fine here
            for name, g in gradient_ranks(self.model, counter).items():
                self.tracker.rows.extend([
                    (self.step, self.epoch + 1, name, "grad_rank", float(g.rank)),
                    (self.step, self.epoch + 1, name, "grad_rank_bound", float(g.bound)),
                    (self.step, self.epoch + 1, name, "grad_rank_cap", float(min(g.shape)))])

        with PatchCounter(self.model) as counter:
            sgd_step(self.model, self.optimizer, self.loss_fn, x, y, after_backward=record)
        self.step += 1

    # --- tracking -----------------------------------------------------------------------
    def _tracks_after(self, epoch: int) -> bool:
        return epoch % self.cfg.track_every == 0 or epoch == self.cfg.epochs

    def track(self) -> dict[str, float]:
        _check_weights(self.model, self.step)
        train_loss, train_acc = evaluate(self.model, self.x_train, self.y_train, self.loss_fn)
        test_loss, test_acc = evaluate(self.model, self.x_test, self.y_test, self.loss_fn)
        if not math.isfinite(train_loss):
            raise Diverged(self.step, "the evaluation loss")
        lr = self.cfg.lr_at(max(self.epoch - 1, 0))
        point = self.tracker.track(self.step, self.epoch, train_loss=train_loss,
                                   train_acc=train_acc, test_loss=test_loss, test_acc=test_acc,
                                   lr=lr, wall_s=self.elapsed, decay_budget=self.decay.budget)
        self._record_initial_share()
        return point

    def _record_initial_share(self) -> None:
        """Per matrix, the share of W_T that is still its decayed initial weights (the
        measured side of the decay budget): prod (1 - shrink) ||W_0||_F / ||W_T||_F."""
        norms = [(s, layer, v) for s, _, layer, m, v in self.tracker.rows if m == "fro_norm"]
        initial = {layer: v for s, layer, v in norms if s == 0}
        latest = {layer: v for s, layer, v in norms if s == self.step}
        self.tracker.rows.extend(
            (self.step, self.epoch, layer, "init_share",
             self.decay.initial_share(initial[layer], norm))
            for layer, norm in latest.items() if layer in initial)

    def early_stop(self, point: dict[str, float]) -> bool:
        """The authors' rule (training/collapse.py): stop a run that collapsed."""
        if not self.cfg.early_stop:
            return False
        self.low_accuracy_points = low_points(self.low_accuracy_points, self.epoch,
                                              point["train_acc"])
        return self.low_accuracy_points >= POINTS_IN_A_ROW

    # --- the result -----------------------------------------------------------------------
    def new_result(self, started: float, **provenance) -> RunResult:
        """This run's result, status done until told otherwise, with its provenance (code
        and library versions, device (and a GPU's name), threads, seed, and any `provenance`
        given)."""
        gpu = ({"gpu": torch.cuda.get_device_name(self.device)}
               if self.device.type == "cuda" else {})
        return RunResult(run_id=self.cfg.run_id(), config=self.cfg.to_dict(), status="done",
                         started=started, provenance={
                             "code_version": code_version(),
                             "library_versions": library_versions(), "device": str(self.device),
                             **gpu, "threads": torch.get_num_threads(), "seed": self.cfg.seed,
                             **provenance})

    def finish(self, result: RunResult) -> RunResult:
        """Fill `result` with what the run measured: counters, rows, spectra, summary."""
        result.epochs, result.steps = self.epoch, self.step
        result.rows, result.spectra = self.tracker.rows, self.tracker.spectra
        result.finished = result.finished or time.time()
        result.summary = summarize_result(result, self.tracker)
        return result

    # --- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "run_id": self.cfg.run_id(),
            "config": self.cfg.to_dict(), "model_spec": self.model.spec,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "order_rng": self.order.get_state(),
            "epoch": self.epoch, "step": self.step, "elapsed": self.elapsed,
            "low_accuracy_points": self.low_accuracy_points,
            "decay": [self.decay.budget, self.decay.log_keep],
            "tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.order.set_state(state["order_rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.elapsed = state["elapsed"]
        self.low_accuracy_points = state["low_accuracy_points"]
        self.decay = DecayLedger(*state.get("decay", (0.0, 0.0)))  # 0.2's had none
        self.tracker.load_state_dict(state["tracker"])

    def save_checkpoint(self, path: Path) -> None:
        save_checkpoint(self.state_dict(), path)


def train_run(cfg: RunConfig, data: Dataset | None = None,
              checkpoint_path: str | os.PathLike | None = None, resume: bool = False,
              on_start: Callable[[], None] | None = None,
              on_track: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train one run to the end (or divergence); return everything it measured.

    `checkpoint_path`: where checkpoints go (every `checkpoint_every` epochs and at the end).
    `resume`: continue from that checkpoint when it exists; the result is bit-identical to
    an uninterrupted run on CPU. `on_track(epoch, point)` is called at each tracking point
    (progress bars); `on_start()` once the data and model are built and the config has
    passed every check, before any training. User errors raise `RankbiasError`; other
    errors propagate (the sweep runner records them as a `failed` run).
    """
    cfg.validated()
    # Weight decay drives many weights toward zero; denormal floats make CPU math ~20%
    # slower without changing what the run measures.
    with process_state(flush_denormal=True):
        return _train(cfg, data, checkpoint_path, resume, on_start, on_track)


def _train(cfg: RunConfig, data: Dataset | None, checkpoint_path, resume: bool, on_start,
           on_track) -> RunResult:
    started = time.time()
    device = resolve_device(cfg.device)
    run = Run(cfg, data, device)
    result = run.new_result(started)
    path = Path(checkpoint_path) if checkpoint_path else None
    if resume and path is not None and path.exists():
        run.load_state_dict(load_checkpoint(path, result.run_id))
    if on_start:
        on_start()
    try:
        if run.epoch == 0 and run.step == 0:
            point = run.track()  # initialization, step 0
            if on_track:
                on_track(0, point)
        while run.epoch < cfg.epochs:
            tic = time.perf_counter()
            run.train_epoch()
            run.elapsed += time.perf_counter() - tic  # wall_s of a point: up to its epoch
            if run._tracks_after(run.epoch):
                tic = time.perf_counter()
                point = run.track()
                run.elapsed += time.perf_counter() - tic
                if on_track:
                    on_track(run.epoch, point)
                if run.early_stop(point):
                    result.mark_stopped()
                    break
            if path and cfg.checkpoint_every and run.epoch % cfg.checkpoint_every == 0:
                run.save_checkpoint(path)
                pause_point("epoch", run.epoch)
    except (Diverged, NonFiniteError) as err:
        result.mark_diverged(err, run.step)
    if path and result.status in ("done", "stopped"):
        run.save_checkpoint(path)
    return run.finish(result)


def summarize_result(result: RunResult, tracker: RankTracker) -> dict:
    """The headline numbers of a run (its final tracking point); a model with attention
    also has the mean rank of its per-head products W_Q^T W_K and W_O W_V (init and final;
    never part of the average rank)."""
    def first(metric: str) -> float:
        return next((v for s, _, layer, m, v in tracker.rows if layer == "" and m == metric),
                    math.nan)

    products = {f"{when}_{metric}": value(metric) for metric in ("avg_qk_rank", "avg_ov_rank")
                for when, value in (("init", first), ("final", tracker.latest))
                if tracker.attention}
    return {
        "run_id": result.run_id, "status": result.status,
        "init_avg_rank": first("avg_rank"), "final_avg_rank": tracker.latest("avg_rank"),
        **products,
        "train_acc": tracker.latest("train_acc"), "test_acc": tracker.latest("test_acc"),
        "decay_budget": tracker.latest("decay_budget"),
        "epochs": result.epochs, "steps": result.steps, "wall_s": round(result.wall_s, 3),
    }
