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
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so that a 32-bit value times one stays below 2**63: no int64 overflow anywhere.
_MULTIPLIERS = (0x7FEB352D, 0x5BD1E995, 0x2C1B3C6D)
_SHIFTS = (16, 15, 13, 16)


@lru_cache(maxsize=None)
def stream_base(seed: int, name: str) -> int:
    """The 32-bit hash of the seed and a tensor's name that :func:`stream_key` mixes with the step."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=4).digest(), "little")


def stream_key(seed: int, name: str, step: int | Tensor) -> int | Tensor:
    """A 32-bit key for one tensor's draws at one step (stable across processes and Python runs): a hash of the
    seed and the name, mixed with the step. With ``step`` a tensor (the stored counter) the key is a tensor on its
    device, computed there: no value is read back to the host."""
    base = stream_base(seed, name)
    if isinstance(step, Tensor):
        return keyed(base, step)
    return int(_mix(torch.tensor((step & _MASK32) ^ base, dtype=torch.int64)))


def keyed(base: int, step: Tensor) -> Tensor:
    """:func:`stream_key` of a stored step counter, from its :func:`stream_base` (traceable by the compiler)."""
    return _mix((step.to(torch.int64) & _MASK32) ^ base)


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


def _hash(x: Tensor) -> Tensor:
    """Two xor-shift-multiply rounds over 32-bit values (each output bit flips with probability 0.5 +- 0.007 when
    one input bit flips, measured): the per-element hash, cheaper than :func:`_mix` to run and to compile."""
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIERS[0]) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MULTIPLIERS[2]) & _MASK32
    return x ^ (x >> 16)


def random_bits(key: int | Tensor, index: Tensor, wide: bool = True) -> Tensor:
    """32 random bits (as int64 in ``[0, 2**32)``) for each element index, a pure function of ``key`` and the
    index. With ``wide``, the index's high half enters too, so tensors beyond 2**32 elements draw distinct bits."""
    bits = _hash((index & _MASK32) ^ key)
    return _hash(bits ^ (index >> 32)) if wide else bits


def element_bits(key: int | Tensor, local_shape: Sequence[int], offset: Sequence[int], whole_shape: Sequence[int],
                 device: torch.device) -> Tensor:
    """:func:`random_bits` of each element of a box of a whole tensor, by its position in the whole: the high half
    of the position enters only where the whole tensor has more than 2**32 elements (a fact of the whole shape, so
    every rank and every layout decides it alike)."""
    index = global_index(local_shape, offset, whole_shape, device)
    return random_bits(key, index, wide=math.prod(whole_shape) > _MASK32)


def round_stochastic(x: Tensor, dtype: torch.dtype, bits: Tensor) -> Tensor:
    """``x`` (float32) rounded to ``dtype`` (bfloat16 or float16) stochastically with the given random bits, in
    integer arithmetic only (so that a compiled kernel rounds exactly as the eager one: no fused multiply-add).

    Adding a random number below the kept bits of the float32 pattern and truncating is exact stochastic rounding:
    bfloat16 keeps the top 16 bits; float16 keeps 10 mantissa bits where it is normal (from 2**-14), and below that
    its fixed spacing 2**-24 is kept by rounding ``|x| * 2**24`` to an integer. float16 saturates at 65504."""
    x = x.float()
    as_int = x.view(torch.int32).to(torch.int64)
    if dtype == torch.bfloat16:
        dithered = ((as_int + (bits & 0xFFFF)) & ~0xFFFF).to(torch.int32)
        out = torch.where(torch.isfinite(x), dithered.view(torch.float32), x)
        return out.to(torch.bfloat16)  # exact: the low 16 bits are zero
    if dtype == torch.float16:
        normal = ((as_int + (bits & 0x1FFF)) & ~0x1FFF).to(torch.int32).view(torch.float32)
        steps = torch.floor(x.abs() * 2.0 ** 24 + (bits >> 13 & 0x7FF).to(torch.float32) * 2.0 ** -11)
        subnormal = torch.copysign(steps * 2.0 ** -24, x)
        out = torch.where(x.abs() < 2.0 ** -14, subnormal, normal).clamp(-65504.0, 65504.0)
        return torch.where(torch.isfinite(x), out, x).to(torch.float16)
    raise ValueError(f"stochastic rounding writes bfloat16 or float16, not {dtype}")


def widen(narrow: Tensor) -> Tensor:
    """A bfloat16 or float16 tensor as float32 (exact). Inductor folds a round trip ``x.to(bf16).float()`` into
    ``x`` (an identity only in exact arithmetic), which would erase every rounding error this module measures:
    every graph that runs these functions compiles with :data:`COMPILE_OPTIONS`, which keeps the round trip."""
    return narrow.float()


#: Options of every compiled graph that rounds (inductor's ``emulate_precision_casts`` keeps ``x.to(bf16).float()``
#: as the two casts eager runs; without it the compiled encodings lose their rounding errors: test_compiled).
COMPILE_OPTIONS = {"emulate_precision_casts": True}


def kahan_split(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``x`` (float32) as a value in ``dtype`` rounded to nearest plus the rounding error, also in ``dtype``: the
    pair carries about twice ``dtype``'s precision (Kahan's compensated summation, as optimi keeps it)."""
    value = x.to(dtype)
    return value, (x - widen(value)).to(dtype)
