"""How well owners balance compute: lower bounds on the busiest rank's cost, and two reference assignments.

Giving every matrix one owner is scheduling jobs on identical machines to minimize the makespan (P||Cmax). No
assignment can beat these bounds on the busiest rank:

* :func:`simple_bound`: ``max(total / W, largest matrix)``.
* :func:`l2_bound`: the smallest capacity ``T`` at which the bin-packing bound L2 of Martello & Toth ("Lower bounds
  and reduction procedures for the bin packing problem", Discrete Applied Mathematics 28, 1990) allows ``W`` bins.
* :func:`configuration_bound`: the same with the bound of the configuration LP (Gilmore & Gomory, 1961), by a dual
  solution that is checked exactly against every configuration, so that it holds whatever the LP's rounding.

The search over ``T`` keeps only capacities proven too small, so every returned value is a valid bound.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Sequence


def simple_bound(costs: Sequence[float], world: int) -> float:
    return max(sum(costs) / world, max(costs, default=0.0))


def _types(costs: Sequence[float]) -> list[tuple[float, int]]:
    """Distinct positive costs with their counts, largest first."""
    return sorted(Counter(c for c in costs if c > 0).items(), reverse=True)


def _search(too_small: Callable[[float], bool], low: float, high: float) -> float:
    """The largest capacity found with ``too_small`` true, starting from ``low`` (already a valid bound)."""
    for _ in range(60):
        if high - low <= 1e-9 * high:
            break
        middle = (low + high) / 2
        if too_small(middle):
            low = middle
        else:
            high = middle
    return low


def l2_bins(types: list[tuple[float, int]], capacity: float) -> int | float:
    """Martello & Toth's L2: fewest bins of ``capacity`` for the items ``types`` (size, count; largest first).

    For each threshold ``a`` up to half the capacity: items above ``capacity - a`` each need a bin, and so do the
    items above half (no two share one); those between ``a`` and half fill the room the latter leave, then more bins.
    """
    if not types:
        return 0
    if types[0][0] > capacity:
        return math.inf
    ascending = [size for size, _ in reversed(types)]
    counts, volumes = [0], [0.0]  # prefix sums over ascending sizes
    for size, count in reversed(types):
        counts.append(counts[-1] + count)
        volumes.append(volumes[-1] + size * count)

    def above(x: float) -> int:  # index of the first size > x
        return bisect.bisect_right(ascending, x)

    half, total = capacity / 2, counts[-1]
    best = 0
    for a in [0.0] + [s for s in ascending if s <= half]:
        big, mid = above(capacity - a), above(half)
        n_mid, v_mid = counts[big] - counts[mid], volumes[big] - volumes[mid]
        small = bisect.bisect_left(ascending, a)
        v_small = volumes[mid] - volumes[small]
        room = n_mid * capacity - v_mid
        extra = max(0, math.ceil((v_small - room) / capacity - 1e-12))
        best = max(best, (total - counts[big]) + n_mid + extra)
    return best


def l2_bound(costs: Sequence[float], world: int, upper: float | None = None) -> float:
    """Smallest ``T`` (within 1e-9) for which L2 does not rule out ``world`` bins; at least the simple bound.
    ``upper``: any makespan known to be achievable (the planner's), to start the search from."""
    types, low = _types(costs), simple_bound(costs, world)
    return _search(lambda t: l2_bins(types, t) > world, low, max(low, upper if upper else sum(costs)))


# ---- configuration LP ------------------------------------------------------------------------------------------
#: Sizes below ``simple bound / FLUID_BELOW`` are relaxed to a divisible fluid (a relaxation: the bound stays valid).
FLUID_BELOW = 16
#: At most this many sizes are kept whole, and at most this many configurations enumerated, else fewer sizes.
MAX_WHOLE, MAX_CONFIGS = 6, 20_000


def configuration_bound(costs: Sequence[float], world: int, upper: float | None = None) -> float:
    """Smallest ``T`` (within 1e-9) at which the configuration LP does not rule out ``world`` bins; at least the
    simple and L2 bounds. The largest sizes are kept whole, the others pooled as a fluid volume."""
    types = _types(costs)
    low = max(simple_bound(costs, world), l2_bound(costs, world, upper))
    high = max(low, upper if upper else sum(costs))
    whole = [t for t in types[:MAX_WHOLE] if t[0] * FLUID_BELOW >= low]
    while whole and _count_configs(whole, high) > MAX_CONFIGS:
        whole = whole[:-1]
    if not whole:
        return low
    fluid = sum(size * count for size, count in types[len(whole):])
    return _search(lambda t: lp_bins(whole, fluid, t) > world * (1 + 1e-9), low, high)


def _configurations(whole: list[tuple[float, int]], capacity: float) -> list[tuple[tuple[int, ...], float]]:
    """Every way to fill one bin with whole items (counts per size, load), the empty one included."""
    out = []

    def fill(t: int, counts: tuple[int, ...], load: float) -> None:
        if t == len(whole):
            out.append((counts, load))
            return
        size, available = whole[t]
        for k in range(min(available, int(capacity * (1 + 1e-12) // size)) + 1):
            if load + k * size > capacity * (1 + 1e-12):
                break
            fill(t + 1, counts + (k,), load + k * size)

    fill(0, (), 0.0)
    return out


def _count_configs(whole, capacity) -> int:
    count = 1
    for size, available in whole:
        count *= min(available, int(capacity // size)) + 1
    return count


def lp_bins(whole: list[tuple[float, int]], fluid: float, capacity: float) -> float:
    """A lower bound on the bins of ``capacity`` that hold ``whole`` (size, count) and a divisible ``fluid``: the
    value of a dual solution of the configuration LP (min bins s.t. every size is covered and the room the whole
    items leave holds the fluid), scaled so that no configuration violates it."""
    configs = _configurations(whole, capacity)
    columns = [list(counts) + [capacity - load] for counts, load in configs]
    demand = [float(count) for _, count in whole] + [fluid]
    y = _simplex_duals(columns, demand)
    y = [max(0.0, v) for v in y]
    worst = max(sum(a * v for a, v in zip(col, y)) for col in columns)
    return sum(d * v for d, v in zip(demand, y)) / worst if worst > 0 else 0.0


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (the systems here are a few rows)."""
    n = len(rhs)
    a = [row[:] + [r] for row, r in zip(matrix, rhs)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p] = a[p], a[c]
        if abs(a[c][c]) < 1e-300:
            raise ZeroDivisionError("singular basis")
        for r in range(c + 1, n):
            f = a[r][c] / a[c][c]
            if f:
                for k in range(c, n + 1):
                    a[r][k] -= f * a[c][k]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (a[r][n] - sum(a[r][k] * x[k] for k in range(r + 1, n))) / a[r][r]
    return x


def _simplex_duals(columns: list[list[float]], demand: list[float], max_pivots: int = 500) -> list[float]:
    """Duals of min sum(x) s.t. sum_j x_j columns[j] >= demand, x >= 0, by a revised simplex whose basis starts at
    the one-item configurations (and the empty one, or the fluid row's surplus). Any duals it returns are only a
    candidate: :func:`lp_bins` makes them feasible."""
    m = len(demand)
    index = {tuple(col[:-1]): j for j, col in enumerate(columns)}
    surplus = [[0.0] * m for _ in range(m)]
    for r in range(m):
        surplus[r][r] = -1.0
    every = columns + surplus  # column ids: configurations first, then the surpluses (cost 0)

    def unit(t: int) -> tuple[int, ...]:
        return tuple(1 if i == t else 0 for i in range(m - 1))

    basis = [index[unit(t)] for t in range(m - 1)]
    room = sum(columns[j][-1] * demand[t] for t, j in enumerate(basis))
    basis.append(len(columns) + m - 1 if room >= demand[-1] else index[(0,) * (m - 1)])
    y = [0.0] * m
    for _ in range(max_pivots):
        b_matrix = [[every[j][r] for j in basis] for r in range(m)]
        cost = [1.0 if j < len(columns) else 0.0 for j in basis]
        try:
            x = _solve(b_matrix, demand)
            y = _solve([list(col) for col in zip(*b_matrix)], cost)
        except ZeroDivisionError:
            break
        reduced = [(1.0 if j < len(columns) else 0.0) - sum(a * v for a, v in zip(every[j], y))
                   for j in range(len(every))]
        entering = min(range(len(every)), key=lambda j: reduced[j])
        if reduced[entering] > -1e-12:
            break
        direction = _solve(b_matrix, every[entering])
        ratios = [(x[i] / d, basis[i], i) for i, d in enumerate(direction) if d > 1e-12]
        if not ratios:
            break
        basis[min(ratios)[2]] = entering
    return y


# ---- reference assignments -------------------------------------------------------------------------------------
def round_robin_loads(shapes: Sequence[tuple[int, ...]], costs: Sequence[float], world: int) -> list[float]:
    """Per-rank cost of the Muon reference implementation's scheme: matrices sorted by shape, largest first (a
    stable sort on the shape tuple, as ``sorted(params, key=lambda p: p.size(), reverse=True)``), then dealt in
    turn, rank ``r`` taking positions ``r, r + W, ...``; the padding slots of the last round do no work."""
    order = sorted(range(len(shapes)), key=lambda i: tuple(shapes[i]), reverse=True)
    loads = [0.0] * world
    for position, i in enumerate(order):
        loads[position % world] += costs[i]
    return loads


def padding_loads(shapes: Sequence[tuple[int, ...]], costs: Sequence[float], world: int) -> list[float]:
    """Per-rank cost of microsoft/dion's scheme: matrices grouped by shape, each group cut into batches of ``W``
    (the last one padded with dummy matrices) and rank ``r`` orthogonalizing the ``r``-th matrix of every batch, a
    padded slot costing a real one: every rank does ``sum over shapes of ceil(n / W) * cost``."""
    groups: dict[tuple[int, ...], list[float]] = {}
    for shape, cost in zip(shapes, costs):
        groups.setdefault(tuple(shape), []).append(cost)
    return [float(sum(-(-len(g) // world) * max(g) for g in groups.values()))] * world
