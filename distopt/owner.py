"""The owner route: runs the matrix algorithms' steps with one owner rank per matrix.

Per step and bucket: each rank runs ``prepare`` on its local shards (no communication), one ``all_to_all_single``
carries the pieces to their owners, each owner runs ``owner_update`` on its whole matrices (stacked by shape and
group), one ``all_to_all_single`` carries the results back, and each rank runs ``finish`` on its shards. The plan
and the per-rank routes are computed once; the steady state sends payload only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .algos import MatrixAlgorithm
from .compile import compiling
from .sharding import exchange, layout
from .sharding.plan import MatrixSpec, Plan, make_plan
from .transforms import Reducer
from .transforms.chain import finish_matrices, prepare_matrices

#: Default payload bound of one bucket (whole matrices, in the wire dtype).
DEFAULT_BUCKET_BYTES = 64 * 2**20


@dataclass(frozen=True, slots=True)
class MatrixEntry:
    param: Tensor
    fqn: str
    group_index: int  # by index: load_state_dict replaces the group dicts, schedulers edit the new ones
    algorithm: MatrixAlgorithm


def group_layout(process_group) -> tuple[Any, tuple[int, ...], int]:
    """(group, its global ranks, this rank's index); a single process counts as a group of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, (0,), 0
    group = process_group if process_group is not None else dist.group.WORLD
    return group, tuple(dist.get_process_group_ranks(group)), dist.get_rank(group)


def matrix_spec(meta: layout.ParamMeta, algorithm: MatrixAlgorithm, hp: dict[str, Any],
                param_dtype: torch.dtype) -> MatrixSpec:
    """What the planner needs of one matrix: its layout, and its algorithm's cost, wire dtype and owner state."""
    return MatrixSpec(meta, algorithm.cost(meta.shape, hp), algorithm.wire_dtype(hp, param_dtype),
                      algorithm.owner_state_bytes(meta.shape, hp, param_dtype), algorithm.channels(hp))


class OwnerRoute:
    """Plan, exchange and per-step orchestration of every matrix parameter of one optimizer."""

    def __init__(self, entries: list[MatrixEntry], groups: list[dict[str, Any]], process_group=None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, compile: bool = False):
        self.entries, self.compile = entries, compile
        self.group, ranks, self.rank = group_layout(process_group)
        shared: dict = {}
        metas = [layout.describe(e.param, e.fqn, ranks, self.rank, shared) for e in entries]
        if len(ranks) > 1:
            exchange.agree_on_metadata(metas, self.group)
        specs = [matrix_spec(meta, e.algorithm, groups[e.group_index], e.param.dtype) for meta, e in zip(metas, entries)]
        self.plan: Plan = make_plan(specs, len(ranks), bucket_bytes)
        self.exchange = exchange.Exchange(self.plan, self.rank, self.group)
        self.index = {e.param: m for m, e in enumerate(entries)}

    def owns(self, param: Tensor) -> bool:
        """Whether this rank holds ``param``'s owner state."""
        return self.plan.owners[self.index[param]] == self.rank

    def step(self, groups: list[dict[str, Any]], state_of: Callable[[MatrixEntry], dict[str, Tensor]],
             reducer_for: Callable[[list[int]], Reducer]) -> None:
        """One step of every matrix whose parameter has a gradient (the same set on every rank).

        A group with flags on runs its shard sections for all its matrices at once, before and after the exchange
        (a flag's reduction covers the whole group in one collective); ``reducer_for(matrices)`` gives it the
        reduction over the ranks. Other groups prepare and finish bucket by bucket."""
        active = frozenset(i for i, e in enumerate(self.entries) if e.param.grad is not None)
        pieces, states, chains = self._prepare_flagged(active, groups, state_of, reducer_for)
        updates: dict[int, Tensor] = {}
        for route in self.exchange.routes(active):
            for m in route.matrices:
                if m in pieces:
                    continue
                entry = self.entries[m]
                states[m] = {k: layout.local(v) for k, v in state_of(entry).items()}
                grad = layout.local_grad(entry.param, entry.param.grad)
                pieces[m] = entry.algorithm.prepare(layout.local(entry.param), grad, states[m],
                                                    groups[entry.group_index])
            spec = self.plan.matrices[route.matrices[0]]
            device = pieces[route.matrices[0]].device
            wholes = self.exchange.to_owners(route, pieces, spec.wire_dtype, device,
                                             lambda m: not self.entries[m].algorithm.owner_mutates_input)
            # Owner state is plain (never a DTensor): the owner's maths reads and writes the real state dicts.
            with compiling(self.compile):  # the owner maths only: the exchanges around it stay eager
                results = self._owner_compute(route.owned, wholes, groups,
                                              {m: state_of(self.entries[m]) for m in route.owned})
            mine = self.exchange.to_holders(route, results, spec.wire_dtype, device)
            for m in route.matrices:
                pieces.pop(m, None)
            for m, update in mine.items():
                entry = self.entries[m]
                if entry.group_index in chains:
                    updates[m] = update
                    continue
                offset = ({"row_offset": layout.global_offset(entry.param)[0]}
                          if entry.algorithm.takes_row_offset else {})
                entry.algorithm.finish(layout.local(entry.param), update, states[m], groups[entry.group_index],
                                       self.plan.matrices[m].meta.shape, **offset)
        for group_index, (members, steps, reducer) in chains.items():
            algorithm = self.entries[members[0]].algorithm
            # A rank whose shard of a matrix is empty receives nothing back: its update is empty too.
            finish_matrices(algorithm, steps, [updates.get(m, layout.local(self.entries[m].param).new_zeros(
                layout.local(self.entries[m].param).shape)) for m in members], reducer)

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
            for m, entry in zip(members, entries):
                states[m] = {k: layout.local(v) for k, v in state_of(entry).items()}
            reducer = reducer_for(members)
            prepared, steps = prepare_matrices(
                entries[0].algorithm, [layout.local(e.param) for e in entries],
                [layout.local_grad(e.param, e.param.grad) for e in entries], [states[m] for m in members],
                groups[group_index], [tuple(e.param.shape) for e in entries], reducer,
                [layout.global_offset(e.param) for e in entries])
            pieces.update(zip(members, prepared))
            chains[group_index] = (members, steps, reducer)
        return pieces, states, chains

    def _owner_compute(self, owned: tuple[int, ...], wholes: dict[int, Tensor], groups: list[dict[str, Any]],
                       states: dict[int, dict[str, Tensor]]) -> dict[int, Tensor]:
        """Run each owned matrix's owner maths, batched over same-shape matrices of the same group."""
        batches: dict[tuple, list[int]] = defaultdict(list)
        for m in owned:
            batches[(self.entries[m].group_index, self.plan.matrices[m].meta.shape)].append(m)
        results = {}
        for (group_index, shape), members in batches.items():
            algorithm = self.entries[members[0]].algorithm
            out = algorithm.owner_update([wholes[m] for m in members], [states[m] for m in members],
                                         groups[group_index], shape, [self.entries[m].fqn for m in members])
            results.update(zip(members, out))
        return results
