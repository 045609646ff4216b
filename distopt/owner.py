"""The owner route: runs the matrix algorithms' steps with one owner rank per matrix.

Per step and bucket: each rank runs ``prepare`` on its local shards (no communication), one ``all_to_all_single``
carries the pieces to their owners, each owner runs ``owner_update`` on its whole matrices (stacked by shape and
group), one ``all_to_all_single`` carries the results back, and each rank runs ``finish`` on its shards. The plan
and the per-rank routes are computed once; the steady state sends payload only.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .algos import MatrixAlgorithm, splits
from .compile import compiling
from .precision import owner_state
from .sharding import exchange, layout
from .sharding.plan import MatrixSpec, Plan, Route, make_plan
from .transforms import Reducer
from .transforms.chain import finish_matrices, prepare_matrices

#: Default payload bound of one bucket (whole matrices, in the wire dtype).
DEFAULT_BUCKET_BYTES = 64 * 2**20
#: Default bound of one batched owner call (its stacked input, in the wire dtype): same-shape matrices are batched
#: up to this many bytes, and a matrix larger than it goes alone. The call's workspace (the orthogonalization's
#: iterates and Gram matrices) scales with it, so it caps the step's peak memory: at 512 KiB the bench model's Muon
#: step peaks at 1.0x (eager) and 1.1x (compiled) torch.optim.Muon's own peak in one process (1 MiB: 1.2x and 2.1x;
#: the whole bucket: 9x), its batches still hold four 256 x 256 matrices, and the compiled step is as fast as with
#: the whole bucket batched (measured interleaved on the 2-core VM: 67.8 against 75.0 ms median).
DEFAULT_OWNER_BATCH_BYTES = 2**19
#: Buckets whose outbound exchange may be in flight at once (the one being computed and the next).
IN_FLIGHT = 2


@dataclass(frozen=True, slots=True)
class MatrixEntry:
    param: Tensor
    fqn: str
    group_index: int  # by index: load_state_dict replaces the group dicts, schedulers edit the new ones
    algorithm: MatrixAlgorithm
    part: splits.Part | None = None  # a row block of ``param`` planned as a matrix of its own


def _spread(entries: list[MatrixEntry], metas: list[layout.ParamMeta], groups: list[dict[str, Any]]
            ) -> tuple[list[MatrixEntry], list[layout.ParamMeta]]:
    """Each weight split into parts (``split_sizes``) by an algorithm that can spread them becomes one entry per
    part, so that the planner may give the parts of one fused weight to different owners."""
    out_entries, out_metas, cache = [], [], {}
    for entry, meta in zip(entries, metas):
        hp = groups[entry.group_index]
        layout_of_parts = splits.parts(meta.shape, hp) if entry.algorithm.spreads_parts else None
        if layout_of_parts is None or len(layout_of_parts) < 2 or entry.algorithm.chained(hp):
            out_entries.append(entry)
            out_metas.append(meta)
            continue
        for part in layout_of_parts:
            out_metas.append(layout.row_block(meta, part.start, part.stop, cache))
            out_entries.append(MatrixEntry(entry.param, out_metas[-1].fqn, entry.group_index, entry.algorithm,
                                           part))
    return out_entries, out_metas


def _row_offset(algorithm: MatrixAlgorithm, param: Tensor) -> dict[str, int]:
    """``finish``'s ``row_offset`` keyword for the algorithms that take it: where this rank's rows start."""
    return {"row_offset": layout.global_offset(param)[0]} if algorithm.takes_row_offset else {}


def group_layout(process_group) -> tuple[Any, tuple[int, ...], int]:
    """(group, its global ranks, this rank's index); a single process counts as a group of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, (0,), 0
    group = process_group if process_group is not None else dist.group.WORLD
    return group, tuple(dist.get_process_group_ranks(group)), dist.get_rank(group)


def matrix_spec(meta: layout.ParamMeta, algorithm: MatrixAlgorithm, hp: dict[str, Any],
                param_dtype: torch.dtype) -> MatrixSpec:
    """What the planner needs of one matrix: its layout, and its algorithm's cost, wire dtype and owner state."""
    wire = algorithm.wire_dtype(hp, param_dtype)
    back = algorithm.return_dtype(hp, param_dtype)
    held = sum(math.prod(shape) * dtype.itemsize  # in stored form: compact owner states count as stored
               for shape, dtype in owner_state.stored_entries(algorithm, meta.shape, hp, param_dtype).values())
    return MatrixSpec(meta, algorithm.cost(meta.shape, hp), wire, held, algorithm.channels(hp),
                      None if back == wire else back)


class OwnerRoute:
    """Plan, exchange and per-step orchestration of every matrix parameter of one optimizer."""

    def __init__(self, entries: list[MatrixEntry], groups: list[dict[str, Any]], process_group=None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, compile: bool = False,
                 owner_batch_bytes: int = DEFAULT_OWNER_BATCH_BYTES):
        self.compile, self.owner_batch_bytes = compile, owner_batch_bytes
        self.group, ranks, self.rank = group_layout(process_group)
        shared: dict = {}
        metas = [layout.describe(e.param, e.fqn, ranks, self.rank, shared) for e in entries]
        if len(ranks) > 1:
            exchange.agree_on_metadata(metas, self.group)
            entries, metas = _spread(entries, metas, groups)  # in one process every owner is here anyway
        self.entries = entries
        specs = [matrix_spec(meta, e.algorithm, self._part_hp(e, groups), e.param.dtype)
                 for meta, e in zip(metas, entries)]
        self.plan: Plan = make_plan(specs, len(ranks), bucket_bytes)
        self.exchange = exchange.Exchange(self.plan, self.rank, self.group)
        self.index: dict[Tensor, int] = {}
        for m, e in enumerate(entries):
            self.index.setdefault(e.param, m)
        self.parts_of: dict[Tensor, list[int]] = defaultdict(list)
        for m, e in enumerate(entries):
            if e.part is not None:
                self.parts_of[e.param].append(m)

    @staticmethod
    def _part_hp(entry: MatrixEntry, groups: list[dict[str, Any]]) -> dict[str, Any]:
        """A part's hyperparameters: its own heads, and no further split."""
        hp = groups[entry.group_index]
        if entry.part is None:
            return hp
        return {**hp, "split_sizes": None, "num_heads": entry.part.heads if entry.part.heads > 1 else None}

    def owns(self, param: Tensor) -> bool:
        """Whether this rank holds ``param``'s owner state."""
        return self.plan.owners[self.index[param]] == self.rank

    def step(self, groups: list[dict[str, Any]], state_of: Callable[[MatrixEntry], dict[str, Tensor]],
             reducer_for: Callable[[list[int]], Reducer], opener: Callable | None = None,
             owner_opener: Callable | None = None, factors_finisher: Callable | None = None) -> None:
        """One step of every matrix whose parameter has a gradient (the same set on every rank).

        A group with flags on runs its shard sections for all its matrices at once, before and after the exchange
        (a flag's reduction covers the whole group in one collective); ``reducer_for(matrices)`` gives it the
        reduction over the ranks. Other groups prepare and finish bucket by bucket."""
        active = frozenset(i for i, e in enumerate(self.entries) if e.param.grad is not None)
        # Working copies (float32) of a matrix's parameter and shard-side state, where its group's precision
        # settings ask for them: opened at prepare, closed after finish (see distopt.precision).
        self._opener, self._opened = opener or (lambda entry, stored: None), {}
        self._factor_sums: dict[int, tuple[Any, Tensor]] = {}  # factored shard states: partial sums, per matrix
        # The owner's compact states (elementwise moments stored in the group's state form), opened as working
        # copies around each owner call: ``owner_opener(entry, shape, hp, state)`` (None where none is compact).
        self._owner_opener = owner_opener or (lambda entry, shape, hp, stored: None)
        self._finish_factor_sums = factors_finisher or (lambda pending, reducer: None)
        pieces, states, chains = self._prepare_flagged(active, groups, state_of, reducer_for)
        updates: dict[int, Tensor] = {}
        if self.plan.world_size == 1:
            # Every owner is here and nothing travels: prepare, orthogonalize and finish one owner batch at a time,
            # so the step holds one batch's pieces and workspace (the matrices' own bytes, not the bucket's).
            for route in self.exchange.routes(active):
                for members in self._batches(route.owned):
                    self._stream(members, groups, state_of, pieces, states, chains, updates)
            self._finish_chains(chains, updates)
            self._finish_factors(reducer_for)
            return
        # Several processes: bucket k+1's pieces go out while the owners compute bucket k, and bucket k's results
        # come back while bucket k+1 is computed. At most IN_FLIGHT buckets are out at once, so memory stays
        # bounded; the schedule depends only on the number of routes, so every rank issues the same collectives in
        # the same order.
        routes = self.exchange.routes(active)
        outbound: deque = deque()
        back = None

        def launch(route: Route):
            for m in route.matrices:
                self._prepare(m, groups, state_of, pieces, states)
            spec = self.plan.matrices[route.matrices[0]]
            flight = self.exchange.start_to_owners(route, pieces, spec.wire_dtype, pieces[route.matrices[0]].device)
            for m in route.matrices:
                pieces.pop(m, None)  # packed into the send buffer
            return flight

        pending: dict[Tensor, Tensor] = {}

        def land(flight) -> None:
            for m, update in self.exchange.finish_to_holders(flight).items():
                if self.entries[m].part is not None:
                    self._land_part(m, update, pending)
                else:
                    self._finish(m, update, groups, states, chains, updates)

        for route in routes[:IN_FLIGHT]:
            outbound.append(launch(route))
        upcoming = IN_FLIGHT
        while outbound:
            flight = outbound.popleft()
            wholes = self.exchange.finish_to_owners(flight)
            route, spec = flight.route, self.plan.matrices[flight.route.matrices[0]]
            # Owner state is plain (never a DTensor): the owner's maths reads and writes the real state dicts.
            with compiling(self.compile):  # the owner maths only: the exchanges around it stay eager
                results = self._owner_compute(route.owned, wholes, groups,
                                              {m: state_of(self.entries[m]) for m in route.owned})
            del wholes
            returning = self.exchange.start_to_holders(route, results, spec.back_dtype, flight.received.device)
            del results
            if back is not None:
                land(back)
            back = returning
            if upcoming < len(routes):
                outbound.append(launch(routes[upcoming]))
                upcoming += 1
        if back is not None:
            land(back)
        self._finish_parts(pending, groups, states)
        self._finish_chains(chains, updates)
        self._finish_factors(reducer_for)

    def _prepare(self, m: int, groups, state_of, pieces: dict[int, Tensor], states: dict[int, dict[str, Tensor]]
                 ) -> None:
        if m in pieces:  # a flagged group's matrices are prepared together, before the owners
            return
        entry = self.entries[m]
        if entry.part is not None:
            self._prepare_parts(entry.param, groups, state_of, pieces, states)
            return
        local, states[m], grad = self._open(m, state_of)
        pieces[m] = entry.algorithm.prepare(local, grad, states[m], groups[entry.group_index])

    def _prepare_parts(self, param: Tensor, groups, state_of, pieces, states) -> None:
        """``prepare`` once for the whole local shard, and each part's piece as a view of its rows."""
        members = self.parts_of[param]
        entry = self.entries[members[0]]
        local, state, grad = self._open(members[0], state_of)
        whole = entry.algorithm.prepare(local, grad, state, groups[entry.group_index])
        first_row = layout.global_offset(param)[0]
        for m in members:
            part = self.entries[m].part
            lo = min(max(part.start - first_row, 0), local.shape[0])
            hi = max(min(part.stop - first_row, local.shape[0]), lo)
            pieces[m], states[m] = whole[lo:hi], state

    def _open(self, m: int, state_of) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Matrix ``m``'s local parameter, shard-side state and gradient, as its prepare and finish see them."""
        entry = self.entries[m]
        stored = {k: layout.local(v) for k, v in state_of(entry).items()}
        grad = layout.local_grad(entry.param, entry.param.grad)
        opened = self._opener(entry, stored)
        if opened is None:
            return layout.local(entry.param), stored, grad
        self._opened[m] = opened
        return opened.work_param, opened.work_state, (grad.float() if grad.dtype in (torch.bfloat16, torch.float16)
                                                      else grad)

    def _local(self, m: int) -> Tensor:
        opened = self._opened.get(m)
        return opened.work_param if opened is not None else layout.local(self.entries[m].param)

    def _close(self, m: int) -> None:
        opened = self._opened.pop(m, None)
        if opened is not None:
            if opened.reduced():  # factored: the partial sums of this shard, taken before the copies are dropped
                self._factor_sums[m] = (opened, opened.partials(True))
            opened.close()

    def _finish_factors(self, reducer_for: Callable[[list[int]], Reducer]) -> None:
        """Close what is still open (a rank whose shard of a matrix is empty gets no result back to finish), and
        store the factors of the factored shard states from their partial sums, summed over the ranks in one
        collective per step: every rank opened the same matrices, so the sums line up in matrix order."""
        for m in sorted(self._opened):
            self._close(m)
        if not self._factor_sums:
            return
        order = sorted(self._factor_sums)
        reducer = reducer_for(order)
        pending = [(opened, sums if counts else torch.zeros_like(sums))  # a replica's copy adds zeros
                   for (opened, sums), counts in zip((self._factor_sums[m] for m in order), reducer.weights)]
        self._factor_sums = {}
        self._finish_factor_sums(pending, reducer)

    def _land_part(self, m: int, update: Tensor, pending: dict[Tensor, Tensor]) -> None:
        """Put a part's returned rows into its weight's local update (finished once every part is back)."""
        entry = self.entries[m]
        local = layout.local(entry.param)
        if entry.param not in pending:
            pending[entry.param] = local.new_empty(local.shape, dtype=update.dtype)
        first_row = layout.global_offset(entry.param)[0]
        lo = max(entry.part.start - first_row, 0)
        pending[entry.param][lo:lo + update.shape[0]] = update

    def _finish_parts(self, pending: dict[Tensor, Tensor], groups, states) -> None:
        for param, update in pending.items():
            members = self.parts_of[param]
            entry = self.entries[members[0]]
            state = states[members[0]]
            for m in members:
                states.pop(m, None)
            entry.algorithm.finish(self._local(members[0]), update, state, groups[entry.group_index],
                                   tuple(param.shape), **_row_offset(entry.algorithm, param))
            self._close(members[0])

    def _finish(self, m: int, update: Tensor, groups, states, chains, updates: dict[int, Tensor]) -> None:
        entry = self.entries[m]
        if entry.group_index in chains:
            updates[m] = update
            return
        entry.algorithm.finish(self._local(m), update, states.pop(m), groups[entry.group_index],
                               self.plan.matrices[m].meta.shape, **_row_offset(entry.algorithm, entry.param))
        self._close(m)

    def _stream(self, members: list[int], groups, state_of, pieces, states, chains, updates) -> None:
        """One owner batch in one process: prepare, the owner maths, finish."""
        for m in members:
            self._prepare(m, groups, state_of, pieces, states)
        spec = self.plan.matrices[members[0]]
        route = _Local(tuple(members))
        wholes = self.exchange.to_owners(route, pieces, spec.wire_dtype, pieces[members[0]].device,
                                         lambda m: not self.entries[m].algorithm.owner_mutates_input)
        for m in members:
            pieces.pop(m)
        with compiling(self.compile):
            results = self._owner_compute(route.owned, wholes, groups,
                                          {m: state_of(self.entries[m]) for m in members})
        del wholes
        for m in members:
            self._finish(m, results.pop(m), groups, states, chains, updates)

    def _finish_chains(self, chains, updates: dict[int, Tensor]) -> None:
        for group_index, (members, steps, reducer) in chains.items():
            algorithm = self.entries[members[0]].algorithm
            # A rank whose shard of a matrix is empty receives nothing back: its update is empty too.
            finish_matrices(algorithm, steps, [updates.get(m, layout.local(self.entries[m].param).new_zeros(
                layout.local(self.entries[m].param).shape)) for m in members], reducer)
            for m in members:
                self._close(m)

    def _prepare_flagged(self, active: frozenset[int], groups: list[dict[str, Any]],
                         state_of: Callable[[MatrixEntry], dict[str, Tensor]],
                         reducer_for: Callable[[list[int]], Reducer]):
        """The shard section before the owners of every group with flags on: ``(pieces, states, chains)``."""
        pieces: dict[int, Tensor] = {}
        states: dict[int, dict[str, Tensor]] = {}
        chains: dict[int, tuple[list[int], list, Reducer]] = {}
        by_group: dict[int, list[int]] = defaultdict(list)
        for m in sorted(active):
            entry = self.entries[m]
            if entry.algorithm.chained(groups[entry.group_index]):
                by_group[self.entries[m].group_index].append(m)
        for group_index, members in by_group.items():
            entries = [self.entries[m] for m in members]
            locals_, grads = [], []
            for m in members:
                local, states[m], grad = self._open(m, state_of)
                locals_.append(local)
                grads.append(grad)
            reducer = reducer_for(members)
            prepared, steps = prepare_matrices(
                entries[0].algorithm, locals_, grads, [states[m] for m in members],
                groups[group_index], [tuple(e.param.shape) for e in entries], reducer,
                [layout.global_offset(e.param) for e in entries])
            pieces.update(zip(members, prepared))
            chains[group_index] = (members, steps, reducer)
        return pieces, states, chains

    def _owner_compute(self, owned: tuple[int, ...], wholes: dict[int, Tensor], groups: list[dict[str, Any]],
                       states: dict[int, dict[str, Tensor]]) -> dict[int, Tensor]:
        """Run each owned matrix's owner maths, batched over same-shape matrices of the same group."""
        results = {}
        for members in self._batches(owned):
            entry, shape = self.entries[members[0]], self.plan.matrices[members[0]].meta.shape
            hp = self._part_hp(entry, groups)
            opened = [self._owner_opener(self.entries[m], shape, hp, states[m]) for m in members]
            out = entry.algorithm.owner_update([wholes[m] for m in members],
                                               [states[m] if o is None else o.work for m, o in zip(members, opened)],
                                               hp, shape, [self.entries[m].fqn for m in members])
            for o in opened:
                if o is not None:
                    o.close()
            results.update(zip(members, out))
        return results

    def _batches(self, owned: tuple[int, ...]) -> list[list[int]]:
        """The owner calls: same group and shape, at most ``owner_batch_bytes`` of input each (one matrix at least)."""
        by_kind: dict[tuple, list[int]] = defaultdict(list)
        for m in owned:
            part = self.entries[m].part
            by_kind[(self.entries[m].group_index, self.plan.matrices[m].meta.shape,
                     part.heads if part is not None else None)].append(m)
        out = []
        for members in by_kind.values():
            spec = self.plan.matrices[members[0]]
            size = spec.channels_out * spec.numel * spec.wire_itemsize
            per_call = max(1, self.owner_batch_bytes // max(size, 1))
            out.extend(members[i:i + per_call] for i in range(0, len(members), per_call))
        return out


@dataclass(frozen=True, slots=True)
class _Local:
    """The part of a route that one process needs: every matrix is owned here."""

    owned: tuple[int, ...]
