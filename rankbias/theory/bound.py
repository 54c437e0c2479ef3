"""Theorem 3.4's rank bound and the number of steps it needs, in PyTorch's convention.

    rankbias bound --batch-size 8 --lr 0.5 --weight-decay 5e-3 --shape 100x100

    from rankbias.theory.bound import min_steps, rank_bound
    rank_bound(batch_size=8, lr=0.5, weight_decay=5e-3, eps=1e-3, patches=1)

Convention. The paper puts lambda ||W||_F^2 in the loss, so its SGD step is
W <- (1 - 2 mu lambda) W - mu G, while PyTorch's `SGD(weight_decay=wd)` does
W <- (1 - mu wd) W - mu G: **wd = 2 lambda** and 2 mu lambda = mu wd. Functions take
PyTorch's `weight_decay` (the knob users set, as in the authors' code and logs);
`rank_bound` and `min_steps` also accept the paper's lambda as `lam=`.
"""

from __future__ import annotations

import math
import re

from rankbias.utils import RankbiasError, to_json
from rankbias.validate import require_int, require_real

CONVENTION = "PyTorch SGD weight_decay = 2*lambda (paper), so 2*mu*lambda = lr*weight_decay"


def _decay_rate(lr: float, weight_decay: float | None, lam: float | None) -> float:
    """2 mu lambda = lr * weight_decay, after checking the inputs."""
    lr = require_real(lr, "lr", positive=True)
    if lam is not None:
        lam = require_real(lam, "lam", positive=False)
        if weight_decay is not None and not math.isclose(weight_decay, 2 * lam, rel_tol=1e-9):
            raise RankbiasError(f"weight_decay={weight_decay!r} and lam={lam!r} disagree: "
                                f"PyTorch's weight_decay is 2*lambda = {2 * lam!r}; give one")
        weight_decay = 2 * lam
    elif weight_decay is None:
        raise RankbiasError("give weight_decay (PyTorch's) or lam (the paper's lambda)")
    weight_decay = require_real(weight_decay, "weight_decay", positive=False)
    rate = lr * weight_decay
    # The proof bounds (1 - 2 mu lambda)^k by exp(-2 mu lambda k), which needs a factor >= 0.
    if rate > 1:
        raise RankbiasError(f"lr * weight_decay = {rate:g} > 1: the decay factor 1 - lr*wd is "
                            "negative, outside the theorem's assumptions")
    return rate


def _require_eps(eps: float) -> float:
    eps = require_real(eps, "eps", positive=True)
    if eps >= 2:
        raise RankbiasError(f"eps must be in (0, 2), got {eps!r}")
    return eps


def min_steps(lr: float, weight_decay: float | None, eps: float = 1e-3,
              lam: float | None = None) -> float:
    """T* = log(2/eps) / (2 mu lambda) = log(2/eps) / (lr * weight_decay).

    The number of steps after which Theorem 3.4 applies, and the length k of the truncated
    sum in its proof (as a real number; a step count is ceil(T*)). `math.inf` at weight
    decay 0. Give PyTorch's `weight_decay` (= 2 lambda) or the paper's `lam` (then
    weight_decay must be None or equal to 2*lam).
    """
    rate = _decay_rate(lr, weight_decay, lam)
    eps = _require_eps(eps)
    return math.log(2 / eps) / rate if rate > 0 else math.inf


def rank_bound(batch_size: int, lr: float, weight_decay: float | None, eps: float = 1e-3,
               patches: int = 1, lam: float | None = None) -> float:
    """Theorem 3.4: W_T/||W_T|| is within eps of a matrix of rank at most

        patches * B * log(2/eps) / (2 mu lambda)  =  patches * B * min_steps(...)

    with lambda = weight_decay / 2 (PyTorch convention, see the module docstring), or the
    paper's lambda given directly as `lam` (then weight_decay must be None or 2*lam).
    `patches` is m: 1 for a fully connected layer, the output spatial positions of a conv.
    `math.inf` at weight decay 0 (no bound). Requires lr * weight_decay <= 1.

    The paper's example: B=4, mu=1, wd=6e-3, eps=1e-3 gives 4 * log(2000) / 6e-3 ~ 5.1e3,
    far above the 100 of a 100-wide layer: the absolute value is vacuous at realistic
    settings; its trends (linear in B and m, 1/(mu lambda)) are what experiments test.
    """
    batch_size = require_int(batch_size, "batch_size")
    patches = require_int(patches, "patches")
    return patches * batch_size * min_steps(lr, weight_decay, eps, lam)


def parse_shape(text: str) -> tuple[int, int]:
    """'OUTxIN' (e.g. '100x784') -> (100, 784)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(g) for g in match.groups()) < 1:
        raise RankbiasError(f"--shape must look like OUTxIN with positive integers "
                            f"(e.g. 100x784), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def bound_report(batch_size: int, lr: float, weight_decay: float, eps: float = 1e-3,
                 patches: int = 1, shape: str | tuple[int, int] | None = None,
                 fmt: str = "text") -> str:
    """The text or one-line JSON that `rankbias bound` prints.

    JSON has no infinity: an infinite bound or T* (weight decay 0) is written as null.
    "vacuous" is null without a shape, else whether bound >= min(out, in).
    """
    if isinstance(shape, str):
        shape = parse_shape(shape)
    bound = rank_bound(batch_size, lr, weight_decay, eps, patches)
    steps = min_steps(lr, weight_decay, eps)
    vacuous = None if shape is None else bound >= min(shape)
    if fmt == "json":
        return to_json({"bound": bound, "min_steps": steps, "vacuous": vacuous,
                        "weight_decay": weight_decay, "lambda": weight_decay / 2,
                        "convention": CONVENTION})
    if fmt != "text":
        raise RankbiasError(f"unknown format {fmt!r}: use text or json")
    lines = [
        f"rank bound    {bound:.6g}   = patches * B * log(2/eps) / (2 mu lambda)"
        f"   (B={batch_size}, patches={patches}, lr={lr:g}, eps={eps:g})",
        f"min steps T*  {steps:.6g}   = log(2/eps) / (2 mu lambda)",
        f"convention    PyTorch weight_decay = 2*lambda: weight_decay={weight_decay:g}, "
        f"lambda={weight_decay / 2:g}, 2*mu*lambda = lr*weight_decay = {lr * weight_decay:g}",
    ]
    if weight_decay == 0:
        lines.append("no bound: without weight decay the theorem gives nothing")
    if shape is not None:
        verdict = "vacuous" if vacuous else "informative"
        relation = ">=" if vacuous else "<"
        lines.append(f"shape {shape[0]}x{shape[1]}  {verdict}: bound {bound:.6g} {relation} "
                     f"min(out, in) = {min(shape)}")
    return "\n".join(lines)
