"""Boxes computed by distopt equal DTensor's own local shapes and offsets, for every mesh coordinate."""

from __future__ import annotations

import itertools

import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from distopt.sharding.layout import box_at

CASES = [
    ((7, 5), (4,), (Shard(0),)),
    ((1, 64), (4,), (Shard(0),)),
    ((3, 7), (4,), (Shard(1),)),
    ((37, 113), (3,), (Shard(1),)),
    ((37, 113), (2, 2), (Shard(0), Shard(1))),
    ((37, 113), (2, 2), (Replicate(), Shard(0))),
    ((5, 3), (2, 3), (Shard(0), Shard(0))),
    ((8, 3, 2, 2), (3,), (Shard(0),)),
    ((2, 9), (2, 4), (Shard(1), Replicate())),
    ((0, 4), (2,), (Shard(0),)),
]


@pytest.mark.parametrize("shape,mesh_shape,placements", CASES)
def test_boxes_match_dtensor(shape, mesh_shape, placements):
    for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
        sizes, offsets = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), placements)
        assert box_at(shape, mesh_shape, placements, coordinate) == (tuple(offsets), tuple(sizes)), coordinate


def test_unsupported_placement_is_named():
    from torch.distributed.tensor import Partial

    with pytest.raises(NotImplementedError, match=r"placement P\(sum\) is not supported"):
        box_at((4, 4), (2,), (Partial(),), (0,))


def test_strided_shard_of_fsdp2_with_tensor_parallelism_is_named_as_unsupported():
    """The README's limit: FSDP2 over a tensor-parallel mesh lays parameters out as _StridedShard."""
    from torch.distributed.tensor.placement_types import _StridedShard

    with pytest.raises(NotImplementedError, match=r"placement _S\(0, 2\) is not supported by the owner route"):
        box_at((4, 4), (2, 2), (_StridedShard(0, split_factor=2), Shard(0)), (0, 0))
