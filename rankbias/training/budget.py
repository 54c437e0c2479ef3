"""The decay budget: whether weight decay has had the time to act (docs/theory.md, "The
decay budget").

With weight decay, SGD multiplies every earlier component of W by (1 - lr_t * wd) at each
step, so after the steps 1..T the initial weights keep prod_t (1 - lr_t wd) ~ exp(-D) of
their size, with the **decay budget**

    D = sum over steps of lr_t * wd          (PyTorch's convention: wd = 2 lambda).

Theorem 3.4 bounds the eps-rank only once the initial part is below eps: nothing can fall
below eps before D >= log(2/eps) (7.6 at eps = 1e-3); at a constant lr that is T >= k* =
log(2/eps) / (lr * wd). A design whose runs stay below that threshold cannot show the
low-rank bias, whatever the paper says: its verdict is "inconclusive", not "fail".

Per optimizer, the shrink of one step:
- SGD: lr_t * wd; with momentum m the heavy ball's steady-state shrink lr_t * wd / (1 - m);
- AdamW: its decoupled factor lr_t * wd;
- Adam with L2 decay: the adaptive scaling divides it by sqrt(v_hat) + eps, which only the
  run knows: it is measured during training (`adam_shrink`) and summed into the run's
  "decay_budget" metric; from the config alone it is unknown (None).

    rows = validity(cfg)     # {"steps", "k_star", "decay_budget", "threshold", "informative"}
    ledger = DecayLedger()   # what a run has had so far: ledger.add(steps, shrink per step)
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

from rankbias.training.config import RunConfig
from rankbias.training.sgd import batch_starts

DEFAULT_EPS = 1e-3


def threshold(eps: float = DEFAULT_EPS) -> float:
    """log(2/eps): the decay budget below which the eps-rank cannot have fallen."""
    return math.log(2.0 / eps)


def shrink_rate(cfg: RunConfig) -> float | None:
    """The decay of one step per unit of learning rate (wd; wd/(1-m) with momentum), or None
    for Adam with L2 decay (measured during training instead)."""
    if cfg.optimizer == "adam":
        return None
    if cfg.optimizer == "sgd" and cfg.momentum:
        return cfg.weight_decay / (1.0 - cfg.momentum)
    return cfg.weight_decay


@functools.lru_cache(maxsize=256)
def _has_batch_norm(model: str, model_args: str, dataset: str, dataset_args: str) -> bool:
    from rankbias.data import describe
    from rankbias.models import create_model
    from rankbias.training.sgd import has_batch_norm

    _, shape, classes = describe(dataset, json.loads(dataset_args))
    with torch.device("meta"):
        net = create_model(model, shape, classes, **json.loads(model_args))
    return has_batch_norm(net)


def steps_per_epoch(cfg: RunConfig) -> int:
    """The SGD steps of one epoch (training/sgd.py's batching rule), from the config alone."""
    from rankbias.data import describe

    n = describe(cfg.dataset, cfg.dataset_args)[0]
    batch_norm = _has_batch_norm(cfg.model, json.dumps(cfg.model_args, sort_keys=True),
                                 cfg.dataset, json.dumps(cfg.dataset_args, sort_keys=True))
    return len(batch_starts(n, cfg.batch_size, cfg.drop_last, batch_norm))


def decay_budget(cfg: RunConfig, epochs: int | None = None) -> float | None:
    """D after `epochs` epochs (all of them by default), from the config and its lr
    schedule; None for Adam with L2 decay."""
    rate = shrink_rate(cfg)
    if rate is None:
        return None
    per_epoch = steps_per_epoch(cfg)
    return rate * per_epoch * sum(cfg.lr_at(e) for e in range(cfg.epochs if epochs is None
                                                               else epochs))


def k_star(cfg: RunConfig, eps: float = DEFAULT_EPS) -> float:
    """Theorem 3.4's k* = log(2/eps) / (lr * wd) in steps, at the initial learning rate (the
    steps a constant lr needs to reach the threshold); inf without decay."""
    rate = shrink_rate(cfg)
    if rate is None or rate * cfg.lr <= 0:
        return math.inf
    return threshold(eps) / (cfg.lr * rate)


def validity(cfg: RunConfig, eps: float | None = None, measured: float | None = None,
             min_budget: float | None = None) -> dict:
    """Whether a run of `cfg` could show the low-rank bias: its steps, k*, decay budget D
    (`measured` replaces the config's for Adam with L2 decay), the threshold (log(2/eps),
    or `min_budget` where an experiment states another) and `informative` (D >= it; None
    when D is unknown)."""
    eps = eps if eps is not None else cfg.tolerances[0]
    budget = decay_budget(cfg)
    if budget is None and measured is not None and math.isfinite(measured):
        budget = measured
    limit = threshold(eps) if min_budget is None else float(min_budget)
    return {"steps": steps_per_epoch(cfg) * cfg.epochs, "k_star": _finite(k_star(cfg, eps)),
            "decay_budget": None if budget is None else round(budget, 4),
            "threshold": round(limit, 4),
            "informative": None if budget is None else bool(budget >= limit)}


def adam_shrink(optimizer: torch.optim.Optimizer, matrices: set[int] | None = None) -> float:
    """The typical shrink of one step of Adam with L2 decay: the median over the entries of
    the decayed matrices (`matrices`: their ids; all >= 2-D parameters by default) of
    lr * wd / (sqrt(v_hat) + eps), from the optimizer's state now. The median, not the
    mean: an entry whose gradient is its decay alone has v_hat ~ (wd p)^2 and a shrink of
    ~lr/|p| whatever wd is (it moves by about lr a step, down to 0), and these few entries
    would decide a mean; the eps-rank falls when the bulk of the initial weights has
    decayed. 0 before its first step."""
    shrinks = []
    for group in optimizer.param_groups:
        if not group["weight_decay"]:
            continue
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state or p.ndim < 2 or (matrices and id(p) not in matrices):
                continue
            shrinks.append(shrink_entries(state["exp_avg_sq"], float(state["step"]), group["lr"],
                                          group["weight_decay"], beta2, eps))
    return float(torch.cat(shrinks).median()) if shrinks else 0.0


def shrink_entries(exp_avg_sq: torch.Tensor, steps: float, lr: float, wd: float, beta2: float,
                   eps: float) -> torch.Tensor:
    """Per entry of one matrix, Adam's shrink lr * wd / (sqrt(v_hat) + eps), flat, in float64
    after the state's own (float32) arithmetic; a stack's member gets its single run's."""
    v_hat = exp_avg_sq / (1 - beta2 ** steps)
    return (lr * wd / (v_hat.sqrt() + eps)).double().flatten()


@dataclass
class DecayLedger:
    """The decay a run has had so far: the budget D (the sum of each step's shrink) and the
    log of the factor that multiplies its initial weights, sum log(1 - shrink) (exact for
    plain SGD and AdamW; the heavy ball's steady state with momentum; an estimate for Adam
    with L2 decay, whose shrink is measured once per epoch)."""

    budget: float = 0.0
    log_keep: float = 0.0

    def add(self, steps: int, shrink: float) -> None:
        """`steps` steps of one shrink each (one epoch at one learning rate)."""
        self.budget += steps * shrink
        self.log_keep += steps * (math.log1p(-shrink) if shrink < 1 else -math.inf)

    def initial_share(self, initial_norm: float, norm: float) -> float:
        """How much of ||W_T||_F the decayed initial weights still are:
        prod (1 - shrink) ||W_0||_F / ||W_T||_F."""
        return math.exp(self.log_keep) * initial_norm / norm if norm > 0 else math.nan


def step_shrink(cfg: RunConfig, lr: float, optimizer: torch.optim.Optimizer | None = None
                ) -> float:
    """The shrink of one step at learning rate `lr`: lr times the shrink rate, or, for Adam
    with L2 decay, measured from `optimizer`'s state now (`adam_shrink`)."""
    rate = shrink_rate(cfg)
    if rate is not None:
        return lr * rate
    return adam_shrink(optimizer) if optimizer is not None else 0.0


def budget_cells(cfg: RunConfig) -> list[str]:
    """T, k*, D and T/k* of one run as table cells; D marked * below log(2/eps)."""
    v = validity(cfg)
    k = v["k_star"]
    budget = "measured" if v["decay_budget"] is None else (
        f"{v['decay_budget']:.2f}" + ("" if v["informative"] else "*"))
    return [f"{v['steps']:,}", "-" if k is None else f"{k:,.0f}", budget,
            "-" if k is None else f"{v['steps'] / k:.1f}"]


def _finite(value: float) -> float | None:
    return round(value, 2) if math.isfinite(value) else None
