"""K models of one architecture trained as one batched computation: any model, CPU or CUDA.

    from rankbias.training.stack import ModelStack
    stack = ModelStack(models, configs, device)     # K nn.Modules of one architecture
    stack.set_lr([cfg.lr_at(epoch) for cfg in configs])
    losses = stack.step(x, y)                       # x (K, b, *input_shape), y (K, b) -> (K,)
                                                    # (each member's own lr and weight decay)
    stack.load_into(j, model, steps, optimizer)     # member j -> an nn.Module (+ optimizer state)

rankbias.training.ensemble drives it (see there); this module knows nothing of training runs.

How. The members' parameters and buffers are stacked along a new first dimension (the
layout of torch.func.stack_module_state). `vmap(functional_call(template))` runs the
forward of all members at once: convolutions become grouped convolutions (on CPU the
ConvNet's are one bmm each instead, training/conv_stack.py), linear layers batched
matmuls, and train-mode BatchNorm normalizes each member's channels with that
member's batch statistics and updates its running mean / unbiased running variance and
num_batches_tracked in place (the buffers are inputs of the vmapped call, so each update
lands in the member's own slice). Ordinary autograd on the sum of the members' losses
then gives every member its own gradient: members share no element of any tensor, so
d(sum)/d(theta_k) = d(loss_k)/d(theta_k), and a member whose loss is NaN/Inf poisons only
its own slices. On one CPU core this is faster than `vmap(grad_and_value(...))`: one
backward pass of plain kernels instead of a functorch transform per op
(docs/performance.md, "Stack engines"). Gradients accumulate into tensors allocated once,
so a step touches the same memory every time (a CUDA graph can replay it).

The update is the member's optimizer's (train.make_optimizer), with weight decay on every
parameter or only on the matrices (>= 2-D per member) when wd_scope is "weights":
- SGD: d = g + wd*p; buf = d at the first step, then buf = m*buf + d; p -= lr*d (or lr*buf);
- Adam (wd as L2 in the gradient) and AdamW (p scaled by 1 - lr*wd first), torch's
  defaults: moments m, v; p -= lr/(1 - b1^t) * m / (sqrt(v/(1 - b2^t)) + eps). The bias
  corrections are host numbers that change every step, so Adam stacks are not graphed.
lr and wd are (K,) tensors on the device (set_lr changes them in place), and each stage is
one torch._foreach_* call over all parameters.

How close members stay to their single runs (train_run with the same config and seed):
the vmapped kernels round differently from one model's, so a member differs from its twin
by ~1e-7 relative per step, which chaotic runs amplify as they amplify any perturbation
(another CPU's kernels). docs/performance.md, "Stack engines", has the measured drift per
model family; tests/test_ensemble.py measures it against a perturbed twin of the single
run. The hand-written MLP stack (training/mlp_stack.py) is bitwise equal on CPU.

Randomness: vmap runs with randomness="error". No registered model draws random numbers
in train mode (no dropout; nn.MultiheadAttention's dropout is 0), so this never fires; a
model with dropout would raise here. vmap(randomness="different") would run, but its
masks are not the ones the single runs draw from their own generators, so members could
not follow their twins: such a model must train alone.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from rankbias.training.conv_stack import stacked_forward
from rankbias.training.steps import has_conv2d

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults (train.make_optimizer)


def member_losses(loss: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K, b, classes) logits, (K, b) labels -> each member's mean loss (K,), the losses
    of train.loss_function ("ce": cross-entropy; "mse": squared error on one-hot targets
    summed over classes)."""
    k, b, c = logits.shape
    if loss == "mse":
        target = F.one_hot(y, c).to(logits.dtype)
        return ((logits - target) ** 2).sum(dim=2).mean(dim=1)
    return F.cross_entropy(logits.reshape(k * b, c), y.reshape(-1), reduction="none"
                           ).view(k, b).mean(dim=1)


def optimizer_state(optimizer: torch.optim.Optimizer | None, model: nn.Module
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """The per-parameter state of a torch.optim SGD, Adam or AdamW over `model`, as
    {slot: {parameter name: tensor}} (SGD: "momentum_buffer"; Adam: "exp_avg",
    "exp_avg_sq"), and Adam's step count. ({}, 0) before the first step, and for SGD
    without momentum."""
    if optimizer is None:
        return {}, 0
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if owned != {id(p) for p in model.parameters()}:
        raise ValueError("an optimizer is not over its model's parameters")
    states = {name: optimizer.state.get(p, {}) for name, p in model.named_parameters()}
    slots = sorted({key for state in states.values() for key in state if key != "step"})
    if any(sorted(set(state) - {"step"}) != slots for state in states.values()):
        raise ValueError("an optimizer has state for only some parameters")
    steps = {int(state["step"]) for state in states.values() if "step" in state}
    if len(steps) > 1:
        raise ValueError("an optimizer's parameters are at different step counts")
    return ({slot: {name: state[slot] for name, state in states.items()} for slot in slots},
            steps.pop() if steps else 0)


class ModelStack:
    """K members of one architecture as stacked tensors; see the module docstring.

    `configs` give each member's lr and weight_decay and the shared optimizer, loss,
    momentum and wd_scope. `optimizers` (optional, one per member): the members' torch.optim
    SGD / Adam / AdamW, whose state (momentum buffers; Adam's moments and step count) the
    stack continues from (a resumed run); all or none must have state, at one step count.
    """

    autograd = True  # forward_backward needs autograd (not inference_mode)

    def __init__(self, models: list[nn.Module], configs: list, device: torch.device,
                 optimizers: list[torch.optim.Optimizer] | None = None) -> None:
        self.device = device
        self.loss = configs[0].loss
        self.optimizer = configs[0].optimizer
        self.momentum = configs[0].momentum
        # Adam's bias corrections change every step as host numbers: no CUDA graph for it.
        self.graphable = self.optimizer == "sgd"
        self.template = copy.deepcopy(models[0]).to("meta").train()
        # On CPU the ConvNet runs its convs as batched matrix products (conv_stack.py);
        # other 2-D conv nets get their batch in the layout whose grouped view is
        # channels_last (members_channels_last); on CUDA neither is measured yet.
        self.stacked_forward = stacked_forward(self.template) if device.type == "cpu" else None
        self.channels_last = (device.type == "cpu" and has_conv2d(models[0])
                              and self.stacked_forward is None)
        names = [n for n, _ in models[0].named_parameters()]
        # Weight decay on all parameters, or on the matrices only (train.make_optimizer).
        self.decays = {n: configs[0].wd_scope == "all" or p.ndim >= 2
                       for n, p in models[0].named_parameters()}
        with torch.no_grad():
            member_params = [dict(m.named_parameters()) for m in models]
            member_buffers = [dict(m.named_buffers()) for m in models]
            params = {n: torch.stack([p[n] for p in member_params]) for n in names}
            buffers = {n: torch.stack([b[n] for b in member_buffers]) for n in member_buffers[0]}
        states = [optimizer_state(o, m) for o, m in zip(optimizers or [None] * len(models),
                                                         models)]
        if len({(tuple(slots), steps) for slots, steps in states}) > 1:
            raise ValueError("either every member or none has optimizer state, at one step")
        slots = {slot: {n: torch.stack([s[slot][n] for s, _ in states]) for n in names}
                 for slot in states[0][0]}
        self._build(params, buffers, slots, states[0][1],
                    lr=[c.lr for c in configs], weight_decay=[c.weight_decay for c in configs])

    def _build(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
               slots: dict[str, dict[str, torch.Tensor]], steps: int,
               lr: list[float] | torch.Tensor, weight_decay: list[float] | torch.Tensor) -> None:
        device = self.device
        self.k = next(iter(params.values())).shape[0]
        self.params = {n: p.detach().to(device).contiguous().requires_grad_()
                       for n, p in params.items()}
        self.buffers = {n: b.to(device).contiguous() for n, b in buffers.items()}
        self.param_list = list(self.params.values())
        self.grads = [torch.zeros_like(p) for p in self.param_list]
        for p, g in zip(self.param_list, self.grads):
            p.grad = g  # autograd adds into these: the same memory every step
        # The optimizer's state, in param_list order: {slot: [tensor per parameter]}.
        self.slots = {slot: [t[n].to(device).contiguous().clone() for n in self.params]
                      for slot, t in slots.items()}
        self.steps = steps  # Adam's step count (the bias corrections)
        dtype = self.param_list[0].dtype  # lr and wd in the parameters' precision
        self.neg_lr = -torch.as_tensor(lr, dtype=dtype).to(device)
        self.weight_decay = torch.as_tensor(weight_decay, dtype=dtype).to(device)
        # (K, 1, ..., 1) views that broadcast over each parameter's elements.
        shape = {n: (self.k,) + (1,) * (p.ndim - 1) for n, p in self.params.items()}
        self.neg_lr_views = [self.neg_lr.view(shape[n]) for n in self.params]
        decayed = [n for n in self.params if self.decays[n]]
        self.decayed_params = [self.params[n] for n in decayed]
        self.decayed_grads = [p.grad for p in self.decayed_params]
        self.decay_views = [self.weight_decay.view(shape[n]) for n in decayed]
        self.adamw_factor = torch.ones_like(self.neg_lr)  # AdamW: 1 - lr*wd, set each step
        self.adamw_factor_views = [self.adamw_factor.view(shape[n]) for n in decayed]
        self.any_decay = bool((self.weight_decay != 0).any()) and bool(decayed)
        self._forward = self.stacked_forward or vmap(self._member_logits, randomness="error")

    def _member_logits(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def set_lr(self, lrs: list[float]) -> None:
        """Each member's learning rate from now on (in place: a captured graph sees it)."""
        self.neg_lr.copy_(torch.tensor(lrs, dtype=self.neg_lr.dtype).neg_())

    def keep(self, positions: list[int]) -> None:
        """Keep only these stack positions (members that diverged or stopped leave)."""
        index = torch.tensor(positions, dtype=torch.int64, device=self.device)
        with torch.no_grad():
            params = {n: p[index] for n, p in self.params.items()}
            slots = {slot: {n: t[index] for n, t in zip(self.params, tensors)}
                     for slot, tensors in self.slots.items()}
            self._build(params, {n: b[index] for n, b in self.buffers.items()}, slots,
                        self.steps, lr=-self.neg_lr[index],
                        weight_decay=self.weight_decay[index])

    @torch.no_grad()
    def load_into(self, position: int, model: nn.Module, steps: int,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy member `position` into an ordinary model of the same architecture (for
        tracking, evaluation and checkpoints). With `optimizer` (the member's torch.optim
        optimizer over `model`'s parameters), also set its state (momentum buffers; Adam's
        moments and step), so that a checkpoint written from the model and optimizer
        resumes as a single run's would. `steps` is unused: the stacked num_batches_tracked
        buffers already count each member's steps."""
        del steps
        for name, tensor in model.named_parameters():
            tensor.copy_(self.params[name][position])
        for name, tensor in model.named_buffers():
            tensor.copy_(self.buffers[name][position])
        if optimizer is None:
            return
        for i, p in enumerate(model.parameters()):
            state = optimizer.state[p]
            for slot, tensors in self.slots.items():
                state[slot] = tensors[i][position].clone()
            if self.optimizer != "sgd" and self.slots:
                state["step"] = torch.tensor(float(self.steps))

    def adam_shrink(self) -> list[float]:
        """Per member, the typical shrink of one step of Adam with L2 decay: the median over
        the entries of its decayed matrices of lr * wd / (sqrt(v_hat) + eps), from the state
        now (training/budget.adam_shrink measures a single run the same way; why the
        median is said there)."""
        squares = self.slots.get("exp_avg_sq")
        rate = (-self.neg_lr * self.weight_decay).double().cpu()
        parts = []
        for name, square in zip(self.params, squares or []):
            if self.decays[name] and square.ndim >= 3:  # a matrix of each member
                v_hat = square.double().cpu() / (1 - ADAM_BETAS[1] ** self.steps)
                parts.append((rate.view(-1, *[1] * (square.ndim - 1)) / (v_hat.sqrt() + ADAM_EPS)
                              ).flatten(1))
        if not parts:
            return [0.0] * self.k
        return torch.cat(parts, dim=1).median(dim=1).values.tolist()

    # --- one step -----------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every member on a batch x (K, b, *input_shape), y (K, b);
        returns the per-member losses (K,)."""
        losses = self.forward_backward(x, y)
        self.update()
        return losses

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-member losses (K,) on a batch x (K, b, *input_shape), y (K, b); gradients
        kept inside. BatchNorm in train mode (running statistics updated)."""
        torch._foreach_zero_(self.grads)
        if self.channels_last:
            x = members_channels_last(x)
        with torch.enable_grad(), _attention_kernels(self.device):
            logits = self._forward(self.params, self.buffers, x)
            losses = member_losses(self.loss, logits, y)
            losses.sum().backward()
        return losses.detach()

    @torch.no_grad()
    def update(self) -> None:
        """Every member's optimizer step, with its own lr and weight decay."""
        if self.optimizer == "sgd":
            self._sgd_update()
        else:
            self._adam_update()

    def _sgd_update(self) -> None:
        """torch.optim.SGD: d = g + wd*p; buf = m*buf + d; p -= lr*d (or lr*buf)."""
        if self.any_decay:
            torch._foreach_addcmul_(self.decayed_grads, self.decayed_params, self.decay_views)
        step = self.grads
        if self.momentum:
            if not self.slots:
                self.slots = {"momentum_buffer": [g.clone() for g in self.grads]}
            else:
                torch._foreach_mul_(self.slots["momentum_buffer"], self.momentum)
                torch._foreach_add_(self.slots["momentum_buffer"], self.grads)
            step = self.slots["momentum_buffer"]
        torch._foreach_addcmul_(self.param_list, step, self.neg_lr_views)

    def _adam_update(self) -> None:
        """torch.optim.Adam / AdamW with their defaults (betas 0.9, 0.999; eps 1e-8):
        Adam adds wd*p to the gradient (L2), AdamW first scales p by 1 - lr*wd (decoupled);
        m = lerp(m, g, 1 - b1); v = b2*v + (1 - b2)*g^2; p -= lr/(1 - b1^t) * m /
        (sqrt(v)/sqrt(1 - b2^t) + eps)."""
        beta1, beta2 = ADAM_BETAS
        if not self.slots:
            self.slots = {"exp_avg": [torch.zeros_like(p) for p in self.param_list],
                          "exp_avg_sq": [torch.zeros_like(p) for p in self.param_list]}
        self.steps += 1
        if self.any_decay and self.optimizer == "adamw":
            self.adamw_factor.fill_(1.0).addcmul_(self.neg_lr, self.weight_decay)
            torch._foreach_mul_(self.decayed_params, self.adamw_factor_views)
        elif self.any_decay:
            torch._foreach_addcmul_(self.decayed_grads, self.decayed_params, self.decay_views)
        mean, square = self.slots["exp_avg"], self.slots["exp_avg_sq"]
        torch._foreach_lerp_(mean, self.grads, 1 - beta1)
        torch._foreach_mul_(square, beta2)
        torch._foreach_addcmul_(square, self.grads, self.grads, value=1 - beta2)
        denom = torch._foreach_sqrt(square)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** self.steps))
        torch._foreach_add_(denom, ADAM_EPS)
        step = torch._foreach_div(mean, denom)
        torch._foreach_div_(step, 1 - beta1 ** self.steps)
        torch._foreach_addcmul_(self.param_list, step, self.neg_lr_views)


def members_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A stack's image batch (K, b, C, H, W), laid out in memory as (b, H, W, K, C).

    vmap runs a member's conv as one grouped conv over (b, K*C, H, W): from this layout
    that view is channels_last with no copy, so oneDNN's convs and BatchNorm's channels-last
    kernels take it, and every later activation stays channels_last. From the default layout
    BatchNorm over K*C channels of a few pixels each runs 3-8x slower than channels-last
    (docs/performance.md, "Small runs are bound by per-step overhead").
    """
    return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)


def _attention_kernels(device: torch.device):
    """On CPU, scaled_dot_product_attention's fused kernel has no vmap rule (functorch
    would loop over the members, with a warning); its math version batches."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)
