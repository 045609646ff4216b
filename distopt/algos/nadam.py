"""NAdam (Adam with Nesterov momentum), matching torch.optim.NAdam.

Dozat, "Incorporating Nesterov Momentum into Adam", https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ.
Decoupled weight decay as in NAdamW: https://arxiv.org/abs/1711.05101.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..transforms.flags import l2_refusals
from .base import Algorithm, check_betas, check_bool, check_nonnegative, new_step_counter, second_moment_decay, zeros_like


class NAdam(Algorithm):
    """NAdam. State per parameter: ``step``, ``mu_product`` (scalars), ``exp_avg``, ``exp_avg_sq``."""

    name = "nadam"
    hyperparameters = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                       "momentum_decay": 4e-3, "decoupled_weight_decay": False, "maximize": False}
    scalar_state = ("step", "mu_product")

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_nonnegative(self.name, hp, "eps")
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "weight_decay")
        check_nonnegative(self.name, hp, "momentum_decay")
        check_bool(self.name, hp, "decoupled_weight_decay", "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "mu_product": torch.tensor(1.0, dtype=torch.float32),
                "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        lr, weight_decay, eps, momentum_decay = hp["lr"], hp["weight_decay"], hp["eps"], hp["momentum_decay"]
        beta1, beta2 = hp["betas"]
        if hp["maximize"]:
            grad = -grad
        exp_avg, exp_avg_sq, mu_product = state["exp_avg"], state["exp_avg_sq"], state["mu_product"]
        state["step"] += 1
        step = state["step"].item()
        bias_correction2 = 1 - beta2**step

        if weight_decay != 0:
            if hp["decoupled_weight_decay"]:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        # The momentum schedule mu_t of the paper; mu_product is kept in float32, as torch does.
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
        mu_product *= mu

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.div(bias_correction2).sqrt()

        mu_product_value = mu_product.item()
        mu_product_next = mu_product_value * mu_next
        denom.add_(eps)
        param.addcdiv_(grad, denom, value=(-lr * (1.0 - mu) / (1.0 - mu_product_value)))
        param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - mu_product_next))

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        refused = {"atan2": "NAdam divides two terms by the second moment, and no reference defines atan2 for it"}
        return {**refused, **l2_refusals(hp["decoupled_weight_decay"])}

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        return hp["decoupled_weight_decay"]

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        weight_decay, eps, momentum_decay = hp["weight_decay"], hp["eps"], hp["momentum_decay"]
        beta1, beta2 = hp["betas"]
        exp_avg, exp_avg_sq, mu_product = state["exp_avg"], state["exp_avg_sq"], state["mu_product"]
        state["step"] += 1
        step = t.step
        if weight_decay != 0 and not hp["decoupled_weight_decay"]:
            grad = grad.add(param, alpha=weight_decay)
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
        mu_product *= mu
        exp_avg.lerp_(grad, 1 - beta1)
        decay, bias_correction2 = second_moment_decay(t, beta2)
        exp_avg_sq.mul_(decay).addcmul_(grad, grad, value=1 - decay)
        denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
        mu_product_value = mu_product.item()
        u = grad.div(denom).mul_((1.0 - mu) / (1.0 - mu_product_value))
        return u.addcdiv_(exp_avg, denom, value=mu_next / (1.0 - mu_product_value * mu_next))
