"""Adadelta, with the arithmetic of torch.optim.Adadelta's single-tensor path (results bitwise). Zeiler,
"ADADELTA: An Adaptive Learning Rate Method", https://arxiv.org/abs/1212.5701.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..transforms.flags import L2_DECAY
from .adagrad import NO_MOMENTUM
from .base import as_scalar, Algorithm, _as_number, check_bool, check_nonnegative, new_step_counter, zeros_like

NO_BIAS_CORRECTED_MOMENT = "its running averages are not bias-corrected EMAs with betas[1]"


class Adadelta(Algorithm):
    """Adadelta. State per parameter: ``step``, ``square_avg``, ``acc_delta``; defaults of torch.optim.Adadelta."""

    name = "adadelta"
    hyperparameters = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        rho = _as_number(self.name, "rho", hp["rho"])
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"{self.name}: invalid rho={hp['rho']!r} (must be in [0, 1])")
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "square_avg": zeros_like(param), "acc_delta": zeros_like(param)}

    def _delta(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        rho, eps = hp["rho"], hp["eps"]
        state["step"] += 1
        if hp["weight_decay"] != 0:
            grad = grad.add(param, alpha=hp["weight_decay"])
        square_avg, acc_delta = state["square_avg"], state["acc_delta"]
        square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
        std = square_avg.add(eps).sqrt_()
        delta = acc_delta.add(eps).sqrt_()
        delta.div_(std).mul_(grad)
        acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        return delta

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        hp = {**hp, "lr": as_scalar(hp["lr"])}  # torch.optim reads a tensor lr as a number here
        if hp["maximize"]:
            grad = -grad
        param.add_(self._delta(param, grad, state, hp), alpha=-hp["lr"])

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {"mars": NO_MOMENTUM, "palm": NO_BIAS_CORRECTED_MOMENT, "kourkoutas_beta": NO_BIAS_CORRECTED_MOMENT,
                "atan2": "no reference defines atan2 for Adadelta", "cautious_weight_decay": L2_DECAY,
                "decouple_lr": L2_DECAY}

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        return False

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        return self._delta(param, grad, state, hp)
