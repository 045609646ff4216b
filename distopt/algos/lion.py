"""Lion: EvoLved Sign Momentum. Chen et al., "Symbolic Discovery of Optimization Algorithms",
https://arxiv.org/abs/2302.06675 (Algorithm 2, with decoupled weight decay).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..transforms.lion_k import LION_K

from ..transforms.flags import NO_EPS_DIVISION, NO_SECOND_MOMENT, SIGN_UPDATE
from .base import Algorithm, _as_number, check_betas, check_bool, check_nonnegative, new_step_counter, zeros_like


class Lion(Algorithm):
    """Lion. State per parameter: ``step`` and ``exp_avg`` (the momentum ``m`` of the paper).

    ``c = b1 m + (1 - b1) g``;  ``p -= lr (sign(c) + wd p)``;  ``m = b2 m + (1 - b2) g``.
    """

    name = "lion"
    hyperparameters = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "maximize": False, "kappa_p": 1.0,
                       "auto_kappa_p": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "maximize", "auto_kappa_p")
        kappa = _as_number(self.name, "kappa_p", hp["kappa_p"])
        if not 1.0 <= kappa <= 2.0:
            raise ValueError(f"{self.name}: invalid kappa_p={hp['kappa_p']!r} (must be in [1, 2])")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg": zeros_like(param)}

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        lr, weight_decay = hp["lr"], hp["weight_decay"]
        beta1, beta2 = hp["betas"]
        if hp["maximize"]:
            grad = -grad
        state["step"] += 1
        exp_avg = state["exp_avg"]
        direction = exp_avg.lerp(grad, 1 - beta1).sign_()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(direction, alpha=-lr)
        exp_avg.lerp_(grad, 1 - beta2)

    @staticmethod
    def _lion_k(hp: Mapping[str, Any]) -> bool:
        return bool(hp["auto_kappa_p"]) or float(hp["kappa_p"]) != 1.0

    def chained(self, hp: Mapping[str, Any]) -> bool:
        """Lion-k's norm over the whole tensor is a reduction: the chain runtime runs it."""
        return super().chained(hp) or self._lion_k(hp)

    def core_transforms(self, hp: Mapping[str, Any]) -> tuple:
        return (LION_K,) if self._lion_k(hp) else ()

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {"palm": NO_SECOND_MOMENT, "kourkoutas_beta": NO_SECOND_MOMENT, "atan2": NO_EPS_DIVISION,
                "grams": SIGN_UPDATE}

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        beta1, beta2 = hp["betas"]
        state["step"] += 1
        exp_avg = state["exp_avg"]
        u = exp_avg.lerp(grad, 1 - beta1)
        exp_avg.lerp_(grad, 1 - beta2)
        return u if self._lion_k(hp) else u.sign_()
