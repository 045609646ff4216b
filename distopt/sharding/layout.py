"""What each rank holds of a parameter: local views of DTensors, and state built in the parameter's layout.

Elementwise algorithms only ever see ``to_local()`` views, so they work on any placement (FSDP2's ``Shard(0)``
with uneven or empty shards, ``Shard(k)``, ``Replicate()``, 2-D HSDP meshes) without communicating.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor


def is_dtensor(tensor: Tensor) -> bool:
    return isinstance(tensor, DTensor)


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
