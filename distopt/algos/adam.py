"""Adam and AdamW, with the arithmetic of torch.optim's single-tensor path so that results match it bitwise.

Adam: Kingma & Ba, https://arxiv.org/abs/1412.6980. AdamW: Loshchilov & Hutter, https://arxiv.org/abs/1711.05101.
AMSGrad: Reddi et al., https://openreview.net/forum?id=ryQu7f-RZ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
import torch

from .base import (Algorithm, check_betas, check_bool, check_nonnegative, new_step_counter, zeros_like)


class Adam(Algorithm):
    """Adam. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with AMSGrad)."""

    name = "adam"
    hyperparameters = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                       "maximize": False, "decoupled_weight_decay": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_nonnegative(self.name, hp, "eps")
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "amsgrad", "maximize")

    def _decoupled(self, hp: Mapping[str, Any]) -> bool:
        return hp["decoupled_weight_decay"]

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        state = {"step": new_step_counter(), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}
        if hp["amsgrad"]:
            state["max_exp_avg_sq"] = zeros_like(param)
        return state

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        lr, weight_decay, eps = hp["lr"], hp["weight_decay"], hp["eps"]
        beta1, beta2 = hp["betas"]
        if hp["maximize"]:
            grad = -grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1

        if weight_decay != 0:
            if self._decoupled(hp):
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        step = state["step"].item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1

        second_moment = exp_avg_sq
        if hp["amsgrad"]:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second_moment = max_exp_avg_sq
        denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(Adam):
    """Adam with decoupled weight decay; defaults of ``torch.optim.AdamW``."""

    name = "adamw"
    hyperparameters = {k: v for k, v in Adam.hyperparameters.items() if k != "decoupled_weight_decay"}
    hyperparameters["weight_decay"] = 1e-2

    def _decoupled(self, hp: Mapping[str, Any]) -> bool:
        return True
