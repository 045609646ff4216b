"""Who owns which matrix, and which boxes travel where: a pure function of metadata, the same on every rank.

Owners are chosen by LPT (longest processing time first): matrices sorted by weight (their share of the total
compute cost plus their share of the total owner-held state), heaviest first, each to the least-loaded rank (ties
to the lowest rank, then by bytes and fqn). A refinement follows: while the busiest rank and some other rank can
split their matrices between them so that both end below the busiest load, they do (exactly, over every split by
counts of equal weights, when those are few). LPT alone can be 4/3 of the optimum (Graham, "Bounds on
multiprocessing timing anomalies", 1969); on the shapes of real models the refinement reaches the optimum or comes
close (``launch/plan.py`` reports the gap to a lower bound). Every non-empty box of a matrix travels once from one of
its holders to the owner (the owner itself when it holds the box), and the owner's result travels back to every
holder of every box, replicas included (HSDP, DDP-style plain tensors).

Matrices are grouped into buckets of at most ``bucket_bytes`` of payload (whole matrices in the wire dtype; a
larger matrix gets a bucket of its own). Per step, each bucket costs two ``all_to_all_single`` calls, and a rank's
extra memory for it is bounded by its send and receive buffers (each at most the bucket's payload) plus the whole
matrices it owns in the bucket and the owner maths' workspace.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import torch

from .layout import Box, ParamMeta


@dataclass(frozen=True, slots=True)
class MatrixSpec:
    """One matrix for the planner: its metadata, and its algorithm's cost and wire size."""

    meta: ParamMeta
    cost: float                 # owner compute per step, in flops
    wire_dtype: torch.dtype     # dtype of the payload on the wire, both ways
    state_bytes: int = 0        # state that lives whole on the owner
    channels_out: int = 1       # tensors per box sent to the owner (the result comes back as one)

    @property
    def wire_itemsize(self) -> int:
        return self.wire_dtype.itemsize

    @property
    def numel(self) -> int:
        n = 1
        for s in self.meta.shape:
            n *= s
        return n


@dataclass(frozen=True, slots=True)
class Transfer:
    """One box of one matrix, moving from ``src`` to ``dst`` (possibly the same rank)."""

    matrix: int
    box: Box
    src: int
    dst: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.box[1]:
            n *= s
        return n


@dataclass(frozen=True, slots=True)
class Bucket:
    matrices: tuple[int, ...]
    to_owners: tuple[Transfer, ...]     # holder -> owner, in a fixed order
    to_holders: tuple[Transfer, ...]    # owner -> holders, in a fixed order


@dataclass(frozen=True)
class Plan:
    world_size: int
    matrices: tuple[MatrixSpec, ...]
    owners: tuple[int, ...]
    buckets: tuple[Bucket, ...]
    bucket_bytes: int

    # -- reporting ----------------------------------------------------------------------------------------------
    def _sum_per_owner(self, value) -> list:
        totals = [0] * self.world_size
        for spec, owner in zip(self.matrices, self.owners):
            totals[owner] += value(spec)
        return totals

    @cached_property
    def cost_per_rank(self) -> list[float]:
        return self._sum_per_owner(lambda spec: spec.cost)

    @cached_property
    def state_bytes_per_rank(self) -> list[int]:
        return self._sum_per_owner(lambda spec: spec.state_bytes)

    @cached_property
    def sent_bytes_per_rank(self) -> list[int]:
        """Bytes each rank sends to other ranks per step (both directions; copies to itself excluded)."""
        sent = [0] * self.world_size
        for bucket in self.buckets:
            for t in bucket.to_owners:
                if t.src != t.dst:
                    spec = self.matrices[t.matrix]
                    sent[t.src] += t.numel * spec.channels_out * spec.wire_itemsize
            for t in bucket.to_holders:
                if t.src != t.dst:
                    sent[t.src] += t.numel * self.matrices[t.matrix].wire_itemsize
        return sent

    @property
    def collectives_per_step(self) -> int:
        return 0 if self.world_size == 1 else 2 * len(self.buckets)

    @staticmethod
    def _imbalance(values) -> float:
        mean = sum(values) / len(values)
        return max(values) / mean if mean else 1.0

    @property
    def imbalance(self) -> float:
        """max / mean of the owners' compute cost."""
        return self._imbalance(self.cost_per_rank)

    @property
    def state_imbalance(self) -> float:
        return self._imbalance(self.state_bytes_per_rank)

    def owner_of(self, fqn: str) -> int:
        return self.owners[[m.meta.fqn for m in self.matrices].index(fqn)]

    def __str__(self) -> str:
        lines = [f"owner plan: {len(self.matrices)} matrices on {self.world_size} ranks, {len(self.buckets)} "
                 f"bucket(s) of at most {self.bucket_bytes / 2**20:.0f} MiB, {self.collectives_per_step} "
                 f"collectives per step; compute imbalance (max/mean) {self.imbalance:.3f}"]
        if any(self.state_bytes_per_rank):
            lines[0] += f", owner-state imbalance {self.state_imbalance:.3f}"
        lines.append("  rank   cost (GFLOP)   owner state (MiB)   sent per step (MiB)")
        for rank in range(self.world_size):
            lines.append(f"  {rank:4d}   {self.cost_per_rank[rank] / 1e9:12.4f}   "
                         f"{self.state_bytes_per_rank[rank] / 2**20:17.2f}   "
                         f"{self.sent_bytes_per_rank[rank] / 2**20:19.3f}")
        lines.append("  owner  fqn  shape")
        for spec, owner in zip(self.matrices, self.owners):
            lines.append(f"  {owner:5d}  {spec.meta.fqn}  {tuple(spec.meta.shape)}")
        return "\n".join(lines)


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


def _transfers(index: int, meta: ParamMeta, owner: int) -> tuple[list[Transfer], list[Transfer]]:
    holders_of: dict[Box, list[int]] = {}
    for rank in meta.holders():
        holders_of.setdefault(meta.boxes[rank], []).append(rank)
    to_owner, to_holders = [], []
    for box, holders in holders_of.items():
        # The owner reads its own copy where it has one; otherwise replicas take turns by matrix index.
        src = owner if owner in holders else holders[index % len(holders)]
        to_owner.append(Transfer(index, box, src, owner))
        to_holders.extend(Transfer(index, box, owner, rank) for rank in holders)
    return to_owner, to_holders


def bucket_members(specs: list[MatrixSpec], bucket_bytes: int) -> list[list[int]]:
    """Consecutive matrices grouped into buckets of at most ``bucket_bytes`` of payload (a larger matrix alone)."""
    buckets, current, size = [], [], 0
    for i, spec in enumerate(specs):
        payload = spec.numel * spec.wire_itemsize * spec.channels_out
        # One bucket is one payload buffer, so it holds a single wire dtype.
        if current and (size + payload > bucket_bytes or specs[current[0]].wire_dtype != spec.wire_dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += payload
    if current:
        buckets.append(current)
    return buckets


def make_plan(specs: list[MatrixSpec], world_size: int, bucket_bytes: int = 64 * 2**20) -> Plan:
    """The plan for ``specs`` (in the optimizer's order) on ``world_size`` ranks."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    owners, _ = assign_owners(specs, world_size)
    built = []
    for members in bucket_members(specs, bucket_bytes):
        to_owners, to_holders = [], []
        for i in members:
            forward, backward = _transfers(i, specs[i].meta, owners[i])
            to_owners += forward
            to_holders += backward
        built.append(Bucket(tuple(members), tuple(to_owners), tuple(to_holders)))
    return Plan(world_size, tuple(specs), tuple(owners), tuple(built), bucket_bytes)
