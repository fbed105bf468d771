"""Spectral statistics of a weight matrix: norms, stable rank (Cuttlefish), effective rank, energy ranks.

Exact mode takes the full spectrum (singular values in float32, sums in float64). Fast mode avoids the SVD:
the Frobenius norm is exact and the spectral norm comes from power iteration on W^T W, which is enough for the
stable rank of very large models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ENERGIES: tuple[float, ...] = (0.90, 0.95, 0.99)


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """All singular values of `w`, descending, as float64 (computed in float32 unless `w` is float64)."""
    work = w if w.dtype == torch.float64 else w.float()
    return torch.linalg.svdvals(work).double()


def stable_rank(s: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2 from the singular values (Cuttlefish). 0 for a zero matrix."""
    top = float(s[0]) if s.numel() else 0.0
    return float((s.double() ** 2).sum()) / top**2 if top > 0 else 0.0


def effective_rank(s: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalized singular values (Roy & Vetterli). 0 for a zero matrix."""
    total = float(s.double().sum())
    if total <= 0:
        return 0.0
    p = s.double() / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest r such that the top-r singular values hold at least `energy` of sum(s^2)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    e = s.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 0
    cumulative = torch.cumsum(e, 0) / total
    # a tiny tolerance so that energy=1.0 does not hinge on the last ulp of the cumulative sum
    return min(
        int(torch.searchsorted(cumulative, cumulative.new_tensor(energy - 1e-12))) + 1,
        len(s),
    )


def break_even_rank(out_features: int, in_features: int) -> float:
    """The rank m n / (m + n) at which factors cost as many parameters as the dense weight."""
    return out_features * in_features / (out_features + in_features)


def factored_params(out_features: int, in_features: int, rank: int) -> int:
    """Parameters kept when a layer is factorized at `rank`, or kept dense when that saves nothing."""
    return min(out_features * in_features, rank * (out_features + in_features))


def power_spectral_norm(
    w: torch.Tensor, *, block: int = 8, iters: int = 60, tol: float = 1e-7, seed: int = 0
) -> float:
    """Largest singular value by block power (subspace) iteration with a Rayleigh-Ritz step.

    A block of `block` vectors converges at the rate (sigma_{block+1} / sigma_1)^2 per step rather than
    (sigma_2 / sigma_1)^2, so layers whose top singular values are nearly tied still converge fast.
    Products are float32; stops once the estimate moves less than `tol` (relative).
    """
    work = w.float()
    if work.shape[1] <= work.shape[0]:
        work = work.T  # iterate on the smaller Gram side (rows of `work`), never formed explicitly
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(
        work.shape[0], min(block, *work.shape), generator=gen
    )  # the same start on every device
    q = torch.linalg.qr(start.to(work.device)).Q
    sigma = 0.0
    for _ in range(iters):
        z = work.T @ q  # (other side) x k
        q, _ = torch.linalg.qr(work @ z)
        new_sigma = float(torch.linalg.matrix_norm(work.T @ q, ord=2))  # Rayleigh-Ritz on the small block
        if new_sigma == 0.0 or abs(new_sigma - sigma) <= tol * new_sigma:
            return new_sigma
        sigma = new_sigma
    return sigma


@dataclass
class SpectrumStats:
    """What analyze reports for one matrix. Fields only exact mode can give are None in fast mode."""

    frobenius: float
    spectral: float
    stable_rank: float
    effective_rank: float | None = None
    energy_ranks: dict[float, int] | None = None
    singular_values: torch.Tensor | None = field(default=None, repr=False)


def spectrum_stats(
    w: torch.Tensor,
    *,
    fast: bool = False,
    energies: tuple[float, ...] = ENERGIES,
    tol: float = 1e-7,
    iters: int = 60,
) -> SpectrumStats:
    """Statistics of `w` (out x in). Exact: one full SVD. Fast: exact Frobenius norm, power-iteration spectral norm
    converged to `tol` (relative) or stopped after `iters` steps."""
    if fast:
        fro = float(torch.linalg.vector_norm(w.double()))
        spec = power_spectral_norm(w, tol=tol, iters=iters)
        return SpectrumStats(frobenius=fro, spectral=spec, stable_rank=(fro / spec) ** 2 if spec > 0 else 0.0)
    s = singular_values(w)
    return SpectrumStats(
        frobenius=math.sqrt(float((s**2).sum())),
        spectral=float(s[0]) if s.numel() else 0.0,
        stable_rank=stable_rank(s),
        effective_rank=effective_rank(s),
        energy_ranks={e: energy_rank(s, e) for e in energies},
        singular_values=s,
    )


def estimated_stable_rank(w: torch.Tensor) -> float:
    """The stable rank with the spectral norm by at most 20 block power steps: reported, and read by the
    stable-rank policy, where a few parts in a thousand do not matter. Trained weights converge in a few steps;
    random ones (scale benchmarks) do not: on a random 11008 x 4096 matrix 60 steps took 12.7 s for a 2e-3 error in
    the stable rank, 20 steps 4.4 s for 2e-2, against 10 s for LAPACK's exact norm (2 cores)."""
    return spectrum_stats(w, fast=True, tol=1e-4, iters=20).stable_rank
