"""The optimizer's state dict in the checkpoint layout, and back.

``state_dict()`` keeps torch's format (state keyed by parameter id, ``param_groups`` with ``params`` and
``param_names``), which is what ``torch.distributed.checkpoint.state_dict.get_state_dict`` re-keys by FQN. With
torch.distributed initialized every state tensor is a DTensor of the state's logical shape, so DCP can save it on W
ranks and load it on W':

* state shaped like its parameter: laid out as the parameter (FSDP2, DTensor), or ``Replicate`` over the optimizer's
  ranks for plain (DDP-style) parameters;
* scalar counters (``step``, ...): ``Replicate`` 0-d DTensors;
* owner state (SOAP's bases, PSGD's factors): ``Shard(0)`` row blocks of the whole tensor over the optimizer's ranks,
  built from the owners by :mod:`distopt.sharding.rows`. The owners' in-memory layout is never written as-is.

``load_state_dict`` accepts that form, DCP's resharded version of it, or plain whole tensors (a single-file
checkpoint), checks every key and shape against this optimizer before it changes anything, and sends owner state to
the owners of the current plan.
"""

from __future__ import annotations

import copy
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .algos import MATRIX
from .algos.base import OWNER_PREFIX
from .owner import group_layout
from .precision import PRECISION
from .precision import convert as precision_convert
from .precision import owner_state
from .sharding import layout, rows
from .sharding.rows import OwnerItem
from .transforms.chain import ALL_FLAG_STATE, flag_state, flag_state_keys, is_scalar_state
from .transforms.flags import FLAGS


class StateDictMismatch(ValueError):
    """A state dict does not fit this optimizer (other parameters, keys or shapes)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class SavedState:
    """Converts one optimizer's state between its in-memory layout and the checkpoint layout."""

    def __init__(self, optimizer) -> None:
        self.opt = optimizer
        self._mesh: DeviceMesh | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Context

    def _params(self) -> list[tuple[Tensor, int, str]]:
        """(param, group index, name) in the order of torch's parameter ids."""
        out = []
        for gi, group in enumerate(self.opt.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                out.append((p, gi, repr(names[i]) if names else f"param_groups[{gi}]['params'][{i}]"))
        return out

    def _world(self) -> tuple[Any, int, int]:
        group, ranks, rank = group_layout(self.opt._process_group)
        return group, rank, len(ranks)

    def _device(self) -> torch.device:
        for p, _, _ in self._params():
            return layout.local(p).device
        return torch.device("cpu")

    def mesh(self) -> DeviceMesh:
        """A 1-D mesh over the optimizer's ranks (no new process group: it wraps the existing one)."""
        if self._mesh is None:
            group, _, _ = self._world()
            self._mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD,
                                               self._device().type)
        return self._mesh

    def _replicate(self, value: Tensor) -> Tensor:
        return DTensor.from_local(value, self.mesh(), [Replicate()], run_check=False)

    def _owner_items(self, state_of, settings_of=None) -> tuple[list[OwnerItem], dict[Tensor, int]]:
        """Owner entries of every matrix that has state (the same on every rank), in the stored form of its group's
        settings (``settings_of(m)``: another group's, where given), and each matrix's index."""
        route = self.opt._owner
        if route is None:
            return [], {}
        items, index = [], {}
        for m, entry in enumerate(route.entries):
            index[entry.param] = m
            if not state_of(entry):
                continue
            hp = self.opt.param_groups[entry.group_index] if settings_of is None else settings_of(m)
            shape = route.plan.matrices[m].meta.shape
            for key, (stored, dtype) in owner_state.stored_entries(entry.algorithm, shape, hp,
                                                                   entry.param.dtype).items():
                items.append(OwnerItem(m, key, tuple(stored), dtype, route.plan.owners[m]))
        return items, index

    def replan(self, rebuild, successors: dict[int, Tensor] | None = None) -> None:
        """Run ``rebuild`` (which makes a new owner plan) and move the existing owner state to the new owners.
        ``successors`` maps the id of a parameter that left the plan to the parameter that takes its state."""
        successors = successors or {}
        if self.opt._owner is None or not _distributed():
            rebuild()
            return
        items, _ = self._owner_items(lambda e: self.opt.state.get(e.param))
        group, rank, world = self._world()
        old = self.opt._owner.entries
        blocks = self._scatter_owned(items)
        rebuild()
        entries, owners = self.opt._owner.entries, self.opt._owner.plan.owners
        # Matrices are found again by identity: the new plan may order them differently, and hold new ones.
        index = {id(e.param): m for m, e in enumerate(entries)}
        moved, moved_blocks = [], {}
        for item in items:
            param = old[item.matrix].param
            m = index.get(id(successors.get(id(param), param)))
            if m is None:
                raise RuntimeError(f"internal error: {old[item.matrix].fqn} has owner state but left the plan")
            moved.append(OwnerItem(m, item.key, item.shape, item.dtype, owners[m]))
            moved_blocks[(m, item.key)] = blocks[(item.matrix, item.key)]
        wholes = rows.gather(moved, moved_blocks, rank, world, group, self._device())
        for item in moved:
            param = entries[item.matrix].param
            self.opt.state[param][item.key] = wholes.get((item.matrix, item.key),
                                                         torch.empty(0, device=self._device()))

    # ------------------------------------------------------------------------------------------------------------
    # Save

    def save(self, torch_state_dict: dict[str, Any]) -> dict[str, Any]:
        """torch's ``Optimizer.state_dict()`` output (live in-memory state) to the checkpoint layout."""
        params = self._params()
        distributed = _distributed()
        items, matrix_of = self._owner_items(lambda e: self.opt.state.get(e.param))
        blocks = self._owner_blocks(items) if items else {}
        state = {}
        for pid, saved in torch_state_dict["state"].items():
            param, gi, _ = params[pid]
            group = self.opt.param_groups[gi]
            unsaved = self.opt.algorithm_of(group).unsaved_keys(group)
            out = {}
            for key, value in saved.items():
                if key in unsaved:
                    continue
                if key.startswith(OWNER_PREFIX):
                    out[key] = blocks[(matrix_of[param], key)]
                elif distributed and not isinstance(value, DTensor):
                    out[key] = self._replicate(value)  # scalars, and state of plain (replicated) parameters
                else:
                    out[key] = value
            state[pid] = out
        return {**torch_state_dict, "state": state}

    def _scatter_owned(self, items: list[OwnerItem]) -> dict[tuple[int, str], Tensor]:
        """This rank's row block of every owner tensor in ``items``, from the owners' live state."""
        group, rank, world = self._world()
        entries = self.opt._owner.entries
        wholes = {}
        for item in items:
            if item.owner == rank:
                whole = self.opt.state[entries[item.matrix].param][item.key]
                if tuple(whole.shape) != item.shape:
                    raise RuntimeError(f"internal error: owner state {item.key} of {entries[item.matrix].fqn} has "
                                       f"shape {tuple(whole.shape)}, expected {item.shape}")
                wholes[(item.matrix, item.key)] = whole
        return rows.scatter(items, wholes, rank, world, group, self._device())

    def _owner_blocks(self, items: list[OwnerItem]) -> dict[tuple[int, str], Tensor]:
        entries = self.opt._owner.entries
        if not _distributed():
            return {(i.matrix, i.key): self.opt.state[entries[i.matrix].param][i.key] for i in items}
        local = self._scatter_owned(items)
        out = {}
        for item in items:
            block = local[(item.matrix, item.key)]
            stride = torch.empty(item.shape, device="meta").stride()
            out[(item.matrix, item.key)] = DTensor.from_local(block, self.mesh(), [Shard(0)], run_check=False,
                                                              shape=torch.Size(item.shape), stride=stride)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Load

    def load(self, state_dict: dict[str, Any]) -> tuple[dict[Tensor, dict[str, Tensor]], list[dict[str, Any]]]:
        """Validate ``state_dict`` against this optimizer and build the new state and param groups; nothing of the
        optimizer changes here (the caller installs the result)."""
        groups = self._check_groups(state_dict)
        params = self._params()
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        new_state: dict[Tensor, dict[str, Tensor]] = {}
        owner_blocks: dict[tuple[int, str], Tensor] = {}
        saved_settings: dict[Tensor, dict[str, Any]] = {}  # per matrix: the settings its owner state was saved in
        route = self.opt._owner
        matrix_of = {e.param: m for m, e in enumerate(route.entries)} if route is not None else {}
        for saved_id, (param, gi, name) in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            group = groups[gi]
            algorithm = self.opt.algorithm_of(group)
            if algorithm.kind == MATRIX and param not in matrix_of:
                saved = _renamed(saved, algorithm.renamed_local_state)
            fresh = self.opt._init_state(algorithm, param, group)
            saved = precision_convert.convert(saved, _saved_group(state_dict, gi), group, param, fresh,
                                              lambda key: is_scalar_state(algorithm, key), _local_part,
                                              lambda value: _gathered(value) if isinstance(value, DTensor) else value)
            saved_hp = _with_saved_settings(group, _saved_group(state_dict, gi))
            # Owner state is checked and gathered in the form it was saved in, and converted on its owner.
            owner_shapes = (owner_state.stored_entries(algorithm, tuple(param.shape), saved_hp, param.dtype)
                            if param in matrix_of else {})
            expected = ({key for key in fresh if not key.startswith(OWNER_PREFIX)} | set(owner_shapes)
                        if param in matrix_of else set(fresh))
            unsaved = set(algorithm.unsaved_state)
            # A flag's state may be absent (a torch.optim state dict, whose groups keep this optimizer's flags; or a
            # flag the saved group had off, switched on after loading): it starts fresh. So may a compensation
            # or a draw counter that the saved settings did not keep.
            optional = flag_state_keys(algorithm, group) | precision_convert.OPTIONAL
            missing = sorted(expected - set(saved) - unsaved - optional)
            # State of a flag that this group no longer runs (switched off) is left behind, not refused.
            extra = sorted(set(saved) - expected - unsaved - ALL_FLAG_STATE)
            if missing or extra:
                raise StateDictMismatch(f"optimizer state of {name} ({algorithm.name}) does not match: missing "
                                        f"{missing}, unexpected {extra}")
            if not self.opt.state.get(param) and self._is_initial(saved, param, saved_hp, algorithm, unsaved):
                # A state dict of an optimizer that has not stepped (frameworks round-trip one before the first
                # step): installing it would hold every state tensor unsharded before FSDP shards the model, and
                # would tell SGD that its first step is past. As in torch.optim, nothing is kept.
                continue
            skipped = set(algorithm.unsaved_keys(group))  # the step counter is read where a flag's schedule needs it
            for key in owner_shapes:
                value = saved[key]
                if not isinstance(value, Tensor):
                    raise StateDictMismatch(f"optimizer state {key!r} of {name} is a {type(value).__name__}, not a "
                                            "tensor")
                shape, dtype = owner_shapes[key]
                _check_shape(value, shape, name, key)
                owner_blocks[(matrix_of[param], key)] = self._my_rows(value, shape).to(dtype)
            if param in matrix_of:
                saved_settings[param] = saved_hp
            for key, target in fresh.items():
                # Keys torch.optim does not keep, and flags' state, may be absent.
                if key in skipped or key.startswith(OWNER_PREFIX) and param in matrix_of or (
                        key not in saved and (key in unsaved or key in optional)):
                    continue
                value = saved[key]
                if not isinstance(value, Tensor):
                    raise StateDictMismatch(f"optimizer state {key!r} of {name} is a {type(value).__name__}, not a "
                                            "tensor")
                if is_scalar_state(algorithm, key):
                    _check_shape(value, tuple(target.shape), name, key)
                    target.copy_(layout.local(value) if isinstance(value, DTensor) else value)
                else:
                    _check_shape(value, tuple(target.shape), name, key)
                    layout.local(target).copy_(_local_part(value, target))
            if not unsaved <= (saved.keys() - skipped):
                algorithm.restore_unsaved(fresh)
            new_state[param] = fresh
        if route is not None:
            self._install_owner_state(owner_blocks, new_state, groups, saved_settings)
        return new_state, groups

    def _is_initial(self, saved: dict[str, Any], param: Tensor, group: dict[str, Any], algorithm,
                    unsaved: set[str]) -> bool:
        """Whether ``saved`` is exactly the state a parameter has before its first step. Decided from whole values
        only (plain tensors, or replicated DTensors), so that every rank decides alike; a sharded value counts as
        not initial."""
        values = {}
        for key, value in saved.items():
            if key in unsaved:
                continue
            if isinstance(value, DTensor):
                if not all(isinstance(p, Replicate) for p in value.placements):
                    return False
                value = value.to_local()
            values[key] = value
        local = layout.local(param)
        whole = torch.zeros(param.shape, dtype=local.dtype, device=local.device)
        on_owner = self.opt._on_owner(param)
        init = algorithm.local_init if algorithm.kind == MATRIX and not on_owner else algorithm.init
        initial = {**init(whole, group), **flag_state(algorithm, whole, group)}
        if on_owner:
            initial.update(owner_state.fresh(algorithm, tuple(param.shape), group, param.dtype, local.device))
        for key, value in values.items():
            reference = initial.get(key)
            if not isinstance(value, Tensor) or reference is None or tuple(value.shape) != tuple(reference.shape):
                return False
            if not torch.equal(value.to(device=reference.device, dtype=reference.dtype), reference):
                return False
        return True

    def _check_groups(self, state_dict: dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise StateDictMismatch("an optimizer state dict needs the keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        mine = self.opt.param_groups
        if len(saved_groups) != len(mine):
            raise StateDictMismatch(f"the state dict has {len(saved_groups)} param groups, this optimizer has "
                                    f"{len(mine)}")
        groups = []
        for index, (group, saved) in enumerate(zip(mine, saved_groups)):
            # A group without "algorithm" comes from torch.optim (or another torch.optim.Optimizer): it runs this
            # group's algorithm, and hyperparameters that torch.optim does not have keep this group's values.
            theirs = saved.get("algorithm", group["algorithm"])
            if theirs != group["algorithm"]:
                raise StateDictMismatch(f"param group {index} runs {group['algorithm']!r} but the state dict holds "
                                        f"state of {theirs!r}")
            if len(saved["params"]) != len(group["params"]):
                raise StateDictMismatch(f"param group {index} has {len(group['params'])} parameters, the state dict "
                                        f"has {len(saved['params'])}")
            _check_names(group, saved, index)
            if "algorithm" not in saved:
                try:
                    self.opt.algorithm_of(group).check_torch_group(saved)
                except ValueError as error:
                    raise StateDictMismatch(f"param group {index}: {error}") from None
            new = {k: copy.deepcopy(v) for k, v in saved.items() if k not in ("params", "param_names")}
            new["algorithm"] = group["algorithm"]
            for key in self.opt.algorithm_of(group).hyperparameters:
                new.setdefault(key, group[key])
            if "algorithm" not in saved:  # torch.optim has no flags: this group's stay on
                for key in FLAGS:
                    if key in group:
                        new.setdefault(key, group[key])
            for key in PRECISION:  # the running optimizer's precision settings stay: the state is converted to them
                new.pop(key, None)
                if key in group:
                    new[key] = group[key]
            new["params"] = group["params"]
            if "param_names" in group:
                new["param_names"] = group["param_names"]
            self.opt.algorithm_of(new).check(new)
            self.opt.check_flags(self.opt.algorithm_of(new), new, index)
            groups.append(new)
        return groups

    def _my_rows(self, value: Tensor, shape: tuple[int, ...]) -> Tensor:
        """This rank's row block (checkpoint layout) of an owner tensor given in any layout."""
        if not _distributed():
            return value.full_tensor() if isinstance(value, DTensor) else value
        _, rank, world = self._world()
        if isinstance(value, DTensor):
            if value.placements == (Shard(0),) and value.device_mesh == self.mesh():
                return value.to_local()
            value = value.full_tensor()
        start, count = layout._chunk(shape[0], world, rank)
        return value[start:start + count]

    def _install_owner_state(self, blocks: dict[tuple[int, str], Tensor], new_state: dict[Tensor, dict[str, Tensor]],
                             groups: list[dict[str, Any]], saved_settings: dict[Tensor, dict[str, Any]]) -> None:
        """Gather the loaded owner state (``blocks``, in the form ``saved_settings`` describe) to the owners of the
        current plan, and store it there in the form of this optimizer's settings."""
        route = self.opt._owner
        items, _ = self._owner_items(lambda e: e.param in new_state,
                                     lambda m: saved_settings[route.entries[m].param])
        if not _distributed():
            wholes = {(i.matrix, i.key): blocks[(i.matrix, i.key)].clone() for i in items}
        else:
            group, rank, world = self._world()
            wholes = rows.gather(items, blocks, rank, world, group, self._device())
        by_matrix: dict[int, dict[str, Tensor]] = {}
        for (m, key), whole in wholes.items():
            by_matrix.setdefault(m, {})[key] = whole
        for m, saved in by_matrix.items():
            entry = route.entries[m]
            shape = route.plan.matrices[m].meta.shape
            new_state[entry.param].update(owner_state.convert(entry.algorithm, shape, saved_settings[entry.param],
                                                              groups[entry.group_index], entry.param.dtype, saved))


def _with_saved_settings(group: dict[str, Any], saved_group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with the precision settings of the saved group (absent there: the defaults), which say the form
    its state was stored in."""
    return {**{k: v for k, v in group.items() if k not in PRECISION},
            **{k: saved_group[k] for k in PRECISION if k in saved_group}}


def _renamed(saved: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    out = dict(saved)
    for old, new in renames.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def _saved_group(state_dict: dict[str, Any], index: int) -> dict[str, Any]:
    groups = state_dict.get("param_groups", [])
    return groups[index] if index < len(groups) else {}


def _check_shape(value: Tensor, expected: tuple[int, ...], name: str, key: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise StateDictMismatch(f"optimizer state {key!r} of {name} has shape {tuple(value.shape)} in the state "
                                f"dict, but this optimizer expects {tuple(expected)}")


def _check_names(group: dict[str, Any], saved: dict[str, Any], index: int) -> None:
    """Parameters are matched by position, as in torch; where both sides have names they must agree."""
    mine = group.get("param_names")
    theirs = saved.get("param_names")
    if theirs is None and saved["params"] and all(isinstance(p, str) for p in saved["params"]):
        theirs = saved["params"]  # get_state_dict's form: params given by FQN
    if mine is None or theirs is None or list(mine) == list(theirs):
        return
    missing = [n for n in mine if n not in theirs]
    extra = [n for n in theirs if n not in mine]
    detail = f"missing {missing}, unexpected {extra}" if missing or extra else "the same names in another order"
    raise StateDictMismatch(f"param group {index} of the state dict holds other parameters: {detail}")


def _gathered(value: DTensor) -> Tensor:
    """The whole tensor. Neither gloo nor NCCL gathers int16 (the 16-bit ECC corrections): those travel as int32."""
    if value.dtype == torch.int16:
        return value.to(torch.int32).full_tensor().to(torch.int16)
    return value.full_tensor()


def _local_part(value: Tensor, param: Tensor) -> Tensor:
    """This rank's part of a state tensor shaped like ``param``, laid out as ``param`` is."""
    if not isinstance(param, DTensor):
        return _gathered(value) if isinstance(value, DTensor) else value
    if isinstance(value, DTensor):
        if value.device_mesh == param.device_mesh and value.placements == param.placements:
            return value.to_local()
        value = _gathered(value)
    mesh = param.device_mesh
    offsets, sizes = layout.box_at(tuple(param.shape), tuple(mesh.mesh.shape), tuple(param.placements),
                                   tuple(mesh.get_coordinate()))
    return value[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]

