"""torch-optimi's way of keeping moments bias-corrected: the decay of step ``t`` is the debiased
``β̂_t = β (1 - β^(t-1)) / (1 - β^t)``, so the buffers hold ``m̂`` and ``v̂`` themselves (``m̂_1 = g_1`` exactly)."""

from __future__ import annotations


def debias_beta(beta: float, step: int) -> float:
    """optimi's ``debias_beta``, in its arithmetic (``(β^t - β) / (β^t - 1)``), so results match to the bit."""
    return (beta**step - beta) / (beta**step - 1)
