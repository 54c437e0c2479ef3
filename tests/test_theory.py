"""Theory made executable: the bound, Lemma 3.1, Lemma 3.2, Theorem 3.4's residual, CLI.

Oracles: hand-computed formulas, numpy float64 SVD, per-example gradients from autograd.
Models are tiny and built inline (no dependency on rankbias.models).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rankbias.cli.main import main
from rankbias.metrics.gradient_rank import PatchCounter, gradient_ranks
from rankbias.metrics.layers import weight_matrices
from rankbias.theory.bound import min_steps, rank_bound
from rankbias.theory.unrolling import (
    record_sgd_trajectory,
    theorem_residual,
    theorem_residuals,
    unrolled_identity_check,
    unrolled_weights,
    unrolling_errors,
)
from rankbias.utils import RankbiasError

torch.set_num_threads(1)
LOG_2000 = math.log(2 / 1e-3)


# --- helpers ------------------------------------------------------------------------------
def numpy_rank(matrix: torch.Tensor, tol: float) -> int:
    """Independent oracle: numpy float64 SVD, sigma > tol * sigma_max."""
    sigma = np.linalg.svd(matrix.detach().double().numpy(), compute_uv=False)
    return int(np.sum(sigma > tol * sigma[0])) if sigma[0] > 0 else 0


def grad_matrix(param: torch.Tensor) -> torch.Tensor:
    return param.grad.reshape(param.shape[0], -1)


def mlp_bn(width: int = 32, depth: int = 2, d_in: int = 12) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))


class TinyResNet(nn.Module):
    """Conv -> BN -> ReLU -> conv with a strided 1x1 shortcut -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(self.conv(h) + self.shortcut(h))
        return self.head(h.flatten(1))


class TinyViT(nn.Module):
    """Patch embedding (conv) -> pre-norm attention block -> MLP -> mean-pooled head."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, num_heads=2, batch_first=batch_first)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, T, 16)
        h = self.norm(tokens)
        h = h if self.batch_first else h.transpose(0, 1)
        attended, _ = self.attn(h, h, h, need_weights=False)
        tokens = tokens + (attended if self.batch_first else attended.transpose(0, 1))
        tokens = tokens + self.fc2(F.gelu(self.fc1(tokens)))
        return self.head(tokens.mean(1))


def backward_with_counter(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> PatchCounter:
    counter = PatchCounter(model)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    counter.close()
    return counter


def check_against_oracle(model: nn.Module, ranks: dict, tol: float = 1e-6) -> None:
    for name, result in ranks.items():
        param_name, _, part = name.partition(":")
        grad = model.get_parameter(param_name).grad
        if part:
            grad = grad.chunk(3)["qkv".index(part)]
        assert result.rank == numpy_rank(grad.reshape(grad.shape[0], -1), tol), name
        assert result.holds, (name, result)


# --- Theorem 3.4: the bound -----------------------------------------------------------------
def test_bound_matches_hand_computed_values():
    # docs/theory.md: "~5e3 at B=4, mu=1, wd=6e-3": 4 * log(2000) / (1 * 6e-3) = 5067.3
    assert rank_bound(4, 1.0, 6e-3) == pytest.approx(4 * LOG_2000 / 6e-3, rel=1e-12)
    assert 3e3 < rank_bound(4, 1.0, 6e-3) < 7e3
    assert rank_bound(4, 1.0, 6e-3) == pytest.approx(5067.27, abs=0.01)
    assert min_steps(1.0, 6e-3) == pytest.approx(LOG_2000 / 6e-3, rel=1e-12)
    assert rank_bound(8, 0.5, 5e-3, eps=1e-2, patches=3) == pytest.approx(
        3 * 8 * math.log(200) / (0.5 * 5e-3), rel=1e-12)


def test_bound_trends_linear_in_b_and_m_inverse_in_mu_lambda():
    base = rank_bound(4, 0.1, 1e-3)
    assert rank_bound(8, 0.1, 1e-3) == pytest.approx(2 * base)
    assert rank_bound(4, 0.1, 1e-3, patches=16) == pytest.approx(16 * base)
    assert rank_bound(4, 0.2, 1e-3) == pytest.approx(base / 2)
    assert rank_bound(4, 0.1, 2e-3) == pytest.approx(base / 2)
    assert rank_bound(4, 0.1, 1e-3) == pytest.approx(4 * min_steps(0.1, 1e-3))


def test_bound_is_infinite_without_weight_decay():
    assert rank_bound(4, 1.0, 0.0) == math.inf
    assert min_steps(1.0, 0.0) == math.inf
    assert rank_bound(4, 1.0, None, lam=0.0) == math.inf


def test_lam_is_half_the_pytorch_weight_decay():
    assert rank_bound(4, 1.0, None, lam=3e-3) == pytest.approx(rank_bound(4, 1.0, 6e-3))
    assert rank_bound(4, 1.0, 6e-3, lam=3e-3) == pytest.approx(rank_bound(4, 1.0, 6e-3))
    assert min_steps(0.5, None, lam=1e-3) == pytest.approx(min_steps(0.5, 2e-3))
    with pytest.raises(RankbiasError, match="lam"):
        rank_bound(4, 1.0, 3e-3, lam=3e-3)  # the classic convention mix-up
    with pytest.raises(RankbiasError, match="weight_decay"):
        rank_bound(4, 1.0, None)


@pytest.mark.parametrize("kwargs, argument", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"lr": 0.0}, "lr"),
    ({"lr": -1.0}, "lr"),
    ({"lr": math.nan}, "lr"),
    ({"weight_decay": -1e-3}, "weight_decay"),
    ({"weight_decay": math.inf}, "weight_decay"),
    ({"eps": 0.0}, "eps"),
    ({"eps": 2.0}, "eps"),
    ({"patches": 0}, "patches"),
    ({"lr": 100.0, "weight_decay": 0.1}, "lr \\* weight_decay"),
])
def test_bound_rejects_bad_input_naming_the_argument(kwargs, argument):
    args = {"batch_size": 4, "lr": 0.1, "weight_decay": 1e-3, **kwargs}
    with pytest.raises(RankbiasError, match=argument):
        rank_bound(**args)


# --- CLI ----------------------------------------------------------------------------------
def test_cli_bound_text(capsys):
    assert main(["bound", "--batch-size", "4", "--lr", "1", "--weight-decay", "6e-3"]) == 0
    out = capsys.readouterr().out
    assert "5067.27" in out and "1266.82" in out
    assert "weight_decay = 2*lambda" in out and "lambda=0.003" in out


def test_cli_bound_json_and_shape(capsys):
    argv = ["bound", "--batch-size", "4", "--lr", "1", "--weight-decay", "6e-3",
            "--format", "json"]
    assert main(argv + ["--shape", "100x100"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    result = json.loads(line)
    assert result["bound"] == pytest.approx(rank_bound(4, 1.0, 6e-3))
    assert result["min_steps"] == pytest.approx(min_steps(1.0, 6e-3))
    assert result["vacuous"] is True
    assert main(argv + ["--shape", "10000x20000"]) == 0
    assert json.loads(capsys.readouterr().out)["vacuous"] is False
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["vacuous"] is None


def test_cli_bound_text_shape_and_zero_weight_decay(capsys):
    argv = ["bound", "--batch-size", "2", "--lr", "1", "--weight-decay"]
    assert main(argv + ["0.5", "--patches", "1", "--shape", "100x50"]) == 0
    assert "informative" in capsys.readouterr().out  # 2 * log(2000) / 0.5 = 30 < 50
    assert main(argv + ["0", "--format", "json", "--shape", "5x5"]) == 0
    result = json.loads(capsys.readouterr().out)  # strict JSON: no Infinity token
    assert result["bound"] is None and result["min_steps"] is None and result["vacuous"]
    assert main(argv + ["0"]) == 0
    assert "inf" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--shape", "100"], ["--shape", "0x5"], ["--shape", "axb"],
                                   ["--eps", "3"], ["--patches", "0"]])
def test_cli_bound_bad_input_exits_2_with_one_line(extra, capsys):
    argv = ["bound", "--batch-size", "4", "--lr", "1", "--weight-decay", "6e-3", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankbias bound: error:") and err.count("\n") == 1


def test_cli_bound_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bound", "--batch-size", "four", "--lr", "1", "--weight-decay", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["bound", "--lr", "1", "--weight-decay", "0"])  # --batch-size is required
    assert exc.value.code == 2
    capsys.readouterr()


# --- Lemma 3.1: gradient rank <= B * m -------------------------------------------------------
def test_mlp_with_batchnorm_gradient_rank_at_most_b():
    torch.manual_seed(0)
    model = mlp_bn(width=32).double()
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 10, (8,))
    counter = backward_with_counter(model, x, y)
    ranks = gradient_ranks(model, counter)
    assert set(ranks) == set(weight_matrices(model, include_classifier=True))
    for result in ranks.values():
        assert (result.batch_size, result.patches, result.bound) == (8, 1, 8)
        assert 1 <= result.rank <= 8 < min(result.shape)  # the bound is not trivially met
    check_against_oracle(model, ranks)


def test_float32_gradients_with_default_tolerance():
    torch.manual_seed(1)
    model = mlp_bn(width=64)
    counter = backward_with_counter(model, torch.randn(6, 12), torch.randint(0, 10, (6,)))
    for result in gradient_ranks(model, counter).values():
        assert result.rank <= 6 and result.holds


def test_last_partial_batch_uses_its_own_size():
    torch.manual_seed(2)
    model = mlp_bn(width=32).double()
    data, labels = torch.randn(35, 12, dtype=torch.float64), torch.randint(0, 10, (35,))
    with PatchCounter(model) as counter:
        for start in range(0, 35, 16):  # batches of 16, 16, then 3
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(data[start:start + 16]), labels[start:start + 16]).backward()
        ranks = gradient_ranks(model, counter)
    for result in ranks.values():
        assert result.batch_size == 3 and result.bound == 3 and result.rank <= 3
    check_against_oracle(model, ranks)


def test_no_grad_forward_passes_do_not_overwrite_the_counts():
    torch.manual_seed(3)
    model = mlp_bn(width=32).double()
    with PatchCounter(model) as counter:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(torch.randn(4, 12, dtype=torch.float64)),
                        torch.randint(0, 10, (4,))).backward()
        with torch.no_grad():  # an evaluation pass on a bigger batch
            model.eval()
            model(torch.randn(100, 12, dtype=torch.float64))
            model.train()
        assert all(r.bound == 4 for r in gradient_ranks(model, counter).values())


def test_conv_with_stride_and_padding_bound_is_b_times_output_positions():
    torch.manual_seed(4)
    # 16 x 4 x 4 input, 3x3 kernel, stride 2, padding 1: output 2 x 2, so m = 4.
    # Matrix 32 x 144 while B*m = 3*4 = 12: a wrong m or B would show up.
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(32 * 2 * 2, 10)).double()
    x, y = torch.randn(3, 16, 4, 4, dtype=torch.float64), torch.randint(0, 10, (3,))
    counter = backward_with_counter(model, x, y)
    result = gradient_ranks(model, counter)["0.weight"]
    h_out = (4 + 2 * 1 - 3) // 2 + 1
    assert (result.batch_size, result.patches, result.bound) == (3, h_out * h_out, 12)
    assert result.shape == (32, 144) and result.capped_bound == 12
    assert result.rank == 12  # generic data: the bound is attained, and it can be exceeded
    assert numpy_rank(grad_matrix(conv.weight), 1e-6) == 12
    assert counter.counts["3.weight"].bound == 3


def test_grouped_conv_counts_groups():
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 8, 3, groups=4, bias=False)  # matrix 8 x 18, m = 1 (3x3 input)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(8, 10)).double()
    counter = backward_with_counter(model, torch.randn(1, 8, 3, 3, dtype=torch.float64),
                                    torch.randint(0, 10, (1,)))
    result = gradient_ranks(model, counter)["0.weight"]
    assert result.bound == 4 and result.patches == 1  # groups * B * m = 4 * 1 * 1
    assert result.rank == numpy_rank(grad_matrix(conv.weight), 1e-6) == 4  # not 1 = B*m


@pytest.mark.parametrize("batch_first", [True, False])
def test_vit_like_attention_block_bound_is_b_times_tokens(batch_first):
    torch.manual_seed(6)
    model = TinyViT(batch_first).double()
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (2,))
    counter = backward_with_counter(model, x, y)  # 2 examples x 4 tokens = 8 positions
    ranks = gradient_ranks(model, counter)
    assert set(ranks) == set(weight_matrices(model, include_classifier=True))
    expected = {"patch.weight": 8, "attn.in_proj_weight:q": 8, "attn.in_proj_weight:k": 8,
                "attn.in_proj_weight:v": 8, "attn.out_proj.weight": 8, "fc1.weight": 8,
                "fc2.weight": 8, "head.weight": 2}
    assert {name: r.bound for name, r in ranks.items()} == expected
    assert all(r.batch_size == 2 for r in ranks.values())
    # B*T is attained where the token gradients differ (B alone, 2, would be exceeded);
    # fc2 sees the same pooled gradient at every token of an example, so its rank is B.
    for name in ("patch.weight", "attn.in_proj_weight:q", "fc1.weight"):
        assert ranks[name].rank == 8, name
    assert ranks["fc2.weight"].rank == 2
    check_against_oracle(model, ranks)


def test_cross_attention_with_separate_projections():
    torch.manual_seed(7)
    attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True).double()
    query = torch.randn(2, 3, 16, dtype=torch.float64)
    memory = torch.randn(2, 5, 8, dtype=torch.float64)
    with PatchCounter(attn) as counter:
        out, _ = attn(query, key=memory, value=memory)
        (out * torch.randn_like(out)).sum().backward()
    ranks = gradient_ranks(attn, counter)
    assert {name: r.bound for name, r in ranks.items()} == {
        "q_proj_weight": 6, "k_proj_weight": 10, "v_proj_weight": 10, "out_proj.weight": 6}
    assert ranks["q_proj_weight"].rank == 6  # 16 x 16 matrix, rank capped by B*L = 6
    check_against_oracle(attn, ranks)


def test_per_example_gradients_have_rank_one_for_linear_and_m_for_conv():
    torch.manual_seed(8)
    conv = nn.Conv2d(4, 16, 3, stride=2, padding=1)  # 5x5 input -> 3x3 output: m = 9
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(16 * 9, 32), nn.Tanh(),
                          nn.Linear(32, 10)).double()
    x, y = torch.randn(5, 4, 5, 5, dtype=torch.float64), torch.randint(0, 10, (5,))
    per_example = []
    for i in range(5):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        g_conv, g_lin = torch.autograd.grad(loss, [conv.weight, model[3].weight])
        assert numpy_rank(g_lin, 1e-10) == 1  # (dl/dz) f(x)^T
        assert numpy_rank(g_conv.reshape(16, -1), 1e-10) == 9  # sum of m = 9 outer products
        per_example.append(g_lin)
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()  # no BN: the sum is the batch
    torch.testing.assert_close(sum(per_example), model[3].weight.grad, rtol=1e-12, atol=1e-14)


def test_gradient_ranks_without_a_counted_pass_is_a_user_error():
    model = mlp_bn()
    with pytest.raises(RankbiasError, match="PatchCounter"):
        gradient_ranks(model, PatchCounter(model))


# --- Lemma 3.2: the unrolled identity -----------------------------------------------------------
def make_batches(shape, steps: int, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=generator),
             torch.randint(0, 10, (batch,), generator=generator)) for _ in range(steps)]


def test_unrolled_weights_matches_a_hand_computed_two_step_case():
    w, a, b = torch.eye(2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64), \
        torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    mu, wd = 0.5, 0.2
    decay = 1 - mu * wd  # 0.9: PyTorch convention
    expected = decay**2 * w - mu * (b + decay * a)  # G_{T-1} = b, G_{T-2} = a
    torch.testing.assert_close(unrolled_weights(w, [a, b], mu, wd), expected)
    step = (w * decay - mu * a) * decay - mu * b  # replaying the recursion
    torch.testing.assert_close(unrolled_weights(w, [a, b], mu, wd), step)


@pytest.mark.parametrize("make_model, shape", [(mlp_bn, (12,)), (TinyResNet, (3, 6, 6))])
def test_unrolled_identity_holds_to_float64_precision(make_model, shape):
    torch.manual_seed(9)
    model = make_model()
    before = {n: w.clone() for n, w in model.state_dict().items()}
    errors = unrolled_identity_check(model, make_batches(shape, 6, 4, seed=9), F.cross_entropy,
                                     lr=0.1, weight_decay=0.05)
    assert set(errors) == set(weight_matrices(model, include_classifier=True,
                                              include_shortcuts=True))
    assert max(errors.values()) < 1e-12
    for name, value in model.state_dict().items():  # ran on a copy
        assert torch.equal(value, before[name]) and value.dtype == before[name].dtype


def test_unrolled_identity_over_the_last_k_steps_and_wrong_convention_fails():
    torch.manual_seed(10)
    trajectory = record_sgd_trajectory(TinyResNet(), make_batches((3, 6, 6), 8, 4, seed=10),
                                       F.cross_entropy, lr=0.1, weight_decay=0.05)
    assert trajectory.steps == 8 and len(trajectory.weights) == 9
    for k in (1, 3, 8):
        assert max(unrolling_errors(trajectory, k).values()) < 1e-12
    # the paper's factor with lambda = wd (i.e. 1 - 2*mu*wd) must be caught
    for name in trajectory.weights[-1]:
        w_start, w_end, grads = trajectory.window(name, 8)
        wrong = unrolled_weights(w_start, grads, trajectory.lr, 2 * trajectory.weight_decay)
        assert float(torch.linalg.norm(w_end - wrong) / torch.linalg.norm(w_end)) > 1e-3
    with pytest.raises(RankbiasError, match="k must be"):
        unrolling_errors(trajectory, 9)


class HalfUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(4, 4)
        self.used = nn.Linear(4, 10)

    def forward(self, x):
        return self.used(x)


def test_unused_weight_matrix_is_reported():
    # SGD skips a parameter without .grad (no decay either): the identity would not apply
    with pytest.raises(RankbiasError, match="unused.weight"):
        record_sgd_trajectory(HalfUsed(), make_batches((4,), 1, 2, seed=0), F.cross_entropy,
                              0.1, 0.01)


# --- Theorem 3.4: the residual --------------------------------------------------------------
def test_theorem_residual_equals_its_bound_and_beats_no_low_rank_fit():
    torch.manual_seed(11)
    batch, k = 2, 6
    model = mlp_bn(width=48)
    trajectory = record_sgd_trajectory(model, make_batches((12,), 10, batch, seed=11),
                                       F.cross_entropy, lr=0.2, weight_decay=0.1)
    results = theorem_residuals(trajectory, k, ranks=[1, 4])
    for name, result in results.items():
        assert result.k == k and result.holds
        assert result.actual == pytest.approx(result.bound, rel=1e-10)  # an identity
        assert result.rank_uk <= k * batch  # rank(U_k) <= k * B * m with m = 1
        w_end = trajectory.weights[-1][name]
        sigma = np.linalg.svd((w_end / torch.linalg.norm(w_end)).numpy(), compute_uv=False)
        for r in (1, 4, result.rank_uk):  # Eckart-Young oracle
            assert result.best_rank_distance[r] == pytest.approx(
                math.sqrt(float(np.sum(sigma[r:] ** 2))), rel=1e-9, abs=1e-12)
        # the best rank-r fit is at least as close as U_k, a particular rank-r matrix
        assert result.best_rank_distance[result.rank_uk] <= result.actual + 1e-12
        assert result.best_rank_distance[1] >= result.best_rank_distance[4]
    hidden = results["3.weight"]  # 48 x 48, rank(U_k) <= 12: a genuinely low-rank fit
    assert hidden.rank_uk <= 12 < 48 and hidden.bound < 1


def test_theorem_residual_flags_inconsistent_inputs():
    torch.manual_seed(12)
    w_end = torch.randn(5, 5, dtype=torch.float64)
    w_start = 0.1 * w_end
    result = theorem_residual(w_start, w_end, [torch.zeros(5, 5, dtype=torch.float64)],
                              lr=0.1, weight_decay=0.1)
    assert result.actual == pytest.approx(1.0) and result.bound == pytest.approx(0.099)
    assert not result.holds and result.rank_uk == 0
    assert result.as_dict()["best_rank_distance"] == {0: pytest.approx(1.0)}


# --- SGD noise ----------------------------------------------------------------------------
def test_relative_weight_change():
    from rankbias.metrics.spectral import relative_weight_change

    before = {"a": torch.ones(2, 2), "b": torch.zeros(3, 3), "c": torch.zeros(1, 2)}
    after = {"a": torch.ones(2, 2) * 1.5, "b": torch.ones(3, 3), "c": torch.zeros(1, 2)}
    assert relative_weight_change(before, after) == {"a": pytest.approx(0.5), "b": math.inf,
                                                     "c": 0.0}


def test_relative_weight_change_refuses_uncloned_weights():
    from rankbias.metrics.spectral import relative_weight_change

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    before = weight_matrices(model, include_classifier=True)  # views: the authors' bug
    with pytest.raises(RankbiasError, match="clone"):
        relative_weight_change(before, weight_matrices(model, include_classifier=True))
    cloned = {n: w.clone() for n, w in before.items()}
    with torch.no_grad():
        model[1].weight.mul_(2.0)
    change = relative_weight_change(cloned, weight_matrices(model, include_classifier=True))
    assert change == {"0.weight": 0.0, "1.weight": pytest.approx(1.0)}
    with pytest.raises(RankbiasError, match="not in"):
        relative_weight_change({"x": torch.ones(1, 1)}, {})
