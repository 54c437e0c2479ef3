"""A small decoder-style transformer on token sequences (the grokking literature's model).

    rankbias train --model transformer --dataset modular-addition --optimizer adamw \
        --lr 1e-3 --weight-decay 1.0 --wd-scope weights --batch-size 64 --epochs 100
    # (a + b) mod 97, 30% of the pairs: test accuracy 0.999 in 4500 steps (86 s on one core)

Token and learned position embeddings, `depth` pre-LayerNorm blocks of multi-head
self-attention and an MLP, a final LayerNorm and a Linear head read at the last position
(the "=" token of modular-addition). Choices that matter for rankbias:
- Q, K, V and O are four separate `nn.Linear` modules (`q_proj`, `k_proj`, `v_proj`,
  `o_proj`), so each is a weight matrix of its own (metrics/layers.weight_matrices) with
  its own role (analyze/matrices.role_of), and each attention module says its head layout
  (`num_heads`, `head_dim`) for the per-head products W_Q^T W_K and W_O W_V
  (metrics/attention.py). The MLP's matrices are `mlp.fc_in` and `mlp.fc_out`.
- Attention is written with plain matmul, masked_fill and softmax rather than the fused
  scaled_dot_product_attention: vmap batches these ops over a stack of members
  (training/stack.py), and a member then runs the same kernels as its single run.
- Causal by default: it is the decoder of Power et al. (2022) and Nanda et al. (2023), so
  results can be held against theirs. The head reads the last position, which sees the
  whole sequence either way; `causal=False` lets every position see every other.
- The embeddings and the head are not in the average rank (the head is the last
  nn.Linear: the classifier; embeddings are lookup tables, not Linear layers).
"""

from __future__ import annotations

import torch
from torch import nn

from rankbias.utils import RankbiasError


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate Q, K, V and O projections (all width x width)."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.causal = heads, width // heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:  # (b, t, d) -> (b, heads, t, head_dim)
            return y.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        if self.causal:  # position i attends to positions <= i
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """fc_in (width -> hidden) -> GELU -> fc_out (hidden -> width)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, max(1, round(width * mlp_ratio)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """tok_emb + pos_emb -> `depth` Blocks -> LayerNorm -> head at the last position."""

    input_dtype = torch.int64  # token ids: an example input is torch.zeros(..., dtype=this)

    def __init__(self, length: int, num_classes: int, vocab: int, depth: int, width: int,
                 heads: int, mlp_ratio: float, causal: bool) -> None:
        super().__init__()
        self.vocab = vocab
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(length, width)
        # GPT-2's initialization of the embeddings: N(0, 0.02), not nn.Embedding's N(0, 1),
        # which would dwarf the blocks' outputs in the residual stream.
        for table in (self.tok_emb, self.pos_emb):
            nn.init.normal_(table.weight, std=0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio, causal)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)  # registered last: the classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            raise RankbiasError("the transformer takes token ids (an integer tensor), not "
                                "floats: use a sequence data set such as modular-addition")
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.blocks(self.tok_emb(x) + self.pos_emb(positions))
        return self.head(self.norm(h)[:, -1])


def build_transformer(
    input_shape: tuple[int, ...], num_classes: int, *, depth: int = 2, width: int = 128,
    heads: int = 4, mlp_ratio: float = 4.0, causal: bool = True, vocab: int | None = None,
) -> Transformer:
    """A pre-LayerNorm decoder on token sequences of shape (length,):

        tok_emb(vocab, width) + pos_emb(length, width)
        depth x [x + o_proj(attention(q_proj, k_proj, v_proj)(LN(x)));
                 x + fc_out(GELU(fc_in(LN(x))))]
        -> LayerNorm -> Linear(width, num_classes) at the last position

    with `heads` heads of width // heads, MLP hidden size round(mlp_ratio * width), and
    biases in every Linear. The defaults are Power et al.'s (2022) model (2 layers, width
    128, 4 heads, MLP 512). vocab None: num_classes + 1, the convention of rankbias's
    sequence tasks (the labels are the tokens 0..num_classes-1; one more marks the query,
    modular-addition's "=").
    """
    if len(input_shape) != 1:
        raise RankbiasError(f"the transformer takes token sequences of shape (length,); got "
                            f"{tuple(input_shape)}: use a sequence data set such as "
                            "modular-addition")
    if depth < 0 or width < 1 or heads < 1 or width % heads or mlp_ratio <= 0:
        raise RankbiasError(
            f"transformer needs depth >= 0, heads >= 1, width divisible by heads and "
            f"mlp_ratio > 0; got {depth=}, {width=}, {heads=}, {mlp_ratio=}")
    vocab = num_classes + 1 if vocab is None else vocab
    if vocab < 1:
        raise RankbiasError(f"transformer needs vocab >= 1; got {vocab=}")
    return Transformer(input_shape[0], num_classes, vocab, depth, width, heads, mlp_ratio,
                       causal)
