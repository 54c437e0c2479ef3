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

import torch

from rankbias.models.mlp import MLP
from rankbias.training.budget import shrink_entries
from rankbias.training.config import RunConfig
from rankbias.training.mlp_kernels import (
    Channels,
    Layer,
    activation_backward,
    batch_norm_backward,
    linear_backward,
    loss_and_grad,
    simd_width,
)
from rankbias.training.stack import ADAM_BETAS, ADAM_EPS, optimizer_state


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
        simd = simd_width() if self.device.type == "cpu" else None  # CPU kernel's remainder
        self.lays: dict[str, Channels] = {}  # BN name (weight, bias, running stats) -> layout
        for i, block in enumerate(self.template.blocks):
            if isinstance(block.bn, torch.nn.BatchNorm1d):
                lay = Channels.make(self.k, block.bn.num_features, simd)
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
               block: torch.nn.Module | None) -> Layer:
        fc = prefix + "fc." if block is not None else "head."
        bias = params.get(fc + "bias")
        layer = Layer(weight_t=params[fc + "weight"].transpose(1, 2),
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
        return [float(torch.cat([shrink_entries(square[j], float(self.steps), lr, wd,
                                                ADAM_BETAS[1], ADAM_EPS)
                                 for square in matrices]).median()) if wd else 0.0
                for j, (lr, wd) in enumerate(zip(self.lr_host, self.wd_host))]

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
        losses, grad = loss_and_grad(self.loss, self.head.linear(h), y)

        grad_h = linear_backward(grad, h, self.head, need_input=bool(self.layers))
        self._update(len(self.layers), first)
        for i in reversed(range(len(self.layers))):
            layer, (h_in, inp, out, bn) = self.layers[i], saved[i]
            if layer.lay is None:
                grad_z = activation_backward(layer.act, grad_h, inp, out)
            else:
                scratch, mean, invstd = bn
                scratch.grad_members.copy_(grad_h)
                activation_backward(layer.act, scratch.grad, inp, out, into=scratch.grad)
                grad_z = layer.lay.unflat(batch_norm_backward(scratch, mean, invstd, layer))
            grad_in = linear_backward(grad_z, h_in, layer, need_input=i > 0)
            self._update(i, first)
            if layer.residual and i > 0:
                grad_in = grad_in + grad_h
            grad_h = grad_in
        if self.vector_names:
            self._update(-1, first)
        return losses

    def _update(self, block: int, first: bool) -> None:
        """The optimizer's update of one block (_blocks: a layer's weight matrix, or all
        vectors) for every member, each element with its own member's lr and weight decay;
        torch.optim.SGD's here (d = g + wd*p; buf = m*buf + d; p -= lr*d), Adam's in
        _adam_update."""
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
