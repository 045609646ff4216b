"""Adagrad, with the arithmetic of torch.optim.Adagrad's single-tensor path for dense gradients (results bitwise).
Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic Optimization", JMLR 2011.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..transforms.flags import L2_DECAY
from .base import as_scalar, Algorithm, check_bool, check_nonnegative, new_step_counter

NO_MOMENTUM = "it has no first moment (β1) for the flag to use"
NO_DECAYING_SECOND_MOMENT = "its accumulator is a sum, with no decay for the flag to schedule"


class Adagrad(Algorithm):
    """Adagrad. State per parameter: ``step``, ``sum`` (starting at ``initial_accumulator_value``); defaults of
    torch.optim.Adagrad. Sparse gradients are refused (distopt's steps are dense)."""

    name = "adagrad"
    hyperparameters = {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0,
                       "eps": 1e-10, "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        for key in ("lr_decay", "weight_decay", "initial_accumulator_value", "eps"):
            check_nonnegative(self.name, hp, key)
        check_bool(self.name, hp, "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        value = hp["initial_accumulator_value"]
        init = complex(value, value) if torch.is_complex(param) else value
        return {"step": new_step_counter(), "sum": torch.full_like(param, init, memory_format=torch.preserve_format)}

    def _std(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> tuple:
        state["step"] += 1
        step = state["step"].item()
        if hp["weight_decay"] != 0:
            grad = grad.add(param, alpha=hp["weight_decay"])
        state_sum = state["sum"]
        state_sum.addcmul_(grad, grad, value=1)
        return grad, state_sum.sqrt().add_(hp["eps"]), 1 / (1 + (step - 1) * hp["lr_decay"])

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        hp = {**hp, "lr": as_scalar(hp["lr"])}  # torch.optim reads a tensor lr as a number here
        if hp["maximize"]:
            grad = -grad
        lr = hp["lr"]
        step = state["step"].item() + 1
        clr = lr / (1 + (step - 1) * hp["lr_decay"])
        grad, std, _ = self._std(param, grad, state, hp)
        param.addcdiv_(grad, std, value=-clr)

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {"mars": NO_MOMENTUM, "palm": NO_DECAYING_SECOND_MOMENT, "kourkoutas_beta": NO_DECAYING_SECOND_MOMENT,
                "atan2": "no reference defines atan2 for Adagrad", "cautious_weight_decay": L2_DECAY,
                "decouple_lr": L2_DECAY}

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        return False

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        grad, std, decay = self._std(param, grad, state, hp)
        return (grad / std).mul_(decay)
