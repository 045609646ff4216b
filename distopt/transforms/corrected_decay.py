"""AdamC's corrected weight decay (Defazio et al., "Why Gradients Rapidly Increase Near the End of Training",
https://arxiv.org/abs/2506.02285), as HeavyBall 3.2.1 applies it: the decay of a step at learning rate ``lr_t`` is
``lr_t wd (lr_t / max_lr)``, so that it follows the schedule. ``max_lr`` is the constructor's ``lr`` when not given;
with a constant lr AdamC is AdamW."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .base import Transform, TensorStep


class CorrectedDecay(Transform):
    name = "corrected_decay"
    hyperparameters = {"max_lr": None}

    def check(self, hp: Mapping[str, Any]) -> None:
        if hp.get("max_lr") is None and isinstance(hp, dict):
            hp["max_lr"] = float(hp["lr"])  # HeavyBall's: the lr the optimizer was built with
        if hp.get("decouple_lr"):
            raise ValueError("flag decouple_lr cannot apply: its corrected decay already divides by max_lr")

    @staticmethod
    def decay_scale(hp: Mapping[str, Any], lr: float) -> float:
        return lr / hp["max_lr"]

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        return None
