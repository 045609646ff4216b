"""LaProp: momentum applied after the adaptive normalisation. Ziyin, Wang & Ueda, "LaProp: Separating Momentum and
Adaptivity in Adam", https://arxiv.org/abs/2002.04839 (Algorithm 1, with bias correction; decoupled weight decay).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

import math

import torch

from ..transforms import flags
from .base import second_moment_decay, Algorithm, check_betas, check_bool, check_nonnegative, new_step_counter, zeros_like


class LaProp(Algorithm):
    """LaProp. State per parameter: ``step``, ``exp_avg`` (momentum of normalised gradients), ``exp_avg_sq``.

    ``v = b2 v + (1 - b2) g^2``;  ``m = b1 m + (1 - b1) g / (sqrt(v / (1 - b2^t)) + eps)``;
    ``p -= lr m / (1 - b1^t)``. Defaults are the paper's (lr 4e-4, betas (0.8, 0.99), eps 1e-15).
    """

    name = "laprop"
    hyperparameters = {"lr": 4e-4, "betas": (0.8, 0.99), "eps": 1e-15, "weight_decay": 0.0, "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        lr, eps, weight_decay = hp["lr"], hp["eps"], hp["weight_decay"]
        beta1, beta2 = hp["betas"]
        if hp["maximize"]:
            grad = -grad
        state["step"] += 1
        step = state["step"].item()
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
        exp_avg.lerp_(grad / denom, 1 - beta1)
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(exp_avg, alpha=-lr / (1 - beta1**step))

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {}

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        """``u = m / (1 - b1^t)``. With ``atan2``, the normalised gradient is ``(4/π) atan2(g, sqrt(v̂))`` (no eps),
        as adv_optm normalises ADOPT's."""
        beta1, beta2 = hp["betas"]
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        decay, bias_correction2 = second_moment_decay(t, beta2)
        exp_avg_sq.mul_(decay).addcmul_(grad, grad, value=1 - decay)
        scale = (exp_avg_sq / bias_correction2).sqrt_()
        if flags.value(hp, "atan2"):
            normed = torch.atan2(grad, scale).mul_(4 / math.pi)
        else:
            normed = grad / scale.add_(hp["eps"])
        exp_avg.lerp_(normed, 1 - beta1)
        return exp_avg / (1 - beta1**t.step)
