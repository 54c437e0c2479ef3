"""The transformer's stacked forward pass in batched kernels (ModelStack uses it on CPU).

vmap runs the members' forward op by op through functorch's batching rules; for the small
transformers of the quick runs (width 32, sequences of 3 tokens) that per-op machinery is
about half of a step (docs/performance.md). Here every op is one plain kernel over all K
members: each Linear one baddbmm over (K, b*t, width), attention one bmm over (K*b*heads,
t, head_dim), each LayerNorm one layer_norm over all members with the members' affine
parameters applied after, the embeddings one lookup in the members' tables laid end to
end. Autograd takes the backward pass. The numbers are the single run's up to float32
summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankbias.models.transformer import Transformer
from rankbias.training.conv_stack import Forward


def stacked_forward(template: nn.Module) -> Forward | None:
    """(params, buffers, x) -> logits (K, b, classes) for a stack of `template`'s
    architecture (a Transformer; else None), params stacked on a leading member axis and
    x (K, b, length) token ids."""
    if not isinstance(template, Transformer) or any(
            not isinstance(block.mlp.act, nn.GELU) or block.mlp.act.approximate != "none"
            for block in template.blocks):
        return None
    eps = {name: m.eps for name, m in template.named_modules() if isinstance(m, nn.LayerNorm)}

    def linear(p: dict, name: str, h: torch.Tensor) -> torch.Tensor:
        """(K, n, in) -> (K, n, out) through each member's nn.Linear `name`."""
        return torch.baddbmm(p[f"{name}.bias"].unsqueeze(1), h,
                             p[f"{name}.weight"].transpose(1, 2))

    def layer_norm(p: dict, name: str, h: torch.Tensor) -> torch.Tensor:
        k = h.shape[0]
        normed = F.layer_norm(h, h.shape[-1:], eps=eps[name])
        return torch.addcmul(p[f"{name}.bias"].view(k, 1, -1), normed,
                             p[f"{name}.weight"].view(k, 1, -1))

    def forward(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        del buffers  # the transformer has none
        k, b, t = x.shape
        table = params["tok_emb.weight"]  # (K, vocab, width): one lookup in K tables
        offsets = torch.arange(k, device=x.device).view(k, 1, 1) * table.shape[1]
        h = F.embedding(x + offsets, table.reshape(-1, table.shape[2]))
        h = (h + params["pos_emb.weight"][:, :t].unsqueeze(1)).reshape(k, b * t, -1)
        for i, block in enumerate(template.blocks):
            name, attn = f"blocks.{i}", block.attn
            heads, dim = attn.num_heads, attn.head_dim
            normed = layer_norm(params, f"{name}.norm1", h)
            q, key, v = (  # each (K, b*t, width) -> (K*b*heads, t, dim)
                linear(params, f"{name}.attn.{p}_proj", normed).reshape(k * b, t, heads, dim)
                .transpose(1, 2).reshape(-1, t, dim) for p in ("q", "k", "v"))
            scores = torch.bmm(q, key.transpose(1, 2)) * dim ** -0.5
            if attn.causal:
                future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            out = torch.bmm(scores.softmax(dim=-1), v)  # (K*b*heads, t, dim)
            out = out.reshape(k * b, heads, t, dim).transpose(1, 2).reshape(k, b * t, -1)
            h = h + linear(params, f"{name}.attn.o_proj", out)
            hidden = F.gelu(linear(params, f"{name}.mlp.fc_in",
                                   layer_norm(params, f"{name}.norm2", h)))
            h = h + linear(params, f"{name}.mlp.fc_out", hidden)
        last = h.reshape(k, b, t, -1)[:, :, -1]  # the head reads the last position
        return linear(params, "head", layer_norm(params, "norm", last))

    return forward
