"""The SVD variants: exactness at full rank, each method's objective, and the whitening optimum checked with scipy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import scipy.linalg
import torch

from lowrank_compress.calibration import LayerStats
from lowrank_compress.errors import CalibrationError, LowrankError
from lowrank_compress.factorize import METHODS, Decomposition, decompose


@dataclass
class Stats:
    """Same fields as calibration.LayerStats; built here so the tests depend only on the math."""

    gram: torch.Tensor
    abs_sum: torch.Tensor
    n_tokens: int
    fisher_rows: torch.Tensor | None = None
    out_grad_sq: float | None = None


def make_inputs(n_tokens: int, in_f: int, seed: int) -> np.ndarray:
    """Calibration inputs with correlated columns and uneven channel scales (like real activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((in_f, in_f)) / np.sqrt(in_f) + np.eye(in_f)
    scales = np.exp(rng.uniform(-2.0, 2.0, in_f))
    return (rng.standard_normal((n_tokens, in_f)) @ mix) * scales


def make_stats(x: np.ndarray, out_f: int, seed: int) -> Stats:
    rng = np.random.default_rng(seed + 1)
    return Stats(
        gram=torch.from_numpy(x.T @ x),
        abs_sum=torch.from_numpy(np.abs(x).sum(0)),
        n_tokens=x.shape[0],
        fisher_rows=torch.from_numpy(rng.uniform(0.1, 5.0, out_f) * x.shape[0]),
    )


def make_weight(out_f: int, in_f: int, seed: int) -> np.ndarray:
    """A weight with a decaying spectrum, as trained weights have."""
    rng = np.random.default_rng(seed)
    k = min(out_f, in_f)
    a, _ = np.linalg.qr(rng.standard_normal((out_f, k)))
    b, _ = np.linalg.qr(rng.standard_normal((in_f, k)))
    return (a * (1.0 / (1.0 + np.arange(k)) ** 0.7)) @ b.T


def objective(method: str, delta: np.ndarray, x: np.ndarray, stats: Stats, alpha: float = 0.5) -> float:
    """The squared error each method minimizes, written directly from its definition."""
    if method == "svd":
        return float((delta**2).sum())
    if method == "asvd":
        s = (stats.abs_sum.numpy() / stats.n_tokens) ** alpha
        return float(((delta * s) ** 2).sum())
    if method == "whiten":
        return float(((delta @ x.T) ** 2).sum())
    d = np.sqrt(stats.fisher_rows.numpy() / stats.n_tokens)
    return float(((d[:, None] * delta) ** 2).sum())


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reproduces_the_dense_layer(method: str, shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    w = make_weight(out_f, in_f, seed=1)
    x = make_inputs(200, in_f, seed=2)
    dec = decompose(torch.from_numpy(w).float(), method, make_stats(x, out_f, seed=3))
    k = min(shape)
    assert dec.full_rank == dec.stored_rank == k
    assert dec.u.shape == (out_f, k) and dec.v.shape == (k, in_f) and dec.s.dtype == torch.float64
    ref = torch.from_numpy(w).float().double()  # the float32 weight the layer holds, as float64
    up, down = dec.factors(k, dtype=torch.float64)
    assert float(torch.linalg.norm(up @ down - ref) / torch.linalg.norm(ref)) < 1e-10
    up32, down32 = dec.factors(k)
    assert up32.dtype == torch.float32 and up32.shape == (out_f, k) and down32.shape == (k, in_f)
    assert float(torch.linalg.norm((up32 @ down32).double() - ref) / torch.linalg.norm(ref)) < 1e-5
    assert bool((dec.s[:-1] >= dec.s[1:]).all())


@pytest.mark.parametrize("method", METHODS)
def test_truncation_error_curve_is_the_objective(method: str) -> None:
    w = make_weight(24, 32, seed=4)
    x = make_inputs(100, 32, seed=5)
    stats = make_stats(x, 24, seed=6)
    dec = decompose(torch.from_numpy(w), method, stats)
    err = dec.truncation_error()
    assert err.shape == (25,) and float(err[-1]) == 0.0
    assert float(err[0]) == pytest.approx(objective(method, w, x, stats), rel=1e-9)
    for r in range(1, 25):
        direct = objective(method, w - dec.reconstruct(r).numpy(), x, stats)
        assert float(err[r]) == pytest.approx(direct, rel=1e-7, abs=1e-12 * float(err[0]))


def test_whitening_error_equals_discarded_values_and_is_optimal() -> None:
    out_f, in_f = 40, 32
    w = make_weight(out_f, in_f, seed=7)
    x = make_inputs(300, in_f, seed=8)
    stats = make_stats(x, out_f, seed=9)
    white = decompose(torch.from_numpy(w), "whiten", stats)
    plain = decompose(torch.from_numpy(w), "svd")
    assert white.ridge == 0.0
    # the optimum, independently: Eckart-Young on W G^(1/2), since ||A X^T||_F^2 = tr(A G A^T) = ||A G^(1/2)||_F^2
    root = np.real(scipy.linalg.sqrtm(x.T @ x))
    sv = np.linalg.svd(w @ root, compute_uv=False)
    s = white.s.numpy()
    for r in (1, 4, 10, 20, 31):
        out_err = float((((w - white.reconstruct(r).numpy()) @ x.T) ** 2).sum())
        assert out_err == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-8)
        assert out_err == pytest.approx(float((sv[r:] ** 2).sum()), rel=1e-8)
        plain_err = float((((w - plain.reconstruct(r).numpy()) @ x.T) ** 2).sum())
        assert out_err <= plain_err * (1 + 1e-12)
    # on correlated inputs whitening is strictly better than plain SVD at a mid rank
    r = 10
    assert float(white.truncation_error()[r]) < 0.9 * float(
        (((w - plain.reconstruct(r).numpy()) @ x.T) ** 2).sum()
    )


@pytest.mark.parametrize("shape", [(40, 32), (24, 32)])
@pytest.mark.parametrize("cross", [None, "cross", "weighted_cross"])
def test_loss_weighted_whiten_is_the_optimum_of_the_row_weighted_objective(
    shape: tuple[int, int], cross: str | None
) -> None:
    """min over rank-r M of sum_t sum_i d_i ((W X_t - M X'_t)_i)^2: with C = X'^T X' = L L^T and the unconstrained
    optimum M* = W X^T X' C^-1, the objective is const + ||D^1/2 (M* - M) L||_F^2, so Eckart-Young on D^1/2 M* L gives
    M = D^-1/2 [D^1/2 M* L]_r L^-1 (X' = X: M* = W, SVD-LLM's whitening with row weights). Computed here with numpy's
    SVD and compared; at full rank the fit reproduces M* (W itself without a cross term)."""
    out_f, in_f = shape
    w = make_weight(out_f, in_f, seed=31)
    x = make_inputs(300, in_f, seed=32)
    shifted = x if cross is None else x + 0.3 * make_inputs(300, in_f, seed=33)
    d = np.exp(np.random.default_rng(34).uniform(-3.0, 3.0, out_f))
    stats = LayerStats(torch.from_numpy(shifted.T @ shifted), torch.from_numpy(np.abs(shifted).sum(0)), 300)
    if cross == "cross":
        stats.cross = torch.from_numpy(x.T @ shifted)
    elif cross == "weighted_cross":
        stats.weighted_cross = torch.from_numpy(w @ x.T @ shifted)
    dec = decompose(torch.from_numpy(w), "whiten", stats, row_weights=torch.from_numpy(d))
    plain = decompose(torch.from_numpy(w), "whiten", stats)

    gram = shifted.T @ shifted
    best = w @ x.T @ shifted @ np.linalg.inv(gram)
    chol = np.linalg.cholesky(gram)
    u, sv, vt = np.linalg.svd(np.sqrt(d)[:, None] * best @ chol, full_matrices=False)

    def weighted_error(m: np.ndarray) -> float:
        return float((d[:, None] * (w @ x.T - m @ shifted.T) ** 2).sum())

    for r in (1, 5, 12):
        want = ((u[:, :r] * sv[:r]) @ vt[:r] @ np.linalg.inv(chol)) / np.sqrt(d)[:, None]
        got = dec.reconstruct(r).numpy()
        assert np.abs(got - want).max() <= 1e-8 * np.abs(want).max()
        assert weighted_error(got) <= weighted_error(plain.reconstruct(r).numpy()) * (1 + 1e-12)
    k = min(shape)
    assert np.abs(dec.reconstruct(k).numpy() - best).max() <= 1e-8 * np.abs(best).max()


def test_row_weights_are_for_whiten_only_and_need_one_per_row() -> None:
    w = torch.from_numpy(make_weight(8, 6, seed=35))
    stats = make_stats(make_inputs(40, 6, seed=36), 8, seed=37)
    with pytest.raises(ValueError, match="whiten"):
        decompose(w, "asvd", stats, row_weights=torch.ones(8))
    with pytest.raises(ValueError, match="row_weights has shape"):
        decompose(w, "whiten", stats, row_weights=torch.ones(6))


def test_rank_deficient_gram_escalates_the_ridge() -> None:
    out_f, in_f, n_tok = 30, 40, 12  # fewer tokens than input features: the Gram has rank 12
    w = make_weight(out_f, in_f, seed=10)
    x = make_inputs(n_tok, in_f, seed=11)
    dec = decompose(torch.from_numpy(w), "whiten", make_stats(x, out_f, seed=12))
    assert dec.ridge > 0.0
    for t in (dec.u, dec.s, dec.v):
        assert bool(torch.isfinite(t).all())
    up, down = dec.factors(dec.full_rank, dtype=torch.float64)
    assert float(torch.linalg.norm(up @ down - torch.from_numpy(w)) / np.linalg.norm(w)) < 1e-6
    # the ridge is tiny: at rank 12 the calibration outputs are still reproduced (the optimum there is exact)
    out_err = float((((w - dec.reconstruct(n_tok).numpy()) @ x.T) ** 2).sum())
    assert out_err < 1e-8 * float(((w @ x.T) ** 2).sum())


def test_damping_blends_whitening_towards_plain_svd() -> None:
    w = torch.from_numpy(make_weight(20, 16, seed=36))
    stats = make_stats(make_inputs(100, 16, seed=37), 20, seed=38)
    plain = decompose(w, "svd")
    heavy = decompose(w, "whiten", stats, damping=1e8)  # G + 1e8 mean(diag) I is nearly a multiple of I
    assert heavy.ridge == 1e8
    light = decompose(w, "whiten", stats)
    for r in (3, 8):
        assert torch.allclose(heavy.reconstruct(r), plain.reconstruct(r), atol=1e-6)
        assert not torch.allclose(light.reconstruct(r), plain.reconstruct(r), atol=1e-3)


def _loaded_whitening_reference(
    w: np.ndarray, x: np.ndarray, damping: float
) -> tuple[np.ndarray, np.ndarray]:
    """numpy float64: the Cholesky factor L of X^T X + damping x mean(diag) I and the singular values of W L."""
    gram = x.T @ x
    chol = np.linalg.cholesky(gram + damping * np.diag(gram).mean() * np.eye(gram.shape[0]))
    return chol, np.linalg.svd(w @ chol, compute_uv=False)


def test_the_damped_whiten_fit_runs_in_float32_and_reaches_the_float64_optimum() -> None:
    """Damping >= FLOAT32_DAMPING: computed in float32, yet SVD-LLM's objective with the loading,
    ||(W - W_r) L||_F^2 with L L^T = X^T X + rho I, equals the float64 optimum sum_{i>r} s_i(W L)^2 (Eckart-Young)
    to 1e-4, with input channels 1000x the others as LLM activations have."""
    rng = np.random.default_rng(40)
    x, w = rng.standard_normal((400, 64)), make_weight(48, 64, seed=41)
    x[:, :3] *= 1000.0
    chol, s = _loaded_whitening_reference(w, x, damping=0.1)
    stats = make_stats(x, 48, seed=42)
    dec = decompose(torch.from_numpy(w), "whiten", stats, damping=0.1)
    assert dec.u.dtype == dec.v.dtype == torch.float32 and dec.s.dtype == torch.float64
    np.testing.assert_allclose(dec.s.numpy(), s, rtol=1e-4)
    for r in (4, 16, 40):
        got = float((((w - dec.reconstruct(r).numpy()) @ chol) ** 2).sum())
        assert got == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-4)
    assert decompose(torch.from_numpy(w), "whiten", stats, damping=5e-3).u.dtype == torch.float64


def test_a_gram_float32_cannot_hold_is_factorized_in_float64() -> None:
    """Statistics beyond float32's range (3.4e38) fall back to float64 instead of failing."""
    x, w = make_inputs(60, 8, seed=43) * 1e20, make_weight(6, 8, seed=44)
    chol, s = _loaded_whitening_reference(w, x, damping=0.1)
    dec = decompose(torch.from_numpy(w), "whiten", make_stats(x, 6, seed=45), damping=0.1)
    assert dec.u.dtype == torch.float64
    np.testing.assert_allclose(dec.s.numpy(), s, rtol=1e-9)


def test_zero_input_channel_is_handled() -> None:
    x = make_inputs(80, 16, seed=13)
    x[:, 5] = 0.0  # a dead channel: zero row and column in the Gram, zero mean |x|
    w = make_weight(12, 16, seed=14)
    stats = make_stats(x, 12, seed=15)
    for method in ("whiten", "asvd"):
        dec = decompose(torch.from_numpy(w), method, stats)
        assert bool(torch.isfinite(dec.v).all())
        assert np.allclose(dec.reconstruct(12).numpy(), w, atol=1e-9)


def test_asvd_alpha_zero_is_plain_svd() -> None:
    w = torch.from_numpy(make_weight(20, 28, seed=16))
    stats = make_stats(make_inputs(50, 28, seed=17), 20, seed=18)
    a = decompose(w, "asvd", stats, asvd_alpha=0.0)
    p = decompose(w, "svd")
    assert torch.allclose(a.s, p.s, rtol=1e-12)
    for r in (1, 5, 13):
        assert torch.allclose(a.reconstruct(r), p.reconstruct(r), atol=1e-12)
    # and a non-zero alpha changes the result
    b = decompose(w, "asvd", stats, asvd_alpha=0.5)
    assert not torch.allclose(b.reconstruct(5), p.reconstruct(5), atol=1e-6)


def test_fisher_with_uniform_rows_is_plain_svd() -> None:
    w = torch.from_numpy(make_weight(20, 28, seed=19))
    stats = make_stats(make_inputs(50, 28, seed=20), 20, seed=21)
    stats.fisher_rows = torch.full((20,), 7.0)
    f = decompose(w, "fisher", stats)
    p = decompose(w, "svd")
    c2 = 7.0 / stats.n_tokens  # D = sqrt(c2) I scales the spectrum by sqrt(c2)
    assert torch.allclose(f.s, p.s * np.sqrt(c2), rtol=1e-12)
    for r in (1, 5, 13):
        assert torch.allclose(f.reconstruct(r), p.reconstruct(r), atol=1e-12)


def test_fisher_weighting_beats_plain_svd_on_its_objective() -> None:
    w = make_weight(20, 28, seed=22)
    x = make_inputs(50, 28, seed=23)
    stats = make_stats(x, 20, seed=24)
    f = decompose(torch.from_numpy(w), "fisher", stats)
    p = decompose(torch.from_numpy(w), "svd")
    for r in (2, 6, 12):
        fe = objective("fisher", w - f.reconstruct(r).numpy(), x, stats)
        pe = objective("fisher", w - p.reconstruct(r).numpy(), x, stats)
        assert fe <= pe * (1 + 1e-12)


def test_factors_are_balanced_and_castable() -> None:
    x = make_inputs(500, 24, seed=25) * 30.0  # large Gram scale: whitened singular values far from 1
    w = make_weight(16, 24, seed=26)
    dec = decompose(torch.from_numpy(w), "whiten", make_stats(x, 16, seed=27))
    assert float(dec.s[0]) > 100.0
    up, down = dec.factors(8, dtype=torch.float64)
    assert torch.allclose(
        torch.linalg.vector_norm(up, dim=0), torch.linalg.vector_norm(down, dim=1), rtol=1e-10
    )
    assert torch.allclose(up @ down, dec.reconstruct(8), atol=1e-12)
    up16, down16 = dec.factors(8, dtype=torch.bfloat16)
    assert up16.dtype == torch.bfloat16 and bool(torch.isfinite(up16).all() and torch.isfinite(down16).all())
    rel = torch.linalg.norm((up16.double() @ down16.double()) - dec.reconstruct(8)) / torch.linalg.norm(
        dec.reconstruct(8)
    )
    assert float(rel) < 2e-2


def test_truncate_keeps_the_spectrum() -> None:
    dec = decompose(torch.from_numpy(make_weight(12, 10, seed=28)), "svd")
    small = dec.truncate(4)
    assert small.stored_rank == 4 and small.full_rank == 10
    assert torch.equal(small.truncation_error(), dec.truncation_error())
    assert torch.allclose(small.reconstruct(4), dec.reconstruct(4))
    with pytest.raises(ValueError):
        small.factors(5)
    assert dec.truncate(0).stored_rank == 0
    with pytest.raises(ValueError):
        dec.factors(0)


def test_plain_svd_spectrum_matches_numpy() -> None:
    w = make_weight(15, 9, seed=29)
    dec = decompose(torch.from_numpy(w), "svd")
    assert np.allclose(dec.s.numpy(), np.linalg.svd(w, compute_uv=False), rtol=1e-12)
    assert isinstance(dec, Decomposition) and dec.method == "svd" and dec.shape == (15, 9)


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
def test_ill_conditioned_spectrum_is_exact_where_truncation_needs_it(shape: tuple[int, int]) -> None:
    """Singular values spread over 12 decades: the kept ones match LAPACK, truncation stays optimal, and the
    full-rank product is exact although the smallest directions are round-off."""
    out_f, in_f = shape
    rng = np.random.default_rng(33)
    k = min(shape)
    a, _ = np.linalg.qr(rng.standard_normal((out_f, k)))
    b, _ = np.linalg.qr(rng.standard_normal((in_f, k)))
    sigma = np.logspace(0, -12, k)
    w = (a * sigma) @ b.T
    dec = decompose(torch.from_numpy(w), "svd")
    top = k // 2  # down to 1e-6 of the largest, beyond any break-even rank
    assert np.allclose(dec.s[:top].numpy(), sigma[:top], rtol=1e-8)
    for r in (1, 10, top):
        exact_tail = float((sigma[r:] ** 2).sum())
        got = float(((dec.reconstruct(r).numpy() - w) ** 2).sum())
        assert got == pytest.approx(exact_tail, rel=1e-6)
        assert float(dec.truncation_error()[r]) == pytest.approx(exact_tail, rel=1e-6, abs=1e-28)
    assert np.linalg.norm(dec.reconstruct(k).numpy() - w) <= 1e-13 * np.linalg.norm(w)


@pytest.mark.parametrize("method", METHODS)
def test_spectrum_only_matches_the_full_decomposition(method: str) -> None:
    w = make_weight(20, 14, seed=34)
    stats = make_stats(make_inputs(60, 14, seed=35), 20, seed=36)
    full = decompose(torch.from_numpy(w), method, stats)
    alone = decompose(torch.from_numpy(w), method, stats, spectrum_only=True)
    assert alone.stored_rank == 0 and alone.shape == (20, 14)
    torch.testing.assert_close(alone.s, full.s, rtol=1e-9, atol=1e-12 * float(full.s[0]))
    torch.testing.assert_close(alone.truncation_error(), full.truncation_error(), rtol=1e-9, atol=1e-20)


def test_bad_inputs() -> None:
    w = torch.from_numpy(make_weight(8, 6, seed=30))
    stats = make_stats(make_inputs(20, 6, seed=31), 8, seed=32)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(LowrankError, match="non-finite"):
        decompose(bad, "svd")
    bad[0, 0] = float("inf")
    with pytest.raises(LowrankError, match="non-finite"):
        decompose(bad, "whiten", stats)
    for method in ("asvd", "whiten", "fisher"):
        with pytest.raises(ValueError, match="statistics"):
            decompose(w, method, None)
    with pytest.raises(ValueError, match="fisher_rows"):
        decompose(w, "fisher", Stats(stats.gram, stats.abs_sum, stats.n_tokens))
    with pytest.raises(ValueError, match="unknown method"):
        decompose(w, "qr")
    with pytest.raises(ValueError, match="shape"):
        decompose(w.T, "whiten", stats)
    nan_stats = Stats(stats.gram.clone(), stats.abs_sum, stats.n_tokens)
    nan_stats.gram[1, 1] = float("nan")
    with pytest.raises(CalibrationError):
        decompose(w, "whiten", nan_stats)
    with pytest.raises(CalibrationError, match="zero"):
        decompose(w, "whiten", Stats(torch.zeros(6, 6), stats.abs_sum, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n_tokens", [200, 12])
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method: str, n_tokens: int) -> None:
    w = torch.from_numpy(make_weight(48, 40, seed=33)).float()
    stats = make_stats(make_inputs(n_tokens, 40, seed=34), 48, seed=35)
    cpu = decompose(w, method, stats)
    gpu = decompose(w.cuda(), method, stats)  # the statistics stay on the CPU: moved to the weight's device
    assert gpu.s.is_cuda and (gpu.ridge > 0) == (cpu.ridge > 0)
    # a ridge escalation may stop one step apart on the two devices: then only the directions the data determines
    # (rank <= n_tokens) and the full rank are comparable
    exact = cpu.ridge == 0
    tol = 1e-8 if exact else 1e-6
    err = cpu.truncation_error()
    assert torch.allclose(gpu.truncation_error().cpu(), err, rtol=tol, atol=tol * float(err[0]))
    for r in (5, 20, 40) if exact else (5, 40):
        assert torch.allclose(gpu.reconstruct(r).cpu(), cpu.reconstruct(r), atol=tol * float(w.abs().max()))
    up, down = gpu.factors(20, dtype=torch.float16)
    assert up.is_cuda and up.dtype == torch.float16
