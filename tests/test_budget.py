"""The decay budget D = sum of each step's shrink (docs/theory.md, "The decay budget"):
from the config, as the runs record it, and the designs that use it (equal steps, k*)."""

import math

import pytest
import torch

from rankbias.cli.main import main
from rankbias.training.budget import adam_shrink, decay_budget, k_star, validity
from rankbias.training.config import RunConfig
from rankbias.training.ensemble import train_ensemble
from rankbias.training.state import process_state
from rankbias.training.train import train_run
from rankbias.utils import RankbiasError

TINY = dict(model_args=dict(depth=2, width=16), dataset_args=dict(subset=200), batch_size=32,
            device="cpu", track_every=2)
# 200 examples at B = 32 with BatchNorm: batches start at 0, 32, ..., 192 (the last one
# holds 8 examples; one of a single example would be dropped): 7 steps an epoch.
STEPS_PER_EPOCH = 7


@pytest.mark.parametrize("changes, shrink_per_lr", [
    (dict(optimizer="sgd"), 0.02),
    (dict(optimizer="sgd", momentum=0.9), 0.02 / (1 - 0.9)),  # the heavy ball's steady state
    (dict(optimizer="adamw"), 0.02),
])
def test_the_config_s_budget_is_what_a_run_records(changes, shrink_per_lr):
    """Hand-computed: multistep lr 0.1 x0.2 at epoch 2, 4 epochs of 7 steps."""
    cfg = RunConfig(**TINY, lr=0.1, weight_decay=0.02, schedule="multistep", milestones=[2],
                    epochs=4, **changes)
    expected = STEPS_PER_EPOCH * shrink_per_lr * (2 * 0.1 + 2 * 0.02)
    assert decay_budget(cfg) == pytest.approx(expected)
    assert train_run(cfg).summary["decay_budget"] == pytest.approx(expected)
    assert train_ensemble([cfg, cfg.replace(seed=1)])[0].summary["decay_budget"] == \
        pytest.approx(expected)
    v = validity(cfg)
    assert v["steps"] == 4 * STEPS_PER_EPOCH and v["informative"] is False
    assert v["threshold"] == pytest.approx(math.log(2000), abs=1e-4)
    assert k_star(cfg) == pytest.approx(math.log(2000) / (0.1 * shrink_per_lr))


def test_the_initial_share_is_the_decayed_initial_weights():
    """Plain SGD with weight decay on every parameter: W_T holds (1 - lr wd)^T W_0 (Lemma
    3.2 unrolled to the start), so the recorded share is (1 - lr wd)^T ||W_0|| / ||W_T||,
    with W_0 rebuilt here from the seed and W_T read from the run's checkpoint."""
    from rankbias.metrics.layers import weight_matrices
    from rankbias.models import create_model
    from rankbias.training.checkpoint import model_from_checkpoint

    cfg = RunConfig(**TINY, lr=0.2, weight_decay=0.05, epochs=3)
    with process_state(seed=cfg.seed):
        initial = create_model(cfg.model, (1, 8, 8), 10, **cfg.model_args)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.pt"
        result = train_run(cfg, checkpoint_path=path)
        final = model_from_checkpoint(torch.load(path, weights_only=True))
    steps = 3 * STEPS_PER_EPOCH
    recorded = {layer: v for s, _, layer, m, v in result.rows
                if m == "init_share" and s == steps}
    w0, wt = weight_matrices(initial, True, True), weight_matrices(final, True, True)
    for name, share in recorded.items():
        expected = (1 - 0.2 * 0.05) ** steps * float(w0[name].norm() / wt[name].norm())
        assert share == pytest.approx(expected, rel=1e-5), name
    assert len(recorded) == 3


@pytest.mark.parametrize("engine", ["ModelStack", "MLPStack"])
def test_adam_s_shrink_is_the_median_of_its_definition_for_a_run_and_a_stack(engine):
    """lr wd / (sqrt(v_hat) + eps) over the entries of the decayed matrices, its median:
    from torch.optim.Adam's state by hand, from training/budget.adam_shrink, and from a
    stack of the same members (either engine's adam_shrink; the hand-written MLP stack's
    state is the single runs' to the bit, so its shrink is too)."""
    from rankbias.data import load_dataset
    from rankbias.models import create_model
    from rankbias.training.mlp_stack import MLPStack
    from rankbias.training.sgd import make_optimizer, sgd_step
    from rankbias.training.stack import ModelStack

    data = load_dataset("digits", subset=200)
    configs = [RunConfig(**TINY, optimizer="adam", lr=0.01, weight_decay=wd, seed=s)
               for s, wd in ((0, 0.01), (1, 0.03))]
    models = []
    for cfg in configs:
        with process_state(seed=cfg.seed):
            models.append(create_model("mlp", (1, 8, 8), 10, **cfg.model_args))
    stack = {"ModelStack": ModelStack, "MLPStack": MLPStack}[engine](
        [m for m in models], configs, torch.device("cpu"))
    singles = [create_model("mlp", (1, 8, 8), 10, **c.model_args) for c in configs]
    for single, model in zip(singles, models):
        single.load_state_dict(model.state_dict())
    optimizers = [make_optimizer(m, c) for m, c in zip(singles, configs)]
    x, y = data.x_train[:32], data.y_train[:32]
    for _ in range(3):
        with torch.inference_mode(not stack.autograd):
            stack.step(torch.stack([x, x]), torch.stack([y, y]))
        for model, optimizer in zip(singles, optimizers):
            sgd_step(model, optimizer, torch.nn.functional.cross_entropy, x, y)
    for cfg, model, optimizer, stacked in zip(configs, singles, optimizers,
                                              stack.adam_shrink()):
        entries = []
        for p in model.parameters():
            if p.ndim >= 2:
                v_hat = optimizer.state[p]["exp_avg_sq"].double() / (1 - 0.999 ** 3)
                entries.append((cfg.lr * cfg.weight_decay / (v_hat.sqrt() + 1e-8)).flatten())
        by_hand = float(torch.cat(entries).median())
        assert adam_shrink(optimizer) == pytest.approx(by_hand, rel=1e-6)  # float32 state
        if engine == "MLPStack":
            assert stacked == adam_shrink(optimizer)
        else:
            assert stacked == pytest.approx(by_hand, rel=1e-4)  # float32 stack vs single runs


def test_designs_of_equal_steps_equal_budgets_and_schedule_shape():
    from rankbias.runs.sweep import expand

    base = {"model": "mlp", "model_args": {"depth": 2, "width": 16},
            "dataset_args": {"subset": 200}, "lr": 0.5, "weight_decay": 0.02}
    equal = expand({"base": base, "grid": {"batch_size": [8, 32]}, "steps": 100,
                    "milestones_at": [0.5, 0.75]})
    # 200 examples: B = 8 -> 25 steps an epoch, B = 32 -> 7
    assert [(c.batch_size, c.epochs, c.milestones) for c in equal] == [
        (8, 4, [2, 3]), (32, 15, [8, 11])]
    assert {c.schedule for c in equal} == {"multistep"}
    long = expand({"base": base, "grid": {"batch_size": [8]}, "k_star": 2})
    # k* = log(2000) / (0.5 * 0.02) = 760.1 steps: 2 k* = 1520.2 -> 61 epochs of 25
    assert long[0].epochs == 61 and decay_budget(long[0]) >= 2 * math.log(2000)
    with pytest.raises(RankbiasError, match="k_star needs a constant lr"):
        expand({"base": {**base, "schedule": "multistep"}, "k_star": 2})
    with pytest.raises(RankbiasError, match="steps or k_star, not both"):
        expand({"base": base, "steps": 10, "k_star": 2})
    with pytest.raises(RankbiasError, match="fractions"):
        expand({"base": base, "steps": 10, "milestones_at": [1.5]})


def test_a_key_given_twice_in_a_yaml_file_is_an_error(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {model: mlp, epochs: 2, epochs: 3}\nseeds: [0]\n")
    assert main(["sweep", str(grid), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "duplicate key 'epochs'" in err and "line 1" in err and len(err.splitlines()) == 1


def test_the_dry_run_shows_each_setting_s_budget_before_any_run(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {model: mlp, model_args: {depth: 2, width: 16}, lr: 0.5, "
                    "weight_decay: 0.02, schedule: constant, epochs: 30}\n"
                    "grid: {batch_size: [8, 128]}\n")
    store = tmp_path / "s.db"
    assert main(["sweep", str(grid), "--store", str(store), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[2]: line for line in out.splitlines()
             if line[:1].isalnum() and len(line.split()) > 4 and line.split()[1] == "-"}
    # digits: 1437 examples; B = 8: 180 steps an epoch, D = 0.01 x 5400 = 54.00;
    # B = 128: 12 steps an epoch, D = 0.01 x 360 = 3.60, below log(2000): marked *
    assert "54.00" in lines["8"] and "3.60*" in lines["128"]
    assert not store.exists()
