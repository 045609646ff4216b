"""Kourkoutas-β (Kassinos et al., https://arxiv.org/abs/2508.12996), as adv_optm 2.5.16 runs it: a second-moment
decay per layer from the ratio of the layer's gradient norm to its running average.

adv_optm's rule, restated: a "layer" is every tensor of one shape; at step ``t`` the layer's norm ``n`` of step
``t - 1``'s gradients (0 at the first step) updates ``r <- α r + (1 - α) n`` (no bias correction), ``s = x / (1 + x)``
with ``x = n / (r + tiny_spike)``, ``β2 = β2_max - (β2_max - beta2_min) s`` blended from ``β2_max`` over
``k_warmup_steps``; the bias correction keeps ``β2_max = betas[1]``. Differences from adv_optm, on purpose: a layer
is a shape *within one param group* (adv_optm pools same-shape tensors across groups), the norm is over the whole
tensor on every rank (adv_optm sums the local shard), and the pending sum of squares is saved with the state
(adv_optm loses it, so a resumed run differs at its first step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import flags
from .base import Transform, TensorStep


class Kourkoutas(Transform):
    name = "kourkoutas_beta"
    reductions = 1
    scalar_state = state_keys = ("kourkoutas_r_ema", "kourkoutas_sum_sq")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {key: torch.tensor(0.0, dtype=torch.float32) for key in self.scalar_state}

    def partials(self, t: TensorStep) -> Tensor:
        return t.u.float().square().sum().reshape(1)

    def pool(self, totals: Tensor, steps: list[TensorStep]) -> Tensor:
        layers: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(steps):
            layers.setdefault(t.shape, []).append(i)
        pooled = totals.clone()
        for members in layers.values():
            pooled[members] = totals[members].sum(0)
        return pooled

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        hp = t.hp
        beta2_max = float(hp["betas"][1])
        beta2_min, alpha = float(flags.value(hp, "beta2_min")), float(flags.value(hp, "ema_alpha"))
        r_ema, pending = t.state["kourkoutas_r_ema"], t.state["kourkoutas_sum_sq"]
        norm = pending.sqrt()
        r_ema.mul_(alpha).add_(norm * (1 - alpha))
        ratio = norm / (r_ema + float(flags.value(hp, "tiny_spike")))
        sunspike = float(ratio / (1 + ratio))
        target = beta2_max - (beta2_max - beta2_min) * sunspike
        warmup = flags.value(hp, "k_warmup_steps")
        weight = min(1.0, (t.step - 1) / warmup) if warmup > 0 else 1.0
        t.beta2 = (1 - weight) * beta2_max + weight * target
        t.bias_correction2 = 1 - beta2_max**t.step
        pending.copy_(totals[0])
        return None
