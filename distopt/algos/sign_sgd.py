"""SignSGD with momentum, as adv_optm 2.5.16's ``SignSGD_adv``: Bernstein et al., "signSGD: Compressed Optimisation
for Non-Convex Problems", https://arxiv.org/abs/1802.04434. The momentum is an exponential average
(``m <- lerp(m, g, 1 - momentum)``), the step ``p <- p - lr wd p - lr sign(m)``; ``nesterov`` signs
``lerp(g, m, nesterov_coef)``; ``normed_momentum`` averages ``sign(g)`` and steps with the average itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..transforms.flags import NO_EPS_DIVISION, NO_SECOND_MOMENT, SIGN_UPDATE
from .base import (Algorithm, check_bool, check_nonnegative, check_unit_interval, new_step_counter, zeros_like)


def check_momentum_settings(algo: str, hp: Mapping[str, Any]) -> None:
    check_unit_interval(algo, hp, "momentum", closed=True)
    check_nonnegative(algo, hp, "weight_decay")
    check_bool(algo, hp, "nesterov", "maximize")
    if hp["nesterov_coef"] is not None:
        check_unit_interval(algo, hp, "nesterov_coef", closed=True)


def momentum_direction(grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any], normed: bool = False
                       ) -> Tensor:
    """adv_optm's momentum for its sign-like optimizers: the raw direction before the sign (or Sinkhorn). With
    ``normed`` (``grad`` already a sign), Nesterov's look-ahead weighs the gradient by ``|m|`` before the update.
    Without Nesterov it is the buffer itself: callers must not change it in place."""
    momentum = hp["momentum"]
    if momentum == 0:
        return grad
    buf = state["momentum_buffer"]
    ahead = buf.abs() * grad if normed and hp["nesterov"] else grad
    buf.lerp_(grad, 1 - momentum)
    if hp["nesterov"]:
        return ahead.lerp(buf, hp["nesterov_coef"] if hp["nesterov_coef"] is not None else momentum)
    return buf


def adv_optm_step(param: Tensor, update: Tensor, hp: Mapping[str, Any]) -> None:
    """adv_optm's write, in its order: ``p -= wd lr p``, then ``p -= lr u``."""
    lr, weight_decay = hp["lr"], hp["weight_decay"]
    if weight_decay != 0:
        param.add_(param, alpha=-weight_decay * lr)
    param.add_(update.mul(lr).neg_())


class SignSGD(Algorithm):
    """SignSGD. State per parameter: ``step``, and ``momentum_buffer`` where ``momentum > 0``. Defaults of
    adv_optm's SignSGD_adv."""

    name = "signsgd"
    hyperparameters = {"lr": 1e-4, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False, "nesterov_coef": None,
                       "normed_momentum": False, "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_momentum_settings(self.name, hp)
        check_bool(self.name, hp, "normed_momentum")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        state = {"step": new_step_counter()}
        if hp["momentum"] > 0:
            state["momentum_buffer"] = zeros_like(param)
        return state

    def check_local(self, param: Tensor, grad: Tensor, hp: Mapping[str, Any]) -> None:
        pass

    def _direction(self, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        if hp["momentum"] > 0 and "momentum_buffer" not in state:
            raise RuntimeError(f"{self.name}: momentum was switched on after the first step; the state has no "
                               "momentum_buffer (start the run with momentum > 0)")
        state["step"] += 1
        if hp["normed_momentum"]:
            grad = grad.sign()
        raw = momentum_direction(grad, state, hp, hp["normed_momentum"])
        if not hp["normed_momentum"]:
            return raw.sign()
        return raw.clone() if raw is state.get("momentum_buffer") else raw

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        adv_optm_step(param, self._direction(-grad if hp["maximize"] else grad, state, hp), hp)

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {"palm": NO_SECOND_MOMENT, "kourkoutas_beta": NO_SECOND_MOMENT, "atan2": NO_EPS_DIVISION,
                "grams": SIGN_UPDATE}

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        return float(hp["momentum"])

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        return self._direction(grad, state, hp)
