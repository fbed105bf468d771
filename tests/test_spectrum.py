"""Spectral statistics against numpy/scipy on matrices with known spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy, ortho_group

from lowrank_compress.spectrum import (
    break_even_rank,
    effective_rank,
    energy_rank,
    factored_params,
    power_spectral_norm,
    singular_values,
    spectrum_stats,
    stable_rank,
)


def known_spectrum_matrix(s: np.ndarray, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """W = U diag(s) V^T with random orthogonal U (m x m) and V (n x n)."""
    u = ortho_group.rvs(m, random_state=seed)[:, : len(s)]
    v = ortho_group.rvs(n, random_state=seed + 1)[:, : len(s)]
    return torch.from_numpy((u * s) @ v.T)


SPECTRA = {
    "decaying": np.geomspace(10.0, 0.01, 40),
    "flat": np.ones(40),
    "one-dominant": np.r_[100.0, np.full(39, 0.5)],
}


@pytest.mark.parametrize("kind", sorted(SPECTRA))
@pytest.mark.parametrize(("m", "n"), [(48, 40), (40, 64)])
def test_statistics_match_known_spectrum(kind: str, m: int, n: int) -> None:
    s = SPECTRA[kind]
    w = known_spectrum_matrix(s, m, n)
    got = singular_values(w.float())
    np.testing.assert_allclose(got[: len(s)].numpy(), np.sort(s)[::-1], rtol=1e-4, atol=1e-5)

    st = spectrum_stats(w)
    expected_stable = np.sum(s**2) / np.max(s) ** 2
    assert st.stable_rank == pytest.approx(expected_stable, rel=1e-5)
    assert st.frobenius == pytest.approx(np.linalg.norm(w.numpy()), rel=1e-6)
    assert st.spectral == pytest.approx(np.linalg.norm(w.numpy(), 2), rel=1e-6)
    # effective rank: exp of the Shannon entropy of s / sum(s) (scipy normalizes the distribution itself)
    assert st.effective_rank == pytest.approx(np.exp(entropy(s)), rel=1e-4)
    for e, r in st.energy_ranks.items():
        energies = np.sort(s)[::-1] ** 2
        brute = next(k for k in range(1, len(s) + 1) if energies[:k].sum() >= e * energies.sum() * (1 - 1e-9))
        assert r == brute, (e, r, brute)


def test_energy_rank_edges() -> None:
    s = torch.tensor([3.0, 4.0, 0.0]).sort(descending=True).values  # energies 16, 9, 0 of 25
    assert energy_rank(s, 0.64) == 1
    assert energy_rank(s, 0.65) == 2
    assert energy_rank(s, 1.0) == 2
    assert energy_rank(torch.zeros(3), 0.9) == 0
    with pytest.raises(ValueError):
        energy_rank(s, 0.0)


def test_zero_matrix_is_harmless() -> None:
    st = spectrum_stats(torch.zeros(8, 6))
    assert st.stable_rank == 0.0 and st.effective_rank == 0.0 and st.spectral == 0.0
    assert spectrum_stats(torch.zeros(8, 6), fast=True).stable_rank == 0.0


def test_identity_ranks() -> None:
    s = singular_values(torch.eye(7))
    assert stable_rank(s) == pytest.approx(7.0)
    assert effective_rank(s) == pytest.approx(7.0)


@pytest.mark.parametrize(("m", "n"), [(200, 80), (80, 200)])
def test_fast_mode_agrees_with_exact(m: int, n: int) -> None:
    s = np.geomspace(5.0, 0.05, 80)
    w = known_spectrum_matrix(s, m, n, seed=3).float()
    exact = spectrum_stats(w)
    fast = spectrum_stats(w, fast=True)
    assert fast.frobenius == pytest.approx(exact.frobenius, rel=1e-6)
    assert fast.spectral == pytest.approx(float(np.max(s)), rel=1e-4)
    assert fast.stable_rank == pytest.approx(exact.stable_rank, rel=1e-3)
    assert fast.energy_ranks is None and fast.singular_values is None


def test_power_iteration_on_random_gaussian() -> None:
    w = torch.randn(300, 120, generator=torch.Generator().manual_seed(0))
    assert power_spectral_norm(w) == pytest.approx(np.linalg.norm(w.numpy(), 2), rel=1e-4)


def test_break_even_and_factored_params() -> None:
    assert break_even_rank(576, 1536) == pytest.approx(576 * 1536 / (576 + 1536))
    # below break-even the factors are cheaper, above it the layer stays dense
    assert factored_params(100, 50, 10) == 10 * 150
    assert factored_params(100, 50, 40) == 100 * 50
