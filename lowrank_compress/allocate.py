"""Rank policies under a parameter budget, with the break-even guard.

The budget is the fraction of the target layers' weight parameters that is kept:
sum(m n for dense layers, r (m + n) for factorized ones) / sum(m n). Biases are identical either way and not counted.

Every policy works on the same discrete choice per layer: a rank from the allowed grid (multiples of `multiple`, at
least `min_rank`, strictly below break-even m n / (m + n), where factors would stop saving anything) or dense.
`uniform`, `energy` and `stable-rank` are one-parameter families (a shared scale or threshold) searched for the
largest value that fits the budget, then topped up one rank step at a time in the policy's own order. `sensitivity`
solves the budgeted error minimization itself (greedy on convex hulls, then an exact branch and bound on what is left).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lowrank_compress.choices import POLICIES
from lowrank_compress.errors import BudgetError
from lowrank_compress.factorize import Decomposition
from lowrank_compress.spectrum import break_even_rank

TOLERANCE = 0.005
"""How far (absolute, in kept fraction) the result may land from the budget."""

DEFAULT_MIN_FRACTION = 0.1
"""sensitivity: no layer is cut below this fraction of its break-even rank."""

_NODE_LIMIT = 200_000


@dataclass
class LayerCandidate:
    """One target layer as the allocator sees it."""

    name: str
    out_features: int
    in_features: int
    # needed by energy and sensitivity (only `s` and the truncation error are read); None otherwise
    decomposition: Decomposition | None
    # of the ORIGINAL weight; stable-rank computes it from a plain-svd spectrum when None
    stable_rank: float | None = None
    # weight on this layer's truncation error (e.g. out_grad_sq); None means 1
    sensitivity: float | None = None


def kept_fraction(layers: Sequence[LayerCandidate], ranks: dict[str, int | None]) -> float:
    """Kept weight parameters over dense ones for `ranks` (None: dense), literally r (m + n) for a factorized layer."""
    total = sum(x.out_features * x.in_features for x in layers)
    if total == 0:
        raise ValueError("no parameters in the given layers")
    kept = 0
    for x in layers:
        r = ranks[x.name]
        kept += x.out_features * x.in_features if r is None else r * (x.out_features + x.in_features)
    return kept / total


class _Layer:
    """A layer's allowed states: grid ranks (ascending, all strictly below break-even), then dense."""

    def __init__(self, cand: LayerCandidate, multiple: int, floor_rank: float) -> None:
        self.cand = cand
        self.m, self.n = cand.out_features, cand.in_features
        self.dense = self.m * self.n
        self.step = self.m + self.n
        self.be = break_even_rank(self.m, self.n)
        start = max(1, math.ceil(floor_rank / multiple)) * multiple
        # integer test for "strictly saves parameters": r (m + n) < m n
        self.grid = np.array(
            [r for r in range(start, self.dense // self.step + 2, multiple) if r * self.step < self.dense],
            dtype=np.int64,
        )
        self.costs = np.append(self.grid * self.step, self.dense)  # cost of state j; the last state is dense

    @property
    def dense_state(self) -> int:
        return len(self.grid)

    def rank(self, state: int) -> int | None:
        return None if state == self.dense_state else int(self.grid[state])

    def floor_state(self, x: float) -> int:
        """The largest grid rank <= x (at least the smallest grid rank); dense once x reaches break-even."""
        if x >= self.be or len(self.grid) == 0:
            return self.dense_state
        return max(int(np.searchsorted(self.grid, math.floor(x + 1e-9), side="right")) - 1, 0)

    def ceil_state(self, x: float) -> int:
        """The smallest grid rank >= x; dense if no grid rank is that large."""
        return int(np.searchsorted(self.grid, math.ceil(x - 1e-9), side="left"))


def allocate(
    layers: Sequence[LayerCandidate],
    budget: float | None,
    policy: str,
    *,
    energy: float | None = None,
    multiple: int = 1,
    min_rank: int = 1,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    tolerance: float = TOLERANCE,
) -> dict[str, int | None]:
    """Ranks per layer name (None = keep dense) whose kept fraction is within `tolerance` of `budget`.

    The result never factorizes a layer at or above break-even. It is at most `budget` whenever the rank grid allows
    a result within tolerance below it, otherwise at most `budget + tolerance`.

    uniform: every layer keeps the same fraction of its parameters, r ~ c m n / (m + n) with one shared c.
    energy (TRP): per layer the smallest rank holding `energy` of sum s^2 of its decomposition's spectrum; with
        energy=None the shared threshold is searched to meet the budget. With an explicit energy the ranks follow it
        and the budget (may be None) is only a ceiling.
    stable-rank (Cuttlefish): ranks proportional to each layer's stable rank, one shared factor.
    sensitivity: minimizes sum_l sensitivity_l * truncation_error_l(r_l) under the budget, each layer at least
        `min_fraction` of its break-even rank (and `min_rank`).
    multiple: ranks are multiples of it (hardware-friendly tiles); the rank floor is rounded up to one.
    tolerance: how far from the budget the kept fraction may land (absolute).
    """
    _check_arguments(layers, policy, energy, multiple, min_rank, min_fraction)
    specs, total, min_kept, where = _floors(layers, policy, multiple, min_rank, min_fraction)
    solve = _solver(specs, policy, energy)

    if policy == "energy" and energy is not None:
        return _at_energy(specs, solve(math.inf), total, budget, energy, tolerance)

    if budget is None:
        raise ValueError(f"policy {policy!r} needs a budget")
    if _only_floor_fits(budget, min_kept, tolerance, where):
        return _ranks(specs, [0] * len(specs))
    return _ranks(specs, _fit_budget(specs, solve, total, budget, tolerance, multiple))


def check_reachable(
    layers: Sequence[LayerCandidate], budget: float, policy: str, *, multiple: int = 1, min_rank: int = 1,
    min_fraction: float = DEFAULT_MIN_FRACTION, tolerance: float = TOLERANCE,
) -> None:  # fmt: skip
    """Refuse a budget `allocate` could never meet, from the layers' shapes alone: before the calibration, which
    takes hours on a large model, rather than after it."""
    _check_arguments(layers, policy, None, multiple, min_rank, min_fraction)
    _, _, min_kept, where = _floors(layers, policy, multiple, min_rank, min_fraction)
    _only_floor_fits(budget, min_kept, tolerance, where)


def _floors(
    layers: Sequence[LayerCandidate], policy: str, multiple: int, min_rank: int, min_fraction: float
) -> tuple[list[_Layer], int, float, str]:
    """Each layer's rank grid above its floor, the dense total, the smallest reachable kept fraction, and the
    sentence that says it."""
    floor_fraction = min_fraction if policy == "sensitivity" else 0.0
    specs = [
        _Layer(x, multiple, max(min_rank, floor_fraction * break_even_rank(x.out_features, x.in_features)))
        for x in layers
    ]
    total = sum(s.dense for s in specs)
    min_kept = sum(int(s.costs[0]) for s in specs) / total
    where = (
        f"reachable kept fractions for these {len(specs)} layers (min_rank={min_rank}, multiple={multiple}"
        + (f", min_fraction={min_fraction:g}" if policy == "sensitivity" else "")
        + f") are {min_kept:.4f} to 1"
    )
    return specs, total, min_kept, where


def _check_arguments(
    layers: Sequence[LayerCandidate],
    policy: str,
    energy: float | None,
    multiple: int,
    min_rank: int,
    min_fraction: float,
) -> None:
    """Refuse arguments no policy can work with, before any layer's rank grid is built."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not layers:
        raise ValueError("no layers to allocate ranks for")
    names = [x.name for x in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    if multiple < 1 or min_rank < 1:
        raise ValueError(f"multiple and min_rank must be >= 1, got multiple={multiple}, min_rank={min_rank}")
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")


def _at_energy(
    specs: list[_Layer], states: list[int], total: int, budget: float | None, energy: float, tolerance: float
) -> dict[str, int | None]:
    """An explicit energy sets the ranks by itself: the budget (when given) is only a ceiling to check them against."""
    kept = _cost(specs, states) / total
    if budget is not None and kept > budget + tolerance:
        raise BudgetError(
            f"energy {energy:g} keeps {kept:.4f} of the target parameters, above the budget {budget:g}; "
            "lower --energy or raise --budget"
        )
    return _ranks(specs, states)


def _only_floor_fits(budget: float, min_kept: float, tolerance: float, where: str) -> bool:
    """Refuse a budget no allocation can meet, before any search. True when the budget lies below the smallest
    reachable kept fraction but within tolerance of it: the all-floor allocation is then the answer, unsearched."""
    if not 0.0 < budget < 1.0:
        raise BudgetError(f"budget must be strictly between 0 and 1, got {budget:g}; {where}")
    if budget < min_kept:
        if min_kept <= budget + tolerance:
            return True
        raise BudgetError(
            f"budget {budget:g} is unreachable: {where}; raise the budget or lower the rank floor"
        )
    return False


def _fit_budget(
    specs: list[_Layer],
    solve: Callable[[float], list[int]],
    total: int,
    budget: float,
    tolerance: float,
    multiple: int,
) -> list[int]:
    """States at most the budget when the rank grid allows one within tolerance below it, else at most budget +
    tolerance; refused when even that lands farther than tolerance from the budget."""
    states = solve(budget * total)
    kept = _cost(specs, states) / total
    if kept < budget - tolerance:  # a coarse rank grid: allow landing just above the budget instead
        states = solve((budget + tolerance) * total)
        kept = _cost(specs, states) / total
    if abs(kept - budget) > tolerance:
        raise BudgetError(
            f"budget {budget:g} cannot be met within {tolerance:g} with rank multiple {multiple} "
            f"(closest kept fraction {kept:.4f}); use a smaller rank multiple or another budget"
        )
    return states


def _cost(specs: Sequence[_Layer], states: Sequence[int]) -> int:
    return sum(int(s.costs[j]) for s, j in zip(specs, states, strict=True))


def _ranks(specs: Sequence[_Layer], states: Sequence[int]) -> dict[str, int | None]:
    return {s.cand.name: s.rank(j) for s, j in zip(specs, states, strict=True)}


def _spectrum(spec: _Layer) -> np.ndarray:
    dec = spec.cand.decomposition
    if dec is None:
        raise ValueError(f"{spec.cand.name}: this policy needs the layer's decomposition")
    if dec.shape != (spec.m, spec.n):
        raise ValueError(f"{spec.cand.name}: decomposition shape {dec.shape} differs from {(spec.m, spec.n)}")
    return dec.s.detach().double().cpu().numpy()


def _solver(specs: list[_Layer], policy: str, energy: float | None) -> Callable[[float], list[int]]:
    """A function from a parameter cap to one state per layer."""
    if policy == "uniform":
        fraction = lambda i, j: specs[i].costs[j] / specs[i].dense  # noqa: E731
        return lambda cap: _scaled(
            specs, cap, lambda i, c: specs[i].floor_state(c * specs[i].be), 1.0, fraction
        )

    if policy == "stable-rank":
        sr = [_stable_rank(s) for s in specs]
        hi = max(s.be / max(x, 1e-12) for s, x in zip(specs, sr, strict=True)) * 2.0 + 1.0
        ratio = lambda i, j: specs[i].grid[j] / sr[i] if sr[i] > 0 else math.inf  # noqa: E731
        return lambda cap: _scaled(specs, cap, lambda i, c: specs[i].floor_state(c * sr[i]), hi, ratio)

    if policy == "energy":
        held = []  # held[i][r] = fraction of the layer's energy in its top r directions
        for s in specs:
            e = _spectrum(s) ** 2
            tot = float(e.sum())
            held.append(np.concatenate([[0.0], np.cumsum(e) / tot]) if tot > 0 else np.ones(len(e) + 1))

        def state_at(i: int, tau: float) -> int:
            h = held[i]
            r = int(np.searchsorted(h, tau - 1e-12, side="left"))  # smallest r with held[r] >= tau
            return specs[i].ceil_state(min(r, len(h) - 1))

        held_at = lambda i, j: held[i][min(int(specs[i].grid[j]), len(held[i]) - 1)]  # noqa: E731
        if energy is not None:
            return lambda cap: [state_at(i, energy) for i in range(len(specs))]
        return lambda cap: _scaled(specs, cap, state_at, 1.0, held_at)

    weights = [float(s.cand.sensitivity) if s.cand.sensitivity is not None else 1.0 for s in specs]
    if any(not (w >= 0.0 and math.isfinite(w)) for w in weights):
        raise ValueError("sensitivities must be finite and non-negative")
    errors = []
    for s, w in zip(specs, weights, strict=True):
        dec = s.cand.decomposition
        _spectrum(s)  # validates presence and shape
        assert dec is not None
        terr = dec.truncation_error().double().cpu().numpy()
        errors.append(np.append(w * terr[s.grid], 0.0))  # dense: no error
    return lambda cap: _min_error(specs, errors, cap)


def _stable_rank(spec: _Layer) -> float:
    if spec.cand.stable_rank is not None:
        return float(spec.cand.stable_rank)
    dec = spec.cand.decomposition
    if dec is None or dec.method != "svd":
        raise ValueError(
            f"{spec.cand.name}: stable-rank needs LayerCandidate.stable_rank (of the original weight) "
            "or a plain-svd decomposition to compute it from"
        )
    s = _spectrum(spec)
    return float((s**2).sum() / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def _scaled(
    specs: list[_Layer],
    cap: float,
    state_at: Callable[[int, float], int],
    hi: float,
    key: Callable[[int, int], float],
) -> list[int]:
    """Largest shared scalar t in [0, hi] whose states fit under `cap`, then top-up in `key` order (lowest first).

    Requires the cost to be non-decreasing in t. The top-up moves one layer one state up at a time, the layer with
    the lowest key first, as long as the move fits; that fills what the rounding of a shared scalar leaves over.
    """
    at = lambda t: [state_at(i, t) for i in range(len(specs))]  # noqa: E731
    lo_t, hi_t = 0.0, hi
    if _cost(specs, at(hi_t)) <= cap:
        lo_t = hi_t
    else:
        for _ in range(100):
            mid = 0.5 * (lo_t + hi_t)
            if _cost(specs, at(mid)) <= cap:
                lo_t = mid
            else:
                hi_t = mid
    states = at(lo_t)
    cost = _cost(specs, states)
    heap = [(key(i, j), i) for i, j in enumerate(states) if j < specs[i].dense_state]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        s, j = specs[i], states[i]
        delta = int(s.costs[j + 1] - s.costs[j])
        if cost + delta > cap:
            continue  # costs only grow: this layer can never move up again
        states[i], cost = j + 1, cost + delta
        if j + 1 < s.dense_state:
            heapq.heappush(heap, (key(i, j + 1), i))
    return states


def _lower_hull(costs: np.ndarray, errs: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points (cost, err), cost ascending; collinear points are kept."""
    hull: list[int] = []
    for k in range(len(costs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (costs[b] - costs[a]) * (errs[k] - errs[a]) - (errs[b] - errs[a]) * (costs[k] - costs[a])
            if cross < 0:  # b lies strictly above the segment a -> k
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def _min_error(specs: list[_Layer], errors: list[np.ndarray], cap: float) -> list[int]:
    """argmin sum errors[l][state_l] subject to sum costs[l][state_l] <= cap (a multiple-choice knapsack).

    1. Greedy on each layer's lower convex hull, starting from all dense and giving up the segment with the least
       error per parameter saved first (the jump from dense down to the first hull vertex is one such segment, so
       the break-even discontinuity is handled exactly). The state x* where the cost first fits is a Lagrangian
       minimizer of err + lam * cost, hence optimal for its own cost.
    2. Incumbent: x* topped up with the moves that fit the leftover and reduce the error most.
    3. Exact branch and bound over states whose reduced cost d_l = (err + lam cost) - (err + lam cost at x*) is small
       enough to possibly beat the incumbent: any better allocation has sum d_l < D = f(inc) - f(x*) + lam (cap -
       c(x*)). It is exhaustive unless it exceeds a node limit (then the incumbent, at most one segment worse, stays).
    """
    star, c_star, lam = _hull_greedy(specs, errors, cap)
    f_star = sum(float(e[j]) for e, j in zip(errors, star, strict=True))
    inc, f_inc = _top_up(specs, errors, star, c_star, f_star, cap)

    # 3. branch and bound on reduced costs
    scale = abs(f_star) + lam * c_star + 1e-300
    eps = 1e-12 * scale
    slack = cap - c_star
    bound = f_inc - f_star + lam * slack
    if bound <= eps:
        return inc
    options = _options(specs, errors, star, lam, bound)
    if not options:
        return inc
    best_choice = _branch_and_bound(options, f_star, f_inc, lam, slack, bound, eps)
    if best_choice is None:
        return inc
    result = list(star)
    for (i, opts), k in zip(options, best_choice, strict=True):
        result[i] = opts[k][2]
    return result


def _hull_greedy(specs: list[_Layer], errors: list[np.ndarray], cap: float) -> tuple[list[int], int, float]:
    """Step 1 of `_min_error`: the Lagrangian minimizer x* that first fits `cap`, its cost and its multiplier lam.

    Walking down the convex hulls from all dense, the cheapest error per parameter saved first, keeps every state on
    the way optimal for its own cost; lam (the last segment's slope) prices the parameters in the reduced costs.
    """
    hulls = [_lower_hull(s.costs.astype(np.float64), e) for s, e in zip(specs, errors, strict=True)]
    states = [s.dense_state for s in specs]
    cost = sum(s.dense for s in specs)
    pos = [len(h) - 1 for h in hulls]  # current position along each hull (at the dense end)

    def push(heap: list[tuple[float, int]], i: int) -> None:
        if pos[i] > 0:
            a, b = hulls[i][pos[i] - 1], hulls[i][pos[i]]
            saved = float(specs[i].costs[b] - specs[i].costs[a])
            heapq.heappush(heap, ((errors[i][a] - errors[i][b]) / saved, i))

    heap: list[tuple[float, int]] = []
    for i in range(len(specs)):
        push(heap, i)
    lam = 0.0
    while cost > cap:
        if not heap:
            raise BudgetError("internal: the parameter cap is below every layer's smallest rank")
        lam, i = heapq.heappop(heap)
        pos[i] -= 1
        new = hulls[i][pos[i]]
        cost -= int(specs[i].costs[states[i]] - specs[i].costs[new])
        states[i] = new
        push(heap, i)
    return list(states), cost, lam


def _top_up(
    specs: list[_Layer], errors: list[np.ndarray], star: list[int], c_star: int, f_star: float, cap: float
) -> tuple[list[int], float]:
    """Step 2 of `_min_error`: the incumbent and its error, x* topped up with the moves that fit what is left of the
    cap and reduce the error most. Its error bounds the branch and bound, so the better it is the less is searched."""
    inc = list(star)
    c_inc, f_inc = c_star, f_star
    while True:
        best = (0.0, -1, -1)
        for i, s in enumerate(specs):
            j = inc[i]
            fits = np.nonzero(s.costs[j + 1 :] - s.costs[j] <= cap - c_inc)[0]
            if fits.size:
                gains = errors[i][j] - errors[i][j + 1 + fits]
                k = int(np.argmax(gains))
                if gains[k] > best[0]:
                    best = (float(gains[k]), i, j + 1 + int(fits[k]))
        if best[1] < 0:
            break
        _, i, j = best
        c_inc += int(specs[i].costs[j] - specs[i].costs[inc[i]])
        f_inc -= best[0]
        inc[i] = j
    return inc, f_inc


_Options = list[tuple[int, list[tuple[float, int, int]]]]
"""Per layer worth searching: (layer index, [(reduced cost d, cost change from x*, state)] sorted by d)."""


def _options(
    specs: list[_Layer], errors: list[np.ndarray], star: list[int], lam: float, bound: float
) -> _Options:
    """Step 3a of `_min_error`: the states whose reduced cost could still beat the incumbent, per layer with more
    than one such state. Every other layer stays at x*, which keeps the search small."""
    options = []  # per active layer: (d, delta_cost, state) sorted by d
    for i, s in enumerate(specs):
        base = errors[i][star[i]] + lam * s.costs[star[i]]
        d = np.maximum(errors[i] + lam * s.costs - base, 0.0)
        ok = np.nonzero(d < bound)[0]
        if ok.size > 1:
            order = ok[np.argsort(d[ok], kind="stable")]
            options.append((i, [(float(d[j]), int(s.costs[j] - s.costs[star[i]]), int(j)) for j in order]))
    return options


def _branch_and_bound(
    options: _Options, f_star: float, f_inc: float, lam: float, slack: float, bound: float, eps: float
) -> list[int] | None:
    """Step 3b of `_min_error`: the option index per layer of `options` of the best allocation found that beats the
    incumbent by more than eps, None when none does. Exhaustive unless it passes `_NODE_LIMIT` nodes."""
    min_dc = [min(o[1] for o in opts) for _, opts in options]
    suffix = np.append(np.cumsum(min_dc[::-1])[::-1], 0)  # least extra cost the remaining layers can add

    best_f, best_choice = f_inc, None
    choice = [0] * len(options)
    nodes = 0
    # iterative depth-first search: stack of (depth, option index to try, sum d, sum delta cost)
    stack = [(0, 0, 0.0, 0)]
    while stack and nodes < _NODE_LIMIT:
        depth, k, sum_d, sum_dc = stack.pop()
        nodes += 1
        if depth == len(options):
            f = f_star + sum_d - lam * sum_dc
            if f < best_f - eps:
                best_f, best_choice = f, list(choice)
                bound = best_f - f_star + lam * slack
            continue
        opts = options[depth][1]
        if k >= len(opts):
            continue
        d, dc, _ = opts[k]
        if sum_d + d >= bound - eps:
            continue  # sorted by d: no later option at this depth can do better
        stack.append((depth, k + 1, sum_d, sum_dc))  # sibling, explored after this subtree
        if sum_dc + dc + suffix[depth + 1] <= slack:
            choice[depth] = k
            stack.append((depth + 1, 0, sum_d + d, sum_dc + dc))
    return best_choice
