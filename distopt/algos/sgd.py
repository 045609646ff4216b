"""Stochastic gradient descent with momentum, dampening and Nesterov momentum, matching torch.optim.SGD.

Nesterov momentum: Sutskever et al., http://proceedings.mlr.press/v28/sutskever13.html.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .base import Algorithm, check_bool, check_nonnegative, new_step_counter, zeros_like, _as_number


class SGD(Algorithm):
    """SGD. State per parameter: ``step`` and, when ``momentum != 0``, ``momentum_buffer``.

    The first step seeds the buffer with the gradient itself (no dampening), as torch.optim.SGD does.
    """

    name = "sgd"
    hyperparameters = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
                       "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_nonnegative(self.name, hp, "momentum")
        _as_number(self.name, "dampening", hp["dampening"])
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "nesterov", "maximize")
        if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
            raise ValueError(f"{self.name}: nesterov=True requires momentum > 0 and dampening == 0, got "
                             f"momentum={hp['momentum']!r}, dampening={hp['dampening']!r}")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        state = {"step": new_step_counter()}
        if hp["momentum"] != 0:
            state["momentum_buffer"] = zeros_like(param)
        return state

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        lr, momentum, weight_decay = hp["lr"], hp["momentum"], hp["weight_decay"]
        if hp["maximize"]:
            grad = -grad
        state["step"] += 1
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            if "momentum_buffer" not in state:
                raise RuntimeError(f"{self.name}: momentum was switched on after the first step; the momentum "
                                   "buffer does not exist. Set momentum before training starts.")
            buf = state["momentum_buffer"]
            if state["step"].item() == 1:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - hp["dampening"])
            grad = grad.add(buf, alpha=momentum) if hp["nesterov"] else buf
        param.add_(grad, alpha=-lr)
