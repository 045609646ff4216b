"""A parameter's state before its first step (what that step would create), in the stored form of its group's
precision settings and laid out like the parameter; owner state whole on the owner, empty placeholders elsewhere."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import precision
from .algos import MATRIX, Algorithm
from .precision import owner_state
from .sharding import layout
from .transforms.chain import flag_state, is_scalar_state


def stored(algorithm: Algorithm, param: Tensor, group: dict[str, Any], fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    """New state tensors (the algorithm's own form) as the group stores them, laid out like ``param``."""
    plan = precision.plan_for(group, param)
    if plan.active:
        return precision.fresh_state(plan, fresh, param, layout.local(param),
                                     lambda key: is_scalar_state(algorithm, key))
    return {key: value if is_scalar_state(algorithm, key) else layout.like_param(param, value)
            for key, value in fresh.items()}


def initial(algorithm: Algorithm, param: Tensor, group: dict[str, Any], owner: bool | None) -> dict[str, Tensor]:
    """The whole initial state; ``owner``: None where ``param`` does not run on the owner route, else whether this
    rank owns it."""
    local = layout.local(param)
    init = algorithm.local_init if algorithm.kind == MATRIX and owner is None else algorithm.init
    fresh = {**init(local, group), **flag_state(algorithm, local, group)}
    if type(algorithm).position_state is not Algorithm.position_state:  # only Scion's needs the search
        fresh.update(algorithm.position_state(next(i for i, p in enumerate(group["params"]) if p is param)))
    state = stored(algorithm, param, group, fresh)
    if owner is not None:
        # Every rank has every key; the owner holds the whole tensors, the others empty placeholders.
        shape = tuple(param.shape)
        if owner:
            state.update(owner_state.fresh(algorithm, shape, group, param.dtype, local.device))
        else:
            state.update({key: torch.empty(0, device=local.device)
                          for key in owner_state.stored_entries(algorithm, shape, group, param.dtype)})
        if owner_state.needs_draws(algorithm, shape, group, param.dtype):
            state.setdefault(precision.ROUNDING_STEP, torch.zeros((), dtype=torch.int64))
    return state


def missing_flags(algorithm: Algorithm, param: Tensor, group: dict[str, Any],
                  state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state of flags switched on after the parameter's first step (or absent from a loaded state dict):
    fresh, as the flag's first step would make it (HeavyBall does the same)."""
    fresh = {key: value for key, value in flag_state(algorithm, layout.local(param), group).items()
             if key not in state}
    return stored(algorithm, param, group, fresh)
