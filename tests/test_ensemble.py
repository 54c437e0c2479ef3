"""Lockstep ensembles: every member against its single run (train_run is the oracle)."""

import math

import numpy as np
import pytest

from rankbias.config import RunConfig
from rankbias.ensemble import can_ensemble, ensemble_key, group_configs, train_ensemble
from rankbias.train import train_run
from rankbias.utils import RankbiasError

# Small settings: 400 digits, B=8 -> 50 steps per epoch, 150 steps in all.
BASE = dict(model="mlp", dataset_args=dict(subset=400), batch_size=8, epochs=3, device="cpu")
MEMBERS = [dict(lr=0.1, weight_decay=5e-3, seed=0), dict(lr=0.3, weight_decay=1e-3, seed=1),
           dict(lr=0.05, weight_decay=2e-2, seed=2)]


def members(model_args: dict, lr_scale: float = 1.0, **changes) -> list[RunConfig]:
    return [RunConfig(**{**BASE, "model_args": model_args, **changes, **m,
                         "lr": m["lr"] * lr_scale}) for m in MEMBERS]


def assert_twins(ensemble, single, rtol=1e-5) -> float:
    """Same run, status, steps and rows as the single run: ranks exactly, floats to rtol.
    Returns the largest relative deviation found (0.0 when bitwise identical)."""
    assert (ensemble.run_id, ensemble.config, ensemble.status) == \
        (single.run_id, single.config, single.status)
    assert (ensemble.epochs, ensemble.steps, ensemble.diverged_step, ensemble.error) == \
        (single.epochs, single.steps, single.diverged_step, single.error)
    rows = [r for r in ensemble.rows if r[3] != "wall_s"]
    twin = [r for r in single.rows if r[3] != "wall_s"]
    assert [r[:4] for r in rows] == [r[:4] for r in twin]  # same points, layers, metrics
    worst = 0.0
    for (*key, metric, value), (*_, expected) in zip(rows, twin):
        if metric.startswith("rank@") or metric.startswith("avg_rank"):
            assert value == expected, (key, metric)
        else:
            assert value == pytest.approx(expected, rel=rtol, abs=1e-12), (key, metric)
            worst = max(worst, abs(value - expected) / max(abs(expected), 1e-12))
    assert [s[:3] for s in ensemble.spectra] == [s[:3] for s in single.spectra]
    for (*_, a), (*_, b) in zip(ensemble.spectra, single.spectra):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)
    assert ensemble.summary.keys() == single.summary.keys()
    for key, value in single.summary.items():
        if isinstance(value, str):  # run_id, status
            assert ensemble.summary[key] == value, key
        elif key != "wall_s":
            assert ensemble.summary[key] == pytest.approx(value, rel=rtol, nan_ok=True), key
    assert ensemble.provenance["seed"] == single.provenance["seed"]
    return worst


@pytest.mark.parametrize("model_args, changes", [
    (dict(depth=3, width=32), {}),  # MLP-BN
    (dict(depth=3, width=36), {}),  # a width with SIMD remainder channels in BatchNorm
    (dict(depth=3, width=32, batch_norm=False), {}),
    (dict(depth=3, width=32, residual=True, activation="gelu", bias=False), {}),
    (dict(depth=2, width=24, activation="tanh"),
     dict(loss="mse", momentum=0.9, wd_scope="weights", schedule="multistep", milestones=[2],
          track_every=2, lr_scale=0.1)),
], ids=["bn", "bn-width36", "no-bn", "residual-gelu-nobias", "mse-momentum-multistep"])
def test_members_follow_their_single_runs(model_args, changes):
    configs = members(model_args, **changes)
    assert can_ensemble(configs)
    calls = []
    results = train_ensemble(configs, on_track=lambda i, epoch, point: calls.append((i, epoch)))
    for cfg, result in zip(configs, results):
        single = train_run(cfg)
        assert single.steps >= 100 and single.status == "done"
        assert assert_twins(result, single) == 0.0  # on CPU: bitwise identical
    tracked = sorted({r[1] for r in results[0].rows})
    assert sorted(calls) == sorted((i, e) for i in range(3) for e in tracked)
    assert results[0].provenance["ensemble_size"] == 3


def test_a_diverging_member_leaves_the_others_untouched():
    configs = members(dict(depth=3, width=32))
    configs[1] = configs[1].replace(lr=1e4)  # diverges within the first epoch
    results = train_ensemble(configs)
    singles = [train_run(cfg) for cfg in configs]
    assert [r.status for r in results] == ["done", "diverged", "done"]
    for result, single in zip(results, singles):
        assert_twins(result, single)
    dead = results[1]
    assert dead.epochs == 0 and 0 <= dead.diverged_step < 50
    assert "NaN/Inf" in dead.error
    assert all(math.isfinite(v) for *_, metric, v in dead.rows if metric != "wall_s")
    assert results[0].steps == results[2].steps == 150


def test_early_stop_applies_per_member():
    # The authors' rule: train accuracy <= 0.15 at 3 tracking points after epoch 50. A member
    # with a vanishing lr never learns and stops at epoch 53; the other trains on.
    cfg = dict(model="mlp", model_args=dict(depth=1, width=8, batch_norm=False),
               dataset_args=dict(subset=40), batch_size=8, epochs=54, weight_decay=0.0,
               device="cpu")
    configs = [RunConfig(**cfg, lr=0.5, seed=0), RunConfig(**cfg, lr=1e-9, seed=3)]
    results = train_ensemble(configs)
    singles = [train_run(c) for c in configs]
    assert [r.status for r in results] == ["done", "stopped"]
    assert results[1].epochs == 53 and "train accuracy" in results[1].error
    for result, single in zip(results, singles):
        assert_twins(result, single)


def test_incompatible_configs_are_grouped_or_rejected():
    a = RunConfig(batch_size=8, lr=0.1, seed=0, device="cpu")
    b = a.replace(lr=0.5, weight_decay=0.0, seed=7, checkpoint_every=5)  # member fields only
    c = a.replace(batch_size=16)
    d = a.replace(momentum=0.9)
    e = a.replace(model_args=dict(width=50))
    assert ensemble_key(a) == ensemble_key(b)
    assert can_ensemble([a, b]) and not can_ensemble([a, c]) and not can_ensemble([a, d])
    assert group_configs([a, c, b, d, e, c]) == [[0, 2], [1, 5], [3], [4]]
    with pytest.raises(RankbiasError, match="cannot train as one ensemble"):
        train_ensemble([a, c])
    assert train_ensemble([]) == []


def test_models_without_a_fast_path_train_as_single_runs():
    cfg = RunConfig(model="convnet", model_args=dict(width=4, depth=0, batch_norm=True),
                    dataset_args=dict(subset=64), batch_size=16, epochs=1, device="cpu")
    tracked = RunConfig(model_args=dict(depth=1, width=8), dataset_args=dict(subset=64),
                        batch_size=16, epochs=1, device="cpu", track_gradient_rank=True)
    configs = [cfg, cfg.replace(lr=0.3, seed=1)]
    results = train_ensemble(configs)
    configs, results = configs + [tracked], results + train_ensemble([tracked])
    for result, single in zip(results, [train_run(c) for c in configs]):
        assert assert_twins(result, single) == 0.0
        assert "ensemble_size" not in result.provenance  # train_run's own result
