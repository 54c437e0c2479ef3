"""The trainer: ranks against a float64 oracle, the store, divergence, resume, bad configs."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import is_stopped, paused_env, wait_until

from rankbias.cli.main import main
from rankbias.metrics.layers import weight_matrices
from rankbias.metrics.tracker import RankTracker
from rankbias.runs.store import Store, checkpoint_dir_for
from rankbias.training.checkpoint import model_from_checkpoint
from rankbias.training.config import RunConfig
from rankbias.training.sgd import batch_starts
from rankbias.training.train import train_run
from rankbias.utils import RankbiasError

TINY = dict(model_args=dict(depth=3, width=32), dataset_args=dict(subset=400), device="cpu")


def oracle_rank(w, tol=1e-3) -> int:
    m = w.detach().double().numpy()
    s = np.linalg.svd(m, compute_uv=False)
    return int(np.sum(s / np.linalg.norm(m) > tol))


def final_rows(rows, metric, layer=None):
    last = max(r[0] for r in rows)
    return {r[2]: r[4] for r in rows if r[0] == last and r[3] == metric
            and (layer is None or r[2] == layer)}


def test_short_digits_run_ranks_accuracy_and_store(tmp_path):
    cfg = RunConfig(batch_size=16, lr=0.1, weight_decay=5e-3, epochs=4, track_every=2, **TINY)
    ckpt = tmp_path / "run.pt"
    result = train_run(cfg, checkpoint_path=ckpt)
    assert result.status == "done" and result.epochs == 4
    assert result.steps == 4 * len(batch_starts(400, 16, False, True))
    tracked_epochs = sorted({r[1] for r in result.rows})
    assert tracked_epochs == [0, 2, 4]  # initialization, every 2 epochs, the final weights
    assert result.summary["train_acc"] > 0.8
    # the final ranks are those of the final weights, by an independent float64 SVD
    model = model_from_checkpoint(torch.load(ckpt, weights_only=True))
    ranks = final_rows(result.rows, "rank@0.001")
    for name, w in weight_matrices(model, include_classifier=True).items():
        assert ranks[name] == oracle_rank(w)
    hidden = weight_matrices(model)
    assert result.summary["final_avg_rank"] == pytest.approx(
        np.mean([oracle_rank(w) for w in hidden.values()]))
    # what the store holds is what the run measured
    with Store(tmp_path / "r.db") as store:
        store.save_result(result)
        runs = store.runs()
        assert runs.loc[0, "status"] == "done" and runs.loc[0, "batch_size"] == 16
        stored = store.metrics(metrics=["rank@0.001"])
        assert len(stored) == 3 * len(ranks)
        spectra = store.spectra(result.run_id, step=result.steps)
        name = next(iter(hidden))
        oracle = np.linalg.svd(hidden[name].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(spectra[(result.steps, name)], oracle, rtol=1e-9, atol=1e-12)
        provenance = json.loads(store.db.execute("SELECT provenance FROM runs").fetchone()[0])
        assert provenance["seed"] == 0 and "torch" in provenance["library_versions"]
    from rankbias.runs.store import load_metrics, load_runs

    assert load_runs(tmp_path / "r.db").run_id.tolist() == [result.run_id]
    assert len(load_metrics(tmp_path / "r.db", metrics=["avg_rank"])) == 3


def test_weight_decay_lowers_the_rank_and_zero_decay_does_not():
    """By design, not by luck: a decay whose effect (~15 of 32 ranks, measured on three
    kernel paths) dwarfs what another CPU's rounding moves (~1 rank), over two seeds."""
    base = RunConfig(batch_size=4, lr=0.3, epochs=10, track_every=10, **TINY)
    with_wd = [train_run(base.replace(weight_decay=4e-2, seed=s)).summary for s in (0, 1)]
    without = [train_run(base.replace(weight_decay=0.0, seed=s)).summary for s in (0, 1)]
    assert max(r["final_avg_rank"] for r in with_wd) < min(
        r["final_avg_rank"] for r in without) - 8
    assert all(r["final_avg_rank"] >= r["init_avg_rank"] - 1 for r in without)


def test_same_config_and_seed_give_identical_numbers():
    cfg = RunConfig(batch_size=32, epochs=2, **TINY)
    a, b = train_run(cfg), train_run(cfg)
    strip = [r for r in a.rows if r[3] != "wall_s"]
    assert strip == [r for r in b.rows if r[3] != "wall_s"]
    other = train_run(cfg.replace(seed=1))
    assert [r for r in other.rows if r[3] != "wall_s"] != strip


def test_diverging_run_stops_at_once_without_mkl_output(capfd):
    cfg = RunConfig(batch_size=8, lr=1e4, weight_decay=5e-3, epochs=5, **TINY)
    result = train_run(cfg)
    assert result.status == "diverged"
    assert result.diverged_step is not None and result.diverged_step < 50
    assert result.epochs == 0  # stopped inside the first epoch
    out, err = capfd.readouterr()
    assert "MKL" not in out + err and "LAPACK" not in out + err
    assert all(np.isfinite(v) for *_, v in result.rows if _[2] != "wall_s")


def test_multistep_schedule_and_lr_rows():
    cfg = RunConfig(schedule="multistep", milestones=[2, 3], gamma=0.5, lr=0.2, epochs=4,
                    batch_size=64, **TINY)
    assert [cfg.lr_at(e) for e in range(4)] == [0.2, 0.2, 0.1, 0.05]
    lrs = {r[1]: r[4] for r in train_run(cfg).rows if r[3] == "lr"}
    assert lrs == {0: 0.2, 1: 0.2, 2: 0.2, 3: 0.1, 4: 0.05}  # the lr used in that epoch
    assert RunConfig(schedule="multistep").lr_at(60) == pytest.approx(0.1 * 0.2)


def test_wd_scope_weights_leaves_biases_undecayed():
    from rankbias.training.sgd import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    groups = make_optimizer(model, RunConfig(wd_scope="weights")).param_groups
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [5e-3, 0.0]


def test_gradient_rank_tracking_respects_lemma_3_1():
    cfg = RunConfig(batch_size=4, epochs=1, track_gradient_rank=True, gradient_rank_steps=3,
                    **TINY)
    rows = train_run(cfg).rows
    ranks = [(r[0], r[2], r[4]) for r in rows if r[3] == "grad_rank"]
    bounds = {(r[0], r[2]): r[4] for r in rows if r[3] == "grad_rank_bound"}
    assert len({s for s, _, _ in ranks}) == 3
    assert all(rank <= bounds[(s, name)] for s, name, rank in ranks)
    assert max(bounds.values()) == 4  # B for a linear layer
    assert max(rank for *_, rank in ranks) == 4  # the bound is reached: the check can fail


def test_rank_tracker_in_a_user_loop_clones_previous_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    tracker = RankTracker(model, tolerances=[1e-3, 0.1])
    tracker.track(step=0)
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(0.1)
    point = tracker.track(step=1, epoch=1, train_acc=0.5)
    after = model[0].weight.detach()
    expected = float(torch.linalg.norm(after - before) / torch.linalg.norm(before))
    frame = tracker.to_frame()
    change = frame.query("step == 1 and layer == '0.weight' and metric == 'weight_change'")
    assert change["value"].item() == pytest.approx(expected, rel=1e-6)
    assert point["avg_rank"] == oracle_rank(model[0].weight)  # hidden: first layer only
    assert point["train_acc"] == 0.5
    assert set(frame["layer"]) == {"", "0.weight", "2.weight"}


@pytest.mark.parametrize("changes,key", [
    ({"lr": -0.1}, "lr"), ({"batch_size": 0}, "batch_size"), ({"model": "nope"}, "model"),
    ({"dataset": "imagenet"}, "dataset"), ({"schedule": "step"}, "schedule"),
    ({"weight_decay": -1}, "weight_decay"), ({"epochs": 0}, "epochs"),
    ({"tolerances": []}, "tolerances"), ({"loss": "hinge"}, "loss"),
    ({"model_args": {"depht": 2}}, "depht"), ({"learning_rate": 0.1}, "learning_rate"),
])
def test_invalid_configs_are_rejected_naming_the_key(changes, key):
    with pytest.raises(RankbiasError, match=key):
        RunConfig.from_dict(changes)


def test_batch_size_over_training_set_rejected_before_any_work(tmp_path, capsys):
    code = main(["train", "--batch-size", "100000", "--store", str(tmp_path / "r.db"),
                 "--no-progress"])
    assert code == 2
    assert "batch_size" in capsys.readouterr().err
    assert Store(tmp_path / "r.db").runs().empty  # nothing recorded


def test_cli_train_json_then_skip(tmp_path, capsys):
    args = ["train", "--epochs", "2", "--batch-size", "64", "--model-arg", "depth=2",
            "--dataset-arg", "subset=300", "--store", str(tmp_path / "r.db"), "--format", "json",
            "--no-progress"]
    assert main(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"run_id", "status", "init_avg_rank", "final_avg_rank", "train_acc",
                         "test_acc", "epochs", "steps", "wall_s"}
    assert line["status"] == "done" and line["epochs"] == 2
    assert main(args) == 0  # a finished config is not trained again
    captured = capsys.readouterr()
    assert "already finished" in captured.err
    assert json.loads(captured.out.strip())["run_id"] == line["run_id"]
    assert main(["runs", "--store", str(tmp_path / "r.db"), "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_cli_train_from_yaml_config_with_flag_override(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: mlp\nmodel_args: {depth: 2, width: 16}\nepochs: 1\n"
                      "batch_size: 64\ndataset_args: {subset: 200}\n")
    assert main(["train", "--config", str(config), "--lr", "0.05", "--store",
                 str(tmp_path / "r.db"), "--format", "json", "--no-progress"]) == 0
    runs = Store(tmp_path / "r.db").runs()
    model_args = runs.loc[0, "model_args"]
    assert runs.loc[0, "lr"] == 0.05 and (model_args["depth"], model_args["width"]) == (2, 16)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [unclosed\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def _rows_without_timing(store_path):
    frame = Store(store_path).metrics()
    return frame[frame.metric != "wall_s"].reset_index(drop=True)


def test_killed_run_resumes_bit_identical(tmp_path):
    """SIGKILL a real `rankbias train` after its checkpoint of epoch 3 (it stops itself
    there: rankbias.utils.pause_point), resume it, compare with an uninterrupted run."""
    flags = ["--epochs", "12", "--batch-size", "8", "--lr", "0.2", "--model-arg", "depth=2",
             "--model-arg", "width=24", "--dataset-arg", "subset=300", "--checkpoint-every",
             "1", "--no-progress", "--format", "json", "--device", "cpu"]
    killed = tmp_path / "killed.db"
    cmd = [sys.executable, "-m", "rankbias.cli.main", "train", *flags, "--store", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=paused_env("epoch", 3))
    wait_until(lambda: is_stopped(proc.pid), "the run to stop after epoch 3", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(next(checkpoint_dir_for(killed).glob("*.pt")), weights_only=True)
    assert state["epoch"] == 3
    assert Store(killed).runs().loc[0, "status"] == "running"  # never marked done
    assert main(["train", *flags, "--store", str(killed), "--resume"]) == 0
    fresh = tmp_path / "fresh.db"
    assert main(["train", *flags, "--store", str(fresh),
                 "--checkpoint-dir", str(tmp_path / "other")]) == 0
    resumed, uninterrupted = _rows_without_timing(killed), _rows_without_timing(fresh)
    assert len(resumed) == len(uninterrupted) > 0
    assert (resumed == uninterrupted).all().all()  # bit-identical, not approximately


def test_wall_time_of_a_point_includes_its_own_epoch():
    cfg = RunConfig(batch_size=8, epochs=3, track_every=1, **TINY)
    rows = train_run(cfg).rows
    wall = [v for _, epoch, layer, metric, v in rows if metric == "wall_s"]
    assert wall[0] == 0.0  # the initialization: nothing trained yet
    assert all(later > earlier for earlier, later in zip(wall, wall[1:]))  # epoch 1 counts


def test_the_early_stop_rule_records_stopped_not_diverged(tmp_path):
    cfg = RunConfig(lr=1e-9, weight_decay=0.0, epochs=54, batch_size=8,
                    **{**TINY, "model_args": dict(depth=1, width=8, batch_norm=False),
                       "dataset_args": dict(subset=40)})
    result = train_run(cfg)
    assert (result.status, result.epochs, result.diverged_step) == ("stopped", 53, None)
    assert "train accuracy" in result.error
    with Store(tmp_path / "s.db") as store:
        store.save_result(result)
    from rankbias.runs.sweep import run_sweep

    assert run_sweep([cfg], tmp_path / "s.db", workers=1, progress=False).skipped == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_run_interrupted_on_cuda_resumes_there(tmp_path):
    """The tracker's saved weights come back on the CPU: resume must move them to the GPU."""
    from rankbias.training.ensemble import train_ensemble

    cfg = RunConfig(batch_size=16, epochs=4, checkpoint_every=1, **{**TINY, "device": "cuda"})

    class Stop(Exception):
        pass

    def stop_at_epoch_3(*args):
        if args[-2] == 3:
            raise Stop

    with pytest.raises(Stop):
        train_run(cfg, checkpoint_path=tmp_path / "run.pt", on_track=stop_at_epoch_3)
    resumed = train_run(cfg, checkpoint_path=tmp_path / "run.pt", resume=True)
    assert (resumed.status, resumed.epochs) == ("done", 4)
    members = [cfg.replace(seed=s) for s in range(2)]
    with pytest.raises(Stop):
        train_ensemble(members, on_track=stop_at_epoch_3, checkpoint_dir=tmp_path / "stack")
    results = train_ensemble(members, checkpoint_dir=tmp_path / "stack")
    assert [(r.status, r.epochs) for r in results] == [("done", 4), ("done", 4)]


def test_training_leaves_the_processes_state_as_it_found_it():
    """Generators, thread count and denormal mode after a run (and a stack) are what they
    were before, whatever they were: a library must not change its caller's process."""
    import random

    import numpy as np

    from rankbias.training.ensemble import train_ensemble
    from rankbias.training.state import flushes_denormals, process_state

    tiny = RunConfig(**{**TINY, "epochs": 1, "batch_size": 64})
    for flushing in (True, False):
        torch.set_flush_denormal(flushing)
        torch.manual_seed(123)
        random.seed(123)
        np.random.seed(123)
        expected = (torch.rand(3), random.random(), np.random.rand())
        torch.manual_seed(123)
        random.seed(123)
        np.random.seed(123)
        threads = torch.get_num_threads()
        train_run(tiny)
        train_ensemble([tiny, tiny.replace(seed=1)])
        assert (torch.equal(torch.rand(3), expected[0]), random.random(), np.random.rand()) \
            == (True, expected[1], expected[2])
        assert flushes_denormals() is flushing and torch.get_num_threads() == threads
    torch.set_flush_denormal(False)
    with process_state(threads=1, flush_denormal=True, seed=5):
        assert torch.get_num_threads() == 1 and flushes_denormals()
        inside = torch.rand(2)
    with process_state(seed=5):
        assert torch.equal(torch.rand(2), inside)  # the seed decides what is drawn inside
    assert torch.get_num_threads() == threads and not flushes_denormals()
