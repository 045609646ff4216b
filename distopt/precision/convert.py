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
from .working import BOOKKEEPING, KAHAN, OWNER_PREFIX, PARAM_ECC, ROUNDING_STEP, Plan, nearest_bits, plan_for


def same_form(saved_plan: Plan, plan: Plan) -> bool:
    return saved_plan.state_mode == plan.state_mode and saved_plan.write == plan.write


def convert(saved: Mapping[str, Any], saved_group: Mapping[str, Any], group: Mapping[str, Any], param: Tensor,
            fresh: Mapping[str, Tensor], is_scalar: Callable[[str], bool],
            local_part: Callable[[Tensor, Tensor], Tensor]) -> dict[str, Any]:
    """``saved`` (one parameter's entry of a state dict) in the stored form of ``group``'s settings: managed states
    re-encoded (as tensors laid out like ``fresh``'s), bookkeeping this group does not keep dropped, and what it
    keeps but the saved state lacks left to start fresh."""
    saved_plan, plan = plan_for(saved_group, param), plan_for(group, param)
    out = dict(saved)
    for key in BOOKKEEPING:
        if key not in fresh:
            out.pop(key, None)
    if same_form(saved_plan, plan):
        return out
    whole_shape = tuple(param.shape)
    local = layout.local(param)
    if "factored" in (saved_plan.state_mode[2], plan.state_mode[2]):
        raise NotImplementedError("converting states to or from state_precision='factored' on load is not supported "
                                  "yet; load with the saved setting")
    for key in [k for k in saved if k not in BOOKKEEPING and "::" not in k and not is_scalar(k)
                and not k.startswith(OWNER_PREFIX)]:  # converted on the owner (owner_state.convert)
        old = saved_plan.codec_for(key, whole_shape)
        new = plan.codec_for(key, whole_shape)
        old_parts = old.parts(whole_shape)
        if key not in fresh or not all(key + suffix in saved for suffix in old_parts):
            continue  # refused by the key check that follows
        value = saved[key]
        if len(old_parts) == 1 and not (isinstance(value, Tensor) and value.is_floating_point()
                                        and tuple(value.shape) == whole_shape):
            continue
        pieces = {suffix: local_part(saved[key + suffix], _like(param, shape, dtype, local))
                  for suffix, (shape, dtype) in old_parts.items()}
        x = old.decode(pieces)
        for suffix in old_parts:
            out.pop(key + suffix, None)
        stored = {suffix: torch.zeros(shape, dtype=dtype, device=local.device)
                  for suffix, (shape, dtype) in new.parts(tuple(local.shape)).items()}
        # A conversion rounds to nearest: a load is repeatable.
        new.encode(x, stored, nearest_bits(local.shape, local.device) if new.random else None)
        for suffix, (shape, _) in new.parts(whole_shape).items():
            out[key + suffix] = (layout.like_param(param, stored[suffix]) if shape == whole_shape
                                 else layout.like_param_shaped(param, stored[suffix], shape))
    return out


def _like(param: Tensor, shape: tuple[int, ...], dtype: torch.dtype, local: Tensor) -> Tensor:
    """A target laid out like ``param`` with whole ``shape`` (for taking this rank's part of a saved tensor)."""
    if tuple(shape) == tuple(param.shape):
        return param
    empty = torch.empty(0, dtype=dtype, device=local.device)
    return layout.like_param_shaped(param, empty, shape)


OPTIONAL = frozenset({KAHAN, PARAM_ECC, ROUNDING_STEP})
