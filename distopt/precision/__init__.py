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
from .fused import FusedStep
from .working import BOOKKEEPING, ROUNDING_STEP, Plan, encode_fresh, open_tensor, plan_for

__all__ = ["PRECISION", "BOOKKEEPING", "ROUNDING_STEP", "Plan", "plan_for", "step_local", "fresh_state",
           "param_name", "CHUNK_BYTES"]

#: Working float32 copies opened at once in one group's step (parameters, gradients and states): the bound on what
#: compact states cost in memory during a step, beyond their stored form (a larger tensor is opened alone). A
#: group whose step reduces over all its tensors (flags, norms) opens them all at once.
CHUNK_BYTES = 4 << 20


def param_name(group: dict[str, Any], group_index: int, position: int) -> str:
    """The name that seeds a parameter's random draws: its FQN where the group has names."""
    names = group.get("param_names")
    return str(names[position]) if names else f"{group_index}.{position}"


def fresh_state(plan: Plan, fresh: dict[str, Tensor], param: Tensor, local: Tensor,
                is_scalar: Callable[[str], bool]) -> dict[str, Tensor]:
    """A new state in stored form, each tensor laid out like ``param`` (scalars as they are)."""
    scalars = {key for key in fresh if is_scalar(key)} | {ROUNDING_STEP}
    out = {}
    for key, (value, kind, whole) in encode_fresh(plan, fresh, local, tuple(param.shape), scalars).items():
        if kind == "scalar":
            out[key] = value
        elif kind == "like":
            out[key] = layout.like_param(param, value)
        elif kind == "shaped":
            out[key] = layout.like_param_shaped(param, value, whole)
        else:
            out[key] = layout.replicated_like(param, value)
    return out


def open_whole(group: dict[str, Any], param: Tensor, stored: dict[str, Tensor], name: str,
               is_scalar: Callable[[str], bool], compile: bool = False):
    """The working copies of one parameter of the owner route's shard side (``stored``: its local state views), or
    None where its group's settings leave it as it is."""
    if not settings.given(group) and param.dtype not in settings.LOW_PRECISION:
        return None
    plan = plan_for(group, param)
    if not plan.active:
        counter = stored.get(ROUNDING_STEP)
        if counter is not None:  # kept for the owner's compact states alone (their dtype is not the parameter's)
            counter.add_(1)
        return None
    scalars = {key for key in stored if is_scalar(key)} | {ROUNDING_STEP}
    return open_tensor(plan, layout.local(param), stored, name, layout.global_offset(param), tuple(param.shape),
                       scalars, compile)


def rewrite_param(group: dict[str, Any], group_index: int, position: int, param: Tensor, stored: dict[str, Tensor],
                  fn: Callable[[Tensor, dict[str, Tensor]], None], is_scalar: Callable[[str], bool],
                  what: str) -> None:
    """Run ``fn(param, state)`` (a change of the parameter alone, such as schedule-free's swap between ``y`` and
    ``x``) on the working copies where the group's settings ask for them: the parameter with its compensation or
    correction, the states decoded. The parameter is written back as the group writes it (its draws from the
    stream ``what``); the states are read, not stored again."""
    if not settings.given(group) and param.dtype not in settings.LOW_PRECISION:
        fn(layout.local(param), {k: layout.local(v) for k, v in stored.items()})
        return
    plan = plan_for(group, param)
    local = layout.local(param)
    stored = {k: layout.local(v) for k, v in stored.items()}
    if not plan.active:
        fn(local, stored)
        return
    scalars = {key for key in stored if is_scalar(key)} | {ROUNDING_STEP}
    opened = open_tensor(plan, local, stored, param_name(group, group_index, position), layout.global_offset(param),
                         tuple(param.shape), scalars)
    fn(opened.work_param, opened.work_state)
    opened.write_param(what)


def working_grad(opened, grad: Tensor) -> Tensor:
    """The gradient as the working copies take it (float32 where it is bfloat16 or float16)."""
    return grad.float() if opened is not None and grad.dtype in settings.LOW_PRECISION else grad


def _chunks(wholes: Sequence[Tensor], states: Sequence[dict[str, Tensor]]) -> list[list[int]]:
    """Chunks of a batch, decided from the whole tensors' sizes: the same on every rank, so that the reductions of
    factored states are the same collectives everywhere."""
    chunks, current, size = [], [], 0
    for i, (param, state) in enumerate(zip(wholes, states)):
        cost = param.numel() * 4 * (2 + len(state))
        if current and size + cost > CHUNK_BYTES:
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += cost
    if current:
        chunks.append(current)
    return chunks


def step_local(batch: tuple, group_index: int, run: Callable[..., None], is_scalar: Callable[[Any, str], bool],
               reducer_for: Callable[[list[Tensor]], Any] | None = None, compile: bool = False,
               fused_run: Callable[..., list[int]] | None = None) -> None:
    """Run ``run(algorithm, params, grads, states, group, wholes, positions)`` (a group's step on local tensors)
    on float32 working copies where the group's settings ask for them, a chunk of tensors at a time, and put the
    results back in their stored forms. A group whose step reduces over all its tensors (flags, norms) opens
    them all at once.

    With ``fused_run(algorithm, params, grads, states, group, call)`` (the algorithm's compiled pass, which
    returns the indices it left), the stored forms are stepped in one compiled graph (:mod:`.fused`) where they
    can be, without working copies in memory."""
    algorithm, params, grads, states, group, wholes, positions = batch
    if not settings.given(group) and not any(whole.dtype in settings.LOW_PRECISION for whole in wholes):
        run(*batch)  # the common case, decided without building a plan per tensor
        return
    plans = [plan_for(group, whole) for whole in wholes]
    if not any(plan.active for plan in plans):
        run(*batch)
        return
    scalars = {key for state in states for key in state if is_scalar(algorithm, key)} | {ROUNDING_STEP}
    together = algorithm.chained(group) or getattr(algorithm, "reduces", False)
    left = list(range(len(params)))
    if fused_run is not None and not together and FusedStep.fusable(plans):
        names = [param_name(group, group_index, position) for position in positions]
        shapes = [tuple(whole.shape) for whole in wholes]
        offsets = [layout.global_offset(whole) for whole in wholes]
        call = FusedStep(plans, params, states, names, offsets, shapes, scalars)
        left = fused_run(algorithm, params, grads, states, group, call)
        if not left:
            return
    pending, reducer, place = [], None, {i: n for n, i in enumerate(left)}
    for chunk in ([left] if together else [[left[i] for i in c] for c in _chunks([wholes[i] for i in left],
                                                                                   [states[i] for i in left])]):
        opened = [open_tensor(plans[i], params[i], states[i], param_name(group, group_index, positions[i]),
                              layout.global_offset(wholes[i]), tuple(wholes[i].shape), scalars, compile)
                  for i in chunk]
        run(algorithm, [o.work_param for o in opened],
            [grads[i].float() if plans[i].active and grads[i].dtype in settings.LOW_PRECISION else grads[i]
             for i in chunk],
            [o.work_state for o in opened], group, [wholes[i] for i in chunk], [positions[i] for i in chunk])
        if reducer is None and reducer_for is not None and any(o.reduced() for o in opened):
            reducer = reducer_for([wholes[i] for i in left])
        for o, i in zip(opened, chunk):
            if o.reduced():  # a replica's copy adds zeros
                pending.append((o, o.partials(bool(reducer.weights[place[i]]) if reducer else True)))
            o.close()
    finish_factors(pending, reducer)


def finish_factors(pending: list, reducer: Any) -> None:
    """Store the factors of a group's factored states: the partial row and column sums of every chunk, summed over
    the ranks in one collective per group step (the same on every rank: the factored tensors and their order
    follow from the whole shapes)."""
    if not pending:
        return
    sizes = [partials.numel() for _, partials in pending]
    totals = torch.cat([partials for _, partials in pending])
    if reducer is not None and reducer.all_reduce is not None:
        totals = reducer.all_reduce(totals)
    for (opened, _), piece in zip(pending, torch.split(totals, sizes)):
        opened.finish_factors(piece)


def check_unchanged(algorithm: Any, group: dict[str, Any], index: int, seen: dict[int, tuple],
                    has_state: Callable[[], bool]) -> None:
    """Refuse a group whose precision settings were edited in ``param_groups`` after its states were stored in
    the old settings' form (decoding them under the new ones would read garbage); before any state, the new
    settings are checked and taken (at construction too, which records them). ``seen``: the settings each group
    was last checked with."""
    now = tuple(settings.value(group, key) for key in PRECISION)
    entry = seen.get(id(group))
    if entry is not None and entry[0] is group and entry[1] == now:
        return
    if entry is not None and entry[0] is group and has_state():
        changed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in zip(PRECISION, entry[1], now)
                            if old != new)
        raise ValueError(f"param group {index}: precision settings changed after its states were stored "
                         f"({changed}); the states are in the old form. To change them, save the optimizer's "
                         "state_dict and load it into an optimizer built with the new settings (it converts)")
    check_group(algorithm, group, index)
    seen[id(group)] = (group, now)


def check_group(algorithm: Any, group: dict[str, Any], index: int) -> None:
    """Raise ``ValueError`` naming the group (and the parameter) where a precision setting is malformed or cannot
    apply."""
    from .. import param_groups

    try:
        settings.check(algorithm.name, group)
    except ValueError as error:
        raise ValueError(f"param group {index}: {error}") from None
    for i, param in enumerate(group["params"]):
        if not isinstance(param, Tensor):
            continue  # refused by name by the parameter checks
        name = param_groups.describe(group, index, i)
        try:
            settings.check_param(group, param)
            _check_blocks(plan_for(group, param), param)
        except ValueError as error:
            raise ValueError(f"{algorithm.name}: parameter {name}: {error}") from None


def _check_blocks(plan: Plan, param: Tensor) -> None:
    """Quantization blocks lie along the last dimension; where that dimension is sharded (a DTensor placement),
    every rank's columns must start and end on block boundaries, or a block would span two ranks."""
    from torch.distributed.tensor import DTensor, Shard

    precision = plan.state_mode[2]
    if precision not in (*settings.DEFAULT_BLOCK, "factored") or not isinstance(param, DTensor) or param.dim() < 2:
        return
    from .codecs import blocks

    length = (8 if precision == "factored"  # sign bits, eight to a byte along the last dimension
              else blocks(tuple(param.shape), plan.state_mode[3] or settings.DEFAULT_BLOCK[precision]))
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
