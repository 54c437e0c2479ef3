"""The theory claims of `rankbias reproduce` (claims 2 and 3): exact computations on SGD
steps recorded here, not sweeps of runs.

    result = check_unrolled_identity(settings, max_error=1e-10)   # Lemma 3.2
    result = check_theorem(settings, min_steps_over_k=10)          # Theorem 3.4
    result.verdict, result.reason, result.evidence   # "pass" | "fail" | "inconclusive"

`settings` is the experiment file's spec at the chosen scale (models, dataset, batch_size,
lr, weight_decay, steps, ...). Both train through training/sgd.py: full batches of
exactly B examples, a fresh permutation from a seeded generator per pass.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import nn

from rankbias.data import load_dataset
from rankbias.metrics.gradient_rank import PatchCounter
from rankbias.metrics.layers import weight_matrices
from rankbias.models import create_model
from rankbias.theory.unrolling import (
    record_sgd_trajectory,
    theorem_check,
    theorem_steps,
    unrolling_errors,
)
from rankbias.training.sgd import batch_stream, evaluate, sgd_step
from rankbias.training.state import process_state
from rankbias.utils import RankbiasError


class CheckResult(NamedTuple):
    verdict: str  # pass | fail | inconclusive
    reason: str
    evidence: dict


def model_specs(settings: dict) -> list[tuple[str, dict]]:
    """(name, options) of each entry of a theory check's `models`: a name, or
    {name: ..., args: {...}} for a model with options (a narrower ResNet, say)."""
    return [(m, {}) if isinstance(m, str) else (m["name"], m.get("args", {}))
            for m in settings["models"]]


def _sgd_steps(model: nn.Module, optimizer: torch.optim.Optimizer, data, batch_size: int,
               steps: int, order: torch.Generator) -> int:
    """`steps` SGD steps on full mini-batches, starting a fresh pass of the data."""
    loss_fn = torch.nn.functional.cross_entropy
    for x, y in itertools.islice(batch_stream(data.x_train, data.y_train, batch_size, order),
                                 steps):
        sgd_step(model, optimizer, loss_fn, x, y)
    return steps


def _recorded_trajectory(settings: dict, model_name: str, options: dict):
    """`steps` SGD steps recorded in float64, after `warmup_steps` ordinary ones (so the
    check also covers trained weights, not only the initialization)."""
    data = load_dataset(settings["dataset"])
    with process_state(seed=0):
        model = create_model(model_name, data.input_shape, data.num_classes, **options)
    lr, wd = settings["lr"], settings["weight_decay"]
    stream = batch_stream(data.x_train, data.y_train, settings["batch_size"],
                          torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    loss_fn = torch.nn.functional.cross_entropy
    for x, y in itertools.islice(stream, settings.get("warmup_steps", 0)):
        sgd_step(model, optimizer, loss_fn, x, y)
    return record_sgd_trajectory(model, itertools.islice(stream, settings["steps"]), loss_fn,
                                 lr, wd)


def check_unrolled_identity(settings: dict, *, max_error: float = 1e-10) -> CheckResult:
    """Lemma 3.2 to floating-point precision: the largest relative error of the unrolled
    W_T over every matrix, model and k is at most `max_error`."""
    errors = {}
    for model_name, options in model_specs(settings):
        trajectory = _recorded_trajectory(settings, model_name, options)
        for k in settings["ks"]:
            errors[f"{model_name}, k={k}"] = max(unrolling_errors(trajectory, k).values())
    worst, limit = max(errors.values()), max_error
    evidence = {"max_relative_error": {k: float(f"{v:.3g}") for k, v in errors.items()},
                "settings": settings}
    return CheckResult("pass" if worst <= limit else "fail",
                       f"largest relative error {worst:.2e} over every matrix (limit "
                       f"{limit:g})", evidence)


def _decay_groups(model: nn.Module, wd: float, which: str) -> list[dict]:
    """Parameter groups: weight decay on all parameters (the paper's), or on the hidden
    matrices alone ("hidden"): with BatchNorm after them they are scale-invariant, so a
    strong decay lowers their rank without collapsing the network to zero, which a strong
    decay on the classifier and the BatchNorm scales does. The theorem is a statement
    about each matrix that is trained with decay, whatever the other parameters get."""
    if which == "all":
        return [{"params": list(model.parameters()), "weight_decay": wd}]
    hidden = {name.partition(":")[0] for name in weight_matrices(model)}
    params = dict(model.named_parameters())
    return [{"params": [p for n, p in params.items() if n in hidden], "weight_decay": wd},
            {"params": [p for n, p in params.items() if n not in hidden], "weight_decay": 0.0}]


def check_theorem(settings: dict, *, min_steps_over_k: float = 10) -> CheckResult:
    """Theorem 3.4 where it says something: plain SGD at a small B and a large lr*wd, so
    that r = ceil(k*)*B*m is below the matrix size, trained for T >> k* steps; then every
    weight matrix's eps-rank, its tail beyond the best rank-r approximation and rho (see
    `unrolling.TheoremCheck`). Pass: on every matrix where the bound is not vacuous,
    eps_rank <= r and tail_norm <= eps*rho/2. Inconclusive: vacuous everywhere."""
    lr, wd, eps = settings["lr"], settings["weight_decay"], settings["eps"]
    b = settings["batch_size"]
    k = theorem_steps(lr, wd, eps)
    if settings["steps"] < min_steps_over_k * k:
        raise RankbiasError(f"theorem check: {settings['steps']} steps is not >> k* = {k}")
    data = load_dataset(settings["dataset"])
    loss_fn = torch.nn.functional.cross_entropy
    rows, runs = [], []
    for model_name, options in model_specs(settings):
        for seed in settings.get("seeds", [0]):
            with process_state(seed=seed):
                model = create_model(model_name, data.input_shape, data.num_classes, **options)
            with PatchCounter(model) as counter:
                model(data.x_train[:b])
            patches = {n: c.patches for n, c in counter.counts.items()}
            optimizer = torch.optim.SGD(_decay_groups(model, wd, settings.get("decay", "all")),
                                        lr=lr)
            order = torch.Generator().manual_seed(seed)
            steps = _sgd_steps(model, optimizer, data, b, settings["steps"] - k, order)
            before = {n: w.clone() for n, w in weight_matrices(model, True, True).items()}
            steps += _sgd_steps(model, optimizer, data, b, k, order)
            for name, w in weight_matrices(model, True, True).items():
                check = theorem_check(before[name], w, lr, wd, b, patches[name], eps)
                rows.append({"model": model_name, "seed": seed, "layer": name,
                             **check.as_dict()})
            runs.append({"model": model_name, "seed": seed, "steps": steps,
                         "train_acc": evaluate(model, data.x_train, data.y_train, loss_fn)[1],
                         "test_acc": evaluate(model, data.x_test, data.y_test, loss_fn)[1]})
    return _theorem_verdict(rows, runs, settings, eps, k)


def _theorem_verdict(rows: list[dict], runs: list[dict], settings: dict, eps: float,
                     k: int) -> CheckResult:
    informative = [r for r in rows if not r["vacuous"]]
    tails_ok = sum(r["tail_norm"] <= eps * r["rho"] / 2 * (1 + 1e-6) for r in informative)
    ranks_ok = sum(r["eps_rank"] <= r["rank_bound"] for r in informative)
    evidence = {"k_star": rows[0]["k_star"], "k": k, "rank_bound": rows[0]["rank_bound"],
                "settings": settings, "runs": runs, "rows": rows,
                "informative_matrices": len(informative),
                "vacuous_matrices": len(rows) - len(informative),
                "largest_rho": max(r["rho"] for r in rows),
                "largest_eps_rank_over_bound": max(
                    (r["eps_rank"] / r["rank_bound"] for r in informative), default=None),
                "largest_tail_over_limit": max(
                    (r["tail_norm"] / (eps * r["rho"] / 2) for r in informative), default=None)}
    if not informative:
        return CheckResult("inconclusive", f"the bound r = {rows[0]['rank_bound']} is vacuous "
                           "on every matrix: nothing to test", evidence)
    verdict = "pass" if tails_ok == ranks_ok == len(informative) else "fail"
    return CheckResult(verdict, (
        f"{len(informative)} matrices where r = {rows[0]['rank_bound']} is below their size "
        f"(k* = {rows[0]['k_star']:.1f} of {settings['steps']} steps): the tail beyond rank r "
        f"is <= eps*rho/2 on {tails_ok} (Lemma 3.2 makes this an identity) and the eps-rank "
        f"<= r on {ranks_ok} (this needs rho <= 2; the largest rho is "
        f"{evidence['largest_rho']:.3f}); {len(rows) - len(informative)} vacuous matrices "
        "reported apart"), evidence)


THEORY_CHECKS = {"unrolled_identity": check_unrolled_identity, "theorem": check_theorem}
