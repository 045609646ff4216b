"""Stochastic gradient descent with momentum, dampening and Nesterov momentum, matching torch.optim.SGD.

Nesterov momentum: Sutskever et al., http://proceedings.mlr.press/v28/sutskever13.html.

``fused=True`` runs torch's fused kernel (``torch._fused_sgd_``) over a param group's local tensors, per device and
dtype: the results of ``torch.optim.SGD(..., fused=True)`` bitwise. On the CPU it is refused for bfloat16 and float16,
where torch's kernel is wrong (pytorch/pytorch#191763).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..transforms.flags import L2_DECAY, NO_EPS_DIVISION, NO_SECOND_MOMENT
from .base import (FLAG_SWITCHES, Algorithm, check_bool, check_fusable, check_nonnegative, check_optional_bool,
                   group_by_device_and_dtype, new_step_counter, zeros_like, _as_number)


class SGD(Algorithm):
    """SGD. State per parameter: ``step`` and, when ``momentum != 0``, ``momentum_buffer``.

    The first step seeds the buffer with the gradient itself (no dampening), as torch.optim.SGD does.
    """

    name = "sgd"
    hyperparameters = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
                       "maximize": False, "fused": None}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_nonnegative(self.name, hp, "momentum")
        _as_number(self.name, "dampening", hp["dampening"])
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "nesterov", "maximize")
        check_optional_bool(self.name, hp, "fused")
        if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
            raise ValueError(f"{self.name}: nesterov=True requires momentum > 0 and dampening == 0, got "
                             f"momentum={hp['momentum']!r}, dampening={hp['dampening']!r}")

    #: torch.optim.SGD counts no steps (it marks the first by a missing buffer): ``step`` is not saved, and a
    #: loaded buffer means that the first step is past.
    unsaved_state = ("step",)

    def restore_unsaved(self, state: dict[str, Tensor]) -> None:
        if "momentum_buffer" in state:
            state["step"].fill_(1.0)

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
            _check_buffer(self.name, state)
            buf = state["momentum_buffer"]
            if state["step"].item() == 1:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - hp["dampening"])
            grad = grad.add(buf, alpha=momentum) if hp["nesterov"] else buf
        param.add_(grad, alpha=-lr)

    def check_local(self, param: Tensor, grad: Tensor, hp: Mapping[str, Any]) -> None:
        if not hp["fused"]:
            return
        check_fusable(self.name, param, grad)
        if param.device.type == "cpu" and param.dtype in (torch.bfloat16, torch.float16):
            raise RuntimeError(f"{self.name}: fused=True on the CPU is refused for {param.dtype}: torch's CPU fused "
                               "SGD kernel leaves parts of such tensors un-updated and writes wrong momentum "
                               "(pytorch/pytorch#191763). Use fused=False, or float32 parameters")

    def apply_many(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                   hp: Mapping[str, Any]) -> None:
        if not hp["fused"]:
            return super().apply_many(params, grads, states, hp)
        momentum = hp["momentum"]
        if momentum != 0:
            for state in states:
                _check_buffer(self.name, state)
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        options = {"weight_decay": float(hp["weight_decay"]), "momentum": float(momentum), "lr": hp["lr"],
                   "dampening": float(hp["dampening"]), "nesterov": hp["nesterov"], "maximize": hp["maximize"]}
        # The kernel seeds the buffers with the gradient when told that this is their first step; one flag per call,
        # so tensors at their first step (step 1) and the others run in separate calls.
        first = [momentum != 0 and step.item() == 1 for step in steps]
        for is_first in (True, False):
            chosen = [i for i, f in enumerate(first) if f is is_first]
            if not chosen:
                continue
            for indices in group_by_device_and_dtype([params[i] for i in chosen]):
                picked = [chosen[i] for i in indices]
                buffers = [states[i]["momentum_buffer"] for i in picked] if momentum != 0 else []
                torch._fused_sgd_([params[i] for i in picked], [grads[i] for i in picked], buffers,
                                  is_first_step=is_first, **options)


    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        refused = {"palm": NO_SECOND_MOMENT, "kourkoutas_beta": NO_SECOND_MOMENT, "atan2": NO_EPS_DIVISION,
                   "cautious_weight_decay": L2_DECAY, "decouple_lr": L2_DECAY}
        if hp["fused"]:
            refused.update({name: "fused=True runs torch's kernel for the whole step, with no place for a flag "
                            "between its parts; use fused=False" for name in FLAG_SWITCHES})
        return refused

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        return False

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        return float(hp["momentum"])

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        momentum, weight_decay = hp["momentum"], hp["weight_decay"]
        state["step"] += 1
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum == 0:
            return grad
        _check_buffer(self.name, state)
        buf = state["momentum_buffer"]
        if t.step == 1:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - hp["dampening"])
        return grad.add(buf, alpha=momentum) if hp["nesterov"] else buf.clone()


def _check_buffer(algo: str, state: dict[str, Tensor]) -> None:
    if "momentum_buffer" not in state:
        raise RuntimeError(f"{algo}: momentum was switched on after the first step; the momentum buffer does not "
                           "exist. Set momentum before training starts.")
