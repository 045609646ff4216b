"""Adamax, Adam with the infinity norm, with the arithmetic of torch.optim.Adamax's single-tensor path (results
bitwise). Kingma & Ba, "Adam: A Method for Stochastic Optimization", https://arxiv.org/abs/1412.6980, §7.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..transforms.flags import L2_DECAY
from .base import as_scalar, Algorithm, check_betas, check_bool, check_nonnegative, new_step_counter, zeros_like

NO_EMA_SECOND_MOMENT = "its second statistic is a decaying maximum (the infinity norm), not a bias-corrected EMA"


class Adamax(Algorithm):
    """Adamax. State per parameter: ``step``, ``exp_avg``, ``exp_inf``; defaults of torch.optim.Adamax."""

    name = "adamax"
    hyperparameters = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg": zeros_like(param), "exp_inf": zeros_like(param)}

    def _moments(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> float:
        """Update the moments; return the bias correction of the step."""
        beta1, beta2 = hp["betas"]
        state["step"] += 1
        if hp["weight_decay"] != 0:
            grad = grad.add(param, alpha=hp["weight_decay"])
        exp_avg, exp_inf = state["exp_avg"], state["exp_inf"]
        exp_avg.lerp_(grad, 1 - beta1)
        torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(hp["eps"]), out=exp_inf)
        return 1 - beta1 ** state["step"].item()

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        hp = {**hp, "lr": as_scalar(hp["lr"])}  # torch.optim reads a tensor lr as a number here
        if hp["maximize"]:
            grad = -grad
        bias_correction = self._moments(param, grad, state, hp)
        param.addcdiv_(state["exp_avg"], state["exp_inf"], value=-(hp["lr"] / bias_correction))

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {"palm": NO_EMA_SECOND_MOMENT, "kourkoutas_beta": NO_EMA_SECOND_MOMENT,
                "atan2": "no reference defines atan2 for Adamax", "cautious_weight_decay": L2_DECAY,
                "decouple_lr": L2_DECAY}

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        return False

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        bias_correction = self._moments(param, grad, state, hp)
        return (state["exp_avg"] / state["exp_inf"]).div_(bias_correction)
