"""Rank policies under a budget: budgets met, break-even respected, each policy's rule, sensitivity vs brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lowrank_compress.allocate import (
    POLICIES,
    LayerCandidate,
    allocate,
    break_even_rank,
    check_reachable,
    kept_fraction,
)
from lowrank_compress.errors import BudgetError
from lowrank_compress.factorize import Decomposition, decompose

MIX = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def spectrum_only(m: int, n: int, s: np.ndarray, method: str = "whiten") -> Decomposition:
    """A decomposition without factors: the allocator reads only the spectrum."""
    return Decomposition(
        torch.zeros(m, 0, dtype=torch.float64),
        torch.tensor(np.array(s, dtype=np.float64)),
        torch.zeros(0, n, dtype=torch.float64),
        method,
    )


def decaying(k: int, power: float, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.uniform(0.5, 1.5) * (1.0 + np.arange(k)) ** -power * rng.uniform(0.8, 1.2, k))[::-1]


def mix_layers(seed: int = 0) -> list[LayerCandidate]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (m, n) in enumerate(MIX):
        s = decaying(min(m, n), power=[0.3, 0.8, 0.5, 1.2][i], rng=rng)
        out.append(
            LayerCandidate(
                f"blocks.{i}.proj",
                m,
                n,
                spectrum_only(m, n, s),
                stable_rank=[60.0, 8.0, 30.0, 45.0][i],
                sensitivity=float(rng.uniform(0.1, 10.0)),
            )
        )
    return out


def frac(layer: LayerCandidate, r: int | None) -> float:
    m, n = layer.out_features, layer.in_features
    return 1.0 if r is None else r * (m + n) / (m * n)


def check_basic(layers: list[LayerCandidate], ranks: dict[str, int | None], multiple: int = 1) -> None:
    assert list(ranks) == [x.name for x in layers]
    for x in layers:
        r = ranks[x.name]
        if r is not None:
            assert r >= 1 and r % multiple == 0
            assert (
                r * (x.out_features + x.in_features) < x.out_features * x.in_features
            )  # strictly below break-even
            assert r < break_even_rank(x.out_features, x.in_features)


def test_break_even_and_kept_fraction() -> None:
    assert break_even_rank(576, 1536) == pytest.approx(576 * 1536 / 2112)
    layers = [LayerCandidate("a", 10, 30, None), LayerCandidate("b", 20, 20, None)]
    assert kept_fraction(layers, {"a": 3, "b": None}) == pytest.approx((3 * 40 + 400) / 700)
    assert kept_fraction(layers, {"a": None, "b": None}) == 1.0


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("policy", POLICIES)
def test_budgets_are_met_on_a_mix_of_shapes(policy: str, multiple: int) -> None:
    layers = mix_layers()
    for budget in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        ranks = allocate(layers, budget, policy, multiple=multiple)
        check_basic(layers, ranks, multiple)
        kept = kept_fraction(layers, ranks)
        assert abs(kept - budget) <= 0.005, (policy, budget, kept)
        assert kept <= budget + 0.005


@pytest.mark.parametrize("multiple", [1, 8])
def test_uniform_keeps_equal_fractions(multiple: int) -> None:
    layers = mix_layers()
    for budget in (0.35, 0.6, 0.85):
        ranks = allocate(layers, budget, "uniform", multiple=multiple)
        fractions = [frac(x, ranks[x.name]) for x in layers]
        steps = [
            multiple * (x.out_features + x.in_features) / (x.out_features * x.in_features) for x in layers
        ]
        # one shared scale floors every layer within one of its steps; the top-up then fills the leftover, where
        # only layers with small steps may still fit (at most two of them, or a larger step would have fit)
        assert max(fractions) - min(fractions) <= 2 * max(steps) + 1e-12
        assert all(abs(f - budget) <= 2 * max(steps) + 0.005 for f in fractions)


def smallest_rank_holding(s: np.ndarray, energy: float) -> int:
    e = s**2
    held = np.cumsum(e) / e.sum()
    return int(np.argmax(held >= energy - 1e-12)) + 1


def test_energy_threshold_rule_and_monotonicity() -> None:
    layers = mix_layers(1)
    previous = None
    kept_prev = 0.0
    for energy in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        ranks = allocate(layers, None, "energy", energy=energy)
        check_basic(layers, ranks)
        for x in layers:
            need = smallest_rank_holding(x.decomposition.s.numpy(), energy)
            be = break_even_rank(x.out_features, x.in_features)
            assert ranks[x.name] == (need if need < be else None)
        if previous is not None:
            for x in layers:
                a, b = previous[x.name], ranks[x.name]
                assert (b is None) or (a is not None and a <= b)
        kept = kept_fraction(layers, ranks)
        assert kept >= kept_prev
        previous, kept_prev = ranks, kept


def test_energy_budget_search_and_ceiling() -> None:
    layers = mix_layers(2)
    ranks = allocate(layers, 0.5, "energy")
    held = {}
    for x in layers:
        e = x.decomposition.s.numpy() ** 2
        if ranks[x.name] is not None:
            held[x.name] = e[: ranks[x.name]].sum() / e.sum()
    assert len(held) >= 2
    assert max(held.values()) - min(held.values()) < 0.02  # one shared threshold, up to rank granularity
    for x in layers:  # a dense layer needs a rank at break-even to hold that threshold
        if ranks[x.name] is None:
            need = smallest_rank_holding(x.decomposition.s.numpy(), min(held.values()))
            assert need + 1 >= break_even_rank(x.out_features, x.in_features)
    explicit = allocate(layers, None, "energy", energy=0.9)
    with pytest.raises(BudgetError, match="energy"):
        allocate(layers, kept_fraction(layers, explicit) - 0.05, "energy", energy=0.9)
    assert allocate(layers, 0.99, "energy", energy=0.9) == explicit


def test_stable_rank_is_proportional() -> None:
    layers = mix_layers(3)
    for multiple in (1, 8):
        ranks = allocate(layers, 0.3, "stable-rank", multiple=multiple)
        ratios = [ranks[x.name] / x.stable_rank for x in layers]
        slack = max(multiple / x.stable_rank for x in layers)
        assert max(ratios) - min(ratios) <= slack + 1e-12


def test_stable_rank_from_plain_svd_spectrum() -> None:
    rng = np.random.default_rng(4)
    ws = [rng.standard_normal((40, 30)) @ np.diag(np.linspace(3, 0.1, 30)), rng.standard_normal((30, 50))]
    with_sr = []
    without = []
    for i, w in enumerate(ws):
        s = np.linalg.svd(w, compute_uv=False)
        dec = decompose(torch.from_numpy(w), "svd")
        with_sr.append(LayerCandidate(f"l{i}", *w.shape, dec, stable_rank=float((s**2).sum() / s[0] ** 2)))
        without.append(LayerCandidate(f"l{i}", *w.shape, dec))
    assert allocate(without, 0.5, "stable-rank", tolerance=0.05) == allocate(
        with_sr, 0.5, "stable-rank", tolerance=0.05
    )
    whitened = [
        LayerCandidate(
            x.name,
            x.out_features,
            x.in_features,
            spectrum_only(x.out_features, x.in_features, x.decomposition.s.numpy()),
        )
        for x in without
    ]
    with pytest.raises(ValueError, match="stable_rank"):
        allocate(whitened, 0.5, "stable-rank")


# --- sensitivity: the exact optimum, checked by enumeration -----------------------------------------------------


def brute_force(layers: list[LayerCandidate], budget: float, floor: list[int]) -> float:
    """min sum w * err(r) over every allowed combination with kept <= budget (dense allowed, no error)."""
    total = sum(x.out_features * x.in_features for x in layers)
    options = []
    for x, lo in zip(layers, floor, strict=True):
        m, n = x.out_features, x.in_features
        err = (x.decomposition.s.numpy() ** 2)[::-1].cumsum()[::-1]
        opts = [(m * n, 0.0)] + [
            (r * (m + n), x.sensitivity * err[r]) for r in range(lo, min(m, n)) if r * (m + n) < m * n
        ]
        options.append(opts)
    best = np.inf
    for combo in itertools.product(*options):
        if sum(c for c, _ in combo) <= budget * total:
            best = min(best, sum(e for _, e in combo))
    return best


def objective(layers: list[LayerCandidate], ranks: dict[str, int | None]) -> float:
    f = 0.0
    for x in layers:
        r = ranks[x.name]
        if r is not None:
            f += x.sensitivity * float((x.decomposition.s.numpy()[r:] ** 2).sum())
    return f


def tiny_layers(seed: int, shapes: list[tuple[int, int]]) -> list[LayerCandidate]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (m, n) in enumerate(shapes):
        k = min(m, n)
        s = decaying(k, power=rng.uniform(0.0, 2.0), rng=rng)
        if i == 0 and seed % 2 == 0:
            s[k // 2 :] = 0.0  # a rank-deficient layer: flat error curve at the top
        out.append(
            LayerCandidate(f"t{i}", m, n, spectrum_only(m, n, s), sensitivity=float(rng.uniform(0.05, 20.0)))
        )
    return out


@pytest.mark.parametrize("seed", range(6))
def test_sensitivity_matches_brute_force(seed: int) -> None:
    layers = tiny_layers(seed, [(12, 10), (8, 16), (20, 6)])
    total = sum(x.out_features * x.in_features for x in layers)
    min_kept = sum(x.out_features + x.in_features for x in layers) / total
    for budget in np.linspace(min_kept, 0.995, 60):
        ranks = allocate(layers, float(budget), "sensitivity", min_fraction=0.0, tolerance=1.0)
        check_basic(layers, ranks)
        assert kept_fraction(layers, ranks) <= budget + 1e-12
        assert objective(layers, ranks) == pytest.approx(
            brute_force(layers, float(budget), [1, 1, 1]), rel=1e-9, abs=1e-300
        )


@pytest.mark.parametrize("seed", range(3))
def test_sensitivity_matches_brute_force_with_floor_and_multiple(seed: int) -> None:
    layers = tiny_layers(10 + seed, [(30, 20), (16, 40), (24, 24), (10, 50)])
    # min_fraction 0.3 -> floor ceil(0.3 * be); multiple 2 -> even ranks only
    floors = [int(np.ceil(0.3 * break_even_rank(x.out_features, x.in_features))) for x in layers]
    floors = [f + (f % 2) for f in floors]
    total = sum(x.out_features * x.in_features for x in layers)
    min_kept = sum(f * (x.out_features + x.in_features) for f, x in zip(floors, layers, strict=True)) / total
    for budget in np.linspace(min_kept, 0.99, 12):
        ranks = allocate(layers, float(budget), "sensitivity", min_fraction=0.3, multiple=2, tolerance=1.0)
        check_basic(layers, ranks, multiple=2)
        assert all(ranks[x.name] is None or ranks[x.name] >= f for x, f in zip(layers, floors, strict=True))
        assert kept_fraction(layers, ranks) <= budget + 1e-12
        even = [
            list(range(f, min(x.out_features, x.in_features), 2)) for x, f in zip(layers, floors, strict=True)
        ]
        expected = brute_force_grid(layers, float(budget), even)
        assert objective(layers, ranks) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def brute_force_grid(layers: list[LayerCandidate], budget: float, grids: list[list[int]]) -> float:
    total = sum(x.out_features * x.in_features for x in layers)
    options = []
    for x, grid in zip(layers, grids, strict=True):
        m, n = x.out_features, x.in_features
        s2 = x.decomposition.s.numpy() ** 2
        options.append(
            [(m * n, 0.0)]
            + [(r * (m + n), x.sensitivity * s2[r:].sum()) for r in grid if r * (m + n) < m * n]
        )
    best = np.inf
    for combo in itertools.product(*options):
        if sum(c for c, _ in combo) <= budget * total:
            best = min(best, sum(e for _, e in combo))
    return best


def test_sensitivity_puts_more_rank_on_the_more_sensitive_layer() -> None:
    rng = np.random.default_rng(5)
    s = decaying(256, 0.6, rng)
    layers = [
        LayerCandidate(name, 256, 384, spectrum_only(256, 384, s), sensitivity=w)
        for name, w in (("lo", 1.0), ("hi", 10.0))
    ]
    ranks = allocate(layers, 0.5, "sensitivity")
    assert ranks["lo"] is not None and (ranks["hi"] is None or ranks["hi"] > ranks["lo"])
    # equal sensitivities and spectra: equal ranks (up to one step)
    same = [
        LayerCandidate(name, 256, 384, spectrum_only(256, 384, s), sensitivity=3.0) for name in ("a", "b")
    ]
    r = allocate(same, 0.5, "sensitivity")
    assert abs(r["a"] - r["b"]) <= 1


def test_sensitivity_respects_min_fraction() -> None:
    rng = np.random.default_rng(6)
    layers = [
        LayerCandidate(f"l{i}", 96, 96, spectrum_only(96, 96, decaying(96, 1.0, rng)), sensitivity=w)
        for i, w in enumerate((1e-6, 1.0, 100.0))
    ]
    ranks = allocate(layers, 0.4, "sensitivity", min_fraction=0.25)
    floor = int(np.ceil(0.25 * break_even_rank(96, 96)))
    assert ranks["l0"] == floor  # the insensitive layer gives everything it may
    ranks0 = allocate(layers, 0.4, "sensitivity", min_fraction=0.0)
    assert ranks0["l0"] == 1


def test_dense_only_layers_and_budget_errors() -> None:
    layers = mix_layers()
    for policy in POLICIES:
        for budget in (1.0, 1.5, 0.0, -0.2):
            with pytest.raises(BudgetError, match="reachable"):
                allocate(layers, budget, policy)
    small = [LayerCandidate("a", 16, 16, None), LayerCandidate("b", 16, 32, None)]
    min_kept = (32 + 48) / (256 + 512)
    with pytest.raises(BudgetError, match=f"unreachable.*{min_kept:.4f}"):
        allocate(small, 0.05, "uniform")
    # just below the minimum but within tolerance: the minimum allocation
    assert allocate(small, min_kept - 0.003, "uniform") == {"a": 1, "b": 1}
    with pytest.raises(BudgetError, match="unreachable"):
        allocate(small, min_kept - 0.003, "uniform", min_rank=2)
    # a layer whose smallest allowed rank is already at break-even stays dense
    small = [
        LayerCandidate("tiny", 4, 4, spectrum_only(4, 4, np.ones(4)), stable_rank=2.0, sensitivity=1.0),
        *mix_layers(),
    ]
    for policy in POLICIES:
        ranks = allocate(small, 0.5, policy, min_rank=2)
        assert ranks["tiny"] is None
        check_basic(small, ranks)


def test_an_unreachable_budget_is_refused_from_shapes_alone() -> None:
    """check_reachable needs no spectrum: it refuses exactly the budgets allocate refuses as unreachable, with the
    floor computed here as every layer at rank 1: sum r (m + n) / sum m n."""
    rng = np.random.default_rng(0)
    sizes = [(16, 16), (16, 32), (48, 32)]
    layers = [
        LayerCandidate(f"l{i}", m, n, spectrum_only(m, n, decaying(min(m, n), 0.5, rng)), 4.0, 1.0)
        for i, (m, n) in enumerate(sizes)
    ]
    shapes = [LayerCandidate(x.name, x.out_features, x.in_features, None) for x in layers]
    min_kept = sum(m + n for m, n in sizes) / sum(m * n for m, n in sizes)
    with pytest.raises(BudgetError, match=f"budget 0.01 is unreachable.*{min_kept:.4f} to 1"):
        check_reachable(shapes, 0.01, "uniform")
    check_reachable(shapes, min_kept - 0.003, "uniform")  # within tolerance: the floor allocation
    for policy in POLICIES:
        for budget in (0.01, 0.06, 0.1, 0.3):
            try:
                allocate(layers, budget, policy)
            except BudgetError as e:
                if "unreachable" in str(e):
                    with pytest.raises(BudgetError, match="unreachable"):
                        check_reachable(shapes, budget, policy)
                    continue
            check_reachable(shapes, budget, policy)


def test_coarse_multiple_is_refused_or_met() -> None:
    layers = [LayerCandidate("a", 128, 128, None), LayerCandidate("b", 128, 128, None)]
    with pytest.raises(BudgetError, match="multiple"):
        allocate(layers, 0.55, "uniform", multiple=32)  # steps of 25% of the total: nothing within 0.5%
    ranks = allocate(layers, 0.5, "uniform", multiple=32)
    assert ranks == {"a": 32, "b": 32}


def test_missing_inputs_are_value_errors() -> None:
    bare = [LayerCandidate("a", 32, 32, None), LayerCandidate("b", 16, 32, None)]
    for policy in ("energy", "sensitivity", "stable-rank"):
        with pytest.raises(ValueError):
            allocate(bare, 0.5, policy)
    with pytest.raises(ValueError, match="unknown policy"):
        allocate(bare, 0.5, "random")
    with pytest.raises(ValueError, match="unique"):
        allocate([bare[0], bare[0]], 0.5, "uniform")
    wrong = [LayerCandidate("a", 32, 32, spectrum_only(16, 32, np.ones(16)))]
    with pytest.raises(ValueError, match="shape"):
        allocate(wrong, 0.5, "energy")
