"""The hand-written stack of K MLPs (the `mlp` family), trained as one on the CPU.

`ensemble.train_ensemble` drives it through the engine interface (training/engine.py).
Forward and backward are written out with the ATen kernels autograd runs for one run, so
members match their single runs (`train_run`) to the last bit, and a step costs far fewer
calls than autograd's graph (docs/performance.md, "Stack engines").

Limits of the bitwise match: the batched kernels can round differently from
the single run's for tiny matrices (e.g. a last batch of 5 through a 21 -> 10 layer) and
for tanh / gelu at some sizes (MKL and SIMD remainder code paths). Members then agree with
their twins to ~1e-7 per step, which chaotic small-batch training amplifies over many
epochs. ReLU MLPs with or without BatchNorm at the paper's sizes (widths 100, 500) match
bitwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rankbias.models.mlp import MLP
from rankbias.training.config import RunConfig
from rankbias.training.stack import ADAM_BETAS, ADAM_EPS, optimizer_state

# --- the batched MLP ------------------------------------------------------------------------
# By hand, not autograd: its per-node overhead is most of a small step, and each product is
# computed in the orientation nn.Linear's backward uses (the single runs' bits).


def _loss_and_grad(name: str, logits: torch.Tensor, y: torch.Tensor
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


def _linear_backward(grad: torch.Tensor, h: torch.Tensor, layer: _Layer,
                     need_input: bool) -> torch.Tensor | None:
    """Backward of `_Layer.linear`: weight and bias gradients into the layer's gradient
    views; returns the input gradient. The weight gradient is g^T h as nn.Linear's backward
    computes it; autograd's bmm rule computes (h^T g)^T, which MKL rounds differently for
    some shapes (a 10-class head)."""
    torch.bmm(grad.transpose(1, 2), h, out=layer.grad_weight)
    if layer.grad_bias is not None:
        torch.sum(grad, dim=1, out=layer.grad_bias)
    return torch.bmm(grad, layer.weight) if need_input else None


def _activation_backward(act: torch.nn.Module, grad: torch.Tensor, inp: torch.Tensor,
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
class _Channels:
    """Layout of one BatchNorm layer's K*C channels in the batched call."""

    k: int
    c: int
    pad: int  # dummy channels after the K*C real ones
    tail: int  # a member's channels in the kernel's remainder loop in a single run

    @classmethod
    def make(cls, k: int, c: int, simd: int | None) -> _Channels:
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


class _Scratch:
    """One BatchNorm layer's batched tensors for one batch size, reused every step, and the
    views of them that a step reads and writes, made once (~7% off a step with 6 layers:
    the remainder fix's views and a layout copy per layer)."""

    def __init__(self, lay: _Channels, b: int, device: torch.device) -> None:
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


def _batch_norm_backward(scratch: _Scratch, mean: torch.Tensor, invstd: torch.Tensor,
                         layer: _Layer) -> torch.Tensor:
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
def _simd_width() -> int | None:
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
    lay = _Channels.make(k, c, width)
    scratch, packed = _Scratch(lay, b, torch.device("cpu")), lay.pack(weight, 1.0)
    scratch.x_members.copy_(z)
    scratch.grad_members.copy_(dy)
    out, mean, invstd = torch.native_batch_norm(
        scratch.x, packed, lay.pack(bias, 0.0), None, None, True, 0.1, eps)
    grad_weight, grad_bias = torch.empty(2, lay.width)
    layer = _Layer(None, None, None, None, None, lay=lay, bn_weight=packed,
                   grad_bn_weight=grad_weight, grad_bn_bias=grad_bias, eps=eps)
    grad_input = _batch_norm_backward(scratch, mean, invstd, layer)
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


# --- the stack ------------------------------------------------------------------------------
@dataclass
class _Layer:
    """Views of one Linear (+ BatchNorm) of K members into the flat parameter, gradient
    and buffer vectors, made once per layout so that a step creates no views of its own."""

    weight_t: torch.Tensor  # (K, in, out): the weight transposed, as F.linear uses it
    weight: torch.Tensor  # (K, out, in)
    bias: torch.Tensor | None  # (K, 1, out)
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor | None  # (K, out)
    act: torch.nn.Module | None = None  # None: the head
    residual: bool = False
    lay: _Channels | None = None  # BatchNorm (batched layout) or None
    bn_weight: torch.Tensor | None = None  # (K*C + pad,)
    bn_bias: torch.Tensor | None = None
    grad_bn_weight: torch.Tensor | None = None
    grad_bn_bias: torch.Tensor | None = None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    momentum: float = 0.1
    eps: float = 1e-5
    scratches: dict[int, _Scratch] = field(default_factory=dict)  # batch size -> its _Scratch

    @functools.cached_property
    def tail_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The BatchNorm weight, weight gradient and bias gradient of the remainder channels
        (see _batch_norm_backward): fixed views, made once (a step makes ~40 views)."""
        tails = self.lay.tails
        return tails(self.bn_weight), tails(self.grad_bn_weight), tails(self.grad_bn_bias)

    def scratch(self, b: int) -> _Scratch:
        """The BatchNorm layer's _Scratch for batch size b."""
        if b not in self.scratches:
            self.scratches[b] = _Scratch(self.lay, b, self.bn_weight.device)
        return self.scratches[b]

    def linear(self, h: torch.Tensor) -> torch.Tensor:
        """F.linear for K members: (K, b, in) -> (K, b, out)."""
        if self.bias is None:
            return torch.bmm(h, self.weight_t)
        return torch.baddbmm(self.bias, h, self.weight_t)


class MLPStack:
    """K MLPs of one architecture, trained as one with SGD, Adam or AdamW.

    Every parameter of every member lives in one flat vector `theta` (each tensor a
    contiguous (K, ...) block of it; BatchNorm ones in the batched layout), gradients in
    `grad` and the optimizer's state (`slots`: momentum buffers, or Adam's two moments) with
    the same layout: the weight matrices first, then all vectors (biases, BatchNorm). A step
    (`step`) updates each weight matrix as soon as the backward pass has its gradient, while
    the two are still in cache, and all vectors at the end. No autograd: train it in
    torch.inference_mode (no autograd bookkeeping).
    """

    autograd = False  # what the training loop must enable (ModelStack: True)

    def __init__(self, models: list[MLP], configs: list[RunConfig], device: torch.device,
                 optimizers: list[torch.optim.Optimizer] | None = None) -> None:
        self.template = models[0]
        self.shapes = {n: p.shape for n, p in self.template.named_parameters()}
        states = [m.state_dict() for m in models]
        self.state_names = [n for n in states[0] if not n.endswith("num_batches_tracked")]
        self.device = device
        self.loss = configs[0].loss
        self.optimizer = configs[0].optimizer
        self.adam = self.optimizer in ("adam", "adamw")
        # Adam's bias corrections are host numbers that change every step: not graphable.
        self.graphable = not self.adam  # SGD: set_lr writes in place, a replay sees it
        self.momentum = configs[0].momentum
        self.decay_vectors = configs[0].wd_scope == "all"
        # The members' rates as Python floats too: torch.optim computes Adam's step size and
        # AdamW's factor from them in double precision, and so must the stack.
        self.lr_host = [c.lr for c in configs]
        self.wd_host = [c.weight_decay for c in configs]
        self.weight_decay = torch.tensor(self.wd_host, device=device)
        self.lr = torch.tensor(self.lr_host, device=device)
        member_states = [optimizer_state(o, m) for o, m in
                         zip(optimizers or [None] * len(models), models)]
        if len({(tuple(slots), steps) for slots, steps in member_states}) > 1:
            raise ValueError("either every member or none has optimizer state, at one step")
        self.steps = member_states[0][1]  # Adam's step count (its bias corrections)
        slots = {slot: {n: torch.stack([s[slot][n] for s, _ in member_states]).to(device)
                        for n in self.shapes} for slot in member_states[0][0]}
        self._build({n: torch.stack([s[n] for s in states]).to(device)
                     for n in self.state_names}, slots)

    # --- layout -------------------------------------------------------------------------
    def _build(self, stacked: dict[str, torch.Tensor], slots: dict[str, dict]) -> None:
        """Lay out (K, ...) tensors for training; `self.named` maps every state_dict name
        (but num_batches_tracked) to a (K, ...) view of where that tensor now lives."""
        self.k = next(iter(stacked.values())).shape[0]
        simd = _simd_width() if self.device.type == "cpu" else None  # CPU kernel's remainder
        self.lays: dict[str, _Channels] = {}  # BN name (weight, bias, running stats) -> layout
        for i, block in enumerate(self.template.blocks):
            if isinstance(block.bn, torch.nn.BatchNorm1d):
                lay = _Channels.make(self.k, block.bn.num_features, simd)
                self.lays.update({f"blocks.{i}.bn.{key}": lay for key in
                                  ("weight", "bias", "running_mean", "running_var")})
        # Matrices first, then every vector (biases, BatchNorm): the update steps each
        # matrix as a (K, n) block with each member's lr and weight decay a (K, 1) column,
        # and all vectors as one block with per-element lr and weight decay (one op instead
        # of ~20 tiny ones; per-element vectors would stream too much for the matrices).
        # Matrix i is layer i's (the head last).
        self.order = sorted(self.shapes, key=lambda n: len(self.shapes[n]) < 2)
        self.vector_names = [n for n in self.order if len(self.shapes[n]) < 2]
        self.theta = self._pack(stacked, fill=1.0)
        self.grad = torch.zeros_like(self.theta)
        self._set_slots({slot: self._pack(values, fill=0.0) for slot, values in slots.items()})
        buffers = {n: self.lays[n].pack(stacked[n], 0.0 if n.endswith("mean") else 1.0)
                   for n in self.state_names if n not in self.shapes}
        params, grads = self._views(self.theta), self._views(self.grad)
        self.named = {n: self._members(n, t) for n, t in {**params, **buffers}.items()}
        self.layers = [self._layer(f"blocks.{i}.", params, grads, buffers, block)
                       for i, block in enumerate(self.template.blocks)]
        self.head = self._layer("", params, grads, buffers, None)
        self.param_blocks, self.grad_blocks = self._blocks(self.theta), self._blocks(self.grad)
        self.decays = self._per_block(self.weight_decay)  # None: that block is not decayed
        if self.vector_names and not self.decay_vectors:
            self.decays[-1] = None
        if not bool((self.weight_decay != 0).any()):
            self.decays = [None] * len(self.decays)
        # The step reads these tensors; set_lr (and Adam's step) only ever write into them.
        self.neg_lr = -self.lr
        self.neg_lrs = self._per_block(self.neg_lr)
        if self.adam:
            self.neg_step_size = torch.zeros_like(self.lr)  # -lr / (1 - beta1^t)
            self.neg_step_sizes = self._per_block(self.neg_step_size)
            self.adamw_factor = torch.ones_like(self.lr)  # 1 - lr * wd
            self.adamw_factors = self._per_block(self.adamw_factor, fill=1.0)
            self._set_adamw_factor()
            # The update's two temporaries (its denominator and step), reused every step.
            self.adam_scratch = [self._blocks(torch.empty_like(self.grad)) for _ in range(2)]

    def _set_slots(self, slots: dict[str, torch.Tensor]) -> None:
        """The optimizer's state, flat vectors in theta's layout, and their update blocks."""
        self.slots = slots
        self.slot_blocks = {slot: self._blocks(t) for slot, t in slots.items()}

    def _blocks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The update's blocks of a flat vector: each matrix's (K, n) rows, then the vector
        region (1-D), if there are vectors."""
        views = self._views(flat)
        matrices = [views[n].reshape(self.k, -1) for n in self.order if n not in
                    self.vector_names]
        vectors = [flat[sum(m.numel() for m in matrices):]] if self.vector_names else []
        return matrices + vectors

    def _per_block(self, values: torch.Tensor, fill: float = 0.0) -> list[torch.Tensor]:
        """A per-member value (K,) for each update block (_blocks): a (K, 1) column for
        each matrix's rows, one value per element for the vector region."""
        columns = [values.view(-1, 1)] * (len(self.order) - len(self.vector_names))
        return columns + ([self._per_element(values, fill)] if self.vector_names else [])

    def _per_element(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A per-member value (K,) for every element of the vector region (`fill` in
        BatchNorm padding: 0 for rates, so those elements never move)."""
        return self._pack({n: values.view(-1, 1).expand(self.k, self.shapes[n].numel())
                           for n in self.vector_names}, fill=fill, names=self.vector_names)

    def _layer(self, prefix: str, params: dict, grads: dict, buffers: dict,
               block: torch.nn.Module | None) -> _Layer:
        fc = prefix + "fc." if block is not None else "head."
        bias = params.get(fc + "bias")
        layer = _Layer(weight_t=params[fc + "weight"].transpose(1, 2),
                       weight=params[fc + "weight"],
                       bias=None if bias is None else bias.unsqueeze(1),
                       grad_weight=grads[fc + "weight"], grad_bias=grads.get(fc + "bias"))
        if block is None:
            return layer
        layer.act, layer.residual = block.act, block.residual
        bn = prefix + "bn."
        if bn + "weight" in self.lays:
            layer.lay = self.lays[bn + "weight"]
            layer.bn_weight, layer.bn_bias = params[bn + "weight"], params[bn + "bias"]
            layer.grad_bn_weight, layer.grad_bn_bias = grads[bn + "weight"], grads[bn + "bias"]
            layer.running_mean = buffers[bn + "running_mean"]
            layer.running_var = buffers[bn + "running_var"]
            layer.momentum, layer.eps = block.bn.momentum, block.bn.eps
        return layer

    def _pack(self, values: dict[str, torch.Tensor], fill: float,
              names: list[str] | None = None) -> torch.Tensor:
        """The parameters' (K, ...) tensors as one flat vector in self.order (or `names`),
        BN ones in the batched layout, padding set to `fill`."""
        return torch.cat([self.lays[n].pack(values[n], fill) if n in self.lays
                          else values[n].reshape(-1) for n in names or self.order])

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per parameter: its block of a flat vector, (K, ...) (BN: (K*C + pad,))."""
        sizes = [self.lays[n].width if n in self.lays else self.k * self.shapes[n].numel()
                 for n in self.order]
        return {n: c if n in self.lays else c.view(self.k, *self.shapes[n])
                for n, c in zip(self.order, flat.split(sizes))}

    def _members(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """(K, ...) view of a parameter's or buffer's block (BN: without the padding)."""
        return self.lays[name].members(tensor) if name in self.lays else tensor

    def set_lr(self, lrs: list[float]) -> None:
        """Each member's learning rate from now on, written in place into the tensors the
        step reads (the matrices' (K, 1) columns are views of neg_lr)."""
        self.lr_host = list(lrs)
        self.lr.copy_(torch.tensor(lrs, dtype=self.lr.dtype))
        torch.neg(self.lr, out=self.neg_lr)
        if self.vector_names:
            self.neg_lrs[-1].copy_(self._per_element(self.neg_lr))
        if self.adam:
            self._set_adamw_factor()

    def _set_member_values(self, values: torch.Tensor, blocks: list[torch.Tensor],
                           numbers: list[float], fill: float) -> None:
        """Write per-member numbers into `values` (K,) and its per-element vector block."""
        values.copy_(torch.tensor(numbers, dtype=values.dtype))
        if self.vector_names:
            blocks[-1].copy_(self._per_element(values, fill))

    def _set_adamw_factor(self) -> None:
        # torch.optim.AdamW: p *= 1 - lr*wd, the factor a double rounded to float32 once.
        self._set_member_values(self.adamw_factor, self.adamw_factors,
                                [1 - lr * wd for lr, wd in zip(self.lr_host, self.wd_host)],
                                fill=1.0)
    def keep(self, members: list[int]) -> None:
        """Keep only these stack positions (members that diverged or stopped leave)."""
        index = torch.tensor(members, dtype=torch.int64, device=self.device)
        self.weight_decay, self.lr = self.weight_decay[index], self.lr[index]
        self.lr_host = [self.lr_host[j] for j in members]
        self.wd_host = [self.wd_host[j] for j in members]
        slots = {slot: {n: self._members(n, t)[index] for n, t in self._views(flat).items()}
                 for slot, flat in self.slots.items()}
        self._build({n: self.named[n][index] for n in self.state_names}, slots)

    @torch.no_grad()
    def load_into(self, position: int, model: MLP, steps: int,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy member `position` into an ordinary model (for tracking, evaluation and
        checkpoints); with `optimizer` (the member's torch.optim optimizer over `model`),
        also its state (momentum buffers; Adam's moments and step count), so a checkpoint of
        the two resumes as a single run's would."""
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(steps)  # one train-mode forward per step, as in train_run
            else:
                tensor.copy_(self.named[name][position])
        if optimizer is None:
            return
        views = {slot: self._views(flat) for slot, flat in self.slots.items()}
        for name, p in model.named_parameters():
            for slot, view in views.items():
                optimizer.state[p][slot] = self._members(name, view[name])[position].clone()
            if self.adam and self.slots:
                optimizer.state[p]["step"] = torch.tensor(float(self.steps))

    def adam_shrink(self) -> list[float]:
        """Per member, the typical shrink of one step of Adam with L2 decay: the median over
        the entries of its weight matrices of lr * wd / (sqrt(v_hat) + eps), from the state
        now, with the arithmetic of training/budget.adam_shrink (a single run's)."""
        squares = self.slot_blocks.get("exp_avg_sq")
        if not squares:
            return [0.0] * self.k
        matrices = squares[:len(self.order) - len(self.vector_names)]
        correction = 1 - ADAM_BETAS[1] ** float(self.steps)
        shrinks = []
        for j, (lr, wd) in enumerate(zip(self.lr_host, self.wd_host)):
            entries = [(lr * wd / ((square[j] / correction).sqrt() + ADAM_EPS)).double()
                       for square in matrices]
            shrinks.append(float(torch.cat(entries).median()) if wd else 0.0)
        return shrinks

    # --- one step -------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every member on a batch x (K, b, *input_shape), y (K, b);
        returns the per-member losses (K,). BatchNorm in train mode (running statistics
        updated)."""
        first = not self.slots and (self.adam or bool(self.momentum))
        if first:  # torch.optim's state is made at its first step (SGD: buf = d, a copy)
            names = ("exp_avg", "exp_avg_sq") if self.adam else ("momentum_buffer",)
            self._set_slots({name: torch.zeros_like(self.grad) for name in names})
        if self.adam:
            self._next_adam_step()
        saved = []
        h = x.flatten(2)
        for layer in self.layers:
            z = layer.linear(h)
            if layer.lay is None:
                a = layer.act(z)
                saved.append((h, z, a, None))
            else:
                scratch = layer.scratch(z.shape[1])
                scratch.x_members.copy_(z)
                normed, mean, invstd = torch.native_batch_norm(
                    scratch.x, layer.bn_weight, layer.bn_bias, layer.running_mean,
                    layer.running_var, True, layer.momentum, layer.eps)
                act = layer.act(normed)
                saved.append((h, normed, act, (scratch, mean, invstd)))
                a = layer.lay.members_view(act)  # the next layer's bmm reads it in place
            h = h + a if layer.residual else a
        losses, grad = _loss_and_grad(self.loss, self.head.linear(h), y)

        grad_h = _linear_backward(grad, h, self.head, need_input=bool(self.layers))
        self._update(len(self.layers), first)
        for i in reversed(range(len(self.layers))):
            layer, (h_in, inp, out, bn) = self.layers[i], saved[i]
            if layer.lay is None:
                grad_z = _activation_backward(layer.act, grad_h, inp, out)
            else:
                scratch, mean, invstd = bn
                scratch.grad_members.copy_(grad_h)
                _activation_backward(layer.act, scratch.grad, inp, out, into=scratch.grad)
                grad_z = layer.lay.unflat(_batch_norm_backward(scratch, mean, invstd, layer))
            grad_in = _linear_backward(grad_z, h_in, layer, need_input=i > 0)
            self._update(i, first)
            if layer.residual and i > 0:
                grad_in = grad_in + grad_h
            grad_h = grad_in
        if self.vector_names:
            self._update(-1, first)
        return losses

    def _update(self, block: int, first: bool) -> None:
        """torch.optim.SGD's update of one block (_blocks: a layer's weight matrix, or all
        vectors) for every member: d = g + wd*p; buf = m*buf + d; p -= lr*d, each element
        with its own member's lr and weight decay."""
        if self.adam:
            self._adam_update(block)
            return
        param, grad, decay = self.param_blocks[block], self.grad_blocks[block], self.decays[block]
        if decay is not None:
            grad.addcmul_(param, decay)
        step = grad
        if self.momentum:
            buf = self.slot_blocks["momentum_buffer"][block]
            step = buf.copy_(grad) if first else buf.mul_(self.momentum).add_(grad)
        param.addcmul_(step, self.neg_lrs[block])

    def _next_adam_step(self) -> None:
        """Adam's step count and the host numbers torch.optim derives from it: the step size
        lr / (1 - beta1^t) per member (a double, rounded to float32 once, as torch.optim's
        scalar argument is) and sqrt(1 - beta2^t)."""
        self.steps += 1
        beta1, beta2 = ADAM_BETAS
        correction = 1 - beta1 ** float(self.steps)
        self._set_member_values(self.neg_step_size, self.neg_step_sizes,
                                [-(lr / correction) for lr in self.lr_host], fill=0.0)
        self.bias_correction2_sqrt = (1 - beta2 ** float(self.steps)) ** 0.5

    def _adam_update(self, block: int) -> None:
        """torch.optim.Adam's (L2: d = g + wd*p) or AdamW's (p *= 1 - lr*wd) update of one
        block for every member, with the operations of its single-tensor step (the CPU
        default), so each member's bits are its single run's: m = lerp(m, d, 1 - b1);
        v = b2*v + (1 - b2)*d^2; p += (-lr/(1 - b1^t) * m) / (sqrt(v)/sqrt(1 - b2^t) + eps).
        The last is addcdiv with the member's step size folded into m first: addcdiv's
        value is one number, and s*m/d rounds as addcdiv(value=s) does."""
        param, grad, decay = self.param_blocks[block], self.grad_blocks[block], self.decays[block]
        if decay is not None:
            if self.optimizer == "adamw":
                param.mul_(self.adamw_factors[block])
            else:
                grad.addcmul_(param, decay)
        beta1, beta2 = ADAM_BETAS
        mean, square = self.slot_blocks["exp_avg"][block], self.slot_blocks["exp_avg_sq"][block]
        mean.lerp_(grad, 1 - beta1)
        square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom, step = self.adam_scratch[0][block], self.adam_scratch[1][block]
        torch.sqrt(square, out=denom).div_(self.bias_correction2_sqrt).add_(ADAM_EPS)
        param.addcdiv_(torch.mul(mean, self.neg_step_sizes[block], out=step), denom)
