"""HyperBallAdamW, as HeavyBall 3.2.1's: an RMSprop-normalized gradient (no first moment, ``betas[0]`` unused), and
for tensors of two or more dimensions a step on the sphere of the parameter's initial norm: the direction (weight
decay added to it) normalized over the whole tensor and scaled by the radius ``R``, then the parameter projected
back onto the sphere of radius ``R``. Vectors take a plain decoupled step.

Why owners: the direction's norm and the stepped parameter's norm are over the whole tensor, one after the other,
and the radius is the whole parameter's norm at its first step. The owner receives the normalized gradient and the
parameter (two channels), keeps ``R`` (``owner.init_norm``) and sends back the new parameter; the second moment
stays on the shards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import OWNER_PREFIX, MatrixAlgorithm, check_betas, check_nonnegative, new_step_counter, zeros_like
from .heavyball_ema import debiased_ema_

INIT_NORM = f"{OWNER_PREFIX}init_norm"


class HyperBallAdamW(MatrixAlgorithm):
    """HyperBallAdamW. Shard state: ``step``, ``exp_avg_sq``. Owner state: ``owner.init_norm`` (one number per
    tensor of two or more dimensions). Defaults of HeavyBall's."""

    name = "hyperballadamw"
    hyperparameters = {"lr": 0.0025, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")

    def on_owner(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> bool:
        return len(shape) >= 2

    def channels(self, hp: Mapping[str, Any]) -> int:
        return 2

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        return float(10 * math.prod(shape))

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {INIT_NORM: ((1,), param_dtype)}

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg_sq": zeros_like(param)}

    local_init = init

    def _normalized(self, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        state["step"] += 1
        v = debiased_ema_(state["exp_avg_sq"], grad * grad, hp["betas"][1], int(state["step"].item()))
        return grad / v.clamp_min(0).sqrt().clamp(min=hp["eps"])

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        u = self._normalized(grad, state, hp)
        if hp["weight_decay"] != 0:
            u = u + hp["weight_decay"] * param
        return torch.stack([u.to(param.dtype), param.detach()])

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        out = []
        for whole, state in zip(wholes, states):
            u, param = whole[0], whole[1].clone()
            radius = state[INIT_NORM]
            if int(state["step"].item()) == 1:
                radius.copy_(param.norm().reshape(1))
            u = u / u.norm().clamp(min=1e-12)
            param.add_(u * radius, alpha=-hp["lr"])
            param.mul_(radius / param.norm().clamp(min=1e-12))
            out.append(param)
        return out

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        param.copy_(update)

    def local_update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        u = self._normalized(grad, state, hp)
        param.mul_(1 - hp["weight_decay"] * hp["lr"])
        param.add_(u, alpha=-hp["lr"])
