"""Spectral metrics against numpy float64 SVD on matrices with a known spectrum."""

import math

import numpy as np
import pytest
import torch

from rankbias.metrics import spectral
from rankbias.utils import RankbiasError


def matrix_with_spectrum(sigma, m, n, seed=0) -> torch.Tensor:
    """U diag(sigma) V^T with random orthonormal U (m x k), V (n x k)."""
    rng = np.random.default_rng(seed)
    k = len(sigma)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return torch.from_numpy(u @ np.diag(sigma) @ v.T)


def numpy_rank(w, tol):
    s = np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)
    return int(np.sum(s / np.sqrt(np.sum(s**2)) > tol))


@pytest.mark.parametrize("m,n", [(30, 50), (50, 30), (40, 40)])
def test_singular_values_match_numpy(m, n):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    ours = spectral.singular_values(w).numpy()
    oracle = np.linalg.svd(w.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(ours, oracle, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(20, 60), (60, 20)])
def test_rank_threshold_1_percent_apart(shape):
    # After normalization by ||W||_F, 5 values sit 1% above tol and 5 sit 1% below.
    tol = 1e-3
    big = np.ones(3)
    fro_big = np.sqrt(3.0)  # the small values change ||W||_F by ~1e-6 relative only
    above = np.full(5, 1.01 * tol * fro_big)
    below = np.full(5, 0.99 * tol * fro_big)
    sigma = np.concatenate([big, above, below])
    w = matrix_with_spectrum(sigma, *shape)
    assert numpy_rank(w, tol) == 8
    assert spectral.numerical_rank(w, tol=tol) == 8
    # The same matrix in float32 still gets the float64 answer (the metric upcasts).
    assert spectral.numerical_rank(w.float(), tol=tol) == 8


def test_rank_conventions():
    w = matrix_with_spectrum([10.0, 1.0, 0.05, 0.001], 8, 6)
    # normalize=False: absolute threshold on the raw values.
    assert spectral.numerical_rank(w, tol=0.01, normalize=False) == 3
    # relative: sigma > tol * sigma_max = 0.1 -> 2.
    assert spectral.numerical_rank(w, tol=0.01, relative=True) == 2
    # the paper's: sigma / ||W||_F, ||W||_F = sqrt(101.0025...) ~ 10.05 -> 0.05/10.05 < 0.01.
    assert spectral.numerical_rank(w, tol=0.01) == 2
    assert spectral.numerical_rank(w, tol=0.004) == 3


def test_known_spectrum_metrics():
    sigma = np.array([4.0, 2.0, 1.0, 1.0])
    w = matrix_with_spectrum(sigma, 10, 7)
    s = spectral.summarize(w, tols=(1e-3, 0.3))
    fro = math.sqrt(22.0)
    assert s.ranks == {1e-3: 4, 0.3: 2}  # 2/sqrt(22) = 0.426 > 0.3, 1/sqrt(22) = 0.213
    assert s.frobenius_norm == pytest.approx(fro, rel=1e-12)
    assert s.spectral_norm == pytest.approx(4.0, rel=1e-12)
    assert s.stable_rank == pytest.approx(22.0 / 16.0, rel=1e-12)
    assert s.nuclear_fro_ratio == pytest.approx(8.0 / fro, rel=1e-12)
    p = sigma / sigma.sum()
    assert s.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    np.testing.assert_allclose(s.singular_values, [4, 2, 1, 1, 0, 0, 0], atol=1e-12)


def test_effective_rank_extremes():
    assert spectral.effective_rank(torch.eye(7)) == pytest.approx(7.0)
    assert spectral.effective_rank(matrix_with_spectrum([3.0], 5, 5)) == pytest.approx(1.0)


def test_zero_matrix_is_rank_zero_with_finite_metrics():
    s = spectral.summarize(torch.zeros(5, 3), tols=(1e-3,))
    assert s.rank() == 0
    values = [s.stable_rank, s.effective_rank, s.nuclear_fro_ratio, s.frobenius_norm]
    assert all(math.isfinite(v) and v == 0 for v in values)


@pytest.mark.parametrize("shape", [(1, 9), (9, 1)])
def test_vectors_as_matrices(shape):
    w = torch.arange(1.0, 10.0).reshape(shape)
    s = spectral.summarize(w)
    assert s.rank() == 1
    assert s.spectral_norm == pytest.approx(float(np.linalg.norm(np.arange(1, 10))))
    assert s.stable_rank == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises_before_svd(bad, capfd):
    w = torch.randn(4, 4)
    w[1, 2] = bad
    with pytest.raises(RankbiasError, match="NaN or Inf"):
        spectral.summarize(w)
    with pytest.raises(RankbiasError, match="layer3"):
        spectral.summarize_many({"ok": torch.randn(3, 3), "layer3": w})
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # MKL never got to print


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype):
    w = matrix_with_spectrum([1.0, 0.5, 0.25], 16, 12).to(dtype)
    oracle = np.linalg.svd(w.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(spectral.singular_values(w).numpy(), oracle, atol=1e-10)
    # bfloat16 rounding itself adds singular values near 4e-3: compare with the oracle.
    assert spectral.numerical_rank(w) == numpy_rank(w.double().numpy(), 1e-3)


def test_numpy_input():
    w = matrix_with_spectrum([2.0, 1.0, 1e-5], 6, 9).numpy()
    assert spectral.numerical_rank(w) == numpy_rank(w, 1e-3) == 2
    assert spectral.summarize(w).shape == (6, 9)


def test_conv_kernel_reshaped_out_by_in_k_k():
    kernel = torch.randn(6, 3, 3, 3)
    oracle = np.linalg.svd(kernel.double().reshape(6, 27).numpy(), compute_uv=False)
    np.testing.assert_allclose(spectral.singular_values(kernel).numpy(), oracle, rtol=1e-10)


def test_summarize_many_matches_single_calls():
    gen = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(8, 5, generator=gen), "b": torch.randn(8, 5, generator=gen),
               "c": torch.randn(4, 9, generator=gen), "d": torch.zeros(8, 5)}
    many = spectral.summarize_many(weights, tols=(1e-3, 0.1))
    assert list(many) == list(weights)
    for name, w in weights.items():
        single = spectral.summarize(w, tols=(1e-3, 0.1))
        assert many[name].ranks == single.ranks
        np.testing.assert_allclose(many[name].singular_values, single.singular_values,
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_tensor():
    w = torch.randn(20, 30, device="cuda")
    assert spectral.numerical_rank(w) == numpy_rank(w.cpu().numpy(), 1e-3)


def test_metrics_of_a_singular_value_vector_in_any_order():
    """[0, 1, 2] is the spectrum of a rank-2 matrix however it is ordered."""
    for order in ([0.0, 1.0, 2.0], [2.0, 0.0, 1.0], [2.0, 1.0, 0.0]):
        assert spectral.rank_from_singular_values(order, tol=1e-3) == 2
        assert spectral.rank_from_singular_values(order, tol=0.4, relative=True) == 2
        assert spectral.spectral_norm(order, from_sigma=True) == 2.0
        assert spectral.stable_rank(order, from_sigma=True) == pytest.approx(5 / 4)
