"""Simplified AdEMAMix, as adv_optm's ``Simplified_AdEMAMix`` (the seed page's; the class is in adv_optm up to
2.2.3, and 2.5.16 no longer has it). Morwani et al., "Connections between Schedule-Free Optimizers, AdEMAMix, and
Accelerated SGD Variants", https://arxiv.org/abs/2502.02431 (the authors' code: DepenM/Simplified-AdEMAMix).

The momentum is an accumulator (``m <- β1 m + g``), the update ``(m + α g) / (sqrt(v) + eps sqrt(Σβ2))`` times
``sqrt(Σβ2 / Σβ1)`` (the bias corrections as running sums), and adv_optm divides the learning rate by
``(1 - β1^t) / (1 - β1) + α``, for the update and the decay alike: hence its learning rates about 100 times below
AdamW's. ``beta1_warmup`` raises β1 from ``min_beta1`` over that many steps, linearly in half-life.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import (Algorithm, check_betas, check_bool, check_nonnegative, check_optional_positive_int,
                   check_unit_interval, new_step_counter, zeros_like)


def half_life_warmup(step: int, beta_end: float, beta_start: float, warmup: int) -> float:
    """β1 at ``step`` of its warm-up: the half-life ``ln 0.5 / ln β - 1`` interpolated linearly (adv_optm's)."""
    if step >= warmup:
        return beta_end

    def half_life(beta: float) -> float:
        return math.log(0.5) / math.log(beta + 1e-8) - 1

    a = step / float(warmup)
    return math.pow(0.5, 1 / ((1.0 - a) * half_life(beta_start) + a * half_life(beta_end) + 1))


class Simplified_AdEMAMix(Algorithm):  # noqa: N801 (adv_optm's name)
    """Simplified AdEMAMix. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``num_sum``, ``den_sum``
    (the running sums of the bias corrections, float64 scalars). Defaults of adv_optm's class."""

    name = "simplified_ademamix"
    hyperparameters = {"lr": 1e-5, "betas": (0.99, 0.999), "eps": 1e-8, "weight_decay": 0.0, "alpha_grad": 100.0,
                       "beta1_warmup": None, "min_beta1": 0.9, "use_bias_correction": True, "maximize": False}
    scalar_state = ("step", "num_sum", "den_sum")

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        for key in ("eps", "weight_decay", "alpha_grad"):
            check_nonnegative(self.name, hp, key)
        check_optional_positive_int(self.name, hp, "beta1_warmup")
        check_unit_interval(self.name, hp, "min_beta1")
        check_bool(self.name, hp, "use_bias_correction", "maximize")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        start = 0.0 if hp["use_bias_correction"] else 1.0
        return {"step": new_step_counter(), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param),
                "num_sum": torch.tensor(start, dtype=torch.float64),
                "den_sum": torch.tensor(start, dtype=torch.float64)}

    def _moments(self, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> tuple[Tensor, float]:
        """Update the state; return ``(m + α g) / (sqrt(v) + eps sqrt(Σβ2)) * sqrt(Σβ2 / Σβ1)`` and the learning
        rate's factor ``1 / ((1 - β1^t) / (1 - β1) + α)``."""
        beta1, beta2 = hp["betas"]
        step = int(state["step"].item()) + 1
        if hp["beta1_warmup"] is not None:
            beta1 = half_life_warmup(step, beta1, hp["min_beta1"], hp["beta1_warmup"])
        if hp["use_bias_correction"]:
            state["num_sum"].copy_(beta1 * state["num_sum"].item() + 1.0)
            state["den_sum"].copy_(beta2 * state["den_sum"].item() + (1.0 - beta2))
        den_sum, num_sum = state["den_sum"].item(), state["num_sum"].item()
        alpha = hp["alpha_grad"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad)
        update = torch.add(exp_avg, grad, alpha=alpha)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        update.div_(exp_avg_sq.sqrt().add_(math.sqrt(den_sum) * hp["eps"]))
        state["step"] += 1
        return update, math.sqrt(den_sum / num_sum), 1 / ((1 - beta1**step) / (1 - beta1) + alpha)

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        update, correction, factor = self._moments(-grad if hp["maximize"] else grad, state, hp)
        lr = hp["lr"] * factor
        update.mul_(lr * correction)
        if hp["weight_decay"] != 0:
            param.add_(param, alpha=-hp["weight_decay"] * lr)
        param.add_(-update)

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "its second moment's bias correction is a running sum, which the flag's schedule does not define"
        return {"palm": reason, "kourkoutas_beta": reason, "atan2": "no reference defines atan2 for it"}

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        update, correction, factor = self._moments(grad, state, hp)
        t.lr_scale = factor
        return update.mul_(correction)
