"""Who owns which matrix, and which boxes travel where: a pure function of metadata, the same on every rank.

Owners come from :func:`.assign.assign_owners`. Every non-empty box of a matrix travels once from one of its holders
to the owner (the owner itself when it holds the box; otherwise replicas take turns by matrix index), and the owner's
result travels back to every holder of every box, replicas included (HSDP, DDP-style plain tensors).

Matrices are grouped into buckets of at most ``bucket_bytes`` of payload (whole matrices in the wire dtype; a
larger matrix gets a bucket of its own). A model whose whole payload is a few buckets' worth is cut into at least
``PIPELINE_BUCKETS`` buckets (of at least ``MIN_BUCKET_BYTES``), so that the exchange of one overlaps the owners'
compute of another. Per step, each bucket costs two ``all_to_all_single`` calls, and a rank's
extra memory for it is bounded by its send and receive buffers (each at most the bucket's payload) plus the whole
matrices it owns in the bucket and the owner maths' workspace.

The plan holds owners, buckets and one :class:`Layout` per distinct parameter layout; transfers are derived from
them on demand. A model at 8192 ranks has millions of transfers, of which each rank needs only its own
(:meth:`Plan.routes`), so planning costs O(matrices + layouts x ranks), not O(matrices x ranks).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property

import torch

from .assign import assign_owners
from .layout import Box, ParamMeta


@dataclass(frozen=True, slots=True)
class MatrixSpec:
    """One matrix for the planner: its metadata, and its algorithm's cost and wire size."""

    meta: ParamMeta
    cost: float                 # owner compute per step, in flops
    wire_dtype: torch.dtype     # dtype of the payload on the wire to the owner
    state_bytes: int = 0        # state that lives whole on the owner
    channels_out: int = 1       # tensors per box sent to the owner (the result comes back as one)
    return_dtype: torch.dtype | None = None  # dtype of the result on its way back (None: the wire dtype)

    @property
    def wire_itemsize(self) -> int:
        return self.wire_dtype.itemsize

    @property
    def back_dtype(self) -> torch.dtype:
        return self.return_dtype if self.return_dtype is not None else self.wire_dtype

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


@dataclass(frozen=True, slots=True, eq=False)
class Layout:
    """Who holds which box, for every parameter laid out alike (same shape, mesh and placements)."""

    groups: tuple[tuple[Box, tuple[int, ...]], ...]  # each distinct non-empty box and its holders, by first holder
    group_of: dict[int, int]                         # rank -> its index in ``groups`` (ranks holding nothing absent)
    held: int                                        # elements held, summed over every holder
    by_length: dict[int, tuple[tuple[int, tuple[int, ...]], ...]]  # holder count -> (numel, holders) of its boxes

    @classmethod
    def of(cls, meta: ParamMeta) -> Layout:
        holders_of: dict[Box, list[int]] = {}
        for rank, box in enumerate(meta.boxes):
            if all(box[1]):
                holders_of.setdefault(box, []).append(rank)
        groups = tuple((box, tuple(ranks)) for box, ranks in holders_of.items())
        by_length: dict[int, list] = defaultdict(list)
        for box, ranks in groups:
            by_length[len(ranks)].append((_numel(box[1]), ranks))
        return cls(groups, {rank: g for g, (_, ranks) in enumerate(groups) for rank in ranks},
                   sum(_numel(box[1]) * len(ranks) for box, ranks in groups),
                   {length: tuple(boxes) for length, boxes in by_length.items()})

    def source(self, group: int, matrix: int, owner: int) -> int:
        """The rank that sends box ``group`` of ``matrix`` to its owner."""
        holders = self.groups[group][1]
        return owner if self.group_of.get(owner) == group else holders[matrix % len(holders)]


@dataclass(frozen=True, slots=True)
class Route:
    """One rank's view of one bucket: what it sends and receives, ordered by peer, then by matrix."""

    matrices: tuple[int, ...]
    owned: tuple[int, ...]
    send: tuple[Transfer, ...]
    send_splits: tuple[int, ...]
    recv: tuple[Transfer, ...]
    recv_splits: tuple[int, ...]
    back_send: tuple[Transfer, ...]
    back_send_splits: tuple[int, ...]
    back_recv: tuple[Transfer, ...]
    back_recv_splits: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    world_size: int
    matrices: tuple[MatrixSpec, ...]
    owners: tuple[int, ...]
    buckets: tuple[Bucket, ...]
    bucket_bytes: int
    layouts: tuple[Layout, ...]  # layouts[m] of matrix m (shared between matrices laid out alike)

    # -- transfers ----------------------------------------------------------------------------------------------
    @cached_property
    def _no_splits(self) -> tuple[int, ...]:
        return (0,) * self.world_size

    def to_owner(self, m: int) -> list[Transfer]:
        """Every box of matrix ``m`` on its way to the owner, one holder sending each."""
        owner, layout = self.owners[m], self.layouts[m]
        return [Transfer(m, box, layout.source(g, m, owner), owner) for g, (box, _) in enumerate(layout.groups)]

    def to_holders(self, m: int) -> list[Transfer]:
        """The owner's result of matrix ``m``, box by box, to every holder of each box."""
        owner = self.owners[m]
        return [Transfer(m, box, owner, rank) for box, holders in self.layouts[m].groups for rank in holders]

    def routes(self, rank: int, active: frozenset[int]) -> tuple[Route, ...]:
        """``rank``'s routes for the matrices in ``active`` (those with gradients this step, the same set on every
        rank), one per bucket that has any. A sender and its receiver list the same transfers in the same order."""
        routes = []
        channels = lambda t: self.matrices[t.matrix].channels_out  # noqa: E731
        for bucket in self.buckets:
            matrices = tuple(m for m in bucket.matrices if m in active)
            if not matrices:
                continue
            send, recv, back_send, back_recv = [], [], [], []
            for m in matrices:
                owner, layout = self.owners[m], self.layouts[m]
                group = layout.group_of.get(rank)
                if group is not None:
                    box = layout.groups[group][0]
                    if layout.source(group, m, owner) == rank:
                        send.append(Transfer(m, box, rank, owner))
                    back_recv.append(Transfer(m, box, owner, rank))
                if owner == rank:
                    recv += self.to_owner(m)
                    back_send += self.to_holders(m)
            routes.append(Route(matrices, tuple(m for m in matrices if self.owners[m] == rank),
                                *self._split(send, lambda t: t.dst, channels),
                                *self._split(recv, lambda t: t.src, channels),
                                *self._split(back_send, lambda t: t.dst),
                                *self._split(back_recv, lambda t: t.src)))
        return tuple(routes)

    def _split(self, transfers: list[Transfer], peer, width=lambda t: 1):
        """Transfers ordered by peer (stable: by matrix within a peer), and the elements for each peer."""
        if not transfers:
            return (), self._no_splits
        ordered = sorted(transfers, key=peer)
        splits = [0] * self.world_size
        for t in ordered:
            splits[peer(t)] += t.numel * width(t)
        return tuple(ordered), tuple(splits)

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
        """Bytes each rank sends to other ranks per step (both directions; copies to itself excluded).

        Counted per layout, not per transfer (there are millions at 8192 ranks): the results go from the owner to
        every holder but itself, and the holders that send boxes to owners are found by their turn (``matrix %
        holders``), so each layout's boxes are visited once per turn, not once per matrix."""
        sent = [0] * self.world_size
        turns: dict[tuple[int, int, int], int] = defaultdict(int)  # (layout, holders, turn) -> bytes per element
        for m, (spec, owner, layout) in enumerate(zip(self.matrices, self.owners, self.layouts)):
            forward = spec.channels_out * spec.wire_itemsize
            mine = layout.group_of.get(owner)
            own_numel = 0 if mine is None else _numel(layout.groups[mine][0][1])
            sent[owner] += spec.back_dtype.itemsize * (layout.held - own_numel)
            for length in layout.by_length:
                turns[id(layout), length, m % length] += forward
            if mine is not None:  # the owner reads its own box: undo the turn counted for it above
                holders = layout.groups[mine][1]
                sent[holders[m % len(holders)]] -= own_numel * forward
        distinct = {id(layout): layout for layout in self.layouts}
        for (key, length, turn), forward in turns.items():
            for numel, holders in distinct[key].by_length[length]:
                sent[holders[turn]] += numel * forward
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


def _numel(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


#: Buckets a small model is cut into, so that exchanges overlap compute (two in flight, one computed).
PIPELINE_BUCKETS = 3
#: No bucket is made smaller than this for the pipeline's sake: below it, a collective's fixed cost dominates
#: (measured on gloo, 4 ranks on 2 cores: 1 MiB buckets of the bench model cost 15% more than 2 MiB ones).
MIN_BUCKET_BYTES = 2**20


def pipelined_bucket_bytes(specs: list[MatrixSpec], bucket_bytes: int) -> int:
    """The bucket bound the plan uses: ``bucket_bytes``, or less for a model of a few buckets' payload."""
    total = sum(spec.numel * spec.wire_itemsize * spec.channels_out for spec in specs)
    return min(bucket_bytes, max(MIN_BUCKET_BYTES, -(-total // PIPELINE_BUCKETS)))


def bucket_members(specs: list[MatrixSpec], bucket_bytes: int) -> list[list[int]]:
    """Consecutive matrices grouped into buckets of at most ``bucket_bytes`` of payload (a larger matrix alone)."""
    buckets, current, size = [], [], 0
    for i, spec in enumerate(specs):
        payload = spec.numel * spec.wire_itemsize * spec.channels_out
        # One bucket is one payload buffer each way, so it holds a single wire dtype and a single return dtype.
        first = specs[current[0]] if current else None
        if current and (size + payload > bucket_bytes or first.wire_dtype != spec.wire_dtype
                        or first.back_dtype != spec.back_dtype):
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
    for spec in specs:
        if len(spec.meta.boxes) != world_size:
            raise ValueError(f"matrix {spec.meta.fqn!r} has boxes for {len(spec.meta.boxes)} ranks, not for the "
                             f"{world_size} of the plan")
    owners, _ = assign_owners(specs, world_size)
    # Parameters laid out alike share one tuple of boxes (``layout.describe``): one Layout each, found by identity
    # (hashing thousands of boxes per matrix would cost more than the plan).
    known: dict[int, Layout] = {}
    layouts = []
    for spec in specs:
        key = id(spec.meta.boxes)
        if key not in known:
            known[key] = Layout.of(spec.meta)
        layouts.append(known[key])
    if world_size > 1:
        bucket_bytes = pipelined_bucket_bytes(specs, bucket_bytes)
    buckets = tuple(Bucket(tuple(members)) for members in bucket_members(specs, bucket_bytes))
    return Plan(world_size, tuple(specs), tuple(owners), buckets, bucket_bytes, tuple(layouts))
