"""Covariance-aligned low-rank factors with one shared right factor per unit.

For a unit whose members read the same input x (q/k/v, gate/up, or a single module) with
quantization errors E_i (d_i x K), we stack E_cat = [E_1; ...; E_m] and solve

    min_{A, B}  || (E_cat - A B) Sigma^{1/2} ||_F ,   A = [A_1; ...; A_m] (sum d_i x r),  B (r x K)

where Sigma is the input's second moment. Any W with W W^T = Sigma whitens the objective
(||M Sigma^{1/2}||_F = ||M W||_F), so we use the Cholesky factor (fast, and exact for
positive-definite Sigma) and fall back to an eigendecomposition with a pseudo-inverse when
Sigma is singular or too ill-conditioned for Cholesky. The best rank-r approximation of
M = E_cat W (Eckart-Young) is found by an exact SVD for small shapes, otherwise by a
randomized SVD of the QR-reduced M (the R factor of E_cat when it has more rows than columns).
Everything runs in float64: the shapes are at most a few thousand wide per unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXACT_MAX_DIM = 1024  # below this the exact SVD is cheap
CHOLESKY_MAX_CONDITION = 1e12  # above this, use the eigen path (Cholesky loses digits)


@dataclass
class Whitening:
    """W with W W^T = Sigma, and a way to apply W^+ from the right (to un-whiten B)."""

    factor: torch.Tensor  # W, [K, K] (or [K, k] on the eigen path)
    kind: str  # "cholesky" | "eigen"

    def unwhiten_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Return rows @ W^+ for rows [r, k] (B = S^{1/2} V^T W^+)."""
        if self.kind == "cholesky":
            # rows @ L^{-1} = (L^{-T} rows^T)^T, a triangular solve.
            return torch.linalg.solve_triangular(self.factor.T, rows.T, upper=True).T
        # factor = Q_+ diag(sqrt(lam_+)); its pseudo-inverse is diag(1/sqrt(lam_+)) Q_+^T.
        norms_sq = (self.factor * self.factor).sum(dim=0)
        return (rows / norms_sq) @ self.factor.T


def whitening(sigma: torch.Tensor) -> Whitening:
    """Cholesky of Sigma when well conditioned, else a rank-revealing eigen factor."""
    sigma = sigma.to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        diag = torch.diagonal(chol)
        if float((diag.max() / diag.min()) ** 2) < CHOLESKY_MAX_CONDITION:
            return Whitening(chol, "cholesky")
    evals, evecs = torch.linalg.eigh((sigma + sigma.T) / 2)
    cutoff = evals.max().clamp_min(0) * sigma.shape[0] * torch.finfo(torch.float64).eps
    keep = evals > cutoff
    if not bool(keep.any()):
        raise ValueError("the input covariance is zero: the calibration data never reached this module")
    return Whitening(evecs[:, keep] * evals[keep].sqrt(), "eigen")


def randomized_svd(
    m: torch.Tensor, rank: int, oversample: int, power_iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of m by a Gaussian range finder with re-orthonormalized power iterations."""
    width = min(rank + oversample, *m.shape)
    omega = torch.randn(m.shape[1], width, generator=generator, dtype=m.dtype, device="cpu").to(m.device)
    basis, _ = torch.linalg.qr(m @ omega)
    for _ in range(power_iters):
        basis, _ = torch.linalg.qr(m.T @ basis)
        basis, _ = torch.linalg.qr(m @ basis)
    u_small, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def truncated_svd(
    m: torch.Tensor, rank: int, method: str, oversample: int, power_iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of m; QR-reduces tall matrices first so the SVD works on a K x K core."""
    q_tall = None
    if m.shape[0] > m.shape[1]:
        q_tall, m = torch.linalg.qr(m)
    use_exact = method == "exact" or (method == "auto" and min(m.shape) <= EXACT_MAX_DIM)
    if use_exact or rank + oversample >= min(m.shape):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, vh = randomized_svd(m, rank, oversample, power_iters, generator)
    return (u if q_tall is None else q_tall @ u), s, vh


@dataclass
class UnitFactors:
    """Factors of one unit and the numbers the report and GlowQ-S need."""

    a: list[torch.Tensor]  # per member [d_i, r], float32
    b: torch.Tensor  # [r, K], float32
    singular_values: torch.Tensor  # kept singular values of the whitened error, float64
    whitened_error_before: float  # ||E_cat W||_F / ||W_cat W||_F
    whitened_error_after: float  # ||(E_cat - A B) W||_F / ||W_cat W||_F
    whitening: str  # "cholesky" | "eigen"


def factorize_unit(
    errors: list[torch.Tensor],
    weights: list[torch.Tensor],
    sigma: torch.Tensor | Whitening,
    rank: int,
    method: str = "auto",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> UnitFactors:
    """Shared-B factors for the members' errors; `weights` only normalize the reported errors.

    `sigma` may be given already factored (a Whitening), so units reading one input share it.
    """
    white = sigma if isinstance(sigma, Whitening) else whitening(sigma)
    device = white.factor.device
    e_cat = torch.cat([e.to(device, torch.float64) for e in errors], dim=0)
    max_rank = min(e_cat.shape)
    if not 0 < rank <= max_rank:
        raise ValueError(f"rank {rank} is outside 1..{max_rank} for an error matrix of shape {tuple(e_cat.shape)}")
    m = e_cat @ white.factor
    generator = torch.Generator().manual_seed(seed)
    u, s, vh = truncated_svd(m, rank, method, oversample, power_iters, generator)
    root = s.sqrt()
    a_cat = u * root
    b = white.unwhiten_rows(root.unsqueeze(1) * vh)
    w_norm = torch.linalg.norm(torch.cat([w.to(device, torch.float64) for w in weights], dim=0) @ white.factor)
    residual = torch.linalg.norm((e_cat - a_cat @ b) @ white.factor)
    sizes = [e.shape[0] for e in errors]
    return UnitFactors(
        a=[part.to(torch.float32) for part in torch.split(a_cat, sizes, dim=0)],
        b=b.to(torch.float32),
        singular_values=s,
        whitened_error_before=float(torch.linalg.norm(m) / w_norm),
        whitened_error_after=float(residual / w_norm),
        whitening=white.kind,
    )


def optimal_whitened_error(errors: list[torch.Tensor], sigma: torch.Tensor, rank: int) -> float:
    """||E_cat Sigma^{1/2} - best rank-r||_F via a full SVD (Eckart-Young); for tests and checks."""
    e_cat = torch.cat([e.to(torch.float64) for e in errors], dim=0)
    s = torch.linalg.svdvals(e_cat @ whitening(sigma).factor)
    return float(s[rank:].square().sum().sqrt())
