"""Owner state in the checkpoint layout: every whole tensor an owner holds, split by rows over all ranks.

An owner keeps, say, SOAP's bases whole. A checkpoint cannot hold them that way: which rank owns a matrix depends on
the world size and the plan, and DCP reshards only tensors whose layout it understands. So, at save time, each owner
tensor of logical shape ``(rows, ...)`` is cut into ``torch.chunk``-style row blocks, block ``r`` going to rank ``r``
(a ``Shard(0)`` DTensor); at load time the blocks go to whichever rank owns the matrix under the new plan. Both
directions are one ``all_to_all`` whose sizes every rank computes from the same metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import exchange
from .layout import _chunk


@dataclass(frozen=True, slots=True)
class OwnerItem:
    """One whole tensor held by ``owner``: entry ``key`` of matrix ``matrix``."""

    matrix: int
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owner: int

    def rows(self, world: int, rank: int) -> tuple[int, int]:
        """(first row, row count) of the block that ``rank`` holds in the checkpoint layout."""
        return _chunk(self.shape[0], world, rank)

    def block_bytes(self, world: int, rank: int) -> int:
        return self.rows(world, rank)[1] * math.prod(self.shape[1:]) * self.dtype.itemsize


def _unpack(buffer: Tensor, offset: int, item: OwnerItem, rows: int) -> tuple[Tensor, int]:
    size = rows * math.prod(item.shape[1:]) * item.dtype.itemsize
    # clone: a fresh, aligned storage per tensor (the buffer mixes dtypes), owned by the state it becomes.
    block = buffer[offset:offset + size].clone().view(item.dtype).reshape(rows, *item.shape[1:])
    return block, offset + size


def scatter(items: list[OwnerItem], wholes: dict[tuple[int, str], Tensor], rank: int, world: int, group=None,
            device: torch.device | str = "cpu") -> dict[tuple[int, str], Tensor]:
    """From the whole tensors this rank owns (``wholes``), this rank's row block of every item."""
    outgoing: list[list[Tensor]] = [[] for _ in range(world)]
    for item in items:
        if item.owner == rank:
            whole = wholes[(item.matrix, item.key)]
            for dst in range(world):
                start, count = item.rows(world, dst)
                outgoing[dst].append(whole[start:start + count])
    incoming = [sum(i.block_bytes(world, rank) for i in items if i.owner == src) for src in range(world)]
    buffers = exchange.exchange_bytes(outgoing, incoming, group, device)
    blocks, offsets = {}, [0] * world
    for item in items:
        blocks[(item.matrix, item.key)], offsets[item.owner] = _unpack(
            buffers[item.owner], offsets[item.owner], item, item.rows(world, rank)[1])
    return blocks


def gather(items: list[OwnerItem], blocks: dict[tuple[int, str], Tensor], rank: int, world: int, group=None,
           device: torch.device | str = "cpu") -> dict[tuple[int, str], Tensor]:
    """From this rank's row block of every item, the whole tensors this rank owns."""
    outgoing: list[list[Tensor]] = [[] for _ in range(world)]
    for item in items:
        outgoing[item.owner].append(blocks[(item.matrix, item.key)])
    mine = [item for item in items if item.owner == rank]
    incoming = [sum(i.block_bytes(world, src) for i in mine) for src in range(world)]
    buffers = exchange.exchange_bytes(outgoing, incoming, group, device)
    parts: dict[tuple[int, str], list[Tensor]] = {(i.matrix, i.key): [] for i in mine}
    for src in range(world):
        offset = 0
        for item in mine:
            block, offset = _unpack(buffers[src], offset, item, item.rows(world, src)[1])
            parts[(item.matrix, item.key)].append(block)
    return {key: torch.cat(blocks_in_order).to(device) for key, blocks_in_order in parts.items()}
