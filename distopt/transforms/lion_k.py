"""Lion-k's direction: the sign of Lion's interpolation generalized by ``kappa_p`` (adv_optm 2.5.16's ``lion_k``,
Chen et al., "Lion Secretly Solves Constrained Optimization", https://arxiv.org/abs/2310.05898). For ``κ = 1`` it is
``sign(c)``; otherwise ``n = sign(c) |c|^(κ-1)`` rescaled to the norm ``sqrt(N)`` of a sign tensor, with the norm
over the whole tensor (a reduction under sharding). ``auto_kappa_p`` takes ``κ = 2`` for tensors of four or more
dimensions (convolutions) and 1 otherwise, as adv_optm's code does."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Transform, TensorStep


def kappa_of(hp, shape: tuple[int, ...]) -> float:
    if hp["auto_kappa_p"]:
        return 2.0 if len(shape) >= 4 else 1.0
    return float(hp["kappa_p"])


def _powered(u: Tensor, kappa: float) -> Tensor:
    return u if kappa == 2.0 else u.sign() * u.abs().pow(kappa - 1)


class LionK(Transform):
    name = "lion_k"
    reductions = 1

    def partials(self, t: TensorStep) -> Tensor:
        kappa = kappa_of(t.hp, t.shape)
        if kappa == 1.0:
            return torch.zeros(1, dtype=t.u.dtype, device=t.u.device)
        t.extra["lion_k"] = powered = _powered(t.u, kappa)  # kept for update (replicas skip partials)
        return torch.linalg.vector_norm(powered).square().reshape(1)

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        kappa = kappa_of(t.hp, t.shape)
        if kappa == 1.0:
            return t.u.sign_()
        powered = t.extra.pop("lion_k", None)
        if powered is None:
            powered = _powered(t.u, kappa)
        # A 0-d tensor, not a Python number: reading the total on the host would wait for the device every tensor.
        scale = (math.sqrt(t.numel) / totals[0].sqrt().clamp(min=1e-12)).to(powered.dtype)
        return powered.mul_(scale) if powered is not t.u else powered * scale


LION_K = LionK()
