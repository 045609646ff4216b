"""HeavyBall's bias-corrected moving average: the buffer holds the debiased average itself, updated with the weight
``(1 - β) / (1 - β^t)`` (``1`` at the first step)."""

from __future__ import annotations

from torch import Tensor


def debiased_ema_(buffer: Tensor, value: Tensor, beta: float, step: int) -> Tensor:
    buffer.lerp_(value, (1 - beta) / (1 - beta**step))
    return buffer
