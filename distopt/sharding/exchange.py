"""Every collective that distopt's optimizer issues lives here.

* Plan time: :func:`agree_on_metadata`, one ``all_gather_object`` of a digest of every rank's parameter metadata
  (and, only on disagreement, a second one of the metadata itself to name the first differing parameter). Every rank
  makes the same calls whatever its model holds, so a mismatch raises on every rank instead of hanging.
* Steady state: :class:`Exchange`, per bucket one ``all_to_all_single`` of boxes to their owners and one of results
  back. Split sizes and buffer offsets are precomputed Python ints: no metadata traffic, no host-device sync.
* Flags that need a number of a whole tensor: :func:`sum_over_ranks`, one ``all_reduce`` of a small vector per
  param group and chain point (never per tensor).
* QK-clip: :func:`max_over_ranks`, one ``all_reduce(MAX)`` per step of every attention layer's per-head maxima.

The collectives are kept out of ``torch.compile`` regions.
"""

from __future__ import annotations

from collections.abc import Callable

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import Box, ParamMeta
from .plan import Plan, Route


class MetadataMismatch(RuntimeError):
    """Ranks disagree on the parameters they optimize."""


def _summary(meta: ParamMeta) -> tuple:
    return (meta.fqn, meta.shape, meta.dtype, meta.mesh_shape, meta.placements)


@torch.compiler.disable
def agree_on_metadata(metas: list[ParamMeta], group=None) -> None:
    """Check that every rank holds the same parameters (names, shapes, dtypes, layouts); raise on all ranks if not."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    # The boxes are a function of the summary and the mesh's ranks, so those are what is compared; the ranks enter
    # by their hash (deterministic for ints), which keeps the digest small at thousands of ranks.
    digest = hashlib.sha256(repr([(_summary(m), hash(m.mesh_ranks)) for m in metas]).encode()).hexdigest()
    digests: list = [None] * world
    dist.all_gather_object(digests, (len(metas), digest), group=group)
    if all(d == digests[0] for d in digests):
        return
    tables: list = [None] * world
    dist.all_gather_object(tables, [_summary(m) for m in metas], group=group)
    reference = tables[0]
    for rank, table in enumerate(tables[1:], start=1):
        for position in range(max(len(reference), len(table))):
            mine = reference[position] if position < len(reference) else None
            theirs = table[position] if position < len(table) else None
            if mine != theirs:
                raise MetadataMismatch(
                    f"ranks disagree on the parameters to optimize: at position {position}, rank 0 has "
                    f"{_describe(mine)} but rank {rank} has {_describe(theirs)} (rank 0 holds {len(reference)} "
                    f"parameters, rank {rank} holds {len(table)}). Every rank must build the same model.")
    raise MetadataMismatch("ranks disagree on the layout of their parameters (the ranks of their device meshes)")


def _describe(entry) -> str:
    if entry is None:
        return "no parameter"
    fqn, shape, dtype, mesh_shape, placements = entry
    return f"{fqn!r} of shape {tuple(shape)}, {dtype}, placements {placements} on a {mesh_shape} mesh"


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(*box))


@dataclass
class InFlight:
    """One bucket's exchange, started and not yet waited on: what the receiving side needs to unpack it."""

    route: Route
    dtype: torch.dtype
    work: Any
    received: Tensor
    payload: Tensor  # kept alive until the collective has read it


class Exchange:
    """Moves boxes to owners and results back, one bucket at a time, with precomputed splits.

    Each direction is a pair: ``start_*`` packs this rank's pieces and issues the ``all_to_all_single`` without
    waiting, ``finish_*`` waits and unpacks; so that a caller may compute while a bucket is on the wire. Every rank
    issues the same collectives in the same order (the caller's schedule is a function of the plan alone)."""

    def __init__(self, plan: Plan, rank: int, group=None):
        self.plan, self.rank, self.group = plan, rank, group
        # Routes for a set of matrices with gradients (the same set on every rank); a job steps with one or two.
        self.routes = lru_cache(maxsize=8)(lambda active: plan.routes(rank, active))

    @torch.compiler.disable
    def _start(self, route: Route, send: list[Tensor], send_splits, recv_splits, dtype, device) -> InFlight:
        payload = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
        received = torch.empty(sum(recv_splits), dtype=dtype, device=device)
        work = dist.all_to_all_single(received, payload, list(recv_splits), list(send_splits), group=self.group,
                                      async_op=True)
        return InFlight(route, dtype, work, received, payload)

    @torch.compiler.disable
    def _wait(self, flight: InFlight) -> Tensor:
        flight.work.wait()
        flight.payload = flight.received  # the send buffer may go
        return flight.received

    def to_owners(self, route: Route, pieces: dict[int, Tensor], dtype: torch.dtype,
                  device: torch.device, keeps: Callable[[int], bool] = lambda m: False) -> dict[int, Tensor]:
        """Send each rank's local pieces ``(channels, *local)``, in the wire dtype, to their owners; return the whole
        ``(channels, *shape)`` matrices owned here. ``keeps(m)``: the owner of ``m`` only reads what it receives."""
        if self.plan.world_size == 1:
            # Every piece is its whole matrix: no packing into a send buffer and out of it, and a copy only where
            # the owner may work in place on what it receives (the piece may be the algorithm's own state).
            return {m: pieces[m].reshape(self.plan.matrices[m].channels_out, *self.plan.matrices[m].meta.shape)
                    .to(dtype=dtype, copy=not keeps(m)) for m in route.owned}
        return self.finish_to_owners(self.start_to_owners(route, pieces, dtype, device))

    def start_to_owners(self, route: Route, pieces: dict[int, Tensor], dtype: torch.dtype,
                        device: torch.device) -> InFlight:
        """Pack and send this rank's pieces of ``route`` (several processes only); :meth:`finish_to_owners` waits."""
        return self._start(route, [pieces[t.matrix].reshape(-1).to(dtype) for t in route.send], route.send_splits,
                           route.recv_splits, dtype, device)

    def finish_to_owners(self, flight: InFlight) -> dict[int, Tensor]:
        received, route, dtype = self._wait(flight), flight.route, flight.dtype
        whole = {}
        for m in route.owned:
            spec = self.plan.matrices[m]
            whole[m] = torch.empty((spec.channels_out, *spec.meta.shape), dtype=dtype, device=received.device)
        offset = 0
        for t in route.recv:
            channels = self.plan.matrices[t.matrix].channels_out
            size = t.numel * channels
            whole[t.matrix][(slice(None), *_slices(t.box))] = received[offset:offset + size].view(channels, *t.box[1])
            offset += size
        return whole

    def to_holders(self, route: Route, results: dict[int, Tensor], dtype: torch.dtype,
                   device: torch.device) -> dict[int, Tensor]:
        """Send the owners' whole results back; return this rank's boxes of them, by matrix."""
        if self.plan.world_size == 1:
            return {m: results[m] for m in route.owned}
        return self.finish_to_holders(self.start_to_holders(route, results, dtype, device))

    def start_to_holders(self, route: Route, results: dict[int, Tensor], dtype: torch.dtype,
                         device: torch.device) -> InFlight:
        return self._start(route, [results[t.matrix][_slices(t.box)].reshape(-1).to(dtype) for t in route.back_send],
                           route.back_send_splits, route.back_recv_splits, dtype, device)

    def finish_to_holders(self, flight: InFlight) -> dict[int, Tensor]:
        received = self._wait(flight)
        mine, offset = {}, 0
        for t in flight.route.back_recv:
            mine[t.matrix] = received[offset:offset + t.numel].view(t.box[1])
            offset += t.numel
        return mine


@torch.compiler.disable
def sum_over_ranks(partials: Tensor, group=None) -> Tensor:
    """The sum over the process group of a small tensor of partial sums (the flags' reductions: every number a
    chain point needs for every tensor of a param group, in one collective). In place, and returned."""
    dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)
    return partials


@torch.compiler.disable
def max_over_ranks(values: Tensor, group=None) -> Tensor:
    """The elementwise maximum over the process group of a small tensor (in place, and returned); a no-op in one
    process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values


@torch.compiler.disable
def exchange_bytes(outgoing: list[list[Tensor]], incoming: list[int], group=None,
                   device: torch.device | str = "cpu") -> list[Tensor]:
    """Send ``outgoing[dst]`` (tensors of any dtypes, concatenated as bytes) to each rank ``dst`` in one
    ``all_to_all_single``; return, for each source rank, the ``uint8`` buffer of the ``incoming[src]`` bytes it
    sent here. Checkpoint-time only: the sizes are computed by both sides from the plan, so nothing else travels."""
    def as_bytes(t: Tensor) -> Tensor:
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    sends = [[as_bytes(t) for t in tensors] for tensors in outgoing]
    send_splits = [sum(b.numel() for b in chunk) for chunk in sends]
    payload = torch.cat([b for chunk in sends for b in chunk]) if any(send_splits) else \
        torch.empty(0, dtype=torch.uint8, device=device)
    world = len(incoming)
    if world == 1:
        received = payload
    else:
        received = torch.empty(sum(incoming), dtype=torch.uint8, device=device)
        dist.all_to_all_single(received, payload.to(device), list(incoming), send_splits, group=group)
    return list(received.split(list(incoming)))


def rank_zero_decides(value, group=None):
    """Every rank gets rank 0's ``value`` (a small picklable object: a path, an error message). A checkpoint
    manager uses it so that all ranks act on one view of the file system."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def wait_for_all(group=None) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)
