"""StableAdamW's parts: AdamW's moments in torch-optimi's debiased form, and the update clip by the RMS of
``g² / v̂`` over the whole tensor (a reduction under sharding). Wortsman et al., "Stable and low-precision training
for large-scale vision-language models", https://arxiv.org/abs/2304.13013, Algorithm 2."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..algos.optimi_moments import debias_beta
from .base import Transform, TensorStep


def _check_betas(hp: Mapping[str, Any]) -> None:
    betas = hp["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        raise ValueError(f"invalid betas={betas!r} (two numbers in [0, 1))")


def _check_nonnegative(hp: Mapping[str, Any], key: str) -> None:
    value = hp[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"invalid {key}={value!r} (must be a number >= 0)")


class ScaleByOptimiAdam(Transform):
    """Adam's direction ``m̂ / (sqrt(v̂) + eps)`` with optimi's debiased decays (the buffers hold ``m̂`` and ``v̂``).
    Keeps this step's input in ``extra["adam_input"]`` for :class:`ClipByStableRMS`."""

    name = "scale_by_optimi_adam"
    hyperparameters = {"betas": (0.9, 0.99), "eps": 1e-6}
    state_keys = ("exp_avg", "exp_avg_sq")
    # No ``second_moment``: its buffers hold the debiased v̂, which PaLM's and Kourkoutas-β's schedules do not define.

    def check(self, hp: Mapping[str, Any]) -> None:
        _check_betas(hp)
        _check_nonnegative(hp, "eps")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {key: torch.zeros_like(param, memory_format=torch.preserve_format) for key in self.state_keys}

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        beta1, beta2 = t.hp["betas"]
        b2 = debias_beta(beta2, t.step)
        t.state["exp_avg"].lerp_(t.u, 1 - debias_beta(beta1, t.step))
        t.state["exp_avg_sq"].mul_(b2).addcmul_(t.u, t.u, value=1 - b2)
        t.extra["adam_input"] = t.u
        return t.state["exp_avg"] / t.state["exp_avg_sq"].sqrt().add_(t.hp["eps"])


class ClipByStableRMS(Transform):
    """StableAdamW's clip: the step's learning rate (and decay) divided by ``max(1, RMS)``, the RMS of
    ``g² / max(v̂, eps²)`` over the whole tensor."""

    name = "clip_by_stable_rms"
    reductions = 1

    def partials(self, t: TensorStep) -> Tensor:
        g = t.extra["adam_input"]
        eps = t.hp["eps"]
        return g.square().div_(t.state["exp_avg_sq"].clamp(min=eps * eps)).sum().reshape(1)

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        rms = (totals[0] / t.numel).sqrt().item()
        t.lr_scale = 1 / max(1.0, rms)
        return None
