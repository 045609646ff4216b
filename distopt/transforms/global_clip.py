"""A gradient-norm clip over every parameter of every rank, as ``torch.nn.utils.clip_grad_norm_`` does on DTensor
gradients: the norm of all gradients together, ``c = max_norm / (norm + 1e-6)`` clamped to 1, and every gradient
scaled by ``c`` in place. The squares are summed on each rank's shards (replicas counted once) and added over the
ranks in one ``all_reduce``; no value leaves the device."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def clip_grad_norm(grads: Sequence[Tensor], counts: Sequence[bool], max_norm: float,
                   all_reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
    """Scale ``grads`` (local shards) in place; return the total norm (a 0-d tensor)."""
    if not grads:
        return torch.zeros(())
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device
    squares = [g.to(dtype).square().sum() for g, counted in zip(grads, counts) if counted]
    total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=dtype, device=device)
    if all_reduce is not None:
        total = all_reduce(total.reshape(1)).reshape(())
    norm = total.sqrt()
    coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coefficient.to(g.dtype))
    return norm
