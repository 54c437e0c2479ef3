"""The ConvNet's stacked forward (bmm over im2col columns) against each member's own
nn.Module in float64: logits, autograd gradients and BatchNorm's running statistics."""

import copy

import pytest
import torch

from rankbias.models import create_model
from rankbias.training.conv_stack import stacked_forward


@pytest.mark.parametrize("shape, args", [
    ((1, 8, 8), dict(width=8, depth=2)),  # digits as the claims train it: 3x3 convs dense
    ((3, 9, 7), dict(width=6, depth=1)),  # odd sizes: the halving convs crop
    ((1, 16, 20), dict(width=5, depth=2, batch_norm=False)),  # padded im2col, conv biases
    ((2, 1, 5), dict(width=4, depth=0)),  # a size-1 axis: kernel 1 there
])
def test_the_stacked_convnet_is_each_members_own_forward_and_backward(shape, args):
    torch.manual_seed(0)
    members = [create_model("convnet", shape, 7, **args).double().train() for _ in range(3)]
    singles = copy.deepcopy(members)
    forward = stacked_forward(copy.deepcopy(members[0]).to("meta"))
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in members])
              .requires_grad_() for n, _ in members[0].named_parameters()}
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in members])
               for n, _ in members[0].named_buffers()}
    x = torch.randn(3, 5, *shape, dtype=torch.float64)
    targets = torch.randn(3, 5, 7, dtype=torch.float64)

    logits = forward(params, buffers, x)
    (logits * targets).sum().backward()
    for j, single in enumerate(singles):
        expected = single(x[j])
        (expected * targets[j]).sum().backward()
        torch.testing.assert_close(logits[j], expected, rtol=1e-12, atol=1e-12)
        for name, p in single.named_parameters():
            torch.testing.assert_close(params[name].grad[j], p.grad, rtol=1e-10, atol=1e-12)
        for name, b in single.named_buffers():  # running mean, variance, batches counted
            torch.testing.assert_close(buffers[name][j], b, rtol=1e-12, atol=1e-12)
    assert any("running_var" in n for n in buffers) == args.get("batch_norm", True)


def test_other_architectures_keep_vmap():
    assert stacked_forward(create_model("convnet", (1, 16), 3, width=4)) is None  # Conv1d
    assert stacked_forward(create_model("mlp", (1, 8, 8), 10)) is None
    assert stacked_forward(create_model("resnet18", (3, 8, 8), 10, width=0.125)) is None
