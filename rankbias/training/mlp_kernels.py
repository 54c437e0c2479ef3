"""The pieces of the hand-written MLP stack (training/mlp_stack.py): the loss, linear,
activation and BatchNorm backward passes for K members at once, written with the ATen kernels
autograd runs for one run (so each member keeps its single run's bits), and `Layer`, the
views of one Linear (+ BatchNorm) of K members into the stack's flat vectors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# --- the batched MLP ------------------------------------------------------------------------
# By hand, not autograd: its per-node overhead is most of a small step, and each product is
# computed in the orientation nn.Linear's backward uses (the single runs' bits).


def loss_and_grad(name: str, logits: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, b, classes) logits, (K, b) labels -> (K,) per-member mean losses and the gradient
    of each member's loss w.r.t. its logits, with the ops autograd runs for
    train.loss_function on one run (so the same rounding)."""
    k, b, c = logits.shape
    if name == "mse":
        diff = logits - F.one_hot(y, c).to(logits.dtype)
        losses = (diff ** 2).sum(dim=2).mean(dim=1)
        inv_b = torch.ones((), dtype=logits.dtype, device=logits.device) / b  # MeanBackward
        return losses, (diff * 2) * inv_b  # PowBackward: grad * (2 * diff)
    flat, target = logits.view(k * b, c), y.reshape(-1)
    logp = torch.log_softmax(flat, dim=1)
    losses = F.nll_loss(logp, target, reduction="none").view(k, b).mean(dim=1)
    one = torch.ones((), dtype=logits.dtype, device=logits.device)
    total = torch.full((), float(b), dtype=logits.dtype, device=logits.device)
    grad = torch.ops.aten.nll_loss_backward(one, logp, target, None, 1, -100, total)
    grad = torch.ops.aten._log_softmax_backward_data(grad, logp, 1, logp.dtype)
    return losses, grad.view(k, b, c)


def linear_backward(grad: torch.Tensor, h: torch.Tensor, layer: Layer,
                     need_input: bool) -> torch.Tensor | None:
    """Backward of `Layer.linear`: weight and bias gradients into the layer's gradient
    views; returns the input gradient. The weight gradient is g^T h as nn.Linear's backward
    computes it; autograd's bmm rule computes (h^T g)^T, which MKL rounds differently for
    some shapes (a 10-class head)."""
    torch.bmm(grad.transpose(1, 2), h, out=layer.grad_weight)
    if layer.grad_bias is not None:
        torch.sum(grad, dim=1, out=layer.grad_bias)
    return torch.bmm(grad, layer.weight) if need_input else None


def activation_backward(act: torch.nn.Module, grad: torch.Tensor, inp: torch.Tensor,
                         out: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """The backward autograd runs for each activation of models/mlp.py, written into `into`
    if given (elementwise, so `into` may be `grad` itself)."""
    ops = torch.ops.aten
    if isinstance(act, torch.nn.Identity):
        return grad if into is None else into.copy_(grad)
    kwargs = {}
    if isinstance(act, torch.nn.ReLU):
        op, args = ops.threshold_backward, (grad, out, 0)
    elif isinstance(act, torch.nn.LeakyReLU):
        op, args = ops.leaky_relu_backward, (grad, inp, act.negative_slope, False)
    elif isinstance(act, torch.nn.GELU):
        op, args, kwargs = ops.gelu_backward, (grad, inp), {"approximate": act.approximate}
    elif isinstance(act, torch.nn.Tanh):
        op, args = ops.tanh_backward, (grad, out)
    else:
        raise TypeError(f"no batched backward for activation {type(act).__name__}")
    return op(*args, **kwargs) if into is None else op.grad_input(*args, **kwargs,
                                                                   grad_input=into)


# --- BatchNorm for K members -----------------------------------------------------------------
# The K members' channels sit side by side in one (b, K*C [+ pad]) tensor, so one
# native_batch_norm call normalizes every member with its own batch statistics and updates
# its running mean and (unbiased) running variance in place. PyTorch's CPU kernel computes
# the input gradient with fused multiply-adds in its SIMD body but not in its remainder
# loop (the last C % W channels of a layer, W floats per SIMD vector). In the batched call a
# member's last channels fall in the body, so they are recomputed here the remainder's way,
# and the batched call is padded to a multiple of W so that no other channel is in its
# remainder. W is found once per process by comparing with per-member calls.


@dataclass(frozen=True)
class Channels:
    """Layout of one BatchNorm layer's K*C channels in the batched call."""

    k: int
    c: int
    pad: int  # dummy channels after the K*C real ones
    tail: int  # a member's channels in the kernel's remainder loop in a single run

    @classmethod
    def make(cls, k: int, c: int, simd: int | None) -> Channels:
        if simd is None:
            return cls(k, c, 0, 0)
        return cls(k, c, -(k * c) % simd, c % simd)

    @property
    def width(self) -> int:
        return self.k * self.c + self.pad

    def members_view(self, flat: torch.Tensor) -> torch.Tensor:
        """(b, K*C + pad) -> its (K, b, C) view (bmm takes it as it is, to the same bits)."""
        size, stride = (self.k, flat.shape[0], self.c), (self.c, self.width, 1)
        return flat.as_strided(size, stride, flat.storage_offset())

    def unflat(self, flat: torch.Tensor) -> torch.Tensor:
        """(b, K*C + pad) -> (K, b, C), contiguous."""
        return self.members_view(flat).contiguous()

    def members(self, vector: torch.Tensor) -> torch.Tensor:
        """(K*C + pad,) -> (K, C) view."""
        return vector[:self.k * self.c].view(self.k, self.c)

    def pack(self, stacked: torch.Tensor, fill: float) -> torch.Tensor:
        """(K, C) -> (K*C + pad,), the dummy channels set to `fill`."""
        return F.pad(stacked.reshape(-1), (0, self.pad), value=fill)

    def tails(self, t: torch.Tensor) -> torch.Tensor:
        """The remainder channels of every member: a (b, K*C + pad) tensor's (b, K, tail)
        view, or a (K*C + pad,) vector's (K, tail) view."""
        offset = t.storage_offset() + self.c - self.tail
        if t.ndim == 1:
            return t.as_strided((self.k, self.tail), (self.c, 1), offset)
        return t.as_strided((t.shape[0], self.k, self.tail), (self.width, self.c, 1), offset)


class Scratch:
    """One BatchNorm layer's batched tensors for one batch size, reused every step, and the
    views of them that a step reads and writes, made once (~7% off a step with 6 layers:
    the remainder fix's views and a layout copy per layer)."""

    def __init__(self, lay: Channels, b: int, device: torch.device) -> None:
        # BatchNorm's input, the gradient w.r.t. its output, and its input gradient; the
        # padding channels of the first two stay zero.
        self.x, self.grad, self.grad_input = (torch.zeros(b, lay.width, device=device)
                                              for _ in range(3))
        self.x_members, self.grad_members = lay.members_view(self.x), lay.members_view(self.grad)
        self.x_tails, self.grad_tails, self.grad_input_tails = (
            lay.tails(t) for t in (self.x, self.grad, self.grad_input))
        # The batch size as a 0-dim tensor: dividing by it is the same float division as by
        # a Python number, at half the dispatch cost.
        self.n = torch.tensor(float(b), device=device)


def batch_norm_backward(scratch: Scratch, mean: torch.Tensor, invstd: torch.Tensor,
                         layer: Layer) -> torch.Tensor:
    """Backward of train-mode BatchNorm in the batched layout, from scratch.grad at input
    scratch.x: weight and bias gradients into the layer's gradient views; returns the input
    gradient (scratch.grad_input)."""
    torch.ops.aten.native_batch_norm_backward.out(
        scratch.grad, scratch.x, layer.bn_weight, None, None, mean, invstd, True, layer.eps,
        [True, True, True], out0=scratch.grad_input, out1=layer.grad_bn_weight,
        out2=layer.grad_bn_bias)
    lay = layer.lay
    if not lay.tail:
        return scratch.grad_input
    # The remainder loop's arithmetic, one rounding per operation, on those channels only:
    # dx = (dy - sum/N - (x - mean) * (dotp*invstd)*invstd/N) * invstd * w, where the
    # kernel's weight gradient is exactly dotp*invstd and its bias gradient is sum.
    n = scratch.n
    weight_tail, grad_weight_tail, grad_bias_tail = layer.tail_views
    invstd = lay.tails(invstd)
    k = (grad_weight_tail * invstd).div_(n)
    dx = scratch.x_tails - lay.tails(mean)
    dx.mul_(k)
    remainder = scratch.grad_tails - grad_bias_tail / n
    remainder.sub_(dx).mul_(invstd)
    torch.mul(remainder, weight_tail, out=scratch.grad_input_tails)
    return scratch.grad_input


@functools.cache
def simd_width() -> int | None:
    """The float SIMD width W that makes batched BatchNorm match per-member calls bitwise
    (None: no remainder correction needed, or none found -- then members match their
    single runs to rounding only)."""
    gen = torch.Generator().manual_seed(0)
    for width in (None, 8, 16, 4, 32):
        if all(_batch_norm_matches(width, c, gen) for c in (60, 63)):
            return width
    return None


def _batch_norm_matches(width: int | None, c: int, gen: torch.Generator) -> bool:
    k, b, eps = 3, 5, 1e-5
    z, dy = torch.randn(2, k, b, c, generator=gen)
    weight, bias = torch.randn(2, k, c, generator=gen)
    lay = Channels.make(k, c, width)
    scratch, packed = Scratch(lay, b, torch.device("cpu")), lay.pack(weight, 1.0)
    scratch.x_members.copy_(z)
    scratch.grad_members.copy_(dy)
    out, mean, invstd = torch.native_batch_norm(
        scratch.x, packed, lay.pack(bias, 0.0), None, None, True, 0.1, eps)
    grad_weight, grad_bias = torch.empty(2, lay.width)
    layer = Layer(None, None, None, None, None, lay=lay, bn_weight=packed,
                   grad_bn_weight=grad_weight, grad_bn_bias=grad_bias, eps=eps)
    grad_input = batch_norm_backward(scratch, mean, invstd, layer)
    for j in range(k):
        out_j, mean_j, invstd_j = torch.native_batch_norm(
            z[j], weight[j], bias[j], None, None, True, 0.1, eps)
        grads_j = torch.ops.aten.native_batch_norm_backward(
            dy[j], z[j], weight[j], None, None, mean_j, invstd_j, True, eps, [True] * 3)
        if not (torch.equal(lay.unflat(out)[j], out_j)
                and torch.equal(lay.unflat(grad_input)[j], grads_j[0])
                and torch.equal(lay.members(grad_weight)[j], grads_j[1])
                and torch.equal(lay.members(grad_bias)[j], grads_j[2])):
            return False
    return True


# --- one layer of the stack ----------------------------------------------------------------
@dataclass
class Layer:
    """Views of one Linear (+ BatchNorm) of K members into the flat parameter, gradient
    and buffer vectors, made once per layout so that a step creates no views of its own."""

    weight_t: torch.Tensor  # (K, in, out): the weight transposed, as F.linear uses it
    weight: torch.Tensor  # (K, out, in)
    bias: torch.Tensor | None  # (K, 1, out)
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor | None  # (K, out)
    act: torch.nn.Module | None = None  # None: the head
    residual: bool = False
    lay: Channels | None = None  # BatchNorm (batched layout) or None
    bn_weight: torch.Tensor | None = None  # (K*C + pad,)
    bn_bias: torch.Tensor | None = None
    grad_bn_weight: torch.Tensor | None = None
    grad_bn_bias: torch.Tensor | None = None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    momentum: float = 0.1
    eps: float = 1e-5
    scratches: dict[int, Scratch] = field(default_factory=dict)  # batch size -> its Scratch

    @functools.cached_property
    def tail_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The BatchNorm weight, weight gradient and bias gradient of the remainder channels
        (see batch_norm_backward): fixed views, made once (a step makes ~40 views)."""
        tails = self.lay.tails
        return tails(self.bn_weight), tails(self.grad_bn_weight), tails(self.grad_bn_bias)

    def scratch(self, b: int) -> Scratch:
        """The BatchNorm layer's Scratch for batch size b."""
        if b not in self.scratches:
            self.scratches[b] = Scratch(self.lay, b, self.bn_weight.device)
        return self.scratches[b]

    def linear(self, h: torch.Tensor) -> torch.Tensor:
        """F.linear for K members: (K, b, in) -> (K, b, out)."""
        if self.bias is None:
            return torch.bmm(h, self.weight_t)
        return torch.baddbmm(self.bias, h, self.weight_t)
