"""Orthogonalizing a weight part by part: fused QKV (or gate/up) weights by ``split_sizes``, attention weights head
by head by ``num_heads``.

A fused weight stacks several matrices along its rows (dimension 0): ``split_sizes`` gives their row counts, and
each part is orthogonalized as if it were its own parameter. ``num_heads`` splits each part (or the whole weight)
into that many equal row blocks, one per head (an int for every part, or one int per part, for grouped-query
attention's fewer key and value heads). The owner batches every same-shape block of a bucket into one call, so
per-head orthogonalization costs fewer flops than the whole matrix, not more calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: The hyperparameters, off by default.
SPLIT_HYPERPARAMETERS = {"split_sizes": None, "num_heads": None}


@dataclass(frozen=True)
class Part:
    """Rows ``[start, start + heads * rows)`` of the weight: ``heads`` blocks of ``rows`` rows each."""

    start: int
    rows: int
    heads: int

    @property
    def stop(self) -> int:
        return self.start + self.rows * self.heads


def _positive_ints(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


def check(algo: str, hp: Mapping[str, Any]) -> None:
    sizes, heads = hp.get("split_sizes"), hp.get("num_heads")
    if sizes is not None and not _positive_ints(sizes):
        raise ValueError(f"{algo}: invalid split_sizes={sizes!r} (must be None or a sequence of positive ints)")
    if heads is None:
        return
    if isinstance(heads, int) and not isinstance(heads, bool):
        if heads <= 0:
            raise ValueError(f"{algo}: invalid num_heads={heads!r} (must be a positive int)")
        return
    if not _positive_ints(heads):
        raise ValueError(f"{algo}: invalid num_heads={heads!r} (must be None, a positive int, or one positive int "
                         "per split)")
    if sizes is None or len(heads) != len(sizes):
        raise ValueError(f"{algo}: num_heads={heads!r} is a sequence, so it needs one entry per split_sizes entry "
                         f"(split_sizes={sizes!r})")


def parts(shape: tuple[int, ...], hp: Mapping[str, Any]) -> tuple[Part, ...] | None:
    """The parts of a weight of ``shape`` (None when the group does not split). Assumes :func:`check_shape`."""
    sizes, heads = hp.get("split_sizes"), hp.get("num_heads")
    if sizes is None and heads is None:
        return None
    sizes = tuple(sizes) if sizes is not None else (shape[0],)
    heads = tuple(heads) if isinstance(heads, (tuple, list)) else (heads or 1,) * len(sizes)
    out, start = [], 0
    for size, count in zip(sizes, heads):
        out.append(Part(start, size // count, count))
        start += size
    return tuple(out)


def check_shape(algo: str, shape: tuple[int, ...], name: str, hp: Mapping[str, Any]) -> None:
    """Raise naming the parameter if its rows do not split as the group says."""
    sizes, heads = hp.get("split_sizes"), hp.get("num_heads")
    if sizes is not None and sum(sizes) != shape[0]:
        raise ValueError(f"{algo}: split_sizes={tuple(sizes)} add up to {sum(sizes)} rows, but {name} has "
                         f"{shape[0]} rows (shape {shape})")
    if heads is None:
        return
    sizes = tuple(sizes) if sizes is not None else (shape[0],)
    counts = tuple(heads) if isinstance(heads, (tuple, list)) else (heads,) * len(sizes)
    for size, count in zip(sizes, counts):
        if size % count:
            raise ValueError(f"{algo}: {name} (shape {shape}) has a part of {size} rows, which {count} heads do not "
                             "divide")


def part_shape(part: Part, shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D matrix one head of ``part`` is: ``(rows, rest)``."""
    return part.rows, math.prod(shape[1:])


def orthogonalize_by_part(stacked: Tensor, layout: tuple[Part, ...], orthogonalize: Callable[[Tensor], Tensor]
                          ) -> Tensor:
    """Apply ``orthogonalize`` (a function of a ``(batch, m, n)`` stack) to every head of every part of each matrix
    of ``stacked`` ``(N, rows, cols)``, calling it once per distinct head shape."""
    n, _, cols = stacked.shape
    by_rows: dict[int, list[Part]] = {}
    for part in layout:
        by_rows.setdefault(part.rows, []).append(part)
    out = None
    for rows, members in by_rows.items():
        blocks = torch.cat([stacked[:, p.start:p.stop].reshape(n * p.heads, rows, cols) for p in members])
        result = orthogonalize(blocks)
        if out is None:
            out = stacked.new_empty(stacked.shape, dtype=result.dtype)
        offset = 0
        for p in members:
            count = n * p.heads
            out[:, p.start:p.stop] = result[offset:offset + count].reshape(n, p.stop - p.start, cols)
            offset += count
    return out


def row_scales(layout: tuple[Part, ...], shape: tuple[int, ...], row_offset: int, local_rows: int,
               factor: Callable[[tuple[int, int]], float]) -> list[tuple[slice, float]]:
    """For this rank's rows ``[row_offset, row_offset + local_rows)``: ``(local slice, factor(head shape))`` of
    every part they meet."""
    out = []
    for part in layout:
        lo, hi = max(part.start, row_offset), min(part.stop, row_offset + local_rows)
        if lo < hi:
            out.append((slice(lo - row_offset, hi - row_offset), factor(part_shape(part, shape))))
    return out
