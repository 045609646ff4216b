"""Loading a state saved under other precision settings: each state is decoded from the form it was saved in (the
saved param group's settings say which) and stored in this optimizer's form. A run started with float32 states
continues with 8-bit ones, and back; the precision settings of the running optimizer are kept, not the saved ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..sharding import layout
from .codecs import Factored
from .rounding import global_index
from .working import BOOKKEEPING, KAHAN, OWNER_PREFIX, PARAM_ECC, ROUNDING_STEP, Plan, nearest_bits, plan_for


def same_form(saved_plan: Plan, plan: Plan) -> bool:
    return saved_plan.state_mode == plan.state_mode and saved_plan.write == plan.write


def convert(saved: Mapping[str, Any], saved_group: Mapping[str, Any], group: Mapping[str, Any], param: Tensor,
            fresh: Mapping[str, Tensor], is_scalar: Callable[[str], bool],
            local_part: Callable[[Tensor, Tensor], Tensor], whole: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """``saved`` (one parameter's entry of a state dict) in the stored form of ``group``'s settings: managed states
    re-encoded (as tensors laid out like ``fresh``'s), bookkeeping this group does not keep dropped, and what it
    keeps but the saved state lacks left to start fresh. ``local_part(value, like)`` takes this rank's part of a
    saved tensor, ``whole(value)`` all of it (a collective for a sharded one: every rank converts the same keys in
    the same order); factored states convert through the whole tensor, whose row and column sums they need."""
    saved_plan, plan = plan_for(saved_group, param), plan_for(group, param)
    out = dict(saved)
    for key in BOOKKEEPING:
        if key not in fresh:
            out.pop(key, None)
    if same_form(saved_plan, plan):
        return out
    whole_shape = tuple(param.shape)
    local = layout.local(param)
    # Each state by its own key (a factored one is stored only as "key::row", ...); owner state is converted on
    # its owner (owner_state.convert).
    keys = dict.fromkeys(k.split("::")[0] for k in saved if k not in BOOKKEEPING and not k.startswith(OWNER_PREFIX))
    for key in [k for k in keys if not is_scalar(k)]:
        old = saved_plan.codec_for(key, whole_shape)
        new = plan.codec_for(key, whole_shape)
        old_parts = old.parts(whole_shape)
        if (not any(key + suffix in fresh for suffix in new.parts(whole_shape))
                or not all(key + suffix in saved for suffix in old_parts)):
            continue  # refused by the key check that follows
        value = saved.get(key)
        if len(old_parts) == 1 and not (isinstance(value, Tensor) and value.is_floating_point()
                                        and tuple(value.shape) == whole_shape):
            continue
        factored = isinstance(old, Factored) or isinstance(new, Factored)
        if factored:
            everything = _decoded_whole(old, {suffix: whole(saved[key + suffix]) for suffix in old_parts},
                                        whole_shape, local.device)
            x = local_part(everything, param).to(local.device)
        else:
            pieces = {suffix: local_part(saved[key + suffix], _like(param, shape, dtype, local))
                      for suffix, (shape, dtype) in old_parts.items()}
            x = old.decode(pieces)
        for suffix in old_parts:
            out.pop(key + suffix, None)
        stored = {suffix: torch.zeros(shape, dtype=dtype, device=local.device)
                  for suffix, (shape, dtype) in new.parts(tuple(local.shape)).items()}
        if isinstance(new, Factored):
            new.finish_signs(x.reshape(local.shape), stored)
            new.finish_factors(stored, new.partials(everything, (0,) * len(whole_shape), True))
        else:
            # A conversion rounds to nearest: a load is repeatable.
            new.encode(x.reshape(local.shape), stored, nearest_bits(local.shape, local.device) if new.random
                       else None)
        for suffix, (shape, _) in new.parts(whole_shape).items():
            if getattr(new, "replicated", lambda _: False)(suffix):
                out[key + suffix] = layout.replicated_like(param, stored[suffix])
            else:
                out[key + suffix] = (layout.like_param(param, stored[suffix]) if shape == whole_shape
                                     else layout.like_param_shaped(param, stored[suffix], shape))
    return out


def _decoded_whole(codec: Any, parts: dict[str, Tensor], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """The whole tensor of a state from all of its parts."""
    parts = {suffix: part.to(device) for suffix, part in parts.items()}
    index = global_index(shape, (0,) * len(shape), shape, device) if isinstance(codec, Factored) else None
    return codec.decode(parts, index).reshape(shape).float()


def _like(param: Tensor, shape: tuple[int, ...], dtype: torch.dtype, local: Tensor) -> Tensor:
    """A target laid out like ``param`` with whole ``shape`` (for taking this rank's part of a saved tensor)."""
    if tuple(shape) == tuple(param.shape):
        return param
    empty = torch.empty(0, dtype=dtype, device=local.device)
    return layout.like_param_shaped(param, empty, shape)


OPTIONAL = frozenset({KAHAN, PARAM_ECC, ROUNDING_STEP})
