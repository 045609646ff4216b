"""Schedule-Free AdamW, as HeavyBall 3.2.1's SFAdamW. Defazio et al., "The Road Less Scheduled",
https://arxiv.org/abs/2405.15682 (the authors' code: the ``schedulefree`` package).

The parameter holds ``y`` (where gradients are taken) in train mode, and ``x`` (the average, where to evaluate)
after ``opt.eval()``; ``z`` is in the state. ``opt.train()`` and ``opt.eval()`` swap them on each rank's shard
(``y = lerp(x, z, 1 - β1)``, elementwise, no communication); the mode lives in the param group, so a checkpoint
taken in eval mode records it, and ``opt.train()`` after loading goes back to ``y``.

HeavyBall's arithmetic: its warm-up ``lr t / max(t, warmup_steps + 1)`` (the ``warmup_steps`` flag) also weights
the average, ``c_t = w_t / Σw`` with ``w_t = lr_t^weight_lr_power t^r``; eps floors ``sqrt(v̂)``. Its scalars are
float32 tensors, distopt's float64 numbers (the difference is bounded in the tests). The schedulefree package adds
eps instead, warms up as ``(k + 1) / warmup_steps`` and weights with the largest lr so far.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..transforms import flags
from ..transforms.flags import SWITCHES
from .base import Algorithm, check_betas, check_bool, check_nonnegative, new_step_counter, zeros_like

NO_FLAGS = "its step is the schedule-free interpolation, which the chain's last step does not express"


class SFAdamW(Algorithm):
    """Schedule-Free AdamW. State per parameter: ``step``, ``exp_avg_sq`` (v̂, debiased as HeavyBall keeps it),
    ``z``, ``weight_sum`` (Σw, a float64 scalar). Group: ``train_mode``. Defaults of HeavyBall's SFAdamW."""

    name = "sfadamw"
    hyperparameters = {"lr": 0.0025, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.0, "r": 0.0,
                       "weight_lr_power": 2.0, "train_mode": True}
    scalar_state = ("step", "weight_sum")
    schedule_free = True

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        for key in ("eps", "weight_decay", "r", "weight_lr_power"):
            check_nonnegative(self.name, hp, key)
        check_bool(self.name, hp, "train_mode")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg_sq": zeros_like(param),
                "z": param.detach().clone(memory_format=torch.preserve_format),
                "weight_sum": torch.tensor(0.0, dtype=torch.float64)}

    def chained(self, hp: Mapping[str, Any]) -> bool:
        return False  # its own step reads warmup_steps, the one flag it takes

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {name: NO_FLAGS for name in SWITCHES if name != "warmup_steps"}

    def check_local(self, param: Tensor, grad: Tensor, hp: Mapping[str, Any]) -> None:
        if not hp["train_mode"]:
            raise RuntimeError(f"{self.name}: step() in eval mode (the parameters hold the average x); call "
                               "opt.train() before training")

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        beta1, beta2 = hp["betas"]
        state["step"] += 1
        step = int(state["step"].item())
        warmup = flags.value(hp, "warmup_steps")
        lr = hp["lr"] * step / max(step, warmup + 1)
        weight = abs(lr) ** hp["weight_lr_power"] * max(step, 1) ** hp["r"]
        state["weight_sum"] += weight
        total = state["weight_sum"].item()
        c = weight / total if total != 0 else 0.0
        a = (1 - beta2) / (1 - beta2**step)  # HeavyBall's debiased EMA: v̂ <- v̂ (1 - a) + g² a
        v = state["exp_avg_sq"]
        v.mul_(1 - a).add_(grad * grad, alpha=a)
        u = grad / v.clamp_min(0).sqrt().clamp(min=hp["eps"])
        if hp["weight_decay"] != 0:
            u.add_(param, alpha=hp["weight_decay"])
        z = state["z"]
        param.lerp_(z, c)
        param.add_(u, alpha=lr * (beta1 * (1 - c)) - lr)
        z.add_(u, alpha=-lr)

    def swap(self, param: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any], train: bool) -> None:
        """``eval``: ``x = lerp(y, z, 1 - 1/β1)``; ``train``: ``y = lerp(x, z, 1 - β1)``."""
        beta1 = hp["betas"][0]
        if beta1 <= 0 or "z" not in state:
            return
        param.lerp_(state["z"], 1 - beta1 if train else 1 - 1 / beta1)
