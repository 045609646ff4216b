"""Which rank owns which matrix: LPT on compute and owner memory, then a pair-refinement pass.

Matrices are sorted by weight (their share of the total compute cost plus their share of the total owner-held
state), heaviest first, each to the least-loaded rank (ties to the lowest rank, then by bytes and fqn). A refinement
follows: while the busiest rank and some other rank can split their matrices between them so that both end below
the busiest load, they do (exactly, over every split by counts of equal weights, when those are few). LPT alone can
be 4/3 of the optimum (Graham, "Bounds on multiprocessing timing anomalies", 1969); on the shapes of real models the
refinement reaches the optimum or comes close (``launch/plan.py`` reports the gap to a lower bound).
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import MatrixSpec


def assign_owners(specs: list[MatrixSpec], world_size: int) -> tuple[list[int], list[float]]:
    """LPT on compute and owner memory together, then :func:`refine_owners`: each matrix weighs its share of the
    total cost plus its share of the total owner state. Heaviest first, each to the least-loaded rank;
    deterministic, ties to the lowest rank. Returns the owners and the compute cost per rank."""
    total_cost = sum(s.cost for s in specs) or 1.0
    total_state = sum(s.state_bytes for s in specs)
    weight = [s.cost / total_cost + (s.state_bytes / total_state if total_state else 0.0) for s in specs]
    order = sorted(range(len(specs)), key=lambda i: (-weight[i], -specs[i].numel, specs[i].meta.fqn, i))
    owners = refine_owners(weight, lpt_owners(weight, order, world_size), world_size)
    costs = [0.0] * world_size
    for i, rank in enumerate(owners):
        costs[rank] += specs[i].cost
    return owners, costs


def lpt_owners(weight: list[float], order: list[int], world_size: int) -> list[int]:
    """Each item, in ``order``, to the least-loaded rank (ties to the lowest rank)."""
    heap = [(0.0, rank) for rank in range(world_size)]
    owners = [0] * len(weight)
    for i in order:
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + weight[i], rank))
    return owners


#: The refinement tries every split of two ranks' items (by counts of equal weights) when there are at most this
#: many; beyond it, single moves and swaps.
MAX_SPLITS = 4096


def refine_owners(weight: list[float], owners: list[int], world_size: int) -> list[int]:
    """Lower the busiest rank's load by pair re-splits: the busiest rank pools its items with another rank's (the
    least-loaded first, one try per distinct content) and the pool is split between them to minimize the larger
    side. Accepted only when both sides end below the busiest load, so every round lowers the sorted load vector;
    stops when the busiest rank cannot be helped (or after a bounded number of rounds). Deterministic."""
    if len(weight) <= world_size:
        return list(owners)  # one item per rank at most: already optimal
    owners = list(owners)
    members: list[list[int]] = [[] for _ in range(world_size)]
    for i, rank in enumerate(owners):
        members[rank].append(i)
    loads = [sum(weight[i] for i in m) for m in members]
    content = [_content(weight, m) for m in members]
    for _ in range(4 * world_size + len(weight)):
        busiest = max(range(world_size), key=lambda r: (loads[r], -r))
        partners: dict[tuple, int] = {}  # content -> least-loaded rank holding it
        for rank in range(world_size):
            if rank != busiest and loads[rank] < loads[busiest]:
                best = partners.get(content[rank])
                if best is None or loads[rank] < loads[best]:
                    partners[content[rank]] = rank
        for partner in sorted(partners.values(), key=lambda r: (loads[r], r)):
            keep = _best_split(weight, members[busiest], members[partner], loads[busiest], loads[partner])
            if keep is not None:
                _apply(weight, keep, busiest, partner, members, owners)
                for rank in (busiest, partner):
                    loads[rank] = sum(weight[i] for i in members[rank])
                    content[rank] = _content(weight, members[rank])
                break
        else:
            break
    return owners


def _content(weight: list[float], items: list[int]) -> tuple:
    return tuple(sorted(Counter(weight[i] for i in items).items(), reverse=True))


def _best_split(weight, mine: list[int], theirs: list[int], my_load: float, their_load: float) -> dict | None:
    """How many items of each weight the busiest rank should keep so that both ranks end below ``my_load``
    (the best such split), or None."""
    pool = Counter(weight[i] for i in mine + theirs)
    values = sorted(pool, reverse=True)
    total = my_load + their_load
    limit = my_load * (1 - 1e-12)  # a strict improvement, beyond rounding
    ways = 1
    for v in values[:-1]:
        ways *= pool[v] + 1
    if ways <= MAX_SPLITS:
        splits = [(0.0, ())]
        for v in values[:-1]:
            splits = [(s + k * v, kept + (k,)) for s, kept in splits for k in range(pool[v] + 1)]
        # The count of the lightest weight is chosen by arithmetic: the one nearest an even split.
        last, count = values[-1], pool[values[-1]]
        best, keep = limit, None
        for s, kept in splits:
            k = min(count, max(0, int((total / 2 - s) / last))) if last > 0 else 0
            for k in (k, min(count, k + 1)):
                larger = max(s + k * last, total - s - k * last)
                if larger < best:
                    best, keep = larger, dict(zip(values, kept + (k,)))
        return keep
    # Too many splits: the best single move or swap of one item each way.
    have = Counter(weight[i] for i in mine)
    best, keep = limit, None
    for v in have:
        for u in [0.0, *sorted({weight[i] for i in theirs})]:
            if u < v and max(my_load - v + u, their_load + v - u) < best:
                best = max(my_load - v + u, their_load + v - u)
                keep = {**{w: have[w] for w in values}, v: have[v] - 1}
                if u:
                    keep[u] = have[u] + 1
    return keep


def _apply(weight, keep: dict, busiest: int, partner: int, members, owners) -> None:
    """Give ``busiest`` ``keep[w]`` items of each weight ``w`` (those it has first, by index) and the rest to
    ``partner``: as few moves as the split allows."""
    pool = sorted(members[busiest] + members[partner], key=lambda i: (owners[i] != busiest, i))
    taken: Counter = Counter()
    members[busiest], members[partner] = [], []
    for i in pool:
        rank = busiest if taken[weight[i]] < keep.get(weight[i], 0) else partner
        taken[weight[i]] += rank == busiest
        members[rank].append(i)
        owners[i] = rank
    for rank in (busiest, partner):
        members[rank].sort()
