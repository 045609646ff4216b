"""Adan: adaptive Nesterov momentum, with the arithmetic of torch-optimi 0.3.3's single-tensor Adan. Xie et al.,
"Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models", https://arxiv.org/abs/2208.06677.

Weight decay is the paper's proximal form ``p <- (p - lr u) / (1 + lr wd)``, as optimi applies it (optimi's class
ignores its ``adam_wd`` switch, so distopt does not take one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .base import Algorithm, check_betas, check_bool, check_nonnegative, new_step_counter, zeros_like
from .optimi_moments import debias_beta


class Adan(Algorithm):
    """Adan. State per parameter: ``step``, ``exp_avg`` (m̂), ``exp_avg_diff`` (the debiased average of gradient
    differences), ``exp_avg_sq`` (n̂), ``prev_grad`` (minus the last gradient). Defaults of optimi's Adan (which has
    no default ``lr``; distopt's is 1e-3)."""

    name = "adan"
    hyperparameters = {"lr": 1e-3, "betas": (0.98, 0.92, 0.99), "weight_decay": 2e-2, "eps": 1e-6,
                       "maximize": False}
    proximal_decay = True

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp, count=3)
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg": zeros_like(param), "exp_avg_diff": zeros_like(param),
                "exp_avg_sq": zeros_like(param), "prev_grad": zeros_like(param)}

    def _moments(self, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        """Update the moments; return the denominator ``sqrt(n̂) + eps``."""
        beta1, beta2, beta3 = hp["betas"]
        state["step"] += 1
        step = int(state["step"].item())
        prev_grad = state["prev_grad"]
        if step == 1:
            prev_grad.copy_(grad).mul_(-1)  # the first difference is zero, as optimi starts it
        prev_grad.add_(grad)
        state["exp_avg"].lerp_(grad, 1 - debias_beta(beta1, step))
        state["exp_avg_diff"].lerp_(prev_grad, 1 - debias_beta(beta2, step))
        prev_grad.mul_(beta2).add_(grad)
        b3 = debias_beta(beta3, step)
        state["exp_avg_sq"].mul_(b3).addcmul_(prev_grad, prev_grad, value=1 - b3)
        prev_grad.copy_(grad).mul_(-1)
        return state["exp_avg_sq"].sqrt().add_(hp["eps"])

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        lr, weight_decay = hp["lr"], hp["weight_decay"]
        denom = self._moments(-grad if hp["maximize"] else grad, state, hp)
        param.addcdiv_(state["exp_avg"], denom, value=-lr)
        param.addcdiv_(state["exp_avg_diff"], denom, value=-lr * hp["betas"][1])
        if weight_decay != 0:
            param.div_(1 + lr * weight_decay)

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "its second moment is of the Nesterov-corrected gradient, which PaLM's and Kourkoutas-β's " \
                 "schedules do not define"
        return {"palm": reason, "kourkoutas_beta": reason, "atan2": "no reference defines atan2 for Adan"}

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        denom = self._moments(grad, state, hp)
        return state["exp_avg"].add(state["exp_avg_diff"], alpha=hp["betas"][1]).div_(denom)
