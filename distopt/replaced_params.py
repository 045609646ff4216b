"""Parameters replaced in ``param_groups`` after the optimizer was built, picked up as torch.optim picks them up.

Frameworks do this. accelerate's FSDP2 route builds the optimizer on the model's parameters, shards the model, and
then puts the new DTensor parameters into ``param_groups`` in place of the old ones (after a ``state_dict`` /
``load_state_dict`` round trip on the old ones). torch.optim follows because it reads ``param_groups`` at every
step. distopt keeps more per parameter (the owner plan, state in the parameter's layout), so at the next step (or
state dict) it:

* checks the new parameters as ``add_param_group`` does;
* hands the state of a replaced parameter to its successor at the same place when their global shapes agree,
  re-laid out as the successor is (a whole tensor becomes the successor's shard); a replaced parameter with state
  and no such successor is refused, naming it, since its state would otherwise be lost or misapplied;
* makes the owner plan again where a matrix algorithm's parameters changed (a collective: every rank must make
  the same replacement, as frameworks do), and moves owner state to the new owners.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor

from .algos import MATRIX
from .algos.base import OWNER_PREFIX
from .sharding import layout


def same(before: list[Tensor], now: list[Tensor]) -> bool:
    """Whether two parameter lists hold the same tensors (by identity) in the same order."""
    return len(before) == len(now) and all(x is y for x, y in zip(before, now))


def unchanged(seen: list[list[Tensor]], groups: list[dict[str, Any]]) -> bool:
    """Whether ``param_groups`` still hold exactly the parameters ``seen`` (the per-step check: no collective)."""
    return len(seen) == len(groups) and all(same(before, group["params"]) for before, group in zip(seen, groups))


def follow(opt, seen: list[list[Tensor]]) -> None:
    """Bring ``opt`` in line with its ``param_groups`` after parameters in them were replaced; ``seen`` holds the
    parameters of each group as the optimizer last knew them."""
    groups = opt.param_groups
    if len(groups) != len(seen):
        raise RuntimeError(f"param_groups went from {len(seen)} to {len(groups)} groups outside add_param_group; "
                           "add groups with add_param_group")
    present = {id(p) for group in groups for p in group["params"]}
    old_by_id = {id(p): p for before in seen for p in before}
    _refuse_moves_between_algorithms(opt, seen)
    successors: dict[int, Tensor] = {}  # id of a replaced parameter with state -> its successor
    changed_matrix_group = False
    for gi, (group, before) in enumerate(zip(groups, seen)):
        params = group["params"] = list(group["params"])
        if same(before, params):
            continue
        names = group.get("param_names")
        if names is not None and len(names) != len(params):
            raise ValueError(f"param group {gi} has {len(params)} parameters but {len(names)} param_names")
        for i, old in enumerate(before):
            if id(old) in present or not opt.state.get(old):
                continue
            new = params[i] if len(params) == len(before) else None
            # The successor must be new here: a parameter the optimizer already knows keeps its own state.
            fresh = isinstance(new, Tensor) and id(new) not in old_by_id and not opt.state.get(new)
            if not fresh or tuple(new.shape) != tuple(old.shape) or any(new is s for s in successors.values()):
                raise RuntimeError(f"{_name(group, gi, i, old)} was replaced in param_groups after the optimizer made "
                                   "state for it, and no new parameter of the same shape took its place to carry "
                                   "that state; replace parameters one for one (same shape, same place), or build a "
                                   "new optimizer and load_state_dict into it")
            successors[id(old)] = new
        others = groups[:gi] + [{"params": []}] + groups[gi + 1:]
        opt._check_params(group, gi, opt.algorithm_of(group), others)
        changed_matrix_group |= opt.algorithm_of(group).kind == MATRIX
    if changed_matrix_group:
        opt._saved.replan(opt._build_owner_route, successors)
    for old_id, new in successors.items():
        _hand_over(opt, old_by_id[old_id], new)
    for before in seen:
        for p in before:
            if id(p) not in present:
                opt.state.pop(p, None)  # torch.optim's state_dict trips on entries of parameters it cannot find


def _refuse_moves_between_algorithms(opt, seen: list[list[Tensor]]) -> None:
    """A parameter with state that now sits in a group of another algorithm would carry state that algorithm does
    not know."""
    before = {id(p): gi for gi, params in enumerate(seen) for p in params}
    for gi, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            old_gi = before.get(id(p))
            if old_gi is None or not opt.state.get(p):
                continue
            was, now = opt.param_groups[old_gi]["algorithm"], group["algorithm"]
            if was != now:
                raise RuntimeError(f"{_name(group, gi, i, p)} moved from a {was} group to a {now} group after the "
                                   f"optimizer made {was} state for it; build a new optimizer for the new grouping")


def _hand_over(opt, old: Tensor, new: Tensor) -> None:
    """Move ``old``'s state to ``new``, each tensor shaped like the parameter re-laid out as ``new`` is. Owner
    state that the new plan already placed (``replan``) stays as placed; in one process it moves as it is."""
    state = opt.state.pop(old)
    target = opt.state[new]
    for key, value in state.items():
        if key.startswith(OWNER_PREFIX):
            target.setdefault(key, value)
        elif tuple(value.shape) == tuple(new.shape) and value.dim() > 0:
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            local = layout.local(new)
            # in the successor's dtype and device (frameworks upcast bf16 parameters while they swap them in)
            dtype = local.dtype if whole.is_floating_point() and local.is_floating_point() else whole.dtype
            target[key] = layout.like_param(new, _shard_of(whole, new).to(device=local.device, dtype=dtype,
                                                                          copy=True))
        else:
            target[key] = value  # scalars (step counters)


def _shard_of(whole: Tensor, param: Tensor) -> Tensor:
    if not isinstance(param, DTensor):
        return whole
    mesh = param.device_mesh
    offsets, sizes = layout.box_at(tuple(param.shape), tuple(mesh.mesh.shape), tuple(param.placements),
                                   tuple(mesh.get_coordinate()))
    return whole[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].to(layout.local(param).device)


def _name(group: dict[str, Any], group_index: int, index: int, param: Tensor) -> str:
    names = group.get("param_names")
    if names is not None and index < len(names):
        return f"parameter {names[index]!r}"
    return f"param_groups[{group_index}]['params'][{index}] (shape {tuple(param.shape)})"
