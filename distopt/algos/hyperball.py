"""HyperBallAdamW, as HeavyBall 3.2.1's: an RMSprop-normalized gradient (no first moment, ``betas[0]`` unused), and
for tensors of two or more dimensions a step on the sphere of the parameter's initial norm ``R``: the direction
(weight decay added to it) normalized over the whole tensor and scaled by ``R``, then the parameter projected back
onto the sphere. Vectors take a plain decoupled step.

Under sharding the norms are reductions (one all_reduce per param group and step): each shard sends
``|v|², <p, v>, |p|²``, from which the stepped parameter's norm follows without a second round,
``|p - a v|² = |p|² - 2 a <p, v> + a² |v|²``. ``R`` is ``|p|`` at the first step, kept per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..transforms.base import Transform, TensorStep
from ..transforms.flags import SWITCHES
from .base import Algorithm, check_betas, check_nonnegative, new_step_counter, zeros_like
from .heavyball_ema import debiased_ema_


class HyperBallStep(Transform):
    """The sphere step of tensors with two or more dimensions; vectors pass through to the chain's plain step."""

    name = "hyperball_step"
    reductions = 3

    def partials(self, t: TensorStep) -> Tensor:
        if len(t.shape) < 2:
            return torch.zeros(3, dtype=t.u.dtype, device=t.u.device)
        p = t.param if t.param.dtype == t.u.dtype else t.param.to(t.u.dtype)
        return torch.stack([t.u.square().sum(), (p * t.u).sum(), p.square().sum()])

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor | None:
        if len(t.shape) < 2:
            return None
        # On the device, as 0-d tensors: reading the sums on the host would wait for the device every tensor.
        totals = totals.to(torch.float64)
        v_sq, p_dot_v, p_sq = totals.unbind(0)
        radius = t.state["init_norm"]
        if t.step == 1:
            radius.copy_(p_sq.sqrt())
        r = radius.to(totals.device)
        a = t.hp["lr"] * r / v_sq.sqrt().clamp(min=1e-12)  # the step along v
        new_norm = (p_sq - 2 * a * p_dot_v + a * a * v_sq).clamp(min=0.0).sqrt()
        k = r / new_norm.clamp(min=1e-12)
        t.param.mul_(k.to(t.param.dtype)).sub_(t.u.to(t.param.dtype) * (a * k).to(t.param.dtype))
        t.skip = True  # the parameter is written: the chain's own step is not taken
        return None


HYPERBALL_STEP = HyperBallStep()
WRITES_PARAM = "its sphere step writes the parameter itself, past where a flag would act"


class HyperBallAdamW(Algorithm):
    """HyperBallAdamW. State per parameter: ``step``, ``exp_avg_sq`` (v̂, debiased as HeavyBall keeps it),
    ``init_norm`` (``R``, a float64 scalar). Defaults of HeavyBall's."""

    name = "hyperballadamw"
    hyperparameters = {"lr": 0.0025, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}
    scalar_state = ("step", "init_norm")
    reduces = True

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg_sq": zeros_like(param),
                "init_norm": torch.tensor(0.0, dtype=torch.float64, device=param.device)}

    def chained(self, hp: Mapping[str, Any]) -> bool:
        return True  # its norms are reductions of the chain runtime

    def core_transforms(self, hp: Mapping[str, Any]) -> tuple:
        return (HYPERBALL_STEP,)

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {name: WRITES_PARAM for name in SWITCHES}

    def decays(self, hp: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
        return len(shape) < 2  # matrices take their decay inside the direction

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        state["step"] += 1
        v = debiased_ema_(state["exp_avg_sq"], grad * grad, hp["betas"][1], int(state["step"].item()))
        u = grad / v.clamp_min(0).sqrt().clamp(min=hp["eps"])
        if len(t.shape) >= 2 and hp["weight_decay"] != 0:
            u.add_(param, alpha=hp["weight_decay"])
        return u

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        raise RuntimeError("hyperballadamw runs through the optimizer's chain runtime")
