"""Weight-matrix extraction on our models, user-defined models and bare state_dicts."""

import numpy as np
import pytest
import torch
from torch import nn

from rankbias.metrics.layers import classifier_name, conv_operator_singular_values, weight_matrices
from rankbias.metrics.spectral import rank_from_singular_values
from rankbias.models import create_model


def test_mlp_selection_drops_the_classifier():
    model = create_model("mlp", (1, 8, 8), 10, depth=3, width=20)
    names = list(weight_matrices(model))
    assert len(names) == 3
    assert classifier_name(model) + ".weight" not in names
    assert len(weight_matrices(model, include_classifier=True)) == 4


def test_resnet18_paper_selection_has_17_matrices():
    model = create_model("resnet18", (3, 32, 32), 10, width=0.125)
    hidden = weight_matrices(model)
    assert len(hidden) == 17  # the paper's count (max average rank ~227.5 at width 1)
    assert not any("shortcut" in n for n in hidden)
    everything = weight_matrices(model, include_classifier=True, include_shortcuts=True)
    assert len(everything) == 17 + 3 + 1
    stem = model.conv1.weight if hasattr(model, "conv1") else None
    first_name, first = next(iter(hidden.items()))
    assert first.ndim == 2 and first.shape[1] == 3 * 3 * 3  # out x (in * k * k)
    if stem is not None:
        assert torch.equal(first, stem.reshape(stem.shape[0], -1))


def test_resnet18_max_average_rank_matches_paper():
    model = create_model("resnet18", (3, 32, 32), 10, width=1.0)
    max_ranks = [min(w.shape) for w in weight_matrices(model).values()]
    assert np.mean(max_ranks) == pytest.approx(227.5, abs=0.1)


def test_vgg16_has_13_conv_matrices():
    model = create_model("vgg16", (3, 32, 32), 10, width=0.125)
    assert len(weight_matrices(model)) == 13


def test_attention_in_projection_split_into_q_k_v():
    model = create_model("vit", (1, 8, 8), 10, dim=16, depth=1, heads=2)
    mats = weight_matrices(model)
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)][0]
    qkv = [n for n in mats if n.endswith(("in_proj_weight:q", "in_proj_weight:k",
                                          "in_proj_weight:v"))]
    assert len(qkv) == 3
    stacked = torch.cat([mats[n] for n in qkv])
    assert torch.equal(stacked, attn.in_proj_weight.detach())
    assert any(n.endswith("out_proj.weight") for n in mats)
    assert classifier_name(model) == "head"  # out_proj is never the classifier


def test_user_defined_model_with_conv1d_and_conv3d():
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 4, 5)
            self.c3 = nn.Conv3d(1, 3, (2, 3, 4))
            self.body = nn.Sequential(nn.Linear(7, 9), nn.Tanh())
            self.out = nn.Linear(9, 2)

    mats = weight_matrices(Mine())
    assert {n: tuple(m.shape) for n, m in mats.items()} == {
        "c1.weight": (4, 10), "c3.weight": (3, 24), "body.0.weight": (9, 7)}


def test_single_linear_model_keeps_its_only_matrix():
    assert list(weight_matrices(nn.Linear(3, 2))) == ["weight"]


def test_matrices_are_views_of_live_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    mats = weight_matrices(model)
    with torch.no_grad():
        model[0].weight.mul_(2)
    assert torch.equal(mats["0.weight"], model[0].weight.detach())


@pytest.mark.parametrize("name, options", [
    ("vit", dict(dim=16, depth=1, heads=2)), ("resnet18", dict(width=0.125)),
    ("mlp", dict(depth=2, width=8)), ("vgg11", dict(width=0.125)), ("convnet", dict(width=4)),
])
def test_state_dict_gets_the_same_selection_as_its_model(name, options):
    model = create_model(name, (3, 16, 16), 10, **options)
    for everything in (False, True):
        from_state = weight_matrices(model.state_dict(), everything, everything)
        from_module = weight_matrices(model, everything, everything)
        assert list(from_state) == list(from_module)
        for key in from_module:
            assert torch.equal(from_state[key], from_module[key])
    assert not any(v.ndim != 2 for v in from_state.values())


def authors_resnet18_state_dict() -> dict[str, torch.Tensor]:
    """Keys and shapes of the authors' CIFAR ResNet-18 (LowRankBias models/resnet.py): a
    stem conv in `layers.0`, BasicBlocks `layers.3`..`layers.10` (conv1, conv2, and a
    1x1 conv in `shortcut.0` where the shape changes), then `fc`. Written from the layout,
    with random values."""
    state = {"layers.0.weight": torch.randn(64, 3, 3, 3), "layers.1.weight": torch.ones(64),
             "layers.1.bias": torch.zeros(64)}
    planes_in, index = 64, 3
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block_stride in (stride, 1):
            block = f"layers.{index}"
            state[f"{block}.conv1.weight"] = torch.randn(planes, planes_in, 3, 3)
            state[f"{block}.bn1.weight"] = torch.ones(planes)
            state[f"{block}.conv2.weight"] = torch.randn(planes, planes, 3, 3)
            state[f"{block}.bn2.weight"] = torch.ones(planes)
            if block_stride != 1 or planes_in != planes:
                state[f"{block}.shortcut.0.weight"] = torch.randn(planes, planes_in, 1, 1)
                state[f"{block}.shortcut.1.weight"] = torch.ones(planes)
            planes_in, index = planes, index + 1
    state["fc.weight"] = torch.randn(10, 512)
    state["fc.bias"] = torch.zeros(10)
    return state


def test_the_authors_resnet18_state_dict_averages_their_17_matrices():
    state = authors_resnet18_state_dict()
    selected = weight_matrices(state)
    assert len(selected) == 17  # as their eval_ranks: no shortcuts, no fc
    assert "fc.weight" not in selected and not any("shortcut" in k for k in selected)
    assert len(weight_matrices(state, include_classifier=True, include_shortcuts=True)) == 21


def circulant_conv_operator(kernel: np.ndarray, n: int) -> np.ndarray:
    """The dense matrix of a stride-1 circular-padding conv (cross-correlation) on n x n."""
    c_out, c_in, kh, kw = kernel.shape
    op = np.zeros((c_out * n * n, c_in * n * n))
    for o in range(c_out):
        for i in range(n):
            for j in range(n):
                row = o * n * n + i * n + j
                for c in range(c_in):
                    for a in range(kh):
                        for b in range(kw):
                            col = c * n * n + ((i + a) % n) * n + (j + b) % n
                            op[row, col] += kernel[o, c, a, b]
    return op


def test_conv_operator_singular_values_match_dense_operator():
    kernel = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    n = 5
    ours = conv_operator_singular_values(kernel, n).numpy()
    dense = circulant_conv_operator(kernel.double().numpy(), n)
    oracle = np.linalg.svd(dense, compute_uv=False)
    np.testing.assert_allclose(ours, oracle[: len(ours)], rtol=1e-9, atol=1e-12)
    assert rank_from_singular_values(ours, 1e-3) == rank_from_singular_values(oracle, 1e-3)
