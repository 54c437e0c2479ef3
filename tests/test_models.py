"""The model registry: every model on every input shape, exact parameter counts, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankbias.models import create_model, list_models, model_options
from rankbias.models.mlp import Block as MLPBlock
from rankbias.models.vit import fit_patch
from rankbias.utils import RankbiasError

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (40,), (1, 40)]
# Small widths keep the big models fast on CPU; defaults are used where already small.
FAST = {"resnet18": dict(width=0.125), "vgg11": dict(width=0.125), "vgg16": dict(width=0.125),
        "transformer": dict(width=16, heads=2)}
TOKENS = {"transformer"}  # models of token sequences (length,): int64 ids, not floats


def example(name: str, shape: tuple, n: int, classes: int) -> torch.Tensor:
    """A random batch model `name` takes: token ids below its vocabulary (classes + 1),
    or Gaussian floats."""
    if name in TOKENS:
        return torch.randint(0, classes + 1, (n, *shape))
    return torch.randn(n, *shape)


def shapes_of(name: str) -> list[tuple]:
    return [(3,), (40,)] if name in TOKENS else SHAPES


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def zero_grad_by_design(model: nn.Module) -> set[int]:
    """Biases right before a train-mode BatchNorm: BN removes the batch mean, so their
    gradient is exactly 0 in exact arithmetic (only rounding noise in floats)."""
    return {
        id(m.fc.bias) for m in model.modules()
        if isinstance(m, MLPBlock) and isinstance(m.bn, nn.BatchNorm1d) and m.fc.bias is not None
    }


def test_list_models():
    assert list_models() == [
        "convnet", "mlp", "mlp-5-500", "mlp-bn-10-100", "resnet18", "transformer", "vgg11",
        "vgg16", "vit"
    ]


@pytest.mark.parametrize("name, shape", [(n, s) for n in list_models() for s in shapes_of(n)],
                         ids=str)
def test_forward_backward(name, shape):
    torch.manual_seed(0)
    model = create_model(name, shape, 7, **FAST.get(name, {}))
    x, y = example(name, shape, 4, 7), torch.tensor([0, 1, 2, 6])
    model.train()
    out = model(x)
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    exempt = zero_grad_by_design(model)
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert id(p) in exempt or p.grad.abs().sum() > 0, pname
    model.eval()
    with torch.no_grad():
        out = model(x[:1])
    assert out.shape == (1, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_last_linear_is_the_classifier(name):
    shape = shapes_of(name)[0]
    model = create_model(name, shape, 5, **FAST.get(name, {})).eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen = []
    last.register_forward_hook(lambda m, i, o: seen.append(o))
    out = model(example(name, shape, 2, 5))
    assert last.out_features == 5 and torch.equal(seen[-1], out)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 2), (2, 5, 7), (1,), (2, 3)], ids=str)
@pytest.mark.parametrize("name", ["convnet", "resnet18", "vgg11", "vgg16", "vit"])
def test_tiny_inputs_do_not_collapse(name, shape):
    model = create_model(name, shape, 3, **FAST.get(name, {}))
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_mlp_bn_10_100_parameter_count():
    # 3072*100+100 + 9*(100*100+100) + 10 BN layers * (100 weight + 100 bias) + 100*10+10
    expected = 3072 * 100 + 100 + 9 * (100 * 100 + 100) + 10 * 2 * 100 + 100 * 10 + 10
    assert expected == 401_210
    assert n_params(create_model("mlp-bn-10-100", (3, 32, 32), 10)) == 401_210


def test_mlp_5_500_parameter_count():
    expected = 3072 * 500 + 500 + 4 * (500 * 500 + 500) + 500 * 10 + 10
    assert expected == 2_543_510
    model = create_model("mlp-5-500", (3, 32, 32), 10)
    assert n_params(model) == 2_543_510
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())


def test_tiny_mlp_parameter_counts():
    # 4 inputs -> 3 -> 3 -> 2 classes: (4*3+3) + (3*3+3) + 2 BN * (3+3) + (3*2+2) = 47
    assert n_params(create_model("mlp", (1, 2, 2), 2, depth=2, width=3)) == 47
    # no BN, no biases: 4*3 + 3*3 + 3*2 = 27
    tiny = create_model("mlp", (4,), 2, depth=2, width=3, batch_norm=False, bias=False)
    assert n_params(tiny) == 27
    # depth 0 is logistic regression: 4*2 + 2
    assert n_params(create_model("mlp", (4,), 2, depth=0)) == 10


def test_resnet18_structure_and_full_width_count():
    model = create_model("resnet18", (3, 32, 32), 10, width=1.0)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    shortcut = [m for n, m in convs if "shortcut" in n]
    assert len(convs) - len(shortcut) == 17 and len(shortcut) == 3
    assert all(m.kernel_size == (1, 1) for m in shortcut)
    assert all(m.bias is None for _, m in convs)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    assert n_params(model) == 11_173_962  # the usual CIFAR ResNet-18 figure


def test_resnet18_always_three_shortcuts():
    for width in (0.01, 0.25):
        model = create_model("resnet18", (1, 8, 8), 10, width=width)
        assert sum("shortcut" in n and isinstance(m, nn.Conv2d)
                   for n, m in model.named_modules()) == 3


@pytest.mark.parametrize("name, n_convs", [("vgg11", 8), ("vgg16", 13)])
def test_vgg_structure(name, n_convs):
    model = create_model(name, (3, 32, 32), 10, width=0.125)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == n_convs
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_convs
    plain = create_model(name, (3, 32, 32), 10, width=0.125, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))


def test_vgg16_full_width_count():
    channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(9 * a * b for a, b in zip(channels, channels[1:]))
    bn = 2 * sum(channels[1:])
    model = create_model("vgg16", (3, 32, 32), 10, width=1.0)
    assert n_params(model) == convs + bn + 512 * 10 + 10 == 14_724_042


def test_convnet_structure():
    model = create_model("convnet", (1, 8, 8), 10, width=16, depth=3, batch_norm=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.kernel_size for m in convs] == [(2, 2)] * 2 + [(3, 3)] * 3
    assert [m.stride for m in convs] == [(2, 2)] * 2 + [(1, 1)] * 3
    assert isinstance(create_model("convnet", (40,), 10).features[0], nn.Conv1d)


def test_vit_attention_and_patches():
    model = create_model("vit", (1, 8, 8), 10, dim=32, heads=4, depth=3)
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attn) == 3 and attn[0].in_proj_weight.shape == (96, 32)
    assert list(model.modules())[-1] is model.head
    assert model.patch_size == (2, 2) and model.pos_embed.shape == (1, 17, 32)
    assert fit_patch((32, 32), None) == (4, 4)
    assert fit_patch((28, 28), None) == (4, 4)
    assert fit_patch((40,), None) == (2,)
    assert fit_patch((28, 28), 8) == (7, 7)
    assert fit_patch((1, 6), 4) == (1, 3)  # largest divisor <= 4 per dimension
    assert create_model("vit", (3, 32, 32), 10, patch_size=8).patch_size == (8, 8)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "tanh", "identity"])
def test_mlp_activations_and_residual(activation):
    torch.manual_seed(0)
    plain = create_model("mlp", (10,), 3, depth=3, width=10, activation=activation)
    torch.manual_seed(0)
    res = create_model("mlp", (10,), 3, depth=3, width=10, activation=activation, residual=True)
    assert n_params(plain) == n_params(res)
    x = torch.randn(4, 10)
    assert not torch.allclose(plain(x), res(x))


def test_options_and_spec():
    assert model_options("mlp-5-500") == dict(bias=True, residual=False)
    assert model_options("vit")["patch_size"] is None
    model = create_model("resnet18", [1, 8, 8], 10, width=1)  # a list and an int are fine
    assert model.spec == dict(
        name="resnet18", input_shape=(1, 8, 8), num_classes=10, options=dict(width=1.0)
    )


@pytest.mark.parametrize("name, shape, options, match", [
    ("mlp-xl", (1, 8, 8), {}, "unknown model 'mlp-xl'; valid: convnet, mlp"),
    ("mlp", (1, 8, 8), dict(dropout=0.1), "unknown option.*dropout.*valid: depth, width"),
    ("mlp-5-500", (1, 8, 8), dict(width=100), "width.*fixed by the preset"),
    ("mlp", (1, 8, 8), dict(depth="3"), "depth='3'.*must be int"),
    ("mlp", (1, 8, 8), dict(batch_norm=1), "batch_norm=1.*must be bool"),
    ("mlp", (1, 8, 8), dict(width=2.5), "must be int"),
    ("mlp", (1, 8, 8), dict(activation="swish"), "activation 'swish'; valid: relu"),
    ("mlp", (1, 8, 8), dict(depth=-1), "depth >= 0"),
    ("convnet", (1, 8, 8), dict(width=0), "width >= 1"),
    ("resnet18", (1, 8, 8), dict(width=0.0), "width > 0"),
    ("vgg16", (1, 8, 8), dict(width=-1), "width > 0"),
    ("vit", (1, 8, 8), dict(dim=30, heads=4), "divisible by heads"),
    ("vit", (1, 8, 8), dict(patch_size=0), "patch_size >= 1"),
    ("transformer", (3,), dict(width=30, heads=4), "divisible by heads"),
    ("transformer", (1, 8, 8), {}, "token sequences of shape"),
    ("transformer", (3,), dict(causal="yes"), "causal='yes'.*must be bool"),
    ("convnet", (1, 1, 8, 8), {}, "input shapes"),
    ("mlp", (1, 0, 8), {}, "input_shape must be positive"),
    ("mlp", (), {}, "input_shape must be positive"),
])
def test_errors(name, shape, options, match):
    with pytest.raises(RankbiasError, match=match) as info:
        create_model(name, shape, 10, **options)
    assert "\n" not in str(info.value)


def test_bad_num_classes():
    with pytest.raises(RankbiasError, match="num_classes"):
        create_model("mlp", (4,), 0)


def test_transformer_structure_parameter_count_and_heads():
    model = create_model("transformer", (3,), 7, depth=2, width=16, heads=4, mlp_ratio=2.0)
    # embeddings (7 + 1 tokens, 3 positions) x 16; per block: 2 LayerNorms (2 x 16 each),
    # q, k, v, o (16 x 16 + 16 each), fc_in 16 -> 32, fc_out 32 -> 16; final LayerNorm; head
    block = 2 * 2 * 16 + 4 * (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16)
    assert n_params(model) == 8 * 16 + 3 * 16 + 2 * block + 2 * 16 + 16 * 7 + 7
    attention = [m for m in model.modules() if hasattr(m, "q_proj")]
    assert len(attention) == 2 and attention[0].num_heads == 4 and attention[0].head_dim == 4
    assert list(model.modules())[-1] is model.head and model.input_dtype == torch.int64
    with pytest.raises(RankbiasError, match="token ids"):
        model(torch.randn(2, 3))


def attention_oracle(attn, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """The same attention, one head at a time with explicit loops over positions."""
    b, t, d = x.shape
    h, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    out = torch.zeros(b, t, d)
    for head in range(h):
        cols = slice(head * hd, (head + 1) * hd)
        for i in range(t):
            seen = range(i + 1) if causal else range(t)
            scores = torch.stack([(q[:, i, cols] * k[:, j, cols]).sum(-1) / hd ** 0.5
                                  for j in seen], dim=-1)
            weights = torch.softmax(scores, dim=-1)
            out[:, i, cols] = sum(weights[:, n, None] * v[:, j, cols]
                                  for n, j in enumerate(seen))
    return attn.o_proj(out)


@pytest.mark.parametrize("causal", [True, False])
def test_transformer_attention_against_a_loop(causal):
    torch.manual_seed(0)
    model = create_model("transformer", (5,), 6, width=12, heads=3, causal=causal)
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(attn(x), attention_oracle(attn, x, causal))
    tokens = torch.randint(0, 7, (2, 5))
    changed = tokens.clone()
    changed[:, -1] = (tokens[:, -1] + 1) % 7
    # causal: the earlier positions never see a later token, so changing the last token
    # changes only the last position of every block's output
    hidden = [model.tok_emb(t) + model.pos_emb(torch.arange(5)) for t in (tokens, changed)]
    outs = [model.blocks(h) for h in hidden]
    assert torch.allclose(outs[0][:, :-1], outs[1][:, :-1]) == causal
