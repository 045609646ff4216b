"""ADOPT: Adam that converges for any beta2. Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2
with the Optimal Rate", https://arxiv.org/abs/2411.02853 (Algorithm 2, the clipped variant, as in the authors' code).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import math

from ..transforms import flags
from ..transforms.flags import l2_refusals
from .base import Algorithm, check_betas, check_bool, check_nonnegative, new_step_counter, zeros_like


class ADOPT(Algorithm):
    """ADOPT. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``.

    The first step only sets ``v = g^2`` and leaves the parameter alone. Step ``t >= 1`` normalises the gradient
    by the *previous* second moment: ``m = b1 m + (1 - b1) clip(g / max(sqrt(v), eps), t^(1/4))``, ``p -= lr m``,
    then ``v = b2 v + (1 - b2) g^2``. ``decouple=True`` applies weight decay AdamW-style instead of to the gradient.
    ``clip=False`` drops the clipping (Algorithm 1).
    """

    name = "adopt"
    hyperparameters = {"lr": 1e-3, "betas": (0.9, 0.9999), "eps": 1e-6, "weight_decay": 0.0, "decouple": False,
                       "clip": True, "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "decouple", "clip", "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        lr, eps, weight_decay = hp["lr"], hp["eps"], hp["weight_decay"]
        beta1, beta2 = hp["betas"]
        if hp["maximize"]:
            grad = -grad
        step = state["step"].item()
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if step == 0:
            exp_avg_sq.addcmul_(grad, grad)
            return

        if weight_decay != 0:
            if hp["decouple"]:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        normed = grad / torch.clamp(exp_avg_sq.sqrt(), min=eps)
        if hp["clip"]:
            bound = step**0.25
            normed.clamp_(-bound, bound)
        exp_avg.lerp_(normed, 1 - beta1)
        param.add_(exp_avg, alpha=-lr)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "ADOPT's second moment is not bias-corrected and lags one step; the flag's schedule has no meaning there"
        refused = {"palm": reason, "kourkoutas_beta": reason}
        return {**refused, **l2_refusals(hp["decouple"])}

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        return hp["decouple"]

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor | None:
        """With ``atan2`` the normalised gradient is ``atan2(g, sqrt(v))`` and the step ``(4/π) m`` (adv_optm's
        Adopt_adv), which replaces eps and the clip; the first step then updates too, as in adv_optm."""
        eps, weight_decay = hp["eps"], hp["weight_decay"]
        beta1, beta2 = hp["betas"]
        step = t.step - 1
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if step == 0:
            exp_avg_sq.addcmul_(grad, grad)
            if not flags.value(hp, "atan2"):
                return None
            # adv_optm steps at once with atan2 (scale-invariant, so v = g^2 is a usable first estimate).
        if weight_decay != 0 and not hp["decouple"]:
            grad = grad.add(param, alpha=weight_decay)
        if flags.value(hp, "atan2"):
            normed = torch.atan2(grad, exp_avg_sq.sqrt())
        else:
            normed = grad / torch.clamp(exp_avg_sq.sqrt(), min=eps)
            if hp["clip"]:
                bound = step**0.25
                normed.clamp_(-bound, bound)
        exp_avg.lerp_(normed, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return exp_avg * (4 / math.pi) if flags.value(hp, "atan2") else exp_avg.clone()
