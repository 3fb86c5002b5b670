"""The factorization math on synthetic matrices with an anisotropic input covariance."""

from __future__ import annotations

import pytest
import torch

from offline_calibrate.factorize import factorize_unit, optimal_whitened_error, whitening

K = 96


def anisotropic_sigma(k: int = K, seed: int = 0, condition: float = 1e4) -> torch.Tensor:
    """A random SPD covariance whose eigenvalues span `condition` (log-spaced)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), k, dtype=torch.float64)
    return (q * evals) @ q.T


def errors(shapes=(64, 32, 32), k: int = K, seed: int = 1) -> list[torch.Tensor]:
    """Member errors with a decaying spectrum (like real quantization errors seen through Sigma)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in shapes:
        u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        s = torch.logspace(0, -2, min(rows, k), dtype=torch.float64)
        out.append((u[:, : s.numel()] * s) @ v[:, : s.numel()].T)
    return out


def whitened_residual(errs, factors, sigma) -> float:
    e = torch.cat(errs)
    ab = torch.cat([a.double() for a in factors.a]) @ factors.b.double()
    return float(torch.linalg.norm((e - ab) @ whitening(sigma).factor))


@pytest.mark.parametrize("rank", [4, 16])
def test_randomized_path_is_within_one_percent_of_eckart_young(rank):
    sigma, errs = anisotropic_sigma(), errors()
    factors = factorize_unit(errs, errs, sigma, rank, method="randomized", oversample=10, power_iters=2)
    optimum = optimal_whitened_error(errs, sigma, rank)
    assert whitened_residual(errs, factors, sigma) <= 1.01 * optimum


def test_exact_path_reaches_the_optimum_to_1e6():
    sigma, errs = anisotropic_sigma(), errors()
    factors = factorize_unit(errs, errs, sigma, 8, method="exact")
    optimum = optimal_whitened_error(errs, sigma, 8)
    assert abs(whitened_residual(errs, factors, sigma) - optimum) <= 1e-6 * optimum


def test_shared_b_lies_between_per_module_and_no_correction():
    sigma, errs = anisotropic_sigma(), errors()
    rank = 8
    shared = whitened_residual(errs, factorize_unit(errs, errs, sigma, rank, method="exact"), sigma)
    per_module = sum(
        whitened_residual([e], factorize_unit([e], [e], sigma, rank, method="exact"), sigma) ** 2 for e in errs
    ) ** 0.5
    uncorrected = float(torch.linalg.norm(torch.cat(errs) @ whitening(sigma).factor))
    assert per_module < shared < uncorrected


def test_full_rank_reproduces_the_error():
    sigma, errs = anisotropic_sigma(), errors(shapes=(40, 24))
    factors = factorize_unit(errs, errs, sigma, 64, method="exact")  # 64 = min(40 + 24, K)
    rebuilt = torch.cat([a.double() for a in factors.a]) @ factors.b.double()
    torch.testing.assert_close(rebuilt, torch.cat(errs), rtol=0, atol=1e-5)
    assert factors.whitened_error_after < 1e-6


def test_singular_sigma_takes_the_stable_path_and_stays_optimal():
    """A rank-deficient covariance (inputs live in a subspace): Cholesky fails, eigen path used."""
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(K, 40, generator=g, dtype=torch.float64)
    sigma = basis @ basis.T / 40
    errs = errors()
    factors = factorize_unit(errs, errs, sigma, 8, method="exact")
    assert factors.whitening == "eigen"
    assert torch.isfinite(factors.b).all()
    optimum = optimal_whitened_error(errs, sigma, 8)
    assert whitened_residual(errs, factors, sigma) <= optimum * (1 + 1e-6) + 1e-9


def test_ill_conditioned_sigma_stays_finite_and_optimal():
    sigma, errs = anisotropic_sigma(condition=1e14), errors()
    factors = factorize_unit(errs, errs, sigma, 8, method="exact")
    assert torch.isfinite(factors.b).all() and all(torch.isfinite(a).all() for a in factors.a)
    optimum = optimal_whitened_error(errs, sigma, 8)
    assert whitened_residual(errs, factors, sigma) <= optimum * (1 + 1e-4)


def test_rank_beyond_the_matrix_is_refused():
    errs = errors(shapes=(16,), k=24)
    with pytest.raises(ValueError, match="rank 17 is outside 1..16"):
        factorize_unit(errs, errs, anisotropic_sigma(24), 17)
