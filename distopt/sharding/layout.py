"""What each rank holds of a parameter: local views of DTensors, and state built in the parameter's layout.

Elementwise algorithms only ever see ``to_local()`` views, so they work on any placement (FSDP2's ``Shard(0)``
with uneven or empty shards, ``Shard(k)``, ``Replicate()``, 2-D HSDP meshes) without communicating.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard


def local(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor``: a view that shares storage, so in-place updates land in the DTensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_grad(param: Tensor, grad: Tensor) -> Tensor:
    """This rank's part of ``grad``, laid out as ``param`` is.

    FSDP2 and DTensor autograd give the gradient the parameter's placements, so this is a plain view. A gradient
    that a user laid out differently (for example ``Partial``) is redistributed once, here: it is the only place an
    elementwise step could communicate, and only for such inputs.
    """
    if isinstance(param, DTensor):
        if not isinstance(grad, DTensor):
            raise TypeError("the parameter is a DTensor but its gradient is a plain tensor")
        if grad.device_mesh != param.device_mesh:
            raise ValueError("the gradient's device mesh differs from the parameter's")
        if grad.placements != param.placements:
            grad = grad.redistribute(param.device_mesh, param.placements)
        return grad.to_local()
    if isinstance(grad, DTensor):
        raise TypeError("the parameter is a plain tensor but its gradient is a DTensor")
    return grad


def like_param(param: Tensor, local_state: Tensor) -> Tensor:
    """Wrap a local state tensor, shaped like ``param``'s local part, as a DTensor laid out like ``param``.

    No communication: the global shape and stride are taken from the parameter (as torchao does for its state).
    """
    if not isinstance(param, DTensor):
        return local_state
    return DTensor.from_local(local_state, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def like_param_shaped(param: Tensor, local_state: Tensor, shape: tuple[int, ...]) -> Tensor:
    """As :func:`like_param`, for a state of whole ``shape`` that differs from the parameter's in its last dimension
    only (the block scales of a quantized state): the same placements cut it at the same rows (and, where the last
    dimension is sharded, at block-aligned columns: the precision settings check that)."""
    if not isinstance(param, DTensor):
        return local_state
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_state, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def replicated_like(param: Tensor, whole_state: Tensor) -> Tensor:
    """A state held whole on every rank (a factored state's row and column factors), as a DTensor replicated over
    ``param``'s mesh (a plain tensor for a plain parameter)."""
    if not isinstance(param, DTensor):
        return whole_state
    return DTensor.from_local(whole_state, param.device_mesh, [Replicate()] * param.device_mesh.ndim,
                              run_check=False)


def global_offset(param: Tensor) -> tuple[int, ...]:
    """Where this rank's part of ``param`` starts in the whole tensor, per dimension (zeros for a plain tensor)."""
    if not isinstance(param, DTensor):
        return (0,) * param.dim()
    return _offset(tuple(param.shape), param.device_mesh, tuple(param.placements))


@lru_cache(maxsize=4096)
def _offset(shape: tuple[int, ...], mesh, placements: tuple[Placement, ...]) -> tuple[int, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return tuple(compute_local_shape_and_global_offset(shape, mesh, placements)[1])


def counts_here(param: Tensor, rank: int, world_size: int, name_of: Callable[[Tensor], str]) -> bool:
    """Whether this rank's part of ``param`` counts in a sum over the process group (``rank`` of ``world_size``):
    every shard counts once, replicas (``Replicate`` mesh dimensions, HSDP's replica groups, plain tensors held
    whole by every rank) only at coordinate 0. A reduction sums over the process group, so the mesh must span it."""
    if not isinstance(param, DTensor):
        return rank == 0
    mesh = param.device_mesh
    if mesh.size() != world_size:
        raise NotImplementedError(f"parameter {name_of(param)}: its device mesh has {mesh.size()} ranks but the optimizer's "
                                  f"process group has {world_size}; flags that reduce over a whole tensor need a "
                                  "mesh over exactly the optimizer's ranks")
    coordinate = mesh.get_coordinate()
    return all(c == 0 for c, p in zip(coordinate, param.placements) if isinstance(p, Replicate))


# ----------------------------------------------------------------------------------------------------------------
# Metadata: which box of the global tensor every rank holds. Pure functions of shape, mesh and placements.

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) in the global tensor


@dataclass(frozen=True, slots=True)
class ParamMeta:
    """What the planner knows of one parameter: the same on every rank once metadata has been exchanged."""

    fqn: str
    shape: tuple[int, ...]
    dtype: str
    mesh_ranks: tuple[int, ...]          # global ranks of the device mesh, flattened row-major
    mesh_shape: tuple[int, ...]
    placements: tuple[str, ...]
    boxes: tuple[Box, ...]               # boxes[rank] for every rank of the process group

    def holders(self) -> list[int]:
        """Ranks that hold a non-empty box."""
        return [rank for rank, (_, sizes) in enumerate(self.boxes) if all(sizes)]


def _chunk(length: int, parts: int, index: int) -> tuple[int, int]:
    """(offset, size) of chunk ``index`` when ``length`` is split as ``torch.chunk`` (and DTensor, FSDP2) do."""
    step = -(-length // parts) if length else 0
    start = min(step * index, length)
    return start, min(step, length - start)


def box_at(shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple[Placement, ...],
           coordinate: tuple[int, ...]) -> Box:
    """The box of the global tensor held at mesh ``coordinate``: shards split left to right, like DTensor."""
    offsets, sizes = [0] * len(shape), list(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise NotImplementedError(f"placement {placement} is not supported by the owner route (Shard and "
                                      "Replicate are)")
        dim = placement.dim % len(shape)
        start, size = _chunk(sizes[dim], mesh_shape[mesh_dim], coordinate[mesh_dim])
        offsets[dim] += start
        sizes[dim] = size
    return tuple(offsets), tuple(sizes)


def describe(param: Tensor, fqn: str, group_ranks: tuple[int, ...], rank: int, cache: dict | None = None
             ) -> ParamMeta:
    """Metadata of ``param`` over the process group whose global ranks are ``group_ranks`` (``rank`` is this
    rank's index in it). A plain tensor in a multi-rank job counts as replicated on every rank (DDP-style).
    Parameters on one mesh, laid out alike, share their rank and box tuples through ``cache`` (one dict for all the
    parameters of one set-up): at thousands of ranks, computing them per parameter would dominate the set-up."""
    cache = {} if cache is None else cache
    shape = tuple(param.shape)
    world_size = len(group_ranks)
    if not isinstance(param, DTensor):
        if ("plain", shape) not in cache:
            cache["plain", shape] = (tuple(range(world_size)), (((0,) * len(shape), shape),) * world_size)
        ranks, boxes = cache["plain", shape]
        return ParamMeta(fqn, shape, str(param.dtype), ranks, (world_size,), ("Replicate()",), boxes)
    mesh = param.device_mesh
    if ("mesh", id(mesh)) not in cache:
        cache["mesh", id(mesh)] = _mesh_ranks(mesh, group_ranks, fqn)
    ranks = cache["mesh", id(mesh)]
    mesh_shape = tuple(mesh.mesh.shape)
    placements = tuple(param.placements)
    key = ("boxes", shape, id(mesh), placements)
    if key not in cache:
        cache[key] = _boxes(shape, ranks, mesh_shape, placements, world_size)
    boxes = cache[key]
    local_sizes = tuple(param.to_local().shape)
    if boxes[rank][1] != local_sizes:
        raise RuntimeError(f"parameter {fqn}: the local shard has shape {local_sizes} but its placements "
                           f"{placements} imply {boxes[rank][1]}")
    return ParamMeta(fqn, shape, str(param.dtype), ranks, mesh_shape, tuple(str(p) for p in placements), boxes)


def _mesh_ranks(mesh, group_ranks: tuple[int, ...], fqn: str) -> tuple[int, ...]:
    """The process-group index of each position of ``mesh`` (row-major)."""
    mesh_ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
    if sorted(mesh_ranks) != sorted(group_ranks):
        raise NotImplementedError(f"parameter {fqn}: its device mesh spans ranks {sorted(mesh_ranks)}, not the "
                                  f"optimizer's process group {sorted(group_ranks)}; the owner route needs a mesh "
                                  "over exactly the ranks of its process group")
    index_of = {global_rank: i for i, global_rank in enumerate(group_ranks)}
    return tuple(index_of[r] for r in mesh_ranks)


def _boxes(shape, ranks: tuple[int, ...], mesh_shape: tuple[int, ...], placements, world_size: int
           ) -> tuple[Box, ...]:
    """``boxes[rank]`` for every rank of the group; ``ranks`` lists the group index at each mesh position."""
    boxes: list[Box] = [((), ())] * world_size
    for flat, group_rank in enumerate(ranks):
        coordinate = []
        for size in reversed(mesh_shape):  # row-major, as the mesh is flattened
            flat, c = divmod(flat, size)
            coordinate.append(c)
        boxes[group_rank] = box_at(shape, mesh_shape, placements, tuple(reversed(coordinate)))
    return tuple(boxes)


def row_block(meta: ParamMeta, start: int, stop: int, cache: dict) -> ParamMeta:
    """The metadata of rows ``[start, stop)`` of a parameter as a matrix of its own: every rank's box cut to those
    rows and counted from ``start`` (an empty box where the rank holds none of them). Row blocks of parameters laid
    out alike share their box tuples through ``cache``, as :func:`describe`'s do."""
    key = (id(meta.boxes), start, stop)
    if key not in cache:
        boxes = []
        for offsets, sizes in meta.boxes:
            lo, hi = max(offsets[0], start), min(offsets[0] + sizes[0], stop) if sizes else start
            if sizes and lo < hi:
                boxes.append(((lo - start, *offsets[1:]), (hi - lo, *sizes[1:])))
            else:
                boxes.append(((0,) * len(meta.shape), (0, *meta.shape[1:])))
        cache[key] = (tuple(boxes), meta.boxes)  # the parent's tuple is kept alive, so its id stays unique
    boxes = cache[key][0]
    return ParamMeta(f"{meta.fqn}[{start}:{stop}]", (stop - start, *meta.shape[1:]), meta.dtype, meta.mesh_ranks,
                     meta.mesh_shape, meta.placements, boxes)
