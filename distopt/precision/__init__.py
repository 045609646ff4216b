"""Low precision and compact states for every algorithm: how parameters are written (Kahan summation, stochastic
rounding, error correction) and how states are stored (bfloat16, error-corrected, 8-bit and 4-bit block-wise),
as settings of a param group (:mod:`.settings`). The algorithms never see a stored form (:mod:`.working`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..sharding import layout
from . import settings
from .settings import PRECISION
from .working import BOOKKEEPING, ROUNDING_STEP, Plan, encode_fresh, open_tensor, plan_for

__all__ = ["PRECISION", "BOOKKEEPING", "ROUNDING_STEP", "Plan", "plan_for", "step_local", "fresh_state",
           "param_name", "CHUNK_BYTES"]

#: Working float32 copies opened at once in one group's step (parameters, gradients and states): the bound on what
#: compact states cost in memory during a step, beyond their stored form.
CHUNK_BYTES = 64 << 20


def param_name(group: dict[str, Any], group_index: int, position: int) -> str:
    """The name that seeds a parameter's random draws: its FQN where the group has names."""
    names = group.get("param_names")
    return str(names[position]) if names else f"{group_index}.{position}"


def fresh_state(plan: Plan, fresh: dict[str, Tensor], param: Tensor, local: Tensor,
                is_scalar: Callable[[str], bool]) -> dict[str, Tensor]:
    """A new state in stored form, each tensor laid out like ``param`` (scalars as they are)."""
    scalars = {key for key in fresh if is_scalar(key)} | {ROUNDING_STEP}
    out = {}
    for key, (value, whole) in encode_fresh(plan, fresh, local, tuple(param.shape), scalars).items():
        if key in scalars:
            out[key] = value
        elif whole is None:
            out[key] = layout.like_param(param, value)
        else:
            out[key] = layout.like_param_shaped(param, value, whole)
    return out


def _chunks(params: Sequence[Tensor], states: Sequence[dict[str, Tensor]]) -> list[list[int]]:
    chunks, current, size = [], [], 0
    for i, (param, state) in enumerate(zip(params, states)):
        cost = param.numel() * 4 * (2 + len(state))
        if current and size + cost > CHUNK_BYTES:
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += cost
    if current:
        chunks.append(current)
    return chunks


def step_local(batch: tuple, group_index: int, run: Callable[..., None], is_scalar: Callable[[Any, str], bool]
               ) -> None:
    """Run ``run(algorithm, params, grads, states, group, wholes, positions)`` (a group's step on local tensors)
    on float32 working copies where the group's settings ask for them, a chunk of tensors at a time, and put the
    results back in their stored forms. A group whose step reduces over all its tensors (flags, norms) opens
    them all at once."""
    algorithm, params, grads, states, group, wholes, positions = batch
    plans = [plan_for(group, whole) for whole in wholes]
    if not any(plan.active for plan in plans):
        run(*batch)
        return
    scalars = {key for state in states for key in state if is_scalar(algorithm, key)} | {ROUNDING_STEP}
    together = algorithm.chained(group) or getattr(algorithm, "reduces", False)
    for chunk in ([list(range(len(params)))] if together else _chunks(params, states)):
        opened = [open_tensor(plans[i], params[i], states[i], param_name(group, group_index, positions[i]),
                              layout.global_offset(wholes[i]), tuple(wholes[i].shape), scalars) for i in chunk]
        run(algorithm, [o.work_param for o in opened],
            [grads[i].float() if plans[i].active and grads[i].dtype in settings.LOW_PRECISION else grads[i]
             for i in chunk],
            [o.work_state for o in opened], group, [wholes[i] for i in chunk], [positions[i] for i in chunk])
        for o in opened:
            o.close()


def check_group(algorithm: Any, group: dict[str, Any], index: int) -> None:
    """Raise ``ValueError`` naming the group (and the parameter) where a precision setting is malformed or cannot
    apply."""
    from .. import param_groups
    from ..algos import MATRIX

    try:
        settings.check(algorithm.name, group)
    except ValueError as error:
        raise ValueError(f"param group {index}: {error}") from None
    explicit = [key for key in PRECISION if key in group and group[key] != PRECISION[key]]
    for i, param in enumerate(group["params"]):
        if not isinstance(param, Tensor):
            continue  # refused by name by the parameter checks
        name = param_groups.describe(group, index, i)
        try:
            settings.check_param(group, param)
            plan = plan_for(group, param)
            explicit_here = [key for key in explicit if key != "kahan_sum" or group[key]]
            if (explicit_here and (plan.write is not None or any(m is not None for m in plan.state_mode[:3]))
                    and algorithm.kind == MATRIX and algorithm.on_owner(tuple(param.shape), group)):
                raise ValueError(f"{', '.join(explicit_here)} cannot apply yet to a matrix that {algorithm.name} runs on "
                                 "its owner rank (low-precision writes and compact states run on the shards of "
                                 "elementwise algorithms and of the matrix algorithms' other parameters)")
            _check_blocks(plan, param)
        except ValueError as error:
            raise ValueError(f"{algorithm.name}: parameter {name}: {error}") from None


def _check_blocks(plan: Plan, param: Tensor) -> None:
    """Quantization blocks lie along the last dimension; where that dimension is sharded (a DTensor placement),
    every rank's columns must start and end on block boundaries, or a block would span two ranks."""
    from torch.distributed.tensor import DTensor, Shard

    precision = plan.state_mode[2]
    if precision not in settings.DEFAULT_BLOCK or not isinstance(param, DTensor) or param.dim() == 0:
        return
    from .codecs import blocks

    length = blocks(tuple(param.shape), plan.state_mode[3] or settings.DEFAULT_BLOCK[precision])
    last = param.dim() - 1
    cuts = [mesh_dim for mesh_dim, p in enumerate(param.placements) if isinstance(p, Shard) and p.dim == last]
    if length is None or not cuts:
        return
    cols = param.shape[-1]
    chunk = -(-cols // param.device_mesh.size(cuts[0]))
    if len(cuts) > 1 or chunk % length:
        raise ValueError(f"state_precision={precision!r} quantizes blocks of {length} along the last dimension, "
                         f"which placements {tuple(param.placements)} cut into {chunk} columns per rank: a block "
                         "would span two ranks; shard another dimension, or choose a block size that divides it")
