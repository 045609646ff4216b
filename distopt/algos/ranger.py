"""Ranger: RAdam's rectified Adam with Lookahead, with the arithmetic of torch-optimi 0.3.3's single-tensor
Ranger. Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", https://arxiv.org/abs/1908.03265;
Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back", https://arxiv.org/abs/1907.08610.

While the rectification is undefined (``rho_t <= 5``, the first five steps for the usual ``beta2``) the step is
momentum SGD, ``p -= lr m̂``, with no eps, as optimi does it. Every ``k`` steps the slow weights move ``alpha`` of the
way to the fast ones, and the parameter is set to them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..transforms.flags import l2_refusals
from .base import (Algorithm, _as_number, check_betas, check_bool, check_nonnegative, check_unit_interval,
                   new_step_counter, zeros_like)
from .optimi_moments import debias_beta


def rectification(beta2: float, step: int) -> float | None:
    """RAdam's variance rectification at ``step``, or None where it is undefined (``rho_t <= 5``)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
    if rho <= 5:
        return None
    return math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))


class Ranger(Algorithm):
    """Ranger. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``la_param`` (the slow weights).
    Defaults of optimi's Ranger (which has no default ``lr``; distopt's is 1e-3)."""

    name = "ranger"
    hyperparameters = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0, "eps": 1e-6, "k": 6, "alpha": 0.5,
                       "decouple_wd": True, "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")
        check_unit_interval(self.name, hp, "alpha", closed=True)
        _as_number(self.name, "alpha", hp["alpha"])
        k = hp["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{self.name}: invalid k={k!r} (the lookahead period must be a positive int)")
        check_bool(self.name, hp, "decouple_wd", "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param),
                "la_param": param.detach().clone(memory_format=torch.preserve_format)}

    def _moments(self, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> int:
        beta1, beta2 = hp["betas"]
        state["step"] += 1
        step = int(state["step"].item())
        state["exp_avg"].lerp_(grad, 1 - debias_beta(beta1, step))
        b2 = debias_beta(beta2, step)
        state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        return step

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        lr, weight_decay = hp["lr"], hp["weight_decay"]
        if hp["maximize"]:
            grad = -grad
        if weight_decay != 0:
            if hp["decouple_wd"]:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        step = self._moments(grad, state, hp)
        rect = rectification(hp["betas"][1], step)
        if rect is None:
            param.add_(state["exp_avg"], alpha=-lr)
        else:
            param.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(hp["eps"]), value=-lr * rect)
        self.after_step(param, state, hp)

    def after_step(self, param: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        if int(state["step"].item()) % hp["k"] == 0:
            slow = state["la_param"]
            slow.add_(param.sub(slow), alpha=hp["alpha"])
            param.copy_(slow)

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "its step switches between momentum SGD and a rectified Adam step, which no reference combines " \
                 "with this flag"
        return {"palm": reason, "kourkoutas_beta": reason, "atan2": reason,
                **l2_refusals(hp["decouple_wd"])}

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        return bool(hp["decouple_wd"])

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        if hp["weight_decay"] != 0 and not hp["decouple_wd"]:
            grad = grad.add(param, alpha=hp["weight_decay"])
        step = self._moments(grad, state, hp)
        rect = rectification(hp["betas"][1], step)
        if rect is None:
            return state["exp_avg"].clone()
        return (state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(hp["eps"])).mul_(rect)
