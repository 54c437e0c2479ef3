"""K models of one architecture trained as one batched computation: any model, CPU or CUDA.

    from rankbias.stack import ModelStack
    stack = ModelStack(models, configs, device)     # K nn.Modules of one architecture
    stack.set_lr([cfg.lr_at(epoch) for cfg in configs])
    losses = stack.forward_backward(x, y)           # x (K, b, *input_shape), y (K, b) -> (K,)
    stack.sgd_step()                                # each member's own lr and weight decay
    stack.load_into(j, model, steps, optimizer)     # member j -> an nn.Module (+ its SGD state)

rankbias.ensemble drives it (see there); this module knows nothing of training runs.

How. The members' parameters and buffers are stacked along a new first dimension (the
layout of torch.func.stack_module_state). `vmap(functional_call(template))` runs the
forward of all members at once: convolutions become grouped convolutions, linear layers
batched matmuls, and train-mode BatchNorm normalizes each member's channels with that
member's batch statistics and updates its running mean / unbiased running variance and
num_batches_tracked in place (the buffers are inputs of the vmapped call, so each update
lands in the member's own slice). Ordinary autograd on the sum of the members' losses
then gives every member its own gradient: members share no element of any tensor, so
d(sum)/d(theta_k) = d(loss_k)/d(theta_k), and a member whose loss is NaN/Inf poisons only
its own slices. On one CPU core this is faster than `vmap(grad_and_value(...))` (ConvNet
width 32, K = 8, B = 8: 4.5 ms against 5.4 ms a step): one backward pass of plain kernels
instead of a functorch transform per op. Gradients accumulate into tensors allocated once,
so a step touches the same memory every time (a CUDA graph can replay it).

The update is torch.optim.SGD's, per member: d = g + wd*p (every parameter, or only the
matrices -- >= 2-D per member -- when wd_scope is "weights"); buf = d at the first step,
then buf = m*buf + d; p -= lr*d (or lr*buf). lr and wd are (K,) tensors on the device
(set_lr changes them in place), and each stage is one torch._foreach_* call over all
parameters.

How close members stay to their single runs (train_run with the same config and seed:
same init, data order and batches), float32 on one CPU core. The vmapped kernels (grouped
convs, batched matmuls, BatchNorm over K*C channels) round differently from one model's,
so a member differs from its twin by ~1e-8-1e-7 relative per step (all parameters
together; tests/test_ensemble.py asserts 1e-4 after 3 steps with momentum, for every
registered model). What happens next is the single run's own sensitivity, the same any
1e-7 perturbation (another CPU's kernels) meets:
- mlp, convnet, vit at moderate lr: no growth. Parameters within 1e-7 after 20 steps;
  after 3 epochs of 400 digits at B = 8 every recorded value within 1e-5 (convnet 3e-7,
  mlp 9e-7, vit 1e-5), ranks and accuracies equal;
- chaotic runs amplify it to O(1): tiny ResNet-18 / VGG-11 (width 0.125) at B = 8 (BatchNorm
  over few numbers in the 1x1 - 4x4 late stages) reach 1e-3 in 3-5 steps and O(1) in 10-20,
  as does a single run whose weights are perturbed by 1e-7; so do ViT at lr 0.2 and
  ConvNet at lr 0.4 after 100-300 steps. Then members and twins agree only statistically: after 3
  epochs, ranks equal, accuracies within ~0.2 at these tiny widths. An exploding run may
  reach NaN/Inf a step earlier or later than its twin.
tests/test_ensemble.py asserts every model family within rtol 1e-3 (ranks within 1) over
one short epoch, and ConvNet and ViT over 3 epochs. The hand-written MLP stack in
rankbias/ensemble.py is bitwise equal on CPU; this engine is not.

Randomness: vmap runs with randomness="error". No registered model draws random numbers
in train mode (no dropout; nn.MultiheadAttention's dropout is 0), so this never fires; a
model with dropout would raise here. vmap(randomness="different") would run, but its
masks are not the ones the single runs draw from their own generators, so members could
not follow their twins: such a model must train alone.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap


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


def momentum_buffers(optimizer: torch.optim.SGD | None, model: nn.Module
                     ) -> dict[str, torch.Tensor] | None:
    """A torch.optim.SGD's momentum buffers by parameter name, or None before its first step
    (or without momentum). The optimizer must be over `model`'s parameters."""
    if optimizer is None:
        return None
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if owned != {id(p) for p in model.parameters()}:
        raise ValueError("an optimizer is not over its model's parameters")
    bufs = {name: optimizer.state.get(p, {}).get("momentum_buffer")
            for name, p in model.named_parameters()}
    if all(b is None for b in bufs.values()):
        return None
    if any(b is None for b in bufs.values()):
        raise ValueError("an optimizer has momentum buffers for only some parameters")
    return bufs


class ModelStack:
    """K members of one architecture as stacked tensors; see the module docstring.

    `configs` give each member's lr and weight_decay and the shared loss, momentum and
    wd_scope. `optimizers` (optional, one per member): torch.optim.SGD instances whose
    momentum buffers the stack continues from (a resumed run); all or none must have them.
    """

    autograd = True  # forward_backward needs autograd (not inference_mode)

    def __init__(self, models: list[nn.Module], configs: list, device: torch.device,
                 optimizers: list[torch.optim.SGD] | None = None) -> None:
        self.device = device
        self.loss = configs[0].loss
        self.momentum = configs[0].momentum
        self.template = copy.deepcopy(models[0]).to("meta").train()
        names = [n for n, _ in models[0].named_parameters()]
        # Weight decay on all parameters, or on the matrices only (train.make_optimizer).
        self.decays = {n: configs[0].wd_scope == "all" or p.ndim >= 2
                       for n, p in models[0].named_parameters()}
        with torch.no_grad():
            member_params = [dict(m.named_parameters()) for m in models]
            member_buffers = [dict(m.named_buffers()) for m in models]
            params = {n: torch.stack([p[n] for p in member_params]) for n in names}
            buffers = {n: torch.stack([b[n] for b in member_buffers]) for n in member_buffers[0]}
        bufs = [momentum_buffers(o, m) for o, m in zip(optimizers or [None] * len(models),
                                                         models)]
        if any(b is None for b in bufs) and not all(b is None for b in bufs):
            raise ValueError("either every member or none has momentum buffers")
        momentum = None if bufs[0] is None else {
            n: torch.stack([b[n] for b in bufs]) for n in names}
        self._build(params, buffers, momentum,
                    lr=[c.lr for c in configs], weight_decay=[c.weight_decay for c in configs])

    def _build(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
               momentum: dict[str, torch.Tensor] | None, lr: list[float] | torch.Tensor,
               weight_decay: list[float] | torch.Tensor) -> None:
        device = self.device
        self.k = next(iter(params.values())).shape[0]
        self.params = {n: p.detach().to(device).contiguous().requires_grad_()
                       for n, p in params.items()}
        self.buffers = {n: b.to(device).contiguous() for n, b in buffers.items()}
        self.param_list = list(self.params.values())
        self.grads = [torch.zeros_like(p) for p in self.param_list]
        for p, g in zip(self.param_list, self.grads):
            p.grad = g  # autograd adds into these: the same memory every step
        self.bufs = None if momentum is None else [
            momentum[n].to(device).contiguous().clone() for n in self.params]
        self.neg_lr = -torch.as_tensor(lr, dtype=torch.float32).to(device)
        self.weight_decay = torch.as_tensor(weight_decay, dtype=torch.float32).to(device)
        # (K, 1, ..., 1) views that broadcast over each parameter's elements.
        shape = {n: (self.k,) + (1,) * (p.ndim - 1) for n, p in self.params.items()}
        self.neg_lr_views = [self.neg_lr.view(shape[n]) for n in self.params]
        decayed = [n for n in self.params if self.decays[n]]
        self.decayed_params = [self.params[n] for n in decayed]
        self.decayed_grads = [p.grad for p in self.decayed_params]
        self.decay_views = [self.weight_decay.view(shape[n]) for n in decayed]
        self.any_decay = bool((self.weight_decay != 0).any()) and bool(decayed)
        self._forward = vmap(self._member_logits, randomness="error")

    def _member_logits(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def set_lr(self, lrs: list[float]) -> None:
        """Each member's learning rate from now on (in place: a captured graph sees it)."""
        self.neg_lr.copy_(torch.tensor(lrs, dtype=torch.float32).neg_())

    def keep(self, positions: list[int]) -> None:
        """Keep only these stack positions (members that diverged or stopped leave)."""
        index = torch.tensor(positions, dtype=torch.int64, device=self.device)
        with torch.no_grad():
            params = {n: p[index] for n, p in self.params.items()}
            momentum = None if self.bufs is None else {
                n: b[index] for n, b in zip(self.params, self.bufs)}
            self._build(params, {n: b[index] for n, b in self.buffers.items()}, momentum,
                        lr=-self.neg_lr[index], weight_decay=self.weight_decay[index])

    @torch.no_grad()
    def load_into(self, position: int, model: nn.Module, steps: int | None = None,
                  optimizer: torch.optim.SGD | None = None) -> None:
        """Copy member `position` into an ordinary model of the same architecture (for
        tracking, evaluation and checkpoints). With `optimizer` (a torch.optim.SGD over
        `model`'s parameters), also set its momentum buffers, so that a checkpoint written
        from the model and optimizer resumes as a single run's would. `steps` is unused:
        the stacked num_batches_tracked buffers already count each member's steps."""
        del steps
        for name, tensor in model.named_parameters():
            tensor.copy_(self.params[name][position])
        for name, tensor in model.named_buffers():
            tensor.copy_(self.buffers[name][position])
        if optimizer is not None and self.bufs is not None:
            for p, buf in zip(model.parameters(), self.bufs):
                optimizer.state[p]["momentum_buffer"] = buf[position].clone()

    # --- one step -----------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-member losses (K,) on a batch x (K, b, *input_shape), y (K, b); gradients
        kept inside. BatchNorm in train mode (running statistics updated)."""
        torch._foreach_zero_(self.grads)
        with torch.enable_grad(), _attention_kernels(self.device):
            logits = self._forward(self.params, self.buffers, x)
            losses = member_losses(self.loss, logits, y)
            losses.sum().backward()
        return losses.detach()

    @torch.no_grad()
    def sgd_step(self) -> None:
        """torch.optim.SGD's update of every member: d = g + wd*p; buf = m*buf + d;
        p -= lr*d, each with the member's own lr and weight decay."""
        if self.any_decay:
            torch._foreach_addcmul_(self.decayed_grads, self.decayed_params, self.decay_views)
        step = self.grads
        if self.momentum:
            if self.bufs is None:
                self.bufs = [g.clone() for g in self.grads]
            else:
                torch._foreach_mul_(self.bufs, self.momentum)
                torch._foreach_add_(self.bufs, self.grads)
            step = self.bufs
        torch._foreach_addcmul_(self.param_list, step, self.neg_lr_views)


def _attention_kernels(device: torch.device):
    """On CPU, scaled_dot_product_attention's fused kernel has no vmap rule (functorch
    would loop over the members, with a warning); its math version batches."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)
