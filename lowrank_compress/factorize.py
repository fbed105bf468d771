"""The SVD variants that turn one Linear weight into factors: plain (LoRD), ASVD, whitening (SVD-LLM), Fisher (FWSVD).

Every method is one SVD of a transformed weight T(W) followed by mapping the factors back to the original space, so
that truncating the transformed SVD at rank r minimizes the method's own objective:

    svd     ||W - W_r||_F                 (data-free)
    asvd    ||(W - W_r) S||_F             S = diag(mean |x| ** alpha) per input channel
    whiten  ||(W - W_r) X^T||_F           X the calibration inputs; via the Cholesky factor L of X^T X
            ||W X^T - W_r X'^T||_F        error-aware (stats.cross or weighted_cross): X' the inputs the layer sees behind the
                                          compressed prefix, X its dense inputs (see `_error_aware_target`)
    fisher  ||D (W - W_r)||_F             D = diag(sqrt(fisher_rows / n_tokens)) per output row

Rescaling the statistics by a constant (a mean instead of a sum) changes `s` and the error scale, never the factors.
One `decompose` call does the only SVD; the resulting `Decomposition` gives factors at any rank and the whole
truncation-error curve, which is what the rank allocator needs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from lowrank_compress.choices import METHODS
from lowrank_compress.errors import CalibrationError, LowrankError

if TYPE_CHECKING:  # the calibration module owns the dataclass; only its fields are used here
    from lowrank_compress.calibration import LayerStats

DEFAULT_RIDGE = 1e-10
"""First diagonal loading tried when the Gram is not (numerically) positive definite, relative to its mean diagonal."""

_PIVOT_FLOOR = 1e-12
"""A Cholesky factor is accepted only if every pivot L_ii^2 is at least this times the Gram's mean diagonal:
a factorization that "succeeds" on round-off alone would make L^-1 explode."""

_MAX_RIDGE = 1e4
_SCALE_FLOOR = 1e-6
"""Channel (ASVD) or row (Fisher) statistics below this fraction of their mean are raised to it, so the scaling stays
invertible for dead channels."""


@dataclass
class Decomposition:
    """What one SVD of a layer gives: everything needed to truncate at any rank without another SVD.

    `W ~= (u[:, :r] * s[:r]) @ v[:r]` for every r up to `stored_rank`, exactly equal (up to round-off) at r = len(s)
    when all factors are stored. `u` columns and `v` rows are not unit-norm in general (the transform is undone in
    them); `s` are the singular values of the transformed matrix, so `truncation_error` is in the method's objective.
    """

    u: torch.Tensor  # (out x k') left factor in the original space, float64 (float32 for a damped whiten fit)
    s: torch.Tensor  # (k,) float64, singular values of the transformed matrix, descending; k' <= k
    v: torch.Tensor  # (k' x in) right factor in the original input space, in u's dtype
    method: str = "svd"
    # whiten: the diagonal loading added to the Gram, relative to its mean diagonal (0: none was needed)
    ridge: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the decomposed weight."""
        return int(self.u.shape[0]), int(self.v.shape[1])

    @property
    def full_rank(self) -> int:
        """Length of the spectrum: min(out, in)."""
        return int(self.s.numel())

    @property
    def stored_rank(self) -> int:
        """How many leading factor columns are stored (less than `full_rank` after `truncate`)."""
        return int(self.u.shape[1])

    def _check_rank(self, rank: int) -> None:
        if not 1 <= rank <= self.stored_rank:
            raise ValueError(f"rank must be in [1, {self.stored_rank}] (stored factors), got {rank}")

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(up out x r, down r x in) with `up @ down` the rank-r approximation, cast to `dtype` at the end.

        Balanced per direction: column i of `up` and row i of `down` get the same Euclidean norm
        sqrt(s_i |u_i| |v_i|). For plain SVD that is sqrt(s) on both sides; for the data-aware methods it also undoes
        the arbitrary scale of the statistics (a Gram summed over many tokens), so neither factor ends up tiny or huge.
        That keeps fp16/bf16 casts safe and gives both factors comparable gradients when finetuned.
        """
        self._check_rank(rank)
        u, s, v = self.u[:, :rank], self.s[:rank], self.v[:rank]
        nu = torch.linalg.vector_norm(u, dim=0).double().clamp_min(torch.finfo(torch.float64).tiny)
        nv = torch.linalg.vector_norm(v, dim=1).double().clamp_min(torch.finfo(torch.float64).tiny)
        up = u * torch.sqrt(s * nv / nu)
        down = v * torch.sqrt(s * nu / nv)[:, None]
        return up.to(dtype), down.to(dtype)

    def reconstruct(self, rank: int) -> torch.Tensor:
        """The rank-r approximation of W as a dense float64 matrix (for checks and error reports)."""
        self._check_rank(rank)
        return (self.u[:, :rank].double() * self.s[:rank]) @ self.v[:rank].double()

    def truncation_error(self) -> torch.Tensor:
        """(k+1,) float64: err[r] = sum_{i>=r} s_i^2, the objective's squared error when truncated to rank r.

        err[0] is the objective's total (the error of dropping the layer), err[k] = 0. For `whiten` it is the squared
        output error summed over the calibration tokens (plus ridge * ||W - W_r||^2 when a ridge was needed).
        """
        e = self.s.double() ** 2
        tail = torch.flip(torch.cumsum(torch.flip(e, (0,)), 0), (0,))
        return torch.cat([tail, tail.new_zeros(1)])

    def truncate(self, max_rank: int) -> Decomposition:
        """A copy keeping only the first `max_rank` factor directions (the full spectrum stays).

        Ranks at or above break-even are never used, so the caller can drop the rest to save memory while holding
        many layers for the allocator; `truncate(0)` keeps the spectrum alone.
        """
        r = max(0, min(int(max_rank), self.stored_rank))
        return Decomposition(
            self.u[:, :r].clone(), self.s.clone(), self.v[:r].clone(), self.method, self.ridge
        )


def decompose(
    w: torch.Tensor,
    method: str,
    stats: LayerStats | None = None,
    *,
    asvd_alpha: float = 0.5,
    ridge: float = DEFAULT_RIDGE,
    damping: float = 0.0,
    cholesky_cache: dict[int, Whitening] | None = None,
    spectrum_only: bool = False,
    consume_stats: bool = False,
    row_weights: torch.Tensor | None = None,
) -> Decomposition:
    """One SVD of `w` (out x in) under `method`; see the module docstring for the objectives.

    Computed in float64, except the damped whiten fit (damping >= 0.01), which runs in float32 (its Cholesky, eigh
    and solves about twice as fast on CPUs, far faster on GPUs with few float64 units): the damping bounds the
    whitening's condition number, and the factors are stored at float32 or below anyway. If its float32 Cholesky
    factorization fails, the layer is computed in float64.

    stats: calibration statistics (required for asvd, whiten and fisher; ignored for svd).
    asvd_alpha: ASVD's exponent on the mean absolute activation (0 gives plain SVD).
    ridge: whiten only: the first diagonal loading (relative to the Gram's mean diagonal) tried when the Gram is not
        numerically positive definite; multiplied by 10 until the Cholesky factorization succeeds.
    damping: whiten only: a loading always added (relative to the mean diagonal). 0 is SVD-LLM; larger values blend
        the objective towards plain SVD, a hedge when calibration text differs from the deployment domain.
    cholesky_cache: whiten only: a dict reused across calls, so layers that share one Gram object (q/k/v, gate/up)
        share one Cholesky factorization. Keyed by the Gram's id: keep the statistics alive while it is in use, and
        keep ridge and damping the same.
    spectrum_only: compute singular values alone (no factors: `stored_rank` 0, like `truncate(0)`), about twice
        as fast; what a rank allocator reads.
    consume_stats: whiten with damping >= 1e-3 only: factorize the Gram in place (it then holds the Cholesky
        factor: read it through `cholesky_cache` only), saving a copy of it (1 GB for a 11008-wide layer). The
        damping makes a failed factorization (which would need the original for a larger ridge) impossible in
        practice; it is then an error.
    row_weights: whiten only, (out,) positive: the squared output error of row i counts row_weights[i] times, so
        the fit minimizes sum_t sum_i row_weights[i] ((W - M) x_t)_i^2 (plus the damping term in the same norm):
        with the loss's mean squared gradient per output channel, the diagonal of K-FAC's output factor, that is
        the second-order estimate of the loss increase (the loss-weighted fit). Their scale does not matter.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out x in), got shape {tuple(w.shape)}")
    w = w.detach()  # computed on w's device: the SVD runs on CUDA too
    if not bool(torch.isfinite(w).all()):
        raise LowrankError(
            "the weight has non-finite values (NaN or Inf); fix the checkpoint or keep this layer dense"
        )
    if method != "svd" and stats is None:
        raise ValueError(f"method {method!r} needs calibration statistics (stats=None given)")

    if method == "whiten":
        assert stats is not None
        return _whiten(w, stats, ridge, damping, cholesky_cache, spectrum_only, consume_stats, row_weights)
    if row_weights is not None:
        raise ValueError(f"row_weights are for the whiten method, not {method!r}")
    w = w.to(torch.float64)
    if method == "svd":
        u, s, v = _svd(w, spectrum_only)
        return Decomposition(u, s, v, method)

    assert stats is not None
    if method == "asvd":
        return _asvd(w, stats, asvd_alpha, spectrum_only)
    return _fisher(w, stats, spectrum_only)


def _asvd(w: torch.Tensor, stats: LayerStats, alpha: float, spectrum_only: bool) -> Decomposition:
    """ASVD: the SVD of W scaled per input channel by the mean absolute activation to the power alpha."""
    if stats.abs_sum is None:
        raise ValueError("the asvd method needs the statistics' abs_sum (summed with abs_sums=True)")
    mean_abs = _per_token(stats, stats.abs_sum, (w.shape[1],), "abs_sum", w)
    scale = _floored(mean_abs) ** alpha
    u, s, vh = _svd(w * scale, spectrum_only)
    return Decomposition(u, s, vh / scale, "asvd")


def _fisher(w: torch.Tensor, stats: LayerStats, spectrum_only: bool) -> Decomposition:
    """FWSVD: the SVD of W scaled per output row by the root of its summed squared weight gradients."""
    if stats.fisher_rows is None:
        raise ValueError(
            "method 'fisher' needs stats.fisher_rows (collect calibration statistics with fisher=True)"
        )
    fisher = _per_token(stats, stats.fisher_rows, (w.shape[0],), "fisher_rows", w)
    d = torch.sqrt(_floored(fisher))
    u, s, v = _svd(d[:, None] * w, spectrum_only)
    return Decomposition(u / d[:, None], s, v, "fisher")


def _per_token(
    stats: LayerStats, total: torch.Tensor, shape: tuple[int, ...], name: str, w: torch.Tensor
) -> torch.Tensor:
    """A summed statistic (checked against the weight's shape) as its mean over the calibration tokens."""
    return _checked(total, shape, name, w) / max(int(stats.n_tokens), 1)


def _whiten(
    w: torch.Tensor, stats: LayerStats, ridge: float, damping: float, cache: dict[int, Whitening] | None,
    spectrum_only: bool, consume: bool, row_weights: torch.Tensor | None = None,
) -> Decomposition:  # fmt: skip
    """SVD-LLM's whitened SVD (or the error-aware fit), in the Cholesky factor's precision (see `decompose`).
    Row weights D scale the whitened target's rows by D^1/2 (every term of it is linear in W from the left) and the
    left factor back by D^-1/2: the truncated SVD of D^1/2 T is the optimum of the weighted objective."""
    cached = _whitening(stats, w.shape[1], w.device, ridge, damping, cache, consume)
    chol = cached.chol
    w = w.to(chol.dtype)
    if getattr(stats, "cross", None) is None and getattr(stats, "weighted_cross", None) is None:
        target = w @ chol
    else:
        target = _error_aware_target(w, stats, cached)
    root = None
    if row_weights is not None:
        root = _checked(row_weights, (w.shape[0],), "row_weights", w).clamp_min(0.0).sqrt()
        root = root / root.max().clamp_min(torch.finfo(root.dtype).tiny)  # scale-free; keeps float32 in range
        root = root.clamp_min(_MIN_ROW_ROOT)
        target = target * root[:, None]
    u, s, vh = _svd(target, spectrum_only)
    if root is not None and not spectrum_only:
        u = u / root[:, None]
    # v = Vh L^-1, solved as v L = Vh (triangular, never an explicit inverse)
    v = torch.linalg.solve_triangular(chol, vh, upper=False, left=False)
    return Decomposition(u, s.double(), v, "whiten", ridge=cached.rel)


def _svd(a: torch.Tensor, values_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD `a = (u * s) @ vh` through the eigenvectors of the smaller Gram (a a^T or a^T a).

    Three to four times faster than LAPACK's SVD at these shapes on CPU. Its accuracy is the one truncation needs:
    `u` is orthonormal to round-off, and `s_i = |u_i^T a|` is exactly the norm `a` has along u_i, so the product at
    full rank is u u^T a = a, and the truncation error sum_{i>=r} s_i^2 equals ||a - u_r u_r^T a||_F^2. Directions
    whose singular values are below ~1e-8 of the largest are round-off (the Gram squares the condition number);
    they lie far past any rank a budget keeps (in float32, below ~3e-4 of the largest: still past them for the
    damped whiten fit, the one computed in float32). `values_only`: empty factors, `s` from the Gram's eigenvalues.
    """
    if a.shape[0] > a.shape[1]:
        u, s, vh = _svd(a.T, values_only)
        return vh.T, s, u.T
    if values_only:
        s = torch.linalg.eigvalsh(a @ a.T).flip(0).clamp_min(0.0).sqrt()
        return a.new_zeros(a.shape[0], 0), s, a.new_zeros(0, a.shape[1])
    _, u = torch.linalg.eigh(a @ a.T)
    u = u.flip(1)  # eigh sorts ascending
    proj = u.T @ a  # row i = s_i * v_i
    s = torch.linalg.vector_norm(proj, dim=1)
    s, order = torch.sort(s, descending=True)  # round-off may swap near-equal neighbours
    if not bool((order == torch.arange(len(order), device=order.device)).all()):
        u, proj = u[:, order], proj[order]
    vh = proj.div_(s.clamp_min(torch.finfo(s.dtype).tiny)[:, None])  # in place: a layer's worth of float64
    return u, s, vh


def _error_aware_target(w: torch.Tensor, stats: LayerStats, whitening: Whitening) -> torch.Tensor:
    """The whitened matrix whose truncated SVD solves the error-aware fit.

    min over rank-r M of ||W X - M X'||^2 + rho ||(W - M)||^2 (X the dense inputs, X' the shifted ones, rho the
    ridge/damping loading) has the unconstrained optimum M* = W (X^T X' + rho I) C^-1 with C = X'^T X' + rho I = L L^T,
    and ||W X - M X'||^2 + rho ||W - M||^2 = const + ||(M* - M) L||^2. So truncating the SVD of
    M* L = W (X^T X' + rho I) L^-T is optimal, exactly as SVD-LLM truncates W L; with X' = X it is W L.
    """
    out_f, in_f = w.shape
    rho = whitening.rel * whitening.mean_diag
    if stats.weighted_cross is not None:  # W X^T X', summed directly
        a = _checked(stats.weighted_cross, (out_f, in_f), "weighted_cross", w)
    else:
        a = w @ _checked(stats.cross, (in_f, in_f), "cross", w)
    if rho > 0:
        a = torch.add(a, w, alpha=rho)  # never in place: `a` may be the statistics themselves
    # T L^T = A, L^T upper triangular
    return torch.linalg.solve_triangular(whitening.chol.T, a, upper=True, left=False)


_MIN_ROW_ROOT = 1e-3
"""Row weights below 1e-6 of the largest count as 1e-6 of it: a channel the loss never moved is still fitted a little,
and the left factor's D^-1/2 stays finite."""


def _checked(t: torch.Tensor, shape: tuple[int, ...], what: str, like: torch.Tensor) -> torch.Tensor:
    """Statistics on the device and in the dtype of `like`, with the expected shape and finite values."""
    if tuple(t.shape) != shape:
        raise ValueError(f"stats.{what} has shape {tuple(t.shape)}, expected {shape} for this weight")
    t = t.detach().to(device=like.device, dtype=like.dtype)
    if not bool(torch.isfinite(t).all()):
        raise CalibrationError(
            f"calibration statistics ({what}) have non-finite values; check the model in float32 or use other text"
        )
    return t


def _floored(x: torch.Tensor) -> torch.Tensor:
    """Non-negative per-channel statistics made strictly positive: all ones if they are all zero."""
    x = x.clamp_min(0.0)
    mean = float(x.mean()) if x.numel() else 0.0
    if mean <= 0.0:
        return torch.ones_like(x)
    return x.clamp_min(_SCALE_FLOOR * mean)


def _whitening(
    stats: LayerStats, in_f: int, device: torch.device, ridge: float, damping: float,
    cache: dict[int, Whitening] | None, consume: bool,
) -> Whitening:  # fmt: skip
    """The Cholesky factor of the layer's (loaded) Gram: from `cache` when layers share the Gram, else computed. Its
    dtype is the precision the layer is computed in: float32 when the damping allows it and the factorization
    succeeds, else float64 (in place when the statistics may be consumed and the damping makes a retry impossible in
    practice)."""
    cached = cache.get(id(stats.gram)) if cache is not None else None
    if cached is None:
        in_float32 = fit_dtype("whiten", damping) == torch.float32
        cached = _cholesky_float32(stats, in_f, device, damping, consume) if in_float32 else None
        if cached is None:
            float64 = torch.empty(0, dtype=torch.float64, device=device)
            gram = _checked(stats.gram, (in_f, in_f), "gram", float64)
            in_place = consume and damping >= _IN_PLACE_DAMPING
            cached = (
                _cholesky_in_place(gram, damping) if in_place else _cholesky_with_ridge(gram, ridge, damping)
            )
        if cache is not None:
            cache[id(stats.gram)] = cached
    return cached


def _cholesky_float32(
    stats: LayerStats, in_f: int, device: torch.device, damping: float, consume: bool
) -> Whitening | None:
    """The damped Gram's Cholesky factor in float32, or None where float32 cannot hold the Gram or factorize it (the
    caller then computes in float64). A float64 Gram is copied; a float32 one (summed in `fit_dtype`) is factorized
    where it lies when `consume` allows, else in a copy. A consumed Gram cannot be retried: its failure is an error
    (the damping makes it one in practice only for broken statistics)."""
    like = torch.empty(0, dtype=torch.float32, device=device)
    shared = stats.gram.dtype == torch.float32 and stats.gram.device == like.device
    try:
        gram = _checked(stats.gram, (in_f, in_f), "gram", like)
        return _cholesky_in_place(gram if consume or not shared else gram.clone(), damping)
    except CalibrationError:
        if shared and consume:
            raise
        return None


def fit_dtype(method: str, damping: float) -> torch.dtype:
    """The precision `decompose` computes `method` in at this damping, and so the one worth summing its input
    statistics in: float32 for the damped whiten fit (see `FLOAT32_DAMPING`), float64 otherwise. Summing in float32
    there halves the statistics (an 11008-wide Gram is 0.5 GB instead of 1 GB) and saves the float32 copy the fit
    would make."""
    return torch.float32 if method == "whiten" and damping >= FLOAT32_DAMPING else torch.float64


class Whitening(NamedTuple):
    """The lower Cholesky factor of gram + rel * mean_diag * I, with rel and the Gram's mean diagonal."""

    chol: torch.Tensor
    rel: float
    mean_diag: float


_IN_PLACE_DAMPING = 1e-3
"""The least damping under which `decompose(consume_stats=True)` factorizes a float64 Gram in place."""

FLOAT32_DAMPING = 1e-2
"""The least damping under which the whiten fit runs in float32: the loading keeps the smallest eigenvalue of the
Gram at least 1% of its mean, so its condition number is at most 100 x its width (and far less in practice)."""


def _cholesky_in_place(gram: torch.Tensor, damping: float) -> Whitening:
    """`_cholesky_with_ridge` without a working copy: the Gram (positive semi-definite up to round-off) plus
    `damping` x its mean diagonal is factorized where it lies. LAPACK reads the lower triangle only."""
    mean_diag = _mean_diagonal(gram)
    gram.diagonal().add_(damping * mean_diag)
    info = torch.empty((), dtype=torch.int32, device=gram.device)
    torch.linalg.cholesky_ex(gram, out=(gram, info))
    if int(info) != 0 or float(gram.diagonal().min()) ** 2 < _PIVOT_FLOOR * mean_diag:
        raise CalibrationError(
            f"the calibration Gram is not positive definite even with a damping of {damping:g} x its mean diagonal; "
            "check the calibration statistics"
        )
    return Whitening(gram, damping, mean_diag)


def _mean_diagonal(gram: torch.Tensor) -> float:
    mean_diag = float(gram.diagonal().mean())
    if not mean_diag > 0.0:
        raise CalibrationError(
            "the calibration Gram is zero: the layer saw only zero inputs; use more or other calibration text, "
            "or keep this layer dense"
        )
    return mean_diag


def _cholesky_with_ridge(gram: torch.Tensor, ridge: float, damping: float) -> Whitening:
    """Lower Cholesky factor of gram + rho * mean(diag) * I and the relative rho used.

    rho starts at `damping`; while the factorization fails or has a pivot below the floor, rho = damping + ridge,
    then the ridge grows tenfold each try.
    """
    g = (
        gram + gram.T
    )  # one working copy (a Gram can take gigabytes): symmetrized, loaded, factorized in place
    g.mul_(0.5)
    mean_diag = _mean_diagonal(g)
    if ridge <= 0.0 or damping < 0.0:
        raise ValueError(f"ridge must be > 0 and damping >= 0, got ridge={ridge}, damping={damping}")
    tries = [damping] + [damping + ridge * 10.0**i for i in range(int(math.log10(_MAX_RIDGE / ridge)) + 2)]
    info = torch.empty((), dtype=torch.int32, device=g.device)
    for k, rel in enumerate(tries):
        if k:  # the failed try overwrote the working copy
            torch.add(gram, gram.T, out=g).mul_(0.5)
        g.diagonal().add_(rel * mean_diag)
        torch.linalg.cholesky_ex(g, out=(g, info))
        if int(info) == 0 and float(g.diagonal().min()) ** 2 >= _PIVOT_FLOOR * mean_diag:
            return Whitening(g, rel, mean_diag)
    raise CalibrationError(
        f"the calibration Gram is not positive definite even with a ridge of {tries[-1]:g} x its mean diagonal; "
        "check the calibration statistics"
    )


def release_stats(stats: dict[str, Any], name: str, users: Counter, cache: dict[int, Whitening]) -> None:
    """A layer's statistics leave `stats`; a shared Gram and its Cholesky factor (in `cache`, keyed by the Gram's
    id as `decompose` keys it) go with their last layer: `users` counts the layers left on each Gram."""
    used = stats.pop(name, None)
    if used is not None:
        users[id(used.gram)] -= 1
        if not users[id(used.gram)]:
            cache.pop(id(used.gram), None)
