"""RAdam, Adam with the variance of its adaptive learning rate rectified, with the arithmetic of torch.optim.RAdam's
single-tensor path (results bitwise). Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond",
https://arxiv.org/abs/1908.03265; ``decoupled_weight_decay``: AdamW's decay (Loshchilov & Hutter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..transforms.flags import l2_refusals
from .base import as_scalar, Algorithm, check_betas, check_bool, check_nonnegative, new_step_counter, zeros_like


def _rectification(beta2: float, step: float) -> tuple[float, float]:
    """(rho_t, the rectification factor where rho_t > 5): the length of the approximated SMA and its correction."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / (1 - beta2**step)
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5 if rho_t > 5 else 0.0
    return rho_t, rect


class RAdam(Algorithm):
    """RAdam. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``; defaults of torch.optim.RAdam."""

    name = "radam"
    hyperparameters = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                       "decoupled_weight_decay": False, "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "decoupled_weight_decay", "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        hp = {**hp, "lr": as_scalar(hp["lr"])}  # torch.optim reads a tensor lr as a number here
        lr, weight_decay = hp["lr"], hp["weight_decay"]
        if hp["maximize"]:
            grad = -grad
        state["step"] += 1
        step = state["step"].item()
        if weight_decay != 0 and hp["decoupled_weight_decay"]:
            param.mul_(1 - lr * weight_decay)
        bias_corrected_exp_avg, rho_t, rect = self._moments(param, grad, state, hp, step)
        if rho_t > 5.0:
            adaptive = (1 - hp["betas"][1] ** step) ** 0.5 / state["exp_avg_sq"].sqrt().add_(hp["eps"])
            param.add_(bias_corrected_exp_avg * lr * adaptive * rect, alpha=-1.0)
        else:
            param.add_(bias_corrected_exp_avg * lr, alpha=-1.0)

    @staticmethod
    def _moments(param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any], step: float) -> tuple:
        """Update the moments (L2 decay first, where the decay is not decoupled); return ``(m̂, rho_t, rect)``."""
        beta1, beta2 = hp["betas"]
        if hp["weight_decay"] != 0 and not hp["decoupled_weight_decay"]:
            grad = grad.add(param, alpha=hp["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return (state["exp_avg"] / (1 - beta1**step), *_rectification(beta2, step))

    # The chain form (flags): u = m̂ · (rectified adaptive lr), or m̂ while the variance is untractable.

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        refused = {"palm": "its rectification assumes a constant beta2", "kourkoutas_beta":
                   "its rectification assumes a constant beta2", "atan2": "no reference defines atan2 for RAdam"}
        return {**refused, **l2_refusals(hp["decoupled_weight_decay"])}

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        return hp["decoupled_weight_decay"]

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        state["step"] += 1
        bias_corrected_exp_avg, rho_t, rect = self._moments(param, grad, state, hp, t.step)
        if rho_t > 5.0:
            adaptive = (1 - hp["betas"][1] ** t.step) ** 0.5 / state["exp_avg_sq"].sqrt().add_(hp["eps"])
            return bias_corrected_exp_avg * adaptive * rect
        return bias_corrected_exp_avg
