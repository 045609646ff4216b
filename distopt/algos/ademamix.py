"""AdEMAMix: Adam with a mixture of a fast and a slow gradient EMA. Pagliardini, Ablin & Grangier, "The AdEMAMix
Optimizer: Better, Faster, Older", https://arxiv.org/abs/2409.03137 (Algorithm 1; names and defaults of the
authors' reference code, including its warm-up schedulers for alpha and beta3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .base import (second_moment_decay, Algorithm, check_betas, check_nonnegative, check_optional_positive_int, check_bool,
                   new_step_counter, zeros_like)


def alpha_at(step: int, alpha: float, warmup: int | None) -> float:
    """Linear warm-up of alpha from 0 over ``warmup`` steps."""
    if warmup is None or step >= warmup:
        return alpha
    return step / warmup * alpha


def beta3_at(step: int, beta1: float, beta3: float, warmup: int | None) -> float:
    """Warm-up of beta3 from beta1, linear in the EMA's half-life (the paper's closed form, Sec. 3)."""
    if warmup is None or step >= warmup or beta1 <= 0.0 or beta3 <= 0.0:
        return beta3
    a = step / warmup
    log1, log3 = math.log(beta1), math.log(beta3)
    return min(math.exp(log1 * log3 / ((1 - a) * log3 + a * log1)), beta3)


class AdEMAMix(Algorithm):
    """AdEMAMix. State per parameter: ``step``, ``exp_avg`` (fast EMA), ``exp_avg_slow``, ``exp_avg_sq``.

    ``p -= lr ((m1 / (1 - b1^t) + alpha m2) / (sqrt(v / (1 - b2^t)) + eps) + wd p)``.
    """

    name = "ademamix"
    hyperparameters = {"lr": 1e-3, "betas": (0.9, 0.999, 0.9999), "alpha": 2.0, "beta3_warmup": None,
                       "alpha_warmup": None, "eps": 1e-8, "weight_decay": 0.0, "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp, count=3)
        check_nonnegative(self.name, hp, "alpha")
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")
        check_optional_positive_int(self.name, hp, "beta3_warmup")
        check_optional_positive_int(self.name, hp, "alpha_warmup")
        check_bool(self.name, hp, "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg": zeros_like(param), "exp_avg_slow": zeros_like(param),
                "exp_avg_sq": zeros_like(param)}

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        lr, eps, weight_decay = hp["lr"], hp["eps"], hp["weight_decay"]
        beta1, beta2, beta3 = hp["betas"]
        if hp["maximize"]:
            grad = -grad
        state["step"] += 1
        step = state["step"].item()
        alpha = alpha_at(step, hp["alpha"], hp["alpha_warmup"])
        beta3 = beta3_at(step, beta1, beta3, hp["beta3_warmup"])
        exp_avg, exp_avg_slow, exp_avg_sq = state["exp_avg"], state["exp_avg_slow"], state["exp_avg_sq"]

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_slow.lerp_(grad, 1 - beta3)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        direction = exp_avg.div(1 - beta1**step).add_(exp_avg_slow, alpha=alpha).div_(denom)
        if weight_decay != 0:
            direction.add_(param, alpha=weight_decay)
        param.add_(direction, alpha=-lr)

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {"atan2": "no reference defines atan2 for AdEMAMix's two-EMA numerator"}

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        eps = hp["eps"]
        beta1, beta2, beta3 = hp["betas"]
        state["step"] += 1
        step = t.step
        alpha = alpha_at(step, hp["alpha"], hp["alpha_warmup"])
        beta3 = beta3_at(step, beta1, beta3, hp["beta3_warmup"])
        exp_avg, exp_avg_slow, exp_avg_sq = state["exp_avg"], state["exp_avg_slow"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_slow.lerp_(grad, 1 - beta3)
        decay, bias_correction2 = second_moment_decay(t, beta2)
        exp_avg_sq.mul_(decay).addcmul_(grad, grad, value=1 - decay)
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        return exp_avg.div(1 - beta1**step).add_(exp_avg_slow, alpha=alpha).div_(denom)
