"""Sweeps: file expansion, skip-on-rerun, driver and worker kills, the Ray backend."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import WAIT_S, is_stopped, paused_env, processes_with, wait_until

from rankbias.cli.main import main
from rankbias.runs.estimate import run_steps, run_tracks
from rankbias.runs.store import Store, checkpoint_dir_for
from rankbias.runs.sweep import expand, load_sweep, run_sweep
from rankbias.training.config import RunConfig
from rankbias.utils import RankbiasError

TINY_BASE = {"epochs": 2, "batch_size": 32, "model_args": {"depth": 2, "width": 16},
             "dataset_args": {"subset": 300}, "device": "cpu"}
GRID_8 = {"base": TINY_BASE, "grid": {"batch_size": [16, 32], "weight_decay": [0.0, 5e-3]},
          "seeds": [0, 1]}


def write_yaml(path, spec) -> str:
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_expand_grid_zip_seeds_and_dotted_keys():
    spec = {"base": {"epochs": 1}, "grid": {"batch_size": [8, 16], "model_args.width": [10, 20]},
            "zip": {"lr": [0.1, 0.2, 0.4], "weight_decay": [0.02, 0.01, 0.005]},
            "seeds": [0, 1]}
    configs = expand(spec)
    assert len(configs) == 2 * 2 * 3 * 2
    assert all(c.lr * c.weight_decay == pytest.approx(0.002) for c in configs)
    assert {c.model_args["width"] for c in configs} == {10, 20}
    assert len({c.run_id() for c in configs}) == len(configs)
    duplicated = expand({"grid": {"lr": [0.1, 0.1]}})
    assert len(duplicated) == 1


@pytest.mark.parametrize("spec,key", [
    ({"grid": {"learning_rate": [0.1]}}, "learning_rate"),
    ({"grdi": {"lr": [0.1]}}, "grdi"),
    ({"grid": {"lr": 0.1}}, "lr"),
    ({"zip": {"lr": [0.1, 0.2], "weight_decay": [0.1]}}, "zip"),
    ({"grid": {"lr": [-1.0]}}, "lr"),
    ({"grid": {"optimizer.lr": [0.1]}}, "optimizer.lr"),
])
def test_bad_sweep_files_name_the_key(spec, key):
    with pytest.raises(RankbiasError, match=key):
        expand(spec)


def test_a_bad_run_field_in_a_sweep_file_names_the_file(tmp_path, capsys):
    path = write_yaml(tmp_path / "grid.yaml", {"base": {**TINY_BASE, "epoch": 3}})
    assert main(["sweep", path, "--store", str(tmp_path / "s.db"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "grid.yaml: unknown key 'epoch' in run config" in err
    assert "did you mean 'epochs'" in err


def test_bad_worker_count_exit_2(tmp_path, capsys):
    path = write_yaml(tmp_path / "grid.yaml", GRID_8)
    assert main(["sweep", path, "--store", str(tmp_path / "s.db"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists() or Store(tmp_path / "s.db").runs().empty


def test_experiment_file_scales(tmp_path):
    path = write_yaml(tmp_path / "e.yaml", {
        "id": "x", "claim": 4, "statement": "s", "rule_text": "r", "rule": {"kind": "monotone"},
        "scales": {
        "quick": {"base": {"epochs": 1}, "seeds": [0, 1]},
        "full": {"base": {"epochs": 5}, "seeds": [0, 1, 2]}}})
    assert len(load_sweep(path)) == 2
    assert [c.epochs for c in load_sweep(path, "full")] == [5, 5, 5]
    with pytest.raises(RankbiasError, match="paper"):
        load_sweep(path, "paper")


def test_8_run_grid_twice_second_executes_nothing(tmp_path, capsys):
    path = write_yaml(tmp_path / "grid.yaml", GRID_8)
    store = str(tmp_path / "s.db")
    args = ["sweep", path, "--store", store, "--workers", "2", "--ensemble", "off",
            "--format", "json", "--no-progress"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["total"] == 8 and first["executed"] == 8 and first["failed"] == 0
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second == {**second, "total": 8, "executed": 0, "skipped": 8}
    runs = Store(store).runs()
    assert len(runs) == 8 and set(runs.status) == {"done"}
    assert main(["sweep", path, "--store", store, "--dry-run"]) == 0
    assert capsys.readouterr().out.count("done") == 8


@pytest.mark.parametrize("epochs, track_every, batch_size", [(5, 2, 32), (4, 2, 64), (3, 1, 299),
                                                            (2, 10, 32)])
def test_the_estimate_plans_the_steps_and_tracking_points_a_run_has(epochs, track_every,
                                                                   batch_size):
    """What the dry run's estimate counts, against a run trained here (B = 299 leaves a
    last batch of one example, which BatchNorm drops)."""
    from rankbias.training.train import train_run

    cfg = RunConfig(**{**TINY_BASE, "epochs": epochs, "track_every": track_every,
                       "batch_size": batch_size})
    result = train_run(cfg)
    assert result.steps == run_steps(cfg)
    assert len({r[0] for r in result.rows if r[3] == "avg_rank"}) == run_tracks(cfg)


def test_failing_run_is_isolated(tmp_path):
    configs = [RunConfig(**TINY_BASE), RunConfig(**TINY_BASE, seed=1),
               RunConfig(**{**TINY_BASE, "dataset": "cifar10",
                            "dataset_args": {"root": str(tmp_path / "none")}})]
    summary = run_sweep(configs, tmp_path / "s.db", workers=1, progress=False)
    assert (summary.executed, summary.failed) == (3, 1)
    runs = Store(tmp_path / "s.db").runs().set_index("run_id")
    assert runs.loc[configs[2].run_id(), "status"] == "failed"
    assert "cifar" in runs.loc[configs[2].run_id(), "error"].lower()
    assert (runs.loc[[c.run_id() for c in configs[:2]], "status"] == "done").all()


def test_worker_killed_mid_run_fails_that_run_only(tmp_path):
    """The worker stops itself after the first checkpoint of the first run (only the first
    process to get there: a token file), is killed there, and the driver fails that run
    only: a new worker trains the second."""
    slow = {**TINY_BASE, "epochs": 30, "batch_size": 8, "checkpoint_every": 1, "device": "cpu"}
    configs = [RunConfig(**slow, seed=s) for s in range(2)]
    path = write_yaml(tmp_path / "grid.yaml", {"base": slow, "seeds": [0, 1]})
    marker = f"RANKBIAS_TEST_WORKER_{os.getpid()}_{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "rankbias.cli.main", "sweep", path, "--store",
           str(tmp_path / "s.db"), "--workers", "1", "--ensemble", "off", "--no-progress",
           "--format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=paused_env("epoch", 1, tmp_path / "token", **{marker: "1"}))
    worker = wait_until(lambda: [p for p in processes_with(marker) if is_stopped(p)],
                        "the worker to stop after epoch 1", proc)[0]
    os.kill(worker, signal.SIGKILL)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 1, err  # a failed run: the sweep says so in its exit code
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["executed"] == 2 and summary["failed"] == 1
    runs = Store(tmp_path / "s.db").runs().set_index("run_id")
    assert runs.loc[configs[0].run_id(), "status"] == "failed"
    assert "worker process died" in runs.loc[configs[0].run_id(), "error"]
    assert runs.loc[configs[1].run_id(), "status"] == "done"  # a new worker took over
    retry = run_sweep(configs, tmp_path / "s.db", workers=1, ensemble="off", progress=False)
    assert (retry.executed, retry.skipped, retry.failed) == (1, 1, 0)  # failed run retried


def test_driver_killed_and_restarted(tmp_path):
    spec = {**GRID_8, "base": {**TINY_BASE, "epochs": 6}}
    path = write_yaml(tmp_path / "grid.yaml", spec)
    store = tmp_path / "s.db"
    cmd = [sys.executable, "-m", "rankbias.cli.main", "sweep", path, "--store", str(store),
           "--workers", "1", "--ensemble", "off", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=paused_env("results", 2))
    wait_until(lambda: is_stopped(proc.pid), "the driver to stop after 2 results", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker
    proc.wait()
    done = int((Store(store).runs().status == "done").sum())
    assert done == 2
    summary = run_sweep(load_sweep(path), store, workers=1, progress=False)
    assert summary.skipped >= 2 and summary.executed == 8 - summary.skipped
    runs = Store(store).runs()
    assert len(runs) == 8 and set(runs.status) == {"done"}
    per_run = Store(store).metrics(metrics=["avg_rank"]).groupby("run_id").size()
    assert len(per_run) == 8 and per_run.nunique() == 1  # every run complete, none doubled


def test_workers_end_when_their_driver_is_killed_outright(tmp_path):
    """`kill DRIVER` (SIGTERM, as a batch system sends it) or SIGKILL runs no clean-up in the
    driver: its workers, children of the forkserver, must notice and end rather than train
    their tasks to the end for nobody (they did: a killed full-scale reproduction left two
    workers at 100% CPU)."""
    spec = {**GRID_8, "base": {**TINY_BASE, "epochs": 5000}}  # tasks far longer than the test
    path = write_yaml(tmp_path / "grid.yaml", spec)
    store = tmp_path / "s.db"
    marker = f"RANKBIAS_TEST_DRIVER_{os.getpid()}_{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "rankbias.cli.main", "sweep", path, "--store", str(store),
           "--workers", "2", "--ensemble", "off", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, marker: "1"}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(0.5)
            if store.exists() and (Store(store).runs().status == "running").sum() >= 2:
                break
        assert len(processes_with(marker)) >= 3  # the driver, the forkserver, 2 workers
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline and processes_with(marker):
            time.sleep(0.5)
        assert processes_with(marker) == []
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_stops_cleanly_and_the_same_command_continues(tmp_path):
    spec = {**GRID_8, "base": {**TINY_BASE, "epochs": 20, "batch_size": 8}}
    path = write_yaml(tmp_path / "grid.yaml", spec)
    store = tmp_path / "s.db"
    cmd = [sys.executable, "-m", "rankbias.cli.main", "sweep", path, "--store", str(store),
           "--workers", "2", "--ensemble", "off", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=paused_env("results", 1),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until(lambda: is_stopped(proc.pid), "the driver to stop after its first result", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    os.kill(proc.pid, signal.SIGCONT)  # the driver takes the interrupt as it wakes up
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130
    assert "Traceback" not in err and "rerun the same command" in err
    done = int((Store(store).runs().status == "done").sum())
    assert 1 <= done < 8
    summary = run_sweep(load_sweep(path), store, workers=2, progress=False)
    assert (summary.skipped, summary.executed, summary.failed) == (done, 8 - done, 0)


def test_ray_backend_on_a_local_node(tmp_path):
    pytest.importorskip("ray")
    configs = expand({"base": TINY_BASE, "grid": {"weight_decay": [0.0, 5e-3]}})
    summary = run_sweep(configs, tmp_path / "s.db", workers=2, backend="ray", progress=False)
    assert (summary.executed, summary.failed) == (2, 0)
    local = run_sweep(configs, tmp_path / "local.db", workers=1, progress=False)
    assert local.executed == 2
    ray_rows = Store(tmp_path / "s.db").metrics(metrics=["avg_rank", "train_acc"])
    local_rows = Store(tmp_path / "local.db").metrics(metrics=["avg_rank", "train_acc"])
    assert ray_rows.equals(local_rows)  # same configs, same numbers, whatever the backend


def test_ensemble_auto_groups_runs_and_gives_the_same_numbers(tmp_path):
    from rankbias.runs.sweep import group_tasks

    configs = load_sweep(write_yaml(tmp_path / "grid.yaml", GRID_8))
    tasks = group_tasks(configs, "auto", workers=2)
    assert sorted(len(t) for t in tasks) == [4, 4]  # one group per B, all 4 lr/wd/seed runs
    assert all(len({c.batch_size for c in t}) == 1 for t in tasks)
    assert len(group_tasks(configs, "off", workers=2)) == 8
    together = run_sweep(configs, tmp_path / "auto.db", workers=2, ensemble="auto",
                         progress=False)
    alone = run_sweep(configs, tmp_path / "off.db", workers=2, ensemble="off", progress=False)
    assert together.executed == alone.executed == 8
    for store in ("auto.db", "off.db"):  # grouped or not, one checkpoint per run
        folder = checkpoint_dir_for(tmp_path / store)
        assert sorted(p.stem for p in folder.glob("*.pt")) == sorted(c.run_id() for c in configs)
    columns = ["run_id", "step", "layer", "metric", "value"]
    a = Store(tmp_path / "auto.db").metrics().query("metric != 'wall_s'")[columns]
    b = Store(tmp_path / "off.db").metrics().query("metric != 'wall_s'")[columns]
    assert a.reset_index(drop=True).equals(b.reset_index(drop=True))


def test_stacks_are_sized_to_memory(monkeypatch):
    """The size of a stack from the memory free (set here, not this machine's): a quarter of
    it over what one member costs, capped at 16 on a CPU, at least 1."""
    from rankbias.runs.sweep import group_tasks
    from rankbias.training import ensemble
    from rankbias.training.ensemble import _member_bytes, stack_limit

    monkeypatch.setattr(ensemble, "free_memory", lambda cuda, workers=1: 16e9 / workers)
    small = RunConfig(model="mlp", model_args={"depth": 2, "width": 16}, device="cpu")
    huge = RunConfig(model="vgg16", dataset="cifar10", batch_size=4096, device="cpu")
    assert stack_limit(small) == 16  # the CPU cap: small runs fit by the dozen
    assert stack_limit(huge) == 1  # one member's activations alone take gigabytes
    # a member: 4 copies of 16*64+16 + 16*16+16 + 2*32 (BN) + 16*10+10 weights, 4 bytes each,
    # plus 3 x the forward outputs of one example (16+16+16 per block x 2, 10) x B = 8
    weights = (64 * 16 + 16) + (16 * 16 + 16) + 2 * 2 * 16 + (16 * 10 + 10)
    outputs = 2 * (16 + 16 + 16) + 10
    assert _member_bytes("mlp", '{"depth": 2, "width": 16}', "digits", "{}", 8) == \
        4.0 * (4 * weights + 3 * 8 * outputs)
    many = [small.replace(seed=s) for s in range(40)]
    assert sorted(len(t) for t in group_tasks(many, workers=1)) == [13, 13, 14]  # <= 16 each
    member = _member_bytes("mlp", '{"depth": 2, "width": 16}', "digits", "{}", 8)
    monkeypatch.setattr(ensemble, "free_memory", lambda cuda, workers=1: 4 * 5.5 * member)
    assert stack_limit(small) == 5


def test_stacks_are_split_so_that_no_worker_idles():
    from rankbias.runs.sweep import group_tasks

    three = [RunConfig(**TINY_BASE, seed=s, lr=lr) for lr in (0.1, 0.2, 0.3) for s in range(8)]
    # one group of 24 equal runs: 16 + 8 would keep one worker busy twice as long as the
    # other; two stacks of 12 keep both busy
    assert sorted(len(t) for t in group_tasks(three, workers=2)) == [12, 12]
    # stacks of B = 8, 16, 32 cost 4 : 2 : 1; the B = 8 stack alone is the longest task, so
    # splitting the others would only add work: they stay whole
    mixed = [RunConfig(**{**TINY_BASE, "batch_size": b}, seed=s) for b in (8, 16, 32)
             for s in range(8)]
    assert sorted(len(t) for t in group_tasks(mixed, workers=2)) == [8, 8, 8]
