"""Rounding a float32 result into a narrower float: to nearest, stochastically, or with a compensation (Kahan).

Stochastic rounding (Gupta et al., arXiv 1502.02551; as adv_optm and HeavyBall write bf16 parameters) rounds up with
probability equal to the distance to the lower neighbour, so the rounded value is right on average. Its random bits
here are a counter-based hash of ``(key, global element index)``: ``key`` comes from the seed, the parameter's name
and the step, and the index is the element's position in the *whole* tensor. So a shard draws exactly the bits the
whole tensor would draw at its elements: results do not depend on the world size or the layout, and a resumed run
draws what the uninterrupted run drew (the libraries draw from torch's global generator, which does neither).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so that a 32-bit value times one stays below 2**63: no int64 overflow anywhere.
_MULTIPLIERS = (0x7FEB352D, 0x5BD1E995, 0x2C1B3C6D)
_SHIFTS = (16, 15, 13, 16)
LOW_BITS = {torch.bfloat16: 16, torch.float16: 13}


def stream_key(seed: int, name: str, step: int) -> int:
    """A 32-bit key for one tensor's draws at one step (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) of int64 tensors holding 32-bit values."""
    for shift, multiplier in zip(_SHIFTS, _MULTIPLIERS):
        x = x ^ (x >> shift)
        x = (x * multiplier) & _MASK32
    return x ^ (x >> _SHIFTS[-1])


def global_index(local_shape: Sequence[int], offset: Sequence[int], whole_shape: Sequence[int],
                 device: torch.device) -> Tensor:
    """The position of every element of a box ``[offset, offset + local_shape)`` in the flattened whole tensor."""
    index = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for dim in reversed(range(len(whole_shape))):
        view = [1] * len(whole_shape)
        view[dim] = local_shape[dim]
        coordinate = torch.arange(offset[dim], offset[dim] + local_shape[dim], dtype=torch.int64, device=device)
        index = index + coordinate.view(view) * stride
        stride *= whole_shape[dim]
    return index.expand(tuple(local_shape)) if len(whole_shape) else index


def random_bits(key: int, index: Tensor) -> Tensor:
    """32 random bits (as int64 in ``[0, 2**32)``) for each element index, a pure function of ``key`` and the
    index. The index's high and low halves both enter, so tensors beyond 2**32 elements draw distinct bits."""
    low, high = index & _MASK32, index >> 32
    return _mix(_mix(low ^ key) ^ high)


def round_stochastic(x: Tensor, dtype: torch.dtype, bits: Tensor) -> Tensor:
    """``x`` (float32) rounded to ``dtype`` (bfloat16 or float16) stochastically with the given random bits.

    bfloat16 keeps float32's exponent, so adding a random 16-bit number below the kept bits and truncating is
    exact stochastic rounding. float16 has its own exponent range: the value is dithered by a uniform fraction of
    its float16 spacing, then rounded toward zero, which is the same distribution (subnormals included)."""
    x = x.float()
    if dtype == torch.bfloat16:
        as_int = x.view(torch.int32).to(torch.int64)
        dithered = ((as_int + (bits & 0xFFFF)) & ~0xFFFF).to(torch.int32)
        out = torch.where(torch.isfinite(x), dithered.view(torch.float32), x)
        return out.to(torch.bfloat16)  # exact: the low 16 bits are zero
    if dtype == torch.float16:
        down = _toward_zero_half(x)
        spacing = _spacing_above(down)
        fraction = (bits & 0xFFFFFF).to(torch.float32) * 2.0 ** -24
        dithered = x + torch.sign(x) * fraction * spacing
        out = _toward_zero_half(dithered)
        return torch.where(torch.isfinite(x), out, x.to(torch.float16))
    raise ValueError(f"stochastic rounding writes bfloat16 or float16, not {dtype}")


def _toward_zero_half(x: Tensor) -> Tensor:
    """float32 to float16, rounded toward zero (to nearest first, then one step back where that went outward)."""
    nearest = x.to(torch.float16)
    outward = nearest.float().abs() > x.abs()
    return torch.where(outward, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)


def _spacing_above(h: Tensor) -> Tensor:
    """The float16 spacing from ``|h|`` to the next float16 away from zero, as float32."""
    magnitude = h.abs()
    above = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf")))
    # From the largest finite float16 (65504) the next step up is infinity: use the spacing below it (32).
    top = magnitude.float() - torch.nextafter(magnitude, torch.zeros_like(magnitude)).float()
    return torch.where(torch.isinf(above), top, above.float() - magnitude.float())


def kahan_split(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``x`` (float32) as a value in ``dtype`` rounded to nearest plus the rounding error, also in ``dtype``: the
    pair carries about twice ``dtype``'s precision (Kahan's compensated summation, as optimi keeps it)."""
    value = x.to(dtype)
    return value, (x - value.float()).to(dtype)
