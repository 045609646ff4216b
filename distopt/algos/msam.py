"""MSAMLaProp, as HeavyBall 3.2.1's: Momentum-SAM (Becker et al., https://arxiv.org/abs/2401.12033) around an
RMSprop-normalized gradient (HeavyBall's name notwithstanding, the inner method is RMSprop, not LaProp).

The state ``z`` holds the descent point; the parameter holds ``z`` moved against the momentum's direction by
``sam_step_size`` (``p = z - s m / |m|``), where the next gradient is taken: SAM's perturbation at no extra pass.
``|m|`` is over each whole tensor: under sharding a reduction (one all_reduce per param group and step). As for
Schedule-Free, ``opt.eval()`` puts ``z`` in the parameters to evaluate and ``opt.train()`` puts the perturbed point
back (a swap on each rank's shard); the mode is saved with the param group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..transforms import flags
from ..transforms.base import TensorStep, Transform
from ..transforms.flags import SWITCHES
from .base import Algorithm, check_betas, check_bool, check_nonnegative, new_step_counter, zeros_like
from .heavyball_ema import debiased_ema_


class MSAMStep(Transform):
    """The descent on ``z`` and the perturbed parameter; the chain's own step is not taken."""

    name = "msam_step"
    reductions = 1

    def partials(self, t: TensorStep) -> Tensor:
        return t.u.square().sum().reshape(1)

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        hp = t.hp
        lr = hp["lr"] * t.step / max(t.step, flags.value(hp, "warmup_steps") + 1)
        z, m = t.state["z"], t.u
        z.mul_(1 - hp["weight_decay"] * lr).add_(m.to(z.dtype), alpha=-lr)
        norm = totals.reshape(()).sqrt().clamp(min=1e-8).to(m.dtype)
        t.param.copy_(z + m / norm * -hp["sam_step_size"])
        t.skip = True
        return None


MSAM_STEP = MSAMStep()


class MSAMLaProp(Algorithm):
    """MSAMLaProp. State per parameter: ``step``, ``exp_avg_sq`` and ``exp_avg`` (debiased, as HeavyBall keeps
    them), ``z``. Group: ``train_mode``. Defaults of HeavyBall's."""

    name = "msamlaprop"
    hyperparameters = {"lr": 0.0025, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.0, "sam_step_size": 0.1,
                       "train_mode": True}
    reduces = True
    schedule_free = True  # the eval/train swap of the parameter with z

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        for key in ("eps", "weight_decay", "sam_step_size"):
            check_nonnegative(self.name, hp, key)
        check_bool(self.name, hp, "train_mode")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg_sq": zeros_like(param), "exp_avg": zeros_like(param),
                "z": param.detach().clone(memory_format=torch.preserve_format)}

    def chained(self, hp: Mapping[str, Any]) -> bool:
        return True  # the norm of the momentum is a reduction of the chain runtime

    def core_transforms(self, hp: Mapping[str, Any]) -> tuple:
        return (MSAM_STEP,)

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "its step writes z and the perturbed parameter itself, past where the flag would act"
        return {name: reason for name in SWITCHES if name != "warmup_steps"}

    def check_local(self, param: Tensor, grad: Tensor, hp: Mapping[str, Any]) -> None:
        if not hp["train_mode"]:
            raise RuntimeError(f"{self.name}: step() in eval mode (the parameters hold z); call opt.train() before "
                               "training")

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = hp["betas"]
        v = debiased_ema_(state["exp_avg_sq"], grad * grad, beta2, step)
        return debiased_ema_(state["exp_avg"], grad / v.clamp_min(0).sqrt().clamp(min=hp["eps"]), beta1, step).clone()

    def swap(self, param: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any], train: bool) -> None:
        """Either way, the parameter and ``z`` trade places (HeavyBall's MSAM)."""
        if "z" in state:
            held = param.clone()
            param.copy_(state["z"])
            state["z"].copy_(held)

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        raise RuntimeError("msamlaprop runs through the optimizer's chain runtime")
