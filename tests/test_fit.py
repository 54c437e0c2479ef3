"""The fitted rank law: recovery of a known law, leave-one-setting-out honesty, the store's
runs it uses, `rankbias fit` / `rankbias predict`, and a held-out setting of real runs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sqlite3

import matplotlib.image as mpimg
import numpy as np
import pytest

from rankbias.cli.main import main
from rankbias.fit import fit as rankfit
from rankbias.fit import law as rank_law
from rankbias.metrics.layers import weight_matrices
from rankbias.models import create_model
from rankbias.runs.store import Store
from rankbias.theory.bound import rank_bound
from rankbias.training.config import RunConfig
from rankbias.training.ensemble import group_configs, train_ensemble
from rankbias.training.train import RunResult
from rankbias.utils import RankbiasError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


# --- the law on synthetic ranks ----------------------------------------------------------
def test_fit_law_recovers_a_noiseless_law_exactly():
    a, b, r_max = 0.05, 0.9, 64.0
    x = np.repeat(np.geomspace(20, 20_000, 9), 3)
    rank = np.minimum(r_max, a * x ** b)  # the last 4 settings are on the ceiling
    law = rank_law.fit_law(x, rank, r_max)
    assert law.a == pytest.approx(a, rel=1e-9)
    assert law.b == pytest.approx(b, rel=1e-9)
    assert law.knee(r_max) == pytest.approx((r_max / a) ** (1 / b), rel=1e-9)


def test_fit_law_recovers_a_and_b_from_noisy_seeds():
    """Known law, log-normal noise (sd 0.05), 4 seeds per setting, some settings saturated.

    Tolerance: 4 standard errors of the ordinary least-squares estimates on the true power
    branch, computed from the design and the noise level (not from the fit): under the
    model a miss has probability ~6e-5. The power-branch settings are kept 3 noise sd below
    the knee so that clipping at r_max cannot bias them.
    """
    rng = np.random.default_rng(0)
    a, b, r_max, sigma, seeds = 0.02, 1.2, 64.0, 0.05, 4
    knee = (r_max / a) ** (1 / b)
    power = np.geomspace(knee / 30, knee * math.exp(-3 * sigma / b) / 1.2, 8)
    ceiling = knee * np.array([3.0, 6.0, 12.0])
    x = np.repeat(np.concatenate([power, ceiling]), seeds)
    rank = np.minimum(r_max, a * x ** b * np.exp(rng.normal(0, sigma, len(x))))
    law = rank_law.fit_law(x, rank, r_max)

    lx = np.log(np.repeat(power, seeds))
    sxx = np.sum((lx - lx.mean()) ** 2)
    se_b = sigma / math.sqrt(sxx)
    se_log_a = sigma * math.sqrt(1 / len(lx) + lx.mean() ** 2 / sxx)
    assert abs(law.b - b) < 4 * se_b, (law.b, b, se_b)
    assert abs(math.log(law.a) - math.log(a)) < 4 * se_log_a, (law.a, a, se_log_a)
    predicted = law(x, r_max)
    assert np.all(predicted[x >= ceiling.min()] == r_max)  # the ceiling settings saturate
    assert np.all(predicted[x <= power.max()] < r_max)  # the others do not


def test_fit_law_needs_two_distinct_x():
    with pytest.raises(RankbiasError, match="single value"):
        rank_law.fit_law([100.0, 100.0, 100.0], [10.0, 11.0, 12.0], 64)
    with pytest.raises(RankbiasError, match="> 0"):
        rank_law.fit_law([100.0, 200.0], [10.0, 0.0], 64)


def _synthetic(rng, a=0.05, b=0.9, r_max=64.0, seeds=3):
    x_settings = np.geomspace(20, 20_000, 9)
    x = np.repeat(x_settings, seeds)
    setting = np.repeat(np.arange(len(x_settings)), seeds)
    rank = np.minimum(r_max, a * x ** b * np.exp(rng.normal(0, 0.03, len(x))))
    return x, rank, setting, r_max


def test_leave_one_setting_out_never_uses_the_settings_own_runs():
    x, rank, setting, r_max = _synthetic(np.random.default_rng(1))
    loo = rank_law.leave_one_setting_out(x, rank, r_max, setting)
    for s in np.unique(setting):  # oracle: a fit on the other settings only
        held = setting == s
        law = rank_law.fit_law(x[~held], rank[~held], r_max)
        assert np.allclose(loo[held], law(x[held], r_max), rtol=1e-12)

    outlier = 2  # a power-branch setting: halve its ranks
    spoiled = np.where(setting == outlier, rank * 0.5, rank)
    loo_spoiled = rank_law.leave_one_setting_out(x, spoiled, r_max, setting)
    own = setting == outlier
    assert np.array_equal(loo_spoiled[own], loo[own])  # its prediction ignores its own runs
    assert not np.allclose(loo_spoiled[~own], loo[~own])  # the others do use its runs

    def error(ranks, predictions):
        return abs(predictions[own].mean() - ranks[own].mean())
    assert error(spoiled, loo_spoiled) > 5 * error(rank, loo)  # so its own error rises


def test_r_squared_is_one_for_an_exact_law_and_none_for_constant_ranks():
    law = rank_law.Law(a=0.1, b=1.0)
    x = np.array([10.0, 20.0, 40.0])
    assert rank_law.r_squared(law, x, law(x, 64), 64) == pytest.approx(1.0)
    assert rank_law.r_squared(law, x, [5.0, 5.0, 5.0], 64) is None


# --- the runs of a store (synthetic results, no training) ---------------------------------
SMALL = {"model": "mlp", "model_args": {"depth": 2, "width": 32}, "epochs": 10,
         "device": "cpu"}  # digits: matrices 32x64 and 32x32 -> r_max 32, m = 1
LAW = rank_law.Law(a=0.004, b=1.5)
GRID = [(8, 0.5, 0.1), (8, 0.5, 0.05), (16, 0.5, 0.05), (8, 0.25, 0.05), (32, 0.5, 0.05),
        (64, 0.5, 0.05)]  # x = 160, 320, 640, 640, 1280, 2560


def _save(store: Store, rank: float, extra: dict | None = None, status: str = "done",
          train_acc: float = 0.9, layer_ranks: dict | None = None, **values) -> None:
    config = {**RunConfig.from_dict({**SMALL, **values}).to_dict(), **(extra or {})}
    run_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    rows = [(100, 10, layer, "rank@0.001", r) for layer, r in (layer_ranks or {}).items()]
    store.save_result(RunResult(run_id=run_id, config=config, status=status, rows=rows,
                                summary={"final_avg_rank": rank, "train_acc": train_acc,
                                         "init_avg_rank": 32.0}))


def _law_rank(b: int, lr: float, wd: float, seed: int) -> float:
    return float(min(32.0, LAW.a * (b / (lr * wd)) ** LAW.b * (1 + 0.02 * (seed - 1))))


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "synthetic.db"
    with Store(path) as store:
        for b, lr, wd in GRID:
            for seed in range(3):
                rank = _law_rank(b, lr, wd, seed)
                _save(store, rank, batch_size=b, lr=lr, weight_decay=wd, seed=seed,
                      layer_ranks={"blocks.0.fc.weight": rank, "blocks.1.fc.weight": rank / 2})
        _save(store, 31.0, extra={"optimizer": "sgd"}, batch_size=8, lr=0.5, weight_decay=0.1,
              seed=9)  # explicit plain SGD: used
        left_out = dict(batch_size=8, lr=0.5, seed=7)  # seed 7: no id shared with the grid
        _save(store, 5.0, weight_decay=0.0, **left_out)
        _save(store, 5.0, weight_decay=0.05, momentum=0.9, **left_out)
        _save(store, 5.0, extra={"optimizer": "adamw"}, weight_decay=0.05, **left_out)
        _save(store, 5.0, train_acc=0.1, weight_decay=0.05, **left_out)
        _save(store, 5.0, status="diverged", weight_decay=0.1, **left_out)
        for b in (8, 16):  # another recipe with only 2 settings: skipped, not mixed in
            _save(store, 1.0, batch_size=b, lr=0.5, weight_decay=0.05, epochs=3)
        for b, lr, wd in GRID[:4]:  # another architecture: its own fit
            _save(store, float(LAW(b / (lr * wd), 16)) / 2, batch_size=b, lr=lr,
                  weight_decay=wd, model_args={"depth": 2, "width": 16})
    return path


def test_fit_store_uses_only_eligible_runs_and_fits_them_as_fit_law(synthetic_store):
    result = rankfit.fit_store(synthetic_store)
    assert result.excluded == {
        "not done": 1, "not plain SGD (optimizer other than sgd, or momentum > 0)": 2,
        "weight decay 0": 1, "final train accuracy <= 0.15": 1}
    fit = next(f for f in result.fits if f.model_args == {"depth": 2, "width": 32})
    assert fit.layer == "average" and fit.r_max == 32 and fit.patches == 1
    x = np.array([b / (lr * wd) for b, lr, wd in GRID for _ in range(3)] + [160.0])
    rank = np.array([_law_rank(b, lr, wd, s) for b, lr, wd in GRID for s in range(3)] + [31.0])
    oracle = rank_law.fit_law(x, rank, 32)
    assert (fit.law.a, fit.law.b) == pytest.approx((oracle.a, oracle.b), rel=1e-9)
    d = fit.as_dict()
    assert d["n_runs"] == 19 and d["n_settings"] == 6 and d["x_range"] == [160.0, 2560.0]

    # loo_error: setting means against refits without the setting (all seeds), RMS
    setting = np.array([f"{b},{lr},{wd}" for b, lr, wd in GRID for _ in range(3)] + ["8,0.5,0.1"])
    errors = []
    for s in dict.fromkeys(setting):
        held = setting == s
        law = rank_law.fit_law(x[~held], rank[~held], 32)
        errors.append(law(x[held][0], 32) - rank[held].mean())
    assert d["loo_error"] == pytest.approx(math.sqrt(np.mean(np.square(errors))), rel=1e-9)

    other = next(f for f in result.fits if f.model_args == {"depth": 2, "width": 16})
    assert other.r_max == 16 and len(other.points) == 4
    assert [s["recipe"] for s in result.skipped] == ["epochs=3"]
    assert result.skipped[0]["n_settings"] == 2


def test_per_layer_fits_use_each_matrix_final_rank_and_size(synthetic_store):
    result = rankfit.fit_store(synthetic_store, per_layer=True)
    fits = {f.layer: f for f in result.fits if f.model_args == {"depth": 2, "width": 32}}
    assert set(fits) == {"average", "blocks.0.fc.weight", "blocks.1.fc.weight"}
    net = create_model("mlp", (1, 8, 8), 10, depth=2, width=32)
    for name, w in weight_matrices(net).items():
        assert fits[name].r_max == min(w.shape)
    x = np.array([b / (lr * wd) for b, lr, wd in GRID for _ in range(3)])
    rank = np.array([_law_rank(b, lr, wd, s) for b, lr, wd in GRID for s in range(3)]) / 2
    oracle = rank_law.fit_law(x, rank, 32)
    layer = fits["blocks.1.fc.weight"].law
    assert (layer.a, layer.b) == pytest.approx((oracle.a, oracle.b), rel=1e-9)


def test_architecture_counts_patches_of_a_conv_by_hand():
    # convnet on 8x8 digits: two 2x2 stride-2 convs (8x8 -> 4x4 -> 2x2 positions), then two
    # 3x3 padding-1 convs (2x2 positions); width 32; the first kernel is 32 x (1*2*2).
    arch = rankfit.architecture("convnet", {}, "digits", {})
    assert arch == {"features.0.weight": (4, 16), "features.3.weight": (32, 4),
                    "features.6.weight": (32, 4), "features.9.weight": (32, 4)}


def test_conv_fits_scale_x_by_each_layers_patches(tmp_path):
    path = tmp_path / "conv.db"
    with Store(path) as store:
        for b, lr, wd in GRID:
            ranks = {"features.0.weight": 3.0 + b / 64, "features.3.weight": 10.0 + b / 8}
            _save(store, 12.0 + b / 8, model="convnet", model_args={}, layer_ranks=ranks,
                  batch_size=b, lr=lr, weight_decay=wd)
    fits = {f.layer: f for f in rankfit.fit_store(path, per_layer=True).fits}
    scale = fits["average"].points["batch_size"] / (fits["average"].points["lr"]
                                                    * fits["average"].points["weight_decay"])
    assert np.allclose(fits["average"].points["x"], 7 * scale)  # mean m of (16, 4, 4, 4)
    assert fits["average"].r_max == 25  # mean of min(shape) (4, 32, 32, 32)
    assert np.allclose(fits["features.0.weight"].points["x"], 16 * scale)
    assert fits["features.0.weight"].r_max == 4
    assert np.allclose(fits["features.3.weight"].points["x"], 4 * scale)
    assert set(fits) == {"average", "features.0.weight", "features.3.weight"}  # no rows: no fit


def test_fit_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["fit", "--store", str(tmp_path / "none.db")]) == 2
    assert "no results store" in capsys.readouterr().err

    only_wd0 = tmp_path / "wd0.db"
    with Store(only_wd0) as store:
        _save(store, 30.0, batch_size=8, lr=0.5, weight_decay=0.0)
    assert main(["fit", "--store", str(only_wd0)]) == 2
    err = capsys.readouterr().err
    assert "no eligible runs" in err and "1 weight decay 0" in err and err.count("\n") == 1

    two = tmp_path / "two.db"
    with Store(two) as store:
        for b in (8, 16):
            _save(store, 10.0 * b, batch_size=b, lr=0.5, weight_decay=0.05)
    assert main(["fit", "--store", str(two)]) == 2
    err = capsys.readouterr().err
    assert ">= 3 settings" in err and "has 2" in err and err.count("\n") == 1

    one_x = tmp_path / "one_x.db"
    with Store(one_x) as store:
        for b, wd in ((4, 0.025), (8, 0.05), (16, 0.1)):  # x = B/(0.5 wd) = 320 for all
            _save(store, 10.0, batch_size=b, lr=0.5, weight_decay=wd)
    assert main(["fit", "--store", str(one_x)]) == 2
    err = capsys.readouterr().err
    assert "single value" in err and err.count("\n") == 1


def test_fit_by_model_pools_data_sets_and_by_model_dataset_splits_them(tmp_path):
    path = tmp_path / "two_datasets.db"
    with Store(path) as store:
        for dataset in ("digits", "synthetic"):  # synthetic: 20 inputs -> a 32x20 first matrix
            for b, lr, wd in GRID:
                _save(store, _law_rank(b, lr, wd, 1) / 2, batch_size=b, lr=lr,
                      weight_decay=wd, dataset=dataset)
    (pooled,) = rankfit.fit_store(path).fits
    assert pooled.datasets == ["digits", "synthetic"] and len(pooled.settings) == 12
    assert sorted(set(pooled.points["r_max"])) == [26.0, 32.0]  # mean of (20, 32), (32, 32)
    split = rankfit.fit_store(path, by="model,dataset").fits
    assert sorted((f.datasets[0], f.r_max, len(f.settings)) for f in split) == [
        ("digits", 32.0, 6), ("synthetic", 26.0, 6)]


def test_fit_cli_json_is_strict_and_complete(synthetic_store, tmp_path, capsys):
    figure = tmp_path / "fit.png"
    assert main(["fit", "--store", str(synthetic_store), "--per-layer", "--format", "json"]) == 0
    doc = strict_json(capsys.readouterr().out)
    keys = {"model", "layer", "a", "b", "r2", "loo_error", "n_runs", "n_settings", "x_range",
            "r_max"}
    assert doc["fits"] and all(keys <= set(f) for f in doc["fits"])
    assert {f["layer"] for f in doc["fits"]} >= {"average", "blocks.0.fc.weight"}
    assert main(["fit", "--store", str(synthetic_store), "--figure", str(figure)]) == 0
    data = figure.read_bytes()
    assert data.startswith(PNG_MAGIC) and mpimg.imread(figure).var() > 0


def test_fit_cli_text_table(synthetic_store, capsys):
    assert main(["fit", "--store", str(synthetic_store)]) == 0
    out = capsys.readouterr().out
    assert "mlp depth=2 width=32 on digits" in out and "loo_error" in out
    assert "skipped: mlp depth=2 width=32 on digits, epochs=3" in out


# --- predict ------------------------------------------------------------------------------
def test_predict_without_store_is_the_bound_per_matrix(capsys):
    assert main(["predict", "--model", "mlp", "--batch-size", "8", "--lr", "0.5",
                 "--weight-decay", "0.02", "--patches", "4", "--format", "json"]) == 0
    doc = strict_json(capsys.readouterr().out)
    assert doc["source"] == "bound" and doc["low"] is None and doc["high"] is None
    assert doc["predicted"] == pytest.approx(rank_bound(8, 0.5, 0.02, 1e-3, 4))
    assert main(["predict", "--model", "mlp", "--batch-size", "8", "--lr", "0.5",
                 "--weight-decay", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "upper bound" in out and "not a prediction" in out and "per matrix" in out


def test_predict_at_weight_decay_zero_is_null(synthetic_store, capsys):
    for store in ([], ["--store", str(synthetic_store)]):
        assert main(["predict", "--model", "mlp", "--batch-size", "8", "--lr", "0.5",
                     "--weight-decay", "0", "--format", "json", *store]) == 0
        doc = strict_json(capsys.readouterr().out)
        assert doc["predicted"] is None and doc["low"] is None and "weight decay 0" in doc["note"]


def test_predict_from_a_fit_warns_when_extrapolating(synthetic_store, capsys):
    args = ["predict", "--model", "mlp", "--lr", "0.5", "--weight-decay", "0.05",
            "--store", str(synthetic_store), "--format", "json"]
    assert main([*args, "--batch-size", "16"]) == 0
    captured = capsys.readouterr()
    doc = strict_json(captured.out)
    assert doc["source"] == "fit" and doc["extrapolated"] is False and doc["x"] == 640
    assert doc["low"] <= doc["predicted"] <= doc["high"] <= doc["r_max"]
    assert doc["model_args"] == {"depth": 2, "width": 32}  # the fit with the most runs
    assert "other fit(s)" in captured.err  # width 16 also matches --model mlp
    assert main([*args, "--batch-size", "1"]) == 0
    captured = capsys.readouterr()
    assert strict_json(captured.out)["extrapolated"] is True
    assert "outside the fitted x range" in captured.err


def test_predict_unknown_model_in_store_exit_2(synthetic_store, capsys):
    assert main(["predict", "--model", "convnet", "--batch-size", "8", "--lr", "0.5",
                 "--weight-decay", "0.05", "--store", str(synthetic_store)]) == 2
    assert "no fit for model 'convnet'" in capsys.readouterr().err


# --- held out: real short runs ------------------------------------------------------------
REAL = {"model": "mlp", "model_args": {"depth": 2, "width": 32}, "dataset_args": {"subset": 300},
        "epochs": 15, "schedule": "multistep", "milestones": [10], "batch_size": 8,
        "device": "cpu"}
# (lr, wd): x = 8/(lr*wd) = 160, 213, 320, 640, 1280; the held-out one is at x = 320 too,
# reached with another lr: the theorem's scale says it should behave like (0.5, 0.05).
FITTED = [(0.5, 0.1), (0.5, 0.075), (0.5, 0.05), (0.5, 0.025), (0.5, 0.0125)]
HELD_OUT = (0.25, 0.1)


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """18 real runs (6 settings x 3 seeds, ~2 s as one batched ensemble); the held-out
    setting's runs are kept out of the store."""
    configs = [RunConfig.from_dict({**REAL, "lr": lr, "weight_decay": wd, "seed": seed})
               for lr, wd in [*FITTED, HELD_OUT] for seed in range(3)]
    results = []
    for group in group_configs(configs):
        results += train_ensemble([configs[i] for i in group])
    path = tmp_path_factory.mktemp("real") / "results.db"
    held = []
    with Store(path) as store:
        for r in results:
            if (r.config["lr"], r.config["weight_decay"]) == HELD_OUT:
                held.append(r.summary["final_avg_rank"])
            else:
                store.save_result(r)
    return path, held


def test_predict_lands_a_held_out_setting_within_its_interval(real_store):
    path, held = real_store
    lr, wd = HELD_OUT
    result = rankfit.predict("mlp", 8, lr, wd, store=path)
    assert result["source"] == "fit" and not result["extrapolated"]
    assert result["high"] - result["low"] < 0.75 * result["r_max"]  # not the trivial [0, r_max]
    for rank in held:  # each held-out run, and so their mean
        assert result["low"] <= rank <= result["high"], (rank, result)


def test_real_store_fit_has_r2_and_held_out_error(real_store):
    path, _ = real_store
    fit = rankfit.fit_store(path).fits[0]
    d = fit.as_dict()
    assert d["n_settings"] == len(FITTED) and d["n_runs"] == 3 * len(FITTED)
    assert 0 < d["r2"] <= 1 and d["loo_error"] > 0 and d["b"] > 0  # rank rises with x


# --- the quick reproduction (slow) ---------------------------------------------------------
@pytest.mark.slow
def test_quick_reproduction_held_out_settings_within_intervals(tmp_path):
    """Every interior setting of the quick reproduction's fit, held out of the store in
    turn (all its seeds deleted), lands within `predict`'s interval."""
    assert main(["reproduce", "--scale", "quick", "--out", str(tmp_path / "q"),
                 "--no-progress"]) == 0
    store = tmp_path / "q" / "results.db"
    fit = next(f for f in rankfit.fit_store(store).fits if f.layer == "average")
    settings = fit.settings
    interior = [s for s in settings if settings[0]["x"] < s["x"] < settings[-1]["x"]]
    assert len(interior) >= 3
    for i, s in enumerate(interior):
        copy = tmp_path / f"held_out_{i}.db"  # a fresh name: no stale -wal file applies
        shutil.copy(store, copy)
        held = fit.points[(fit.points["batch_size"] == s["batch_size"])
                          & (fit.points["lr"] == s["lr"])
                          & (fit.points["weight_decay"] == s["weight_decay"])]
        with contextlib.closing(sqlite3.connect(copy)) as db, db:
            db.executemany("DELETE FROM runs WHERE run_id=?", [(r,) for r in held["run_id"]])
        result = rankfit.predict(fit.model, s["batch_size"], s["lr"], s["weight_decay"],
                                 store=copy)
        assert not result["extrapolated"]
        assert result["low"] <= s["rank_mean"] <= result["high"], (s, result)
