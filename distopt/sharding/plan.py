"""Who owns which matrix, and which boxes travel where: a pure function of metadata, the same on every rank.

Owners are chosen by LPT (longest processing time first): matrices sorted by weight (their share of the total
compute cost plus their share of the total owner-held state), heaviest first, each to the least-loaded rank (ties
to the lowest rank, then by bytes and fqn). Every non-empty box of a matrix travels once from one of
its holders to the owner (the owner itself when it holds the box), and the owner's result travels back to every
holder of every box, replicas included (HSDP, DDP-style plain tensors).

Matrices are grouped into buckets of at most ``bucket_bytes`` of payload (whole matrices in the wire dtype; a
larger matrix gets a bucket of its own). Per step, each bucket costs two ``all_to_all_single`` calls, and a rank's
extra memory for it is bounded by its send and receive buffers (each at most the bucket's payload) plus the whole
matrices it owns in the bucket and the owner maths' workspace.
"""

from __future__ import annotations

import heapq
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
    """LPT on compute and owner memory together: each matrix weighs its share of the total cost plus its share of
    the total owner state. Heaviest first, each to the least-loaded rank; deterministic, ties to the lowest rank.
    Returns the owners and the compute cost per rank."""
    total_cost = sum(s.cost for s in specs) or 1.0
    total_state = sum(s.state_bytes for s in specs)
    weight = [s.cost / total_cost + (s.state_bytes / total_state if total_state else 0.0) for s in specs]
    order = sorted(range(len(specs)), key=lambda i: (-weight[i], -specs[i].numel, specs[i].meta.fqn, i))
    heap = [(0.0, rank) for rank in range(world_size)]
    owners = [0] * len(specs)
    for i in order:
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + weight[i], rank))
    costs = [0.0] * world_size
    for i, rank in enumerate(owners):
        costs[rank] += specs[i].cost
    return owners, costs


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


def make_plan(specs: list[MatrixSpec], world_size: int, bucket_bytes: int = 64 * 2**20) -> Plan:
    """The plan for ``specs`` (in the optimizer's order) on ``world_size`` ranks."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    owners, _ = assign_owners(specs, world_size)
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
    built = []
    for members in buckets:
        to_owners, to_holders = [], []
        for i in members:
            forward, backward = _transfers(i, specs[i].meta, owners[i])
            to_owners += forward
            to_holders += backward
        built.append(Bucket(tuple(members), tuple(to_owners), tuple(to_holders)))
    return Plan(world_size, tuple(specs), tuple(owners), tuple(built), bucket_bytes)
