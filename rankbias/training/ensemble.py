"""Train K compatible runs in lockstep, in one process, as one batched computation.

    from rankbias.training.ensemble import group_configs, train_ensemble
    configs = [RunConfig(model="mlp", lr=lr, weight_decay=wd, seed=s) for lr, wd, s in grid]
    results = [None] * len(configs)
    for group in group_configs(configs):           # same config but lr, weight_decay, seed
        for i, r in zip(group, train_ensemble([configs[i] for i in group])):
            results[i] = r                          # what train_run(configs[i]) returns

Why: small-batch runs of small models are bound by per-step Python and dispatch overhead
(on a GPU: kernel launches), not FLOPs. K models stacked as (K, ...) tensors take about
as many calls per step as one (benchmarks/ensemble.py, ensemble_convnet.py, gpu_*.py).

Each member follows its single-run twin `train_run(cfg)`: the same init (create_model under
the run's seed, training.state.process_state), data order (a randperm per epoch from its own
seeded generator), batches (batch_starts), lr schedule (cfg.lr_at) and optimizer update
(SGD, Adam or AdamW, as torch.optim does it) with its own lr and weight decay; BatchNorm in
train mode with its own batch statistics and running mean / unbiased running variance.
Tracking, evaluation, early stopping and the divergence checks are train.py's own (`Run`):
at each tracking point a member is copied into an ordinary nn.Module and measured by its own
RankTracker.

Two engines behind one interface (rankbias.training.engine.StackEngine):
- every model, CPU and CUDA: rankbias.training.stack.ModelStack (vmap over the stacked members).
  Members agree with their twins to rounding (see rankbias/training/stack.py for the measured
  drift), not bitwise;
- the `mlp` family on CPU: `rankbias.training.mlp_stack.MLPStack`, forward and backward
  written out with the ATen kernels autograd runs for one run, so members match train_run
  to the last bit
  (exceptions below), and faster than ModelStack (docs/performance.md, "Stack engines").
Configs with `track_gradient_rank` train one after the other with train_run.

A member whose loss turns NaN/Inf is `diverged` at that step (train_run's rule) and leaves
the stack at the end of the epoch: divergence is counted on the device (rankbias.training.steps:
no host round-trip per step) and read once per epoch, which still gives the exact step.
Members are independent slices of every tensor (batched matmuls, grouped convs, per-channel
BatchNorm, per-row losses, per-element update), so its NaN never reaches the others. On
CUDA the step of full batches is captured in a CUDA graph (the last partial batch runs
eagerly). Data: a `subset` in dataset_args depends on the seed, so each distinct seed's
data set is loaded and each member indexes its own rows of the concatenated training
tensors (at most the memory of K separate runs).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rankbias.data import Dataset, load_dataset
from rankbias.metrics.spectral import NonFiniteError
from rankbias.models import MODELS
from rankbias.models.mlp import build_mlp
from rankbias.training.budget import step_shrink
from rankbias.training.checkpoint import checkpoint_path, load_checkpoint
from rankbias.training.config import RunConfig
from rankbias.training.engine import StackEngine
from rankbias.training.mlp_stack import MLPStack
from rankbias.training.stack import ModelStack
from rankbias.training.state import process_state
from rankbias.training.steps import FiniteWatch, GraphedStep
from rankbias.training.train import (
    Diverged,
    Run,
    RunResult,
    resolve_device,
    train_run,
)
from rankbias.utils import RankbiasError, pause_point

# Fields members of one ensemble may differ in: the per-member values of the update and
# the seed (init, data order, subset). checkpoint_every does not change the numbers and
# an ensemble writes no checkpoints.
MEMBER_FIELDS = ("lr", "weight_decay", "seed", "checkpoint_every")

OnTrack = Callable[[int, int, dict], None]  # (member index, epoch, tracking point)


def ensemble_key(cfg: RunConfig) -> str:
    """Configs with equal keys can train as one ensemble: they share everything but
    lr, weight_decay and seed (model, data, batch size, epochs, schedule shape, ...)."""
    shared = {k: v for k, v in cfg.to_dict().items() if k not in MEMBER_FIELDS}
    return json.dumps(shared, sort_keys=True, separators=(",", ":"), default=str)


def can_ensemble(configs: list[RunConfig]) -> bool:
    """True when the configs are compatible (one ensemble key) and there is at least one."""
    return len({ensemble_key(c) for c in configs}) == 1


def group_configs(configs: list[RunConfig]) -> list[list[int]]:
    """Indices of `configs` grouped by ensemble key, groups and members in input order."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(ensemble_key(cfg), []).append(i)
    return list(groups.values())


def can_stack(cfg: RunConfig) -> bool:
    """Whether this config can train in a stack, judged from the config alone (the sweep
    driver asks; the device is resolved later, by each worker): any model and optimizer;
    configs that record gradient ranks (a per-member SVD inside some steps) train alone."""
    return not cfg.track_gradient_rank


def stack_limit(cfg: RunConfig, workers: int = 1) -> int:
    """How many runs of `cfg` to stack: 16 on a CPU (the speed-up levels off there), 256 on
    a GPU, fewer where the members would not fit in this process's share of the memory
    (a quarter of the free RAM, or of the GPU's free memory, over the workers sharing it).
    A member costs its weights four times (weights, gradients, momentum, its own model for
    tracking) and, per example of the batch, three times what one forward pass produces.
    The driver decides, so a device it cannot see (a GPU on a Ray worker) counts as a CPU."""
    try:
        cuda = resolve_device(cfg.device).type == "cuda"
    except RankbiasError:
        cuda = False
    free = free_memory(cuda, workers)
    member = _member_bytes(cfg.model, json.dumps(cfg.model_args, sort_keys=True), cfg.dataset,
                           json.dumps(cfg.dataset_args, sort_keys=True), cfg.batch_size)
    return max(1, min(256 if cuda else 16, int(free / 4 // member)))


def free_memory(cuda: bool, workers: int = 1) -> float:
    """Bytes free for one worker's stacks: the GPU's free memory over the workers sharing
    a GPU, or the machine's available RAM over the workers."""
    if cuda:
        return torch.cuda.mem_get_info()[0] / max(1, workers // max(1,
                                                                    torch.cuda.device_count()))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / max(1, workers)


@functools.lru_cache(maxsize=64)
def _member_bytes(model: str, model_args: str, dataset: str, dataset_args: str,
                  batch_size: int) -> float:
    from rankbias.data import describe
    from rankbias.models import create_model, example_input

    _, shape, classes = describe(dataset, json.loads(dataset_args))
    net = create_model(model, shape, classes, **json.loads(model_args))
    outputs = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel()))
             for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net.eval()(example_input(net, shape))
    for hook in hooks:
        hook.remove()
    weights = sum(p.numel() for p in net.parameters())
    return 4.0 * (4 * weights + 3 * batch_size * sum(outputs))


def handwritten_mlp(cfg: RunConfig) -> bool:
    """Whether the hand-written MLP stack trains this config: the mlp family on the CPU
    (SGD, Adam and AdamW)."""
    return MODELS[cfg.model][0] is build_mlp and resolve_device(cfg.device).type == "cpu"


def train_ensemble(configs: list[RunConfig], data: Dataset | None = None,
                   on_track: OnTrack | None = None,
                   checkpoint_dir: str | os.PathLike | None = None) -> list[RunResult]:
    """Train compatible configs together; return their RunResults in input order.

    Each result is what `train_run(cfg, data)` returns (same run_id, rows, spectra,
    summary, status), except timings (the members share one wall clock, so their wall_s
    is the ensemble's) and provenance["ensemble_size"]. `on_track(i, epoch, point)` is
    called for member i at each of its tracking points. Incompatible configs raise
    RankbiasError (use `group_configs` first).
    """
    if not configs:
        return []
    for cfg in configs:
        cfg.validated()
    if not can_ensemble(configs):
        raise RankbiasError("these configs cannot train as one ensemble: they differ in more "
                            "than lr, weight_decay and seed (group them with group_configs)")
    paths = [checkpoint_path(checkpoint_dir, cfg.run_id()) for cfg in configs]
    if not can_stack(configs[0]):
        return [train_run(cfg, data, checkpoint_path=path, resume=True,
                          on_track=_member_callback(on_track, i))
                for i, (cfg, path) in enumerate(zip(configs, paths))]
    # Resume: each member from its own checkpoint. Members stack only with members at the
    # same point of training, so those that stopped at another epoch form stacks of their
    # own (after a crash all members usually share their last checkpoint's epoch).
    states = [load_checkpoint(p, c.run_id()) if p and p.exists() else None
              for c, p in zip(configs, paths)]
    stacks: dict[tuple[int, int], list[int]] = {}
    for i, state in enumerate(states):
        stacks.setdefault((state["epoch"], state["step"]) if state else (0, 0), []).append(i)
    results: list[RunResult | None] = [None] * len(configs)
    with process_state(flush_denormal=True):  # as train_run: same numbers, faster
        for members in stacks.values():
            callback = None if on_track is None else (
                lambda j, epoch, point, m=members: on_track(m[j], epoch, point))
            part = _Ensemble([configs[i] for i in members], data, callback,
                             [paths[i] for i in members], [states[i] for i in members])
            for i, result in zip(members, part.train()):
                results[i] = result
    return results


def _member_callback(on_track: OnTrack | None, i: int) -> Callable[[int, dict], None] | None:
    if on_track is None:
        return None
    return lambda epoch, point: on_track(i, epoch, point)


def _member_data(configs: list[RunConfig], data: Dataset | None) -> list[Dataset]:
    """The data set of each member: one load, or one per seed when a subset depends on it."""
    if data is not None:
        return [data] * len(configs)
    loaded: dict[int | None, Dataset] = {}
    out = []
    for cfg in configs:
        key = cfg.seed if cfg.dataset_args.get("subset") is not None else None
        if key not in loaded:
            loaded[key] = load_dataset(cfg.dataset, seed=cfg.seed, **cfg.dataset_args)
        out.append(loaded[key])
    return out


class _Ensemble:
    """The lockstep loop: what `train_run`'s `_train` does, for K members at once."""

    def __init__(self, configs: list[RunConfig], data: Dataset | None,
                 on_track: OnTrack | None, checkpoints: list[Path | None] | None = None,
                 states: list[dict | None] | None = None) -> None:
        checkpoints = checkpoints or [None] * len(configs)
        states = states or [None] * len(configs)
        self.started = time.time()
        self.configs = configs
        self.on_track = on_track
        self.device = resolve_device(configs[0].device)
        datasets = _member_data(configs, data)
        # One Run per member: the same init, generator, tracker and checks as train_run.
        # Members of one data set share one copy of it on the device (each Run makes its
        # own: K copies of CIFAR-10 would not fit on a GPU), replaced as soon as made.
        self.runs: list[Run] = []
        owners: dict[int, Run] = {}
        for cfg, ds in zip(configs, datasets):
            run = Run(cfg, ds, self.device)
            if state := states[len(self.runs)]:
                run.load_state_dict(state)
            owner = owners.setdefault(id(ds), run)
            run.x_train, run.y_train = owner.x_train, owner.y_train
            run.x_test, run.y_test = owner.x_test, owner.y_test
            self.runs.append(run)
        self.results = [run.new_result(self.started, ensemble_size=len(configs))
                        for run in self.runs]
        self.alive = list(range(len(configs)))  # member indices, in stack order
        self.x, self.y, offsets = _training_tensors(datasets, self.device)
        self.offsets = offsets.view(-1, 1)
        self.n = len(datasets[0].x_train)
        self.input_shape = tuple(datasets[0].x_train.shape[1:])
        self.starts = self.runs[0].starts
        self.stack: StackEngine | None = None
        self.checkpoints = checkpoints
        self.epoch, self.step = self.runs[0].epoch, self.runs[0].step  # 0, or resumed
        self.elapsed = max(run.elapsed for run in self.runs)

    def train(self) -> list[RunResult]:
        if self.epoch == 0 and self.step == 0:
            self._track_all()  # initialization, step 0
        if self.alive:
            self._stack_members()
        cfg = self.configs[0]
        while self.epoch < cfg.epochs and self.alive:
            tic = time.perf_counter()
            self._train_epoch()
            for i in self.alive:
                self.runs[i].epoch, self.runs[i].step = self.epoch, self.step
            self.elapsed += time.perf_counter() - tic  # wall_s of a point: up to its epoch
            if self.runs[0]._tracks_after(self.epoch):
                tic = time.perf_counter()
                self._track_all()
                self.elapsed += time.perf_counter() - tic
            saved = [i for i in self.alive if self.configs[i].checkpoint_every
                     and self.epoch % self.configs[i].checkpoint_every == 0]
            self._save_checkpoints(saved)
            if saved:
                pause_point("epoch", self.epoch)
        self._save_checkpoints([i for i in self.alive if self.results[i].status == "done"])
        return [self._finish(i) for i in range(len(self.configs))]

    def _save_checkpoints(self, members: list[int]) -> None:
        """Each member's own checkpoint, in train_run's format: `rankbias train --resume`,
        `rankbias analyze` and a resumed ensemble all read it."""
        for i in members:
            if self.checkpoints[i] is None:
                continue
            run = self.runs[i]
            self.stack.load_into(self.alive.index(i), run.model, self.step,
                                 optimizer=run.optimizer)
            run.epoch, run.step, run.elapsed = self.epoch, self.step, self.elapsed
            run.save_checkpoint(self.checkpoints[i])

    # --- training -----------------------------------------------------------------------
    def _stack_members(self) -> None:
        """Stack the members still alive (with their optimizers' momentum, if resumed)."""
        engine = MLPStack if handwritten_mlp(self.configs[0]) else ModelStack
        self.stack = engine([self.runs[i].model for i in self.alive],
                            [self.configs[i] for i in self.alive], self.device,
                            optimizers=[self.runs[i].optimizer for i in self.alive])
        self._new_step()

    def _new_step(self) -> None:
        """Divergence counters and the (CUDA-graph) step for the members now in the stack."""
        self.watch = FiniteWatch(len(self.alive), self.device)
        self.graphed = GraphedStep(self._train_step,
                                   enabled=self.device.type == "cuda" and self.stack.graphable)

    def _train_epoch(self) -> None:
        self.stack.set_lr([self.configs[i].lr_at(self.epoch) for i in self.alive])
        perms = torch.stack([torch.randperm(self.n, generator=self.runs[i].order)
                             for i in self.alive]).to(self.device) + self.offsets
        batch = self.configs[0].batch_size
        self.watch.reset(self.step)
        with torch.inference_mode(not self.stack.autograd):
            for start in self.starts:
                idx = perms[:, start:start + batch]  # (K, b): the members' rows of self.x
                if idx.shape[1] == batch:
                    self.graphed(idx)
                else:
                    self._train_step(idx)  # the last partial batch: another shape, eager
                self.step += 1
        measured = self.stack.adam_shrink() if self.configs[0].optimizer == "adam" else None
        for j, i in enumerate(self.alive):  # each member's decay budget (training/budget.py)
            shrink = measured[j] if measured else step_shrink(self.configs[i],
                                                              self.configs[i].lr_at(self.epoch))
            self.runs[i].decay.add(len(self.starts), shrink)
        # A dead member's NaN stayed in its own slices; it leaves now, at its exact step.
        diverged = {}
        for i, bad_step in zip(self.alive, self.watch.first_nonfinite()):
            if bad_step is not None:
                diverged.setdefault(bad_step, []).append(i)
        for bad_step, members in diverged.items():
            self._diverge(members, Diverged(bad_step, "the training loss"))
        self.epoch += 1

    def _train_step(self, idx: torch.Tensor) -> None:
        """One optimizer step of every member on its rows `idx` (K, b) of self.x: device work
        only."""
        k, b = idx.shape
        flat = idx.reshape(-1)
        x = self.x.index_select(0, flat).view(k, b, *self.input_shape)
        losses = self.stack.step(x, self.y.index_select(0, flat).view(k, b))
        self.watch.update(losses)

    def _diverge(self, members: list[int], err: Exception) -> None:
        """Mark members diverged (as train_run would) and take them out of the stack."""
        for i in members:
            run, result = self.runs[i], self.results[i]
            result.mark_diverged(err, self.step)
            run.epoch, run.step = self.epoch, result.diverged_step
            result.finished = time.time()
        self._drop(members)

    def _drop(self, members: list[int]) -> None:
        keep = [j for j, i in enumerate(self.alive) if i not in members]
        self.alive = [self.alive[j] for j in keep]
        self.offsets = self.offsets[keep]
        if self.stack is not None and members:
            if not keep:  # the last members left: nothing to stack
                self.stack = None
                return
            self.stack.keep(keep)
            self._new_step()

    # --- tracking -----------------------------------------------------------------------
    def _track_all(self) -> None:
        stopped, diverged = [], []
        for j, i in enumerate(list(self.alive)):
            run = self.runs[i]
            if self.stack is not None:
                self.stack.load_into(j, run.model, self.step)
            run.elapsed = self.elapsed
            try:
                point = run.track()
            except (Diverged, NonFiniteError) as err:
                diverged.append((i, err))
                continue
            if self.on_track:
                self.on_track(i, self.epoch, point)
            if run.early_stop(point):
                self.results[i].mark_stopped()
                self.results[i].finished = time.time()
                stopped.append(i)
        if self.stack is not None:
            self._save_checkpoints(stopped)  # as train_run: a stopped run keeps its weights
        for i, err in diverged:
            self._diverge([i], err)
        self._drop(stopped)

    def _finish(self, i: int) -> RunResult:
        return self.runs[i].finish(self.results[i])


def _training_tensors(datasets: list[Dataset], device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All members' training sets as one (N, *input_shape) tensor, its labels, and each
    member's row offset into it (distinct data sets are concatenated once)."""
    sizes = {len(ds.x_train) for ds in datasets}
    if len(sizes) != 1:
        raise RankbiasError("ensemble members need training sets of one size")
    distinct: dict[int, int] = {}  # id(dataset) -> its offset
    xs, ys = [], []
    for ds in datasets:
        if id(ds) not in distinct:
            distinct[id(ds)] = sum(len(x) for x in xs)
            xs.append(ds.x_train)
            ys.append(ds.y_train)
    x = xs[0] if len(xs) == 1 else torch.cat(xs)
    y = ys[0] if len(ys) == 1 else torch.cat(ys)
    offsets = torch.tensor([distinct[id(ds)] for ds in datasets], dtype=torch.int64)
    return x.to(device), y.to(device), offsets.to(device)


