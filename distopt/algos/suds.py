"""SUDSAdamW, as HeavyBall 3.2.1's: Adam in a basis that tracks the top eigendirection of the gradient covariance.
The gradient (flattened) is reflected by the Householder matrix that maps ``e1`` to the tracked direction ``f``, Adam
runs in that basis, the result is reflected back, and ``f`` takes one Oja step toward the gradient's top direction.
The first step only sets ``f`` (no update, no decay); Adam's bias corrections then count from the second.

Why owners: the reflection, the Oja step and their norms are dot products over the whole flattened tensor, one after
another. The owner receives the gradient and keeps ``f`` and Adam's moments (in the reflected basis, so they live
with ``f``); it returns the update, and each shard takes the chain's step ``p (1 - lr wd) - lr u``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import OWNER_PREFIX, MatrixAlgorithm, check_betas, check_nonnegative, new_step_counter
from .heavyball_ema import debiased_ema_

FISHER, EXP_AVG, EXP_AVG_SQ = (f"{OWNER_PREFIX}{key}" for key in ("fisher_approx", "exp_avg", "exp_avg_sq"))


def _reflect(x: Tensor, w: Tensor) -> Tensor:
    return x - 2.0 * (x @ w) * w


class SUDSAdamW(MatrixAlgorithm):
    """SUDSAdamW. Shard state: ``step``. Owner state: ``owner.fisher_approx`` (the direction, flattened),
    ``owner.exp_avg`` and ``owner.exp_avg_sq`` (Adam's, in the reflected basis). Defaults of HeavyBall's; its Adam
    floors ``sqrt(v̂)`` at 1e-8 whatever ``eps`` says, as HeavyBall's does."""

    name = "sudsadamw"
    elementwise_owner_state = frozenset({"fisher_approx", "exp_avg", "exp_avg_sq"})  # as HeavyBall's ecc keeps them
    owner_mutates_input = False  # it reads what it receives
    hyperparameters = {"lr": 0.0025, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0, "precond_lr": 1e-2}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        for key in ("eps", "weight_decay", "precond_lr"):
            check_nonnegative(self.name, hp, key)

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        return float(20 * max(1, math.prod(shape)))

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {FISHER: ((max(1, math.prod(shape)),), param_dtype), EXP_AVG: (shape, param_dtype),
                EXP_AVG_SQ: (shape, param_dtype)}

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter()}

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        state["step"] += 1
        return grad.to(param.dtype)

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        return [self._owner_step(whole.reshape(-1), state, hp).reshape(shape) for whole, state in zip(wholes, states)]

    def _owner_step(self, g: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        step = int(state["step"].item())
        f = state[FISHER]
        if step == 1:
            f.copy_(g / g.norm().clamp(min=1e-8))
            return torch.zeros_like(g)
        v = f / f.norm().clamp(min=1e-12)
        e1 = torch.zeros_like(v)
        e1[0] = 1.0
        w = e1 - v
        w = w / w.norm().clamp(min=1e-12)
        beta1, beta2 = hp["betas"]
        y = _reflect(g, w)
        m = debiased_ema_(state[EXP_AVG].view(-1), y, beta1, step - 1)
        s = debiased_ema_(state[EXP_AVG_SQ].view(-1), y * y, beta2, step - 1)
        update = _reflect(m / s.clamp_min(0).sqrt().clamp(min=1e-8), w)
        gv = g @ f
        fresh = f + hp["precond_lr"] * (gv * g - (gv * gv) * f)
        f.copy_(fresh / fresh.norm().clamp(min=1e-12))
        return update

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        if int(state["step"].item()) == 1:
            return  # the first step only sets the direction
        param.mul_(1 - hp["lr"] * hp["weight_decay"])
        param.add_(update, alpha=-hp["lr"])
