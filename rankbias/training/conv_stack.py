"""The ConvNet's stacked forward pass as batched matrix products (ModelStack uses it on CPU).

vmap runs K members' convs as one grouped conv. On the small images of the quick runs
(8x8 digits: 4x4 and 2x2 after the halving convs) oneDNN's grouped kernels spend most of
a step in per-call overhead, and more on AVX2 CPUs (docs/performance.md). Here every conv
is one `bmm` over the members of (weights) x (im2col columns), in the layout (K, channels,
H, W, batch): a conv's output is then already the (1, K*channels, pixels) view on which a
single batch_norm call keeps each member's statistics and running averages. Autograd
takes the backward pass. The numbers are the single run's up to float32 summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rankbias.models.convnet import ConvNet

Forward = Callable[[dict, dict, torch.Tensor], torch.Tensor]


def stacked_forward(template: nn.Module) -> Forward | None:
    """(params, buffers, x) -> logits (K, b, classes) for a stack of `template`'s
    architecture, params and buffers stacked on a leading member axis and x (K, b,
    *input_shape); None where this architecture has no such forward (vmap then runs it)."""
    if not isinstance(template, ConvNet) or len(template.shape) != 3:
        return None
    blocks = []
    modules = list(template.features.named_children())
    for (conv_name, conv), (norm_name, norm), (_, relu) in zip(*[iter(modules)] * 3):
        if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.dilation == (1, 1)
                and conv.padding_mode == "zeros" and isinstance(relu, nn.ReLU)
                and (isinstance(norm, nn.Identity) or _plain_batch_norm(norm))):
            return None
        blocks.append((f"features.{conv_name}", conv,
                       f"features.{norm_name}" if isinstance(norm, nn.BatchNorm2d) else None,
                       norm))
    if 3 * len(blocks) != len(modules):
        return None
    convs, size = [], template.shape[1:]
    for _, conv, _, _ in blocks:
        convs.append(_StackedConv(conv, size))
        size = convs[-1].size

    def forward(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        k, b = x.shape[:2]
        a = x.reshape(k, b, *template.shape).permute(0, 2, 3, 4, 1)  # (K, C, H, W, b)
        for (conv_name, conv, norm_name, norm), stacked in zip(blocks, convs):
            a = stacked(a, params[f"{conv_name}.weight"])  # (K, out, h*w*b)
            h, w = stacked.size
            if conv.bias is not None:
                a = a + params[f"{conv_name}.bias"].unsqueeze(2)
            if norm_name is not None:
                buffers[f"{norm_name}.num_batches_tracked"].add_(1)
                a = F.batch_norm(
                    a.reshape(1, k * conv.out_channels, -1),
                    buffers[f"{norm_name}.running_mean"].view(-1),
                    buffers[f"{norm_name}.running_var"].view(-1),
                    params[f"{norm_name}.weight"].reshape(-1),
                    params[f"{norm_name}.bias"].reshape(-1),
                    training=True, momentum=norm.momentum, eps=norm.eps)
            a = torch.relu(a).reshape(k, conv.out_channels, h, w, b)
        pooled = a.flatten(2, 3).mean(dim=2)  # (K, C, b): global average pool
        logits = torch.baddbmm(params["head.bias"].unsqueeze(2), params["head.weight"], pooled)
        return logits.transpose(1, 2)

    return forward


def _plain_batch_norm(norm: nn.Module) -> bool:
    """BatchNorm2d as ConvNet builds it: affine, running statistics, a fixed momentum."""
    return (isinstance(norm, nn.BatchNorm2d) and norm.affine and norm.track_running_stats
            and norm.momentum is not None)


class _StackedConv:
    """One Conv2d of the stack: (K, C, H, W, b) activations and (K, out, C, kh, kw)
    weights -> (K, out, h*w*b), as one bmm, in whichever of two forms multiplies less:

    - im2col: one index_select gathers, for each input channel, the (padded) pixel that
      tap (i, j) reads for output pixel (y, x), ordered (tap, y, x) as the weight
      flattens; the bmm multiplies kh*kw*h*w*C*out per sample, padding included;
    - dense, where the image has no more pixels than the kernel has taps (the 3x3 convs
      on 2x2 images of the digits ConvNet): the weights are spread into the (out*h*w) x
      (C*H*W) matrix of the conv itself (entry (o, p; c, q) is the weight of the tap
      through which output pixel p reads input pixel q, zero where no tap does), which
      multiplies only the pixel pairs that meet.
    """

    def __init__(self, conv: nn.Conv2d, size: tuple[int, int]) -> None:
        (height, width), (kh, kw), (sh, sw), (ph, pw) = (size, conv.kernel_size, conv.stride,
                                                         conv.padding)
        h, w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        self.size, self.padding = (h, w), (ph, pw)
        self.dense = height * width <= kh * kw
        y, x = torch.arange(h).view(h, 1), torch.arange(w).view(1, w)  # output pixels
        if self.dense:  # the tap from output pixel (y, x) to input pixel (u, v)
            u, v = torch.arange(height).view(height, 1), torch.arange(width).view(1, width)
            i = u.reshape(1, 1, -1, 1) - sh * y.reshape(h, 1, 1, 1) + ph
            j = v.reshape(1, 1, 1, -1) - sw * x.reshape(1, w, 1, 1) + pw
            self.meets = ((i >= 0) & (i < kh) & (j >= 0) & (j < kw)).flatten()
            self.taps = (i.clamp(0, kh - 1) * kw + j.clamp(0, kw - 1)).flatten()
            self.in_pixels = height * width
        else:  # the padded input pixel that tap (i, j) reads for output pixel (y, x)
            i, j = torch.arange(kh).view(kh, 1, 1, 1), torch.arange(kw).view(1, kw, 1, 1)
            rows, cols = i + sh * y.view(1, 1, h, 1), j + sw * x.view(1, 1, 1, w)
            self.taps = (rows * (width + 2 * pw) + cols).flatten()

    def __call__(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        k, c, b = a.shape[0], a.shape[1], a.shape[-1]
        out = weight.shape[1]
        if self.dense:  # (K, out, C, h*w*H*W) -> (K, out*h*w, C*H*W)
            spread = weight.reshape(k, out, c, -1).index_select(3, self.taps) * self.meets
            matrix = spread.reshape(k, out, c, -1, self.in_pixels).transpose(2, 3)
            return torch.bmm(matrix.reshape(k, -1, c * self.in_pixels), a.reshape(k, -1, b)
                             ).reshape(k, out, -1)
        (ph, pw) = self.padding
        if ph or pw:
            a = F.pad(a, (0, 0, pw, pw, ph, ph))
        cols = a.reshape(k, c, -1, b).index_select(2, self.taps)
        return torch.bmm(weight.reshape(k, out, -1), cols.reshape(k, -1, self.size[0] *
                                                                     self.size[1] * b))
