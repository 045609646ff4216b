"""How one optimizer state is stored: pure encode/decode functions between a float32 working tensor and its parts.

A codec's parts are named by a suffix of the state's key (``""`` is the state's own key, ``"::ecc"`` the correction
of an error-corrected state, ``"::scale"`` the block scales of a quantized one). Every part is laid out like the
parameter along every dimension but the last, so that it shards, saves and reshards with it; quantization blocks lie
along the last dimension, so no block ever spans two ranks of a row-sharded (FSDP2) parameter, and the blocks of a
tensor do not depend on the world size.

* :class:`Plain`: a float dtype, rounded to nearest or stochastically (HeavyBall's ``storage_dtype``, adv_optm's
  ``bf16_sr``/``fp16``/``fp32``).
* :class:`ErrorCorrected`: a bfloat16/float16 value plus an int8/int16 multiple of a half ulp (HeavyBall's ``ecc``,
  after FlashOptim, arXiv 2602.23349).
* :class:`DynamicMap`: block-wise absmax scaling and the nearest code of a dynamic-tree map (Dettmers, arXiv
  1511.04561), 8 or 4 bits (torchao's ``AdamW8bit``/``AdamW4bit``).
* :class:`LinearSR`: block-wise absmax scaling to int8 (or uint8 for a non-negative state) with stochastic rounding
  (adv_optm's ``int8_sr``).
* :class:`Factored`: rank-1 factors of ``|x|`` and a sign bit per element (adv_optm's ``factored``, SMMF).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .rounding import global_index, round_stochastic, widen

Parts = dict[str, Tensor]


def uniform(bits: Tensor) -> Tensor:
    """Uniform numbers in [0, 1) (24 bits of resolution) from random bits."""
    return (bits & 0xFFFFFF).to(torch.float32) * 2.0 ** -24


@dataclass(frozen=True)
class Plain:
    """A float dtype; a narrower one rounded to nearest, or stochastically."""

    dtype: torch.dtype
    stochastic: bool = False
    random: bool = False

    def __post_init__(self):
        object.__setattr__(self, "random", self.stochastic and self.dtype in (torch.bfloat16, torch.float16))

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"": (shape, self.dtype)}

    def decode(self, parts: Parts, index: Tensor | None = None) -> Tensor:
        return parts[""].float()

    def encode(self, x: Tensor, parts: Parts, bits: Tensor | None) -> None:
        if self.random:
            parts[""].copy_(round_stochastic(x, self.dtype, bits))
        else:
            parts[""].copy_(x)


@dataclass(frozen=True)
class ErrorCorrected:
    """``x ~ narrow + (correction / smax) * ulp(narrow) / 2``: the narrow value rounded to nearest, the correction
    rounded stochastically (as HeavyBall does; its bits here come from the layout-independent stream)."""

    mode: str
    random: bool = True

    @property
    def narrow(self) -> torch.dtype:
        return torch.bfloat16 if self.mode.startswith("bf16") else torch.float16

    @property
    def wide(self) -> torch.dtype:
        return torch.int8 if self.mode.endswith("+8") else torch.int16

    @property
    def smax(self) -> float:
        return 127.0 if self.wide == torch.int8 else 32767.0

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"": (shape, self.narrow), "::ecc": (shape, self.wide)}

    def _half_ulp(self, narrow: Tensor) -> Tensor:
        """Half the spacing of the narrow dtype at each (finite) value: ``2**(e - mantissa - 1)``, ``e`` the value's
        binary exponent (the smallest normal one for zeros and subnormals, one past the largest for inf and NaN). The exponent comes from ``log2`` of the
        value, which is exact here (a narrow value just below a power of two is far enough from it for float32's
        ``log2``; equal to the exponent bits' on all 65536 patterns of each dtype, tested): reading it from the bits would stop the compiler
        from vectorizing the step's loop (a 16-bit view does not vectorize)."""
        mantissa, smallest, top = (7, -126, 128) if self.narrow == torch.bfloat16 else (10, -14, 16)
        exponent = torch.floor(torch.log2(widen(narrow).abs()))
        exponent = torch.where(exponent != exponent, top, exponent).clamp(smallest, top)  # inf, NaN: as their bits
        return torch.exp2(exponent - (mantissa + 1))

    def decode(self, parts: Parts, index: Tensor | None = None) -> Tensor:
        narrow = parts[""]
        return widen(narrow) + parts["::ecc"].float() / self.smax * self._half_ulp(narrow)

    def encode(self, x: Tensor, parts: Parts, bits: Tensor) -> None:
        x = x.float()
        narrow = x.to(self.narrow)
        error = torch.nan_to_num(x - widen(narrow), nan=0.0, posinf=float("inf"), neginf=-float("inf"))
        scaled = (error / self._half_ulp(narrow)).clamp(-1, 1) * self.smax
        parts[""].copy_(narrow)
        parts["::ecc"].copy_(torch.floor(scaled + uniform(bits)).clamp(-self.smax, self.smax))


def blocks(shape: tuple[int, ...], block: int) -> int | None:
    """The length of a quantization block along the last dimension of a tensor of (global) ``shape``: ``block``
    where it divides the rows, the row where a row is shorter and divides ``block``; None where neither holds, or
    for vectors and tensors under 4096 elements (torchao's threshold), whose states stay plain. A vector is not
    quantized because its one row is what FSDP2 cuts: a block would span two ranks."""
    if len(shape) < 2 or math.prod(shape) < 4096:
        return None
    cols = shape[-1]
    if cols % block == 0:
        return block
    if block % cols == 0:
        return cols
    return None


def _blocked(x: Tensor, length: int) -> Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // length, length)


@lru_cache(maxsize=None)
def dynamic_map(signed: bool, bits: int) -> tuple[float, ...]:
    """The dynamic-tree map (Dettmers, arXiv 1511.04561) as torchao builds it: per decade ``10**-k`` the midpoints
    of an even split of [0.1, 1], finer for smaller ``k``, mirrored when signed, with 0 and 1. 4-bit unsigned
    states use the linear map ``k/16, k = 1..16`` (no zero), as torchao's AdamW4bit does."""
    if bits == 4 and not signed:
        return tuple(float(v) for v in torch.linspace(0, 1, 17)[1:].tolist())
    exponents = 7 if bits == 8 else 3
    values: list[float] = [0.0, 1.0]
    for i in range(exponents):
        count = 2 ** (i + (bits - 1) - exponents + (0 if signed else 1)) + 1
        edges = torch.linspace(0.1, 1, count)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (i - exponents + 1) * means).tolist()  # in float32, as the map is stored
        if signed:
            values += (-(10 ** (i - exponents + 1)) * means).tolist()
    return tuple(sorted(values))


_MAPS = {(signed, bits): dynamic_map(signed, bits) for signed in (True, False) for bits in (8, 4)}


def _search(y: Tensor, qmap: Tensor) -> Tensor:
    """The nearest code by binary search for the largest code at most ``y`` (the table's reference)."""
    top = qmap.numel() - 1
    code = torch.zeros(y.shape, dtype=torch.int64, device=y.device)
    step = (top + 1) // 2
    while step:
        code = code + step * (y >= qmap[(code + step).clamp_max(top)]).to(torch.int64)
        step //= 2
    up = (code + 1).clamp_max(top)
    return torch.where(y - qmap[code] >= (qmap[up] - qmap[code]) * 0.5, up, code)


_TABLES: dict = {}


def _cell_table(signed: bool, bits: int, device: torch.device) -> Tensor:
    """For each 16-bit prefix of a float32 in [-1, 1], the nearest code at the cell's end nearest to -inf (within
    one of the nearest code anywhere in the cell)."""
    key = (signed, bits, device)
    if key not in _TABLES:
        qmap = torch.tensor(_MAPS[(signed, bits)], dtype=torch.float32)
        prefix = torch.arange(1 << 16, dtype=torch.int64)
        raw = [(((prefix << 16) | low).to(torch.int32)).view(torch.float32) for low in (0, 0xFFFF)]
        inside = torch.isfinite(raw[0]) & torch.isfinite(raw[1]) & (torch.minimum(*raw).abs() <= 1)
        ends = [torch.nan_to_num(e.clamp(-1, 1), nan=0.0) for e in raw]
        lo, hi = (torch.minimum(*ends), torch.maximum(*ends))
        first, last = _search(lo, qmap), _search(hi, qmap)
        if int(((last - first) * inside).max()) > 1:  # cells outside [-1, 1] never occur: y = x / absmax
            raise AssertionError("a cell of the quantization table holds two code changes")
        _TABLES[key] = first.to(device)
    return _TABLES[key]


@dataclass(frozen=True)
class DynamicMap:
    """Block-wise absmax scaling to the nearest code of a dynamic map (ties go up), 8 or 4 bits per element; 4-bit
    codes are packed two to a byte, the first element in the high nibble."""

    bits: int
    block: int  # elements per scale, along the last dimension
    signed: bool
    random: bool = False

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        codes = shape if self.bits == 8 else (*shape[:-1], shape[-1] // 2)
        return {"": (codes, torch.uint8), "::scale": ((*shape[:-1], shape[-1] // self.block), torch.float32)}

    def _qmap(self, device: torch.device) -> Tensor:
        return torch.tensor(_MAPS[(self.signed, self.bits)], dtype=torch.float32, device=device)

    def _nearest(self, y: Tensor, qmap: Tensor) -> Tensor:
        """The nearest code of each ``y`` in [-1, 1], ties up: ``c + 1`` where ``y - q[c] >= (q[c+1] - q[c]) / 2``
        (the comparison torchao makes). ``c`` comes from a table indexed by the top 16 bits of ``y``'s float32
        pattern (sign, exponent, 7 mantissa bits): such a cell is narrower than the map's finest relative spacing,
        so it holds at most one point where the nearest code changes (checked when the table is built), and one
        comparison finishes the search that torchao does in ``bits`` dependent steps."""
        table = _cell_table(self.signed, self.bits, y.device)
        cell = (y.contiguous().view(torch.int32) >> 16) & 0xFFFF
        code = table[cell.to(torch.int64)]
        up = (code + 1).clamp_max(2 ** self.bits - 1)
        low_value = qmap[code]
        return torch.where(y - low_value >= (qmap[up] - low_value) * 0.5, up, code)

    def decode(self, parts: Parts, index: Tensor | None = None) -> Tensor:
        codes, scale = parts[""], parts["::scale"]
        if self.bits == 4:
            codes = torch.stack([codes >> 4, codes & 15], dim=-1).flatten(-2)
        values = self._qmap(codes.device)[codes.long()]
        return (_blocked(values, values.shape[-1] // scale.shape[-1]) * scale.unsqueeze(-1)).flatten(-2)

    def encode(self, x: Tensor, parts: Parts, bits: Tensor | None) -> None:
        scale = parts["::scale"]
        grouped = _blocked(x.float(), x.shape[-1] // scale.shape[-1])
        absmax = grouped.abs().amax(-1).clamp_min(1e-12)
        codes = self._nearest(grouped / absmax.unsqueeze(-1), self._qmap(x.device))
        codes = codes.flatten(-2).to(torch.uint8)
        if self.bits == 4:
            codes = (codes[..., ::2] << 4) | codes[..., 1::2]
        parts[""].copy_(codes)
        scale.copy_(absmax)


@dataclass(frozen=True)
class LinearSR:
    """Block-wise absmax scaling to int8 (``|x| / 127``) or, for a non-negative state, uint8 (``x / 255``), rounded
    stochastically: ``floor(x / scale + u)``."""

    block: int
    signed: bool
    random: bool = True

    @property
    def top(self) -> float:
        return 127.0 if self.signed else 255.0

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"": (shape, torch.int8 if self.signed else torch.uint8),
                "::scale": ((*shape[:-1], shape[-1] // self.block), torch.float32)}

    def decode(self, parts: Parts, index: Tensor | None = None) -> Tensor:
        codes, scale = parts[""], parts["::scale"]
        grouped = _blocked(codes.float(), codes.shape[-1] // scale.shape[-1])
        return (grouped * scale.unsqueeze(-1)).flatten(-2)

    def encode(self, x: Tensor, parts: Parts, bits: Tensor) -> None:
        scale = parts["::scale"]
        length = x.shape[-1] // scale.shape[-1]
        grouped = _blocked(x.float(), length)
        top = grouped.abs().amax(-1) if self.signed else grouped.amax(-1)
        step = top / self.top
        noise = _blocked(uniform(bits), length)
        low = -self.top if self.signed else 0.0
        codes = torch.floor(grouped / step.clamp_min(1e-12).unsqueeze(-1) + noise).clamp(low, self.top)
        parts[""].copy_(codes.flatten(-2))
        scale.copy_(step)


@lru_cache(maxsize=None)
def effective_shape(numel: int) -> tuple[int, int]:
    """adv_optm's 2-D view of a flattened tensor for its rank-1 factors: ``(numel // i, i)`` with ``i`` the largest
    divisor of ``numel`` at most its square root."""
    for i in range(math.isqrt(numel), 0, -1):
        if numel % i == 0:
            return numel // i, i
    return numel, 1


def pack_signs(x: Tensor) -> Tensor:
    """``x > 0`` as bits along the last dimension, eight to a byte, the first element in the lowest bit."""
    bits = (x > 0).to(torch.uint8)
    pad = (-bits.shape[-1]) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)
    return (bits.reshape(*bits.shape[:-1], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, cols: int) -> Tensor:
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) & weights) != 0).flatten(-2)[..., :cols]


@dataclass(frozen=True)
class Factored:
    """adv_optm's ``factored`` state (SMMF, arXiv 2412.08894): ``|x|`` as the outer product of its row and column
    sums over the 2-D view :func:`effective_shape` of the whole tensor (the column factor divided by the total),
    and for a signed state one sign bit per element. The factors are replicated on every rank; encoding sums the
    shards' partial row and column sums over the ranks (:meth:`partials`, then :meth:`finish`). The sign bits are
    packed along the parameter's own rows, so that they shard with it."""

    shape: tuple[int, ...]  # the whole tensor's
    signed: bool
    random: bool = False
    reduces: bool = True

    @property
    def view(self) -> tuple[int, int]:
        return effective_shape(math.prod(self.shape))

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, cols = self.view
        out = {"::row": ((rows,), torch.float32), "::col": ((cols,), torch.float32)}
        if self.signed:
            out["::sign"] = ((*shape[:-1], -(-shape[-1] // 8)), torch.uint8)
        return out

    @staticmethod
    def replicated(suffix: str) -> bool:
        return suffix in ("::row", "::col")

    def _coordinates(self, index: Tensor) -> tuple[Tensor, Tensor]:
        cols = self.view[1]
        return index // cols, index % cols

    def decode(self, parts: Parts, index: Tensor | None = None) -> Tensor:
        rows, cols = self._coordinates(index)
        x = parts["::row"][rows] * parts["::col"][cols]
        if self.signed:
            x = torch.where(unpack_signs(parts["::sign"], index.shape[-1]), x, -x)
        return x

    def partials(self, x: Tensor, offset: tuple[int, ...], counts: bool) -> Tensor:
        """This rank's row and column sums of ``|x|`` (zeros where its copy does not count: a replica), ``x`` the
        box of the whole tensor at ``offset``. A box of whole rows (FSDP2's shards) is a contiguous run of the
        flattened tensor, summed as a dense block of the 2-D view; another box sums by each element's position."""
        n_rows, n_cols = self.view
        out = torch.zeros(n_rows + n_cols, dtype=torch.float32, device=x.device)
        if not counts:
            return out
        magnitude = x.float().abs().flatten()
        if tuple(x.shape[1:]) == self.shape[1:] and not any(offset[1:]):
            start = offset[0] * math.prod(self.shape[1:]) if self.shape else 0
            lead = start % n_cols
            block = torch.nn.functional.pad(magnitude, (lead, -(lead + magnitude.numel()) % n_cols))
            block = block.reshape(-1, n_cols)
            first = start // n_cols
            out[first:first + block.shape[0]] = block.sum(1)
            out[n_rows:] = block.sum(0)
            return out
        rows, cols = self._coordinates(global_index(tuple(x.shape), offset, self.shape, x.device))
        out[:n_rows].index_add_(0, rows.flatten(), magnitude)
        out[n_rows:].index_add_(0, cols.flatten(), magnitude)
        return out

    def finish_signs(self, x: Tensor, parts: Parts) -> None:
        """Store the sign bits of this rank's ``x`` (local: they need no sums)."""
        if self.signed:
            parts["::sign"].copy_(pack_signs(x))

    def encode_whole(self, x: Tensor, parts: Parts) -> None:
        """Store a whole tensor (an owner's, held by one rank): its sign bits and the factors of its own sums."""
        self.finish_signs(x, parts)
        self.finish_factors(parts, self.partials(x, (0,) * x.dim(), True))

    def finish_factors(self, parts: Parts, totals: Tensor) -> None:
        """Store the factors from :meth:`partials` summed over the ranks."""
        n_rows = self.view[0]
        row, col = totals[:n_rows], totals[n_rows:]
        if self.view[0] < self.view[1]:
            row = row / row.sum().clamp_min(1e-12)
        else:
            col = col / col.sum().clamp_min(1e-12)
        parts["::row"].copy_(row)
        parts["::col"].copy_(col)