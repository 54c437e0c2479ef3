"""The step on the device: divergence found without a per-step host read, still at the exact
step; CUDA graphs (their tests run only where CUDA is present)."""

import math

import pytest
import torch

from rankbias.training.config import RunConfig
from rankbias.training.ensemble import train_ensemble
from rankbias.training.steps import FiniteWatch, GraphedStep
from rankbias.training.train import Run, resolve_device, train_run

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# MSE on a small MLP at lr 1.25: finite for four epochs, NaN/Inf in the middle of the fifth.
LATE = dict(model="mlp", model_args=dict(depth=2, width=16, batch_norm=False),
            dataset_args=dict(subset=200), batch_size=16, lr=1.25, weight_decay=0.0,
            loss="mse", epochs=5)


def first_nonfinite_step_checked_every_step(cfg: RunConfig) -> tuple[int | None, int]:
    """The old rule, written out: read the loss after every step and stop at the first
    NaN/Inf before updating (and track after every epoch, as train_run does: the
    evaluation can diverge too). Returns (that step or None, the epoch it happened in)."""
    run = Run(cfg, None, resolve_device(cfg.device))
    step = 0
    for epoch in range(cfg.epochs):
        for group in run.optimizer.param_groups:
            group["lr"] = cfg.lr_at(epoch)
        perm = torch.randperm(len(run.x_train), generator=run.order).to(run.device)
        for start in run.starts:
            idx = perm[start:start + cfg.batch_size]
            loss = run.loss_fn(run.model(run.x_train[idx]), run.y_train[idx])
            if not math.isfinite(loss.item()):
                return step, epoch
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            step += 1
        run.step = step
        run.track()  # raises Diverged on non-finite weights or evaluation loss
    return None, cfg.epochs


@pytest.mark.parametrize("on_host", [True, False], ids=["host counters", "device counters"])
def test_finite_watch_reports_the_first_nonfinite_step_of_each_run(on_host):
    watch = FiniteWatch(3, torch.device("cpu"), on_host=on_host)
    watch.reset(100)
    nan, inf = math.nan, math.inf
    for losses in ([1.0, 1.0, nan], [1.0, inf, 2.0], [1.0, 3.0, 1.0], [1.0, nan, nan]):
        watch.update(torch.tensor(losses))
    assert watch.first_nonfinite() == [None, 101, 100]
    watch.reset(7)  # in place: the same tensors, counting again
    watch.update(torch.tensor(2.0))  # a scalar broadcasts to every run
    assert watch.first_nonfinite() == [None, None, None]
    assert [int(c) for c in watch.count] == [1, 1, 1]


@pytest.mark.parametrize("changes", [dict(lr=1e4, loss="ce", model_args=dict(depth=3, width=32)),
                                     dict()], ids=["first-epoch", "fifth-epoch"])
def test_a_diverging_run_stops_at_the_step_a_per_step_check_gives(changes):
    cfg = RunConfig(**{**LATE, **changes}, device="cpu")
    expected_step, expected_epoch = first_nonfinite_step_checked_every_step(cfg)
    steps_per_epoch = len(Run(cfg, None, torch.device("cpu")).starts)
    assert expected_step is not None and expected_step % steps_per_epoch  # mid-epoch
    result = train_run(cfg)
    assert result.status == "diverged"
    assert (result.diverged_step, result.steps, result.epochs) == \
        (expected_step, expected_step, expected_epoch)
    assert result.error == f"the training loss became NaN/Inf at step {expected_step}"
    assert all(math.isfinite(v) for *_, v in result.rows)  # no point measured NaN weights
    # An ensemble member diverges at the same step, its partner trains on.
    healthy = cfg.replace(lr=0.01, seed=3)
    diverged, done = train_ensemble([cfg, healthy])
    assert (diverged.status, diverged.diverged_step, diverged.epochs) == \
        ("diverged", expected_step, expected_epoch)
    assert diverged.error == result.error
    assert done.status == "done" and done.epochs == cfg.epochs


def test_graphed_step_on_cpu_is_the_plain_call():
    calls = []
    step = GraphedStep(lambda t: calls.append(t.clone()), enabled=False)
    for i in range(5):
        step(torch.full((2,), float(i)))
    assert [float(c[0]) for c in calls] == [0, 1, 2, 3, 4]


@cuda
def test_graphed_step_replays_what_eager_steps_do():
    state = torch.zeros(4, device="cuda")
    eager = torch.zeros(4, device="cuda")

    def fn(x: torch.Tensor) -> None:
        state.mul_(0.5).add_(x.square())

    step = GraphedStep(fn, enabled=True, warmup=2)
    for i in range(8):
        x = torch.arange(4.0, device="cuda") + i
        step(x)
        eager.mul_(0.5).add_(x.square())
    step(torch.ones(2, device="cuda")[:1].expand(4))  # same shape: replayed
    eager.mul_(0.5).add_(1.0)
    assert step.graph is not None
    torch.testing.assert_close(state, eager, rtol=0, atol=0)


@cuda
def test_cuda_single_run_graphed_equals_eager_and_diverges_at_the_exact_step(monkeypatch):
    cfg = RunConfig(model="convnet", model_args=dict(width=8), dataset_args=dict(subset=200),
                    batch_size=16, epochs=2, device="cuda")
    graphed = train_run(cfg)
    monkeypatch.setattr(GraphedStep, "__call__", lambda self, *inputs: self.fn(*inputs))
    eager = train_run(cfg)
    assert [r[:4] for r in graphed.rows] == [r[:4] for r in eager.rows]
    for a, b in zip(graphed.rows, eager.rows):
        if a[3] != "wall_s":
            assert a[4] == pytest.approx(b[4], rel=1e-5, abs=1e-7), a[:4]
    monkeypatch.undo()
    late = RunConfig(**LATE, device="cuda")
    result = train_run(late)
    step, epoch = first_nonfinite_step_checked_every_step(late)
    assert (result.status, result.diverged_step, result.epochs) == ("diverged", step, epoch)


@cuda
def test_cuda_conv_nets_train_in_channels_last():
    run = Run(RunConfig(model="resnet18", model_args=dict(width=0.125), device="cuda"), None,
               torch.device("cuda"))
    convs = [m.weight for m in run.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
