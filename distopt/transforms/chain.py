"""An algorithm with flags as a chain: ``[mars] [gradient clip] [orthograd] [palm | kourkoutas] core
[update clip] [grams] [caution] apply``, HeavyBall 3.2.1's order (with adv_optm's OrthoGrad and Kourkoutas-β on the
gradient before the core, and Grams before caution).

The core is the algorithm's own maths in its chain form (:meth:`Algorithm.direction`, or for matrix algorithms
``prepare`` / owner / ``finish_direction``). A group with no flag on never comes here: it runs the algorithm's own
step, so the torch.optim look-alikes, Muon, SOAP and PSGD keep their results to the bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from . import flags
from .base import Reducer, TensorStep, Transform, run
from .kourkoutas import Kourkoutas
from .parts import Caution, Clip, Grams, Mars, OrthoGraft, OrthoProject, PaLM, apply_update


class CountStep(Transform):
    """A custom chain's step counter (``state["step"]``), first among its own transforms."""

    name = "count_step"

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        t.state["step"] += 1
        return None


COUNT_STEP = CountStep()

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _key(hp: Mapping[str, Any]) -> tuple:
    return (flags.active(hp), flags.clip_name(flags.value(hp, "gradient_clipping")),
            flags.clip_name(flags.value(hp, "update_clipping")))


@lru_cache(maxsize=256)
def _parts(algorithm: Any, key: tuple) -> tuple[tuple[Transform, ...], tuple[Transform, ...]]:
    on, gradient_clip, update_clip = key
    before: list[Transform] = []
    if "mars" in on:
        before.append(Mars(algorithm.momentum_beta))
    if gradient_clip:
        before.append(Clip(gradient_clip, "gradient"))
    if "orthograd" in on:
        before += [OrthoProject(), OrthoGraft()]
    if "palm" in on:
        before.append(PaLM())
    if "kourkoutas_beta" in on:
        before.append(Kourkoutas())
    after: list[Transform] = []
    if update_clip:
        after.append(Clip(update_clip, "update"))
    if "grams" in on:
        after.append(Grams())
    if "caution" in on:
        after.append(Caution())
    return tuple(before), tuple(after)


def parts(algorithm: Any, hp: Mapping[str, Any]) -> tuple[tuple[Transform, ...], tuple[Transform, ...]]:
    """The transforms before and after the owner section (for an elementwise algorithm: around its core): the
    group's flags, and a custom chain's own transforms."""
    before, after = _parts(algorithm, _key(hp))
    own = getattr(algorithm, "transforms", None)
    if own is None:
        core = algorithm.core_transforms(hp)
        return before, ((*core, *after) if core else after)
    return (*before, COUNT_STEP, *algorithm.before), (*algorithm.after, *after)


def flag_state(algorithm: Any, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state the group's flags keep for one local tensor (none when no flag is on)."""
    if not flags.active(hp):
        return {}
    state: dict[str, Tensor] = {}
    for transform in (*parts(algorithm, hp)[0], *parts(algorithm, hp)[1]):
        state.update(transform.init(param, hp))
    return state


def flag_state_keys(algorithm: Any, hp: Mapping[str, Any]) -> frozenset[str]:
    """The state keys of the group's flags (empty when no flag is on)."""
    if not flags.active(hp):
        return frozenset()
    before, after = parts(algorithm, hp)
    return frozenset(key for transform in (*before, *after) for key in transform.state_keys)


#: Every state key a flag keeps (for state dicts that hold a flag's state after the flag was switched off).
ALL_FLAG_STATE = frozenset({*Mars.state_keys, *Kourkoutas.state_keys})


def is_scalar_state(algorithm: Any, key: str) -> bool:
    """Whether a state entry is a scalar rather than shaped like the parameter."""
    return key in algorithm.scalar_state or key in Kourkoutas.scalar_state


def begin(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict[str, Tensor]],
          hp: Mapping[str, Any], shapes: Sequence[tuple[int, ...]],
          offsets: Sequence[tuple[int, ...]] | None = None,
          positions: Sequence[int] | None = None) -> list[TensorStep]:
    """One :class:`TensorStep` per tensor: the gradient as the chain takes it in (negated under ``maximize``).
    Under ``promote`` the chain runs on float32 copies of a low-precision gradient and state; :func:`end` writes
    the state back. ``offsets``: where each local tensor starts in its whole tensor (``extra["offset"]``), for
    transforms that pick elements by their place in the whole tensor (Prodigy's ``slice_p``); ``positions``: each
    tensor's index in its param group (``extra["position"]``), for maths over the group's flatten (PSGDLRA)."""
    maximize, promote = hp.get("maximize", False), flags.value(hp, "promote")
    steps = []
    for param, grad, state, shape in zip(params, grads, states, shapes):
        if maximize:
            grad = -grad
        low = {}
        if promote:
            grad = grad.float() if grad.dtype in LOW_PRECISION else grad
            low = {k: v for k, v in state.items() if v.dtype in LOW_PRECISION}
            state = {**state, **{k: v.float() for k, v in low.items()}} if low else state
        t = TensorStep(param=param, grad=grad, u=grad, state=state, hp=hp, numel=math.prod(shape),
                       shape=tuple(shape), step=int(state["step"]) + 1)
        if low:
            t.extra["low_precision_state"] = low
        if offsets is not None:
            t.extra["offset"] = offsets[len(steps)]
        if positions is not None:
            t.extra["position"] = positions[len(steps)]
        steps.append(t)
    return steps


def end(steps: list[TensorStep]) -> None:
    """Write float32 copies of low-precision state back (``promote``)."""
    for t in steps:
        for key, original in t.extra.pop("low_precision_state", {}).items():
            original.copy_(t.state[key])


def run_elementwise(algorithm: Any, params: Sequence[Tensor], grads: Sequence[Tensor],
                    states: Sequence[dict[str, Tensor]], hp: Mapping[str, Any], shapes: Sequence[tuple[int, ...]],
                    reducer: Reducer, offsets: Sequence[tuple[int, ...]] | None = None,
                    positions: Sequence[int] | None = None) -> None:
    """One step of an elementwise group with flags on, or of a custom chain (for a matrix chain: its tensors that
    skip the owner section)."""
    before, after = parts(algorithm, hp)
    steps = begin(params, grads, states, hp, shapes, offsets, positions)
    run(before, steps, reducer)
    if getattr(algorithm, "transforms", None) is None:
        for t in steps:
            u = algorithm.direction(t.param, t.u, t.state, hp, t)
            if u is None:
                t.skip = True
            else:
                t.u = u
    finish(algorithm, steps, after, reducer)


def finish(algorithm: Any, steps: list[TensorStep], after: Sequence[Transform], reducer: Reducer) -> None:
    run(after, steps, reducer)
    for t in steps:
        if not t.skip:
            apply_update(t, algorithm.decays(t.hp, t.shape), algorithm.proximal_decay, algorithm.decay_scale)
            algorithm.after_step(t.param, t.state, t.hp)
    end(steps)


def prepare_matrices(algorithm: Any, params: Sequence[Tensor], grads: Sequence[Tensor],
                     states: Sequence[dict[str, Tensor]], hp: Mapping[str, Any], shapes: Sequence[tuple[int, ...]],
                     reducer: Reducer, offsets: Sequence[tuple[int, ...]] | None = None
                     ) -> tuple[list[Tensor], list[TensorStep]]:
    """The shard section before the owners: the flags before the core, then the algorithm's ``prepare``."""
    before, _ = parts(algorithm, hp)
    steps = begin(params, grads, states, hp, shapes, offsets)
    run(before, steps, reducer)
    pieces = [algorithm.prepare(t.param, t.u, t.state, hp) for t in steps]
    return pieces, steps


def finish_matrices(algorithm: Any, steps: list[TensorStep], updates: Sequence[Tensor], reducer: Reducer) -> None:
    """The shard section after the owners: ``finish_direction``, the flags after the core, and the step."""
    if not steps:
        return
    hp = steps[0].hp
    for t, update in zip(steps, updates):
        # The owners' result travels in the wire dtype (bfloat16 for Muon); the shard arithmetic after it runs in
        # the parameter's dtype (or float32 under promote), as torch.optim.Muon adds it to the parameter.
        dtype = torch.promote_types(update.dtype, t.grad.dtype if t.grad.is_floating_point() else t.param.dtype)
        offset = ({"row_offset": t.extra.get("offset", (0,))[0]} if getattr(algorithm, "takes_row_offset", False)
                  else {})
        u = algorithm.finish_direction(update.to(torch.promote_types(dtype, t.param.dtype)), t.state, hp, t.shape,
                                       **offset)
        if u is None:  # a step that makes no update (SOAP's first)
            t.skip = True
        else:
            t.u = u
    finish(algorithm, steps, parts(algorithm, hp)[1], reducer)
