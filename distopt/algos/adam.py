"""Adam and AdamW, with the arithmetic of torch.optim's single-tensor path so that results match it bitwise.

Adam: Kingma & Ba, https://arxiv.org/abs/1412.6980. AdamW: Loshchilov & Hutter, https://arxiv.org/abs/1711.05101.
AMSGrad: Reddi et al., https://openreview.net/forum?id=ryQu7f-RZ.

``fused=True`` runs torch's fused kernel (``torch._fused_adam_`` / ``torch._fused_adamw_``) once per device and dtype
over all of a param group's local tensors: one pass over memory, and the results of ``torch.optim.Adam(W)(...,
fused=True)`` bitwise. The default (None or False) is the single-tensor arithmetic, as torch.optim's default on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor
import torch

from ..transforms import flags
from ..transforms.flags import l2_refusals
from .base import (FLAG_SWITCHES, Algorithm, check_betas, check_bool, check_fusable, check_nonnegative,
                   check_optional_bool, group_by_device_and_dtype, new_step_counter, second_moment_decay, zeros_like)

#: adv_optm's Adam-atan2 constant ``a`` (with ``b = 1``): ``a atan2(x, y)`` equals ``x / y`` where ``|x| = |y|``.
ATAN2_SCALE = 4 / math.pi


class Adam(Algorithm):
    """Adam. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with AMSGrad), the
    same keys with and without ``fused``, so checkpoints move between the two."""

    name = "adam"
    hyperparameters = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                       "maximize": False, "decoupled_weight_decay": False, "fused": None}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_nonnegative(self.name, hp, "eps")
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "amsgrad", "maximize")
        check_optional_bool(self.name, hp, "fused")

    def _decoupled(self, hp: Mapping[str, Any]) -> bool:
        return hp["decoupled_weight_decay"]

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        step = new_step_counter()
        if hp["fused"]:
            step = step.to(param.device)  # the fused kernels read the step on the tensors' device, as torch keeps it
        state = {"step": step, "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}
        if hp["amsgrad"]:
            state["max_exp_avg_sq"] = zeros_like(param)
        return state

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        lr, weight_decay, eps = hp["lr"], hp["weight_decay"], hp["eps"]
        beta1, beta2 = hp["betas"]
        if hp["maximize"]:
            grad = -grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1

        if weight_decay != 0:
            if self._decoupled(hp):
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        step = state["step"].item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1

        second_moment = exp_avg_sq
        if hp["amsgrad"]:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second_moment = max_exp_avg_sq
        denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def check_local(self, param: Tensor, grad: Tensor, hp: Mapping[str, Any]) -> None:
        if hp["fused"]:
            check_fusable(self.name, param, grad)

    # The chain form (flags): the same moments; the step ``lr u`` with ``u = (m / bc1) / (sqrt(v / bc2) + eps)``.

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        refused = {}
        if hp["fused"]:
            refused.update({name: "fused=True runs torch's kernel for the whole step, with no place for a flag "
                            "between its parts; use fused=False" for name in FLAG_SWITCHES})
        return {**refused, **l2_refusals(self._decoupled(hp))}

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        return self._decoupled(hp)

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        weight_decay, eps = hp["weight_decay"], hp["eps"]
        beta1, beta2 = hp["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = t.step
        if weight_decay != 0 and not self._decoupled(hp):
            grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        decay, bias_correction2 = second_moment_decay(t, beta2)
        exp_avg_sq.mul_(decay).addcmul_(grad, grad, value=1 - decay)
        second_moment = exp_avg_sq
        if hp["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            second_moment = state["max_exp_avg_sq"]
        bias_correction1 = 1 - beta1**step
        scale = second_moment.sqrt() / bias_correction2**0.5
        if flags.value(hp, "atan2"):
            # adv_optm's Adam-atan2: the first moment enters without its bias correction, which scales the result.
            return torch.atan2(exp_avg, scale).mul_(ATAN2_SCALE / bias_correction1)
        return exp_avg.div(scale.add_(eps)).div_(bias_correction1)

    def apply_many(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                   hp: Mapping[str, Any]) -> None:
        if not hp["fused"]:
            return super().apply_many(params, grads, states, hp)
        kernel = torch._fused_adamw_ if self._decoupled(hp) else torch._fused_adam_
        beta1, beta2 = hp["betas"]
        options = {"lr": hp["lr"], "beta1": float(beta1), "beta2": float(beta2),
                   "weight_decay": float(hp["weight_decay"]), "eps": float(hp["eps"]), "amsgrad": hp["amsgrad"],
                   "maximize": hp["maximize"]}
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        groups = group_by_device_and_dtype(params)
        for indices in groups:
            if len(groups) == 1:
                ps, gs, ss, counts = params, grads, states, steps
            else:
                ps, gs = [params[i] for i in indices], [grads[i] for i in indices]
                ss, counts = [states[i] for i in indices], [steps[i] for i in indices]
            device = ps[0].device
            if device.type != "cpu" and any(count.device != device for count in counts):
                # Counters made without fused live on the CPU; this kernel reads them on its device.
                counts = [count.to(device, non_blocking=True) for count in counts]
            lr = options["lr"]
            if isinstance(lr, Tensor) and lr.device.type != "cpu" and lr.device != device:
                options = {**options, "lr": lr.to(device)}
            kernel(ps, gs, [s["exp_avg"] for s in ss], [s["exp_avg_sq"] for s in ss],
                   [s["max_exp_avg_sq"] for s in ss] if hp["amsgrad"] else [], counts, **options)


class AdamW(Adam):
    """Adam with decoupled weight decay; defaults of ``torch.optim.AdamW``."""

    name = "adamw"
    hyperparameters = {k: v for k, v in Adam.hyperparameters.items() if k != "decoupled_weight_decay"}
    hyperparameters["weight_decay"] = 1e-2

    def _decoupled(self, hp: Mapping[str, Any]) -> bool:
        return True

    def check_torch_group(self, saved: Mapping[str, Any]) -> None:
        if saved.get("decoupled_weight_decay") is False and saved.get("weight_decay", 0) != 0:
            raise ValueError("the param group was saved by torch.optim.Adam with L2 weight decay "
                             f"(weight_decay={saved['weight_decay']!r}, decoupled_weight_decay=False), which adamw "
                             "would run as decoupled decay; load it into distopt.Adam")
