"""Per-head attention products W_Q^T W_K and W_O W_V of one attention layer.

Weights in PyTorch's (out, in) layout: W_Q is (n_heads * head_dim, d), W_K and W_V are
(n_kv_heads * head_dim, d), W_O is (d_out, n_heads * head_dim). For query head h, with
W_Q^h the rows h*head_dim ... (h+1)*head_dim - 1 of W_Q and W_O^h the same columns of W_O,
the attention score of x to y and the head's output are

    (W_Q^h x)^T (W_K^g y) = x^T (W_Q^h^T W_K^g) y        QK_h = W_Q^h^T W_K^g   (d x d)
    W_O^h (W_V^g y)                                     OV_h = W_O^h W_V^g     (d_out x d)

where g = h // (n_heads // n_kv_heads): grouped-query attention shares key/value head g
among consecutive query heads (Hugging Face's `repeat_kv`); n_kv_heads = n_heads is
ordinary multi-head attention, 1 is multi-query. These are the matrices whose rank weight
decay lowers in Kobayashi, Akram, von Oswald (NeurIPS 2024). Rotary embeddings (Llama)
rotate q and k by position between the two factors; the products here are the weights'
part, without the rotation.

Both products have rank <= head_dim, so their singular values come from head_dim x
head_dim matrices (`product_singular_values`), not from d x d SVDs:

    rankbias analyze MODEL_DIR --attention-products
"""

from __future__ import annotations

import torch

from rankbias.utils import RankbiasError


def head_layout(q: torch.Tensor, n_heads: int, n_kv_heads: int | None = None,
                head_dim: int | None = None) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim), the defaults filled in from W_Q's rows."""
    n_kv_heads = n_kv_heads or n_heads
    head_dim = head_dim or q.shape[0] // n_heads
    if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise RankbiasError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads: "
                            "the query heads must be a multiple of the key/value heads")
    return n_heads, n_kv_heads, head_dim


def head_factors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"qk": (A, B), "ov": (A, B)}: per query head, the factors whose product A[h] @ B[h]
    is QK_h (A: (n_heads, d, head_dim), B: (n_heads, head_dim, d)) or OV_h (A: (n_heads,
    d_out, head_dim), B: (n_heads, head_dim, d)). Views of the inputs, no copy of W_Q/W_O."""
    n_heads, n_kv_heads, head_dim = head_layout(q, n_heads, n_kv_heads, head_dim)
    d = q.shape[1]
    expected = {"W_Q": (q, (n_heads * head_dim, d)), "W_K": (k, (n_kv_heads * head_dim, d)),
                "W_V": (v, (n_kv_heads * head_dim, d)),
                "W_O": (o, (o.shape[0], n_heads * head_dim))}
    for name, (weight, shape) in expected.items():
        if tuple(weight.shape) != shape:
            raise RankbiasError(
                f"{name} has shape {tuple(weight.shape)}, but {n_heads} query heads and "
                f"{n_kv_heads} key/value heads of size {head_dim} on width {d} need {shape}: "
                "check the head layout (config.json's heads and head_dim)")
    group = torch.arange(n_heads) // (n_heads // n_kv_heads)  # the kv head of each query head
    q_heads = q.reshape(n_heads, head_dim, d)
    k_heads = k.reshape(n_kv_heads, head_dim, d)[group]
    v_heads = v.reshape(n_kv_heads, head_dim, d)[group]
    o_heads = o.reshape(o.shape[0], n_heads, head_dim).permute(1, 0, 2)
    return {"qk": (q_heads.mT, k_heads), "ov": (o_heads, v_heads)}


def attention_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       n_heads: int, n_kv_heads: int | None = None,
                       head_dim: int | None = None) -> dict[str, torch.Tensor]:
    """{"qk": (n_heads, d, d), "ov": (n_heads, d_out, d)}: the dense products per query head,
    in the inputs' dtype (n_heads * d^2 numbers each: for small models and checks; large
    ones want `product_singular_values` of `head_factors`)."""
    return {kind: a @ b for kind, (a, b) in
            head_factors(q, k, v, o, n_heads, n_kv_heads, head_dim).items()}


def product_singular_values(a: torch.Tensor, b: torch.Tensor,
                            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of a @ b (batched over leading dims), descending, min(m, n) of them.

    a: (..., m, r), b: (..., r, n). When r < min(m, n), a @ b has rank <= r: with the thin
    QR factorizations a = Q_a R_a and b^T = Q_b R_b, a @ b = Q_a (R_a R_b^T) Q_b^T, so its
    singular values are those of the r x r matrix R_a R_b^T followed by zeros (orthogonal
    transformations only: as accurate as an SVD of a @ b, at O((m + n) r^2) instead of
    O(m n min(m, n)))."""
    a, b = a.to(dtype), b.to(dtype)
    m, r, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if r >= min(m, n):
        product = a @ b
        return torch.linalg.svdvals(product if m >= n else product.mT)
    r_a = torch.linalg.qr(a, mode="r").R
    r_b = torch.linalg.qr(b.mT, mode="r").R
    sigma = torch.linalg.svdvals(r_a @ r_b.mT)
    zeros = sigma.new_zeros((*sigma.shape[:-1], min(m, n) - r))
    return torch.cat([sigma, zeros], dim=-1)
