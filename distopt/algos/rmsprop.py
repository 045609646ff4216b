"""RMSprop, plain or centered, with optional momentum, matching torch.optim.RMSprop.

Hinton, Lecture 6e of "Neural Networks for Machine Learning"; centered variant: Graves,
https://arxiv.org/abs/1308.0850.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..transforms.flags import L2_DECAY, NO_SECOND_MOMENT
from .base import Algorithm, check_bool, check_nonnegative, new_step_counter, zeros_like


class RMSprop(Algorithm):
    """RMSprop. State per parameter: ``step``, ``square_avg``, and ``momentum_buffer`` / ``grad_avg`` when used."""

    name = "rmsprop"
    hyperparameters = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                       "centered": False, "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        for key in ("eps", "momentum", "weight_decay", "alpha"):
            check_nonnegative(self.name, hp, key)
        check_bool(self.name, hp, "centered", "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        state = {"step": new_step_counter(), "square_avg": zeros_like(param)}
        if hp["momentum"] > 0:
            state["momentum_buffer"] = zeros_like(param)
        if hp["centered"]:
            state["grad_avg"] = zeros_like(param)
        return state

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        if hp["maximize"]:
            grad = -grad
        grad, avg = self._averages(param, grad, state, hp)
        if hp["momentum"] > 0:
            buf = state["momentum_buffer"]
            buf.mul_(hp["momentum"]).addcdiv_(grad, avg)
            param.add_(buf, alpha=-hp["lr"])
        else:
            param.addcdiv_(grad, avg, value=-hp["lr"])

    def _averages(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> tuple:
        """Count the step, update the running averages; return the (L2-decayed) gradient and ``sqrt(avg) + eps``."""
        alpha = hp["alpha"]
        state["step"] += 1
        if hp["weight_decay"] != 0:
            grad = grad.add(param, alpha=hp["weight_decay"])
        square_avg = state["square_avg"]
        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        if hp["centered"]:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(grad, 1 - alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        return grad, avg.add_(hp["eps"])

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {"palm": NO_SECOND_MOMENT, "kourkoutas_beta": NO_SECOND_MOMENT,
                "atan2": "no reference defines atan2 for RMSprop", "cautious_weight_decay": L2_DECAY,
                "decouple_lr": L2_DECAY}

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        return False

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        return float(hp["momentum"])

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        grad, avg = self._averages(param, grad, state, hp)
        if hp["momentum"] > 0:
            buf = state["momentum_buffer"]
            buf.mul_(hp["momentum"]).addcdiv_(grad, avg)
            return buf.clone()
        return grad / avg
