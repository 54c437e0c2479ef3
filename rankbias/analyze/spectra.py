"""Singular values of many matrices read one at a time: batched by shape, in bounded memory,
on the CPU or a GPU.

    rankbias analyze MODEL_DIR --device cuda

- Precision: float64 on every device (as `rankbias.metrics.spectral`), so a value near a
  1e-3 threshold does not flip with rounding and the GPU gives the CPU's ranks. Data-center
  GPUs (A100, H100) run float64 at half their float32 speed; consumer GPUs at 1/32-1/64.
- Batching: matrices of one shape wait, as float64 on the device, until `BATCH_BYTES` of
  them wait in all; the largest group then goes through one `torch.linalg.svdvals` call.
  A batch saves the per-call overhead that dominates small matrices; large ones gain
  nothing from it, so the bound costs no speed and keeps memory small.
- Tall matrices too large for that bound (an embedding or an output head: vocabulary x
  width) are read in blocks of rows and reduced by QR as they come (TSQR: R of [R; next
  block]); the singular values of the last R are those of the whole matrix (orthogonal
  transformations only), so the matrix is never whole in memory.
- Every matrix is checked for NaN/Inf before any SVD sees it.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from rankbias.analyze.matrices import AttentionLayer, Matrix
from rankbias.analyze.sources import TensorSource
from rankbias.metrics.attention import head_factors, product_singular_values
from rankbias.metrics.spectral import check_finite
from rankbias.utils import RankbiasError

# float64 matrices waiting for their batched SVD, all shapes together: 128 matrices of 64 x 64
# (where batching pays), and at most one copy of the stack (LAPACK's) on top of it
BATCH_BYTES = 4 * 2**20
TALL = 4  # a stored matrix at least this many times taller than wide may be read in blocks
DTYPE = torch.float64
CPU = torch.device("cpu")


def return_freed_memory() -> None:
    """Ask glibc to give every freed block of 1 MiB or more back to the system at once.

    Its default threshold rises (up to 32 MiB) each time such a block is freed, after which
    the float64 copies this module makes and frees stay in the heap: the peak RSS of
    analyzing a 92 MB GPT-2 (384 wide, 6 layers, --all) rises by 52 MB, 30 MB with this.
    Process-wide, so the `rankbias analyze` command calls it, not the library. A no-op where
    the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD (malloc.h): a value set stays put
    except (OSError, AttributeError):
        pass


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda` (an error without CUDA) or `auto` (CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RankbiasError("--device cuda: this machine has no CUDA device (or this torch "
                            "is a CPU build); use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise RankbiasError(f"unknown --device {name!r}: use cpu, cuda or auto") from err


def _bar(total: int, progress: bool | None, what: str):
    from tqdm import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal
    return tqdm(total=total, desc=what, unit="matrix", file=sys.stderr, dynamic_ncols=True,
                disable=None if progress is None or progress else True)


def _streamed(matrix: Matrix, budget: int) -> bool:
    rows, cols = matrix.shape
    return (matrix.whole and len(matrix.entry.shape) == 2 and rows >= TALL * cols
            and rows * cols * 8 > budget)


def _tall_singular_values(matrix: Matrix, source: TensorSource, device: torch.device,
                          budget: int) -> torch.Tensor:
    """TSQR over blocks of rows: R <- R of [R; block]; sigma(R) = sigma(matrix)."""
    rows, cols = matrix.shape
    step = max(cols, budget // (8 * cols))  # >= cols rows: at most 2x the flops of one QR
    r = None
    for start in range(0, rows, step):
        block = source.read_rows(matrix.entry, start, min(rows, start + step))
        check_finite(block, matrix.name)
        block = block.to(device=device, dtype=DTYPE)
        r = torch.linalg.qr(block if r is None else torch.cat([r, block]), mode="r").R
    return torch.linalg.svdvals(r).cpu()


def singular_values(matrices: Sequence[Matrix], source: TensorSource,
                    device: torch.device = CPU, progress: bool | None = None,
                    budget: int = BATCH_BYTES, workers: int = 1
                    ) -> Iterator[tuple[Matrix, torch.Tensor]]:
    """(matrix, its singular values, float64 on the CPU, descending) for every matrix,
    reading them from `source` one at a time (not in the order given: by batch).

    `workers` > 1 (CPU): that many batches' SVDs run at once in threads (torch releases the
    GIL in LAPACK), each on the caller's torch threads: with torch.set_num_threads(1), one
    core per matrix, which on 2-16 cores beats LAPACK's own threads on one matrix at these
    sizes. Memory: the budget plus `workers` batches in flight.
    """
    waiting: dict[tuple[int, int], list[tuple[Matrix, torch.Tensor]]] = {}
    waiting_bytes = 0
    pool = ThreadPoolExecutor(workers) if workers > 1 and device.type == "cpu" else None
    running: deque = deque()  # (group, future) in the order submitted

    def finish(group, sigmas) -> Iterator[tuple[Matrix, torch.Tensor]]:
        yield from ((m, s) for (m, _), s in zip(group, sigmas.cpu()))

    def run(shape) -> Iterator[tuple[Matrix, torch.Tensor]]:
        nonlocal waiting_bytes
        group = waiting.pop(shape)
        waiting_bytes -= sum(x.numel() * 8 for _, x in group)
        batch = group[0][1][None] if len(group) == 1 else torch.stack([x for _, x in group])
        if pool is None:
            yield from finish(group, torch.linalg.svdvals(batch))
            return
        running.append((group, pool.submit(torch.linalg.svdvals, batch)))
        while len(running) >= workers:
            group, future = running.popleft()
            yield from finish(group, future.result())

    try:
        with _bar(len(matrices), progress, "singular values") as bar:
            for matrix in matrices:
                if _streamed(matrix, budget):
                    yield matrix, _tall_singular_values(matrix, source, device, budget)
                    bar.update()
                    continue
                x = matrix.of(source.read(matrix.entry))
                check_finite(x, matrix.name)
                x = x.to(device=device, dtype=DTYPE)
                x = x.mT if x.shape[0] < x.shape[1] else x  # tall: same values, faster LAPACK
                waiting.setdefault(tuple(x.shape), []).append((matrix, x))
                waiting_bytes += x.numel() * 8
                bar.update()
                while waiting_bytes > budget:
                    yield from run(max(waiting, key=lambda s: len(waiting[s]) * s[0] * s[1]))
            source.forget()
            for shape in list(waiting):
                yield from run(shape)
            while running:
                group, future = running.popleft()
                yield from finish(group, future.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def attention_spectra(layers: Sequence[AttentionLayer], source: TensorSource,
                      device: torch.device = CPU, progress: bool | None = None
                      ) -> Iterator[tuple[AttentionLayer, str, torch.Tensor, tuple[int, int]]]:
    """(layer, "qk" or "ov", singular values (n_heads, min(shape)), the product's shape) per
    attention layer: every head's W_Q^T W_K and W_O W_V (rankbias.metrics.attention)."""
    with _bar(len(layers), progress, "attention products") as bar:
        for layer in layers:
            parts = {}
            for p, matrix in layer.parts.items():
                parts[p] = matrix.of(source.read(matrix.entry))
                check_finite(parts[p], matrix.name)
            n_heads, n_kv, head_dim = layer.heads
            factors = head_factors(parts["q"], parts["k"], parts["v"], parts["o"], n_heads,
                                   n_kv, head_dim)
            for kind, (a, b) in factors.items():
                sigma = product_singular_values(a.to(device), b.to(device), DTYPE).cpu()
                yield layer, kind, sigma, (a.shape[1], b.shape[2])
            bar.update()
        source.forget()
