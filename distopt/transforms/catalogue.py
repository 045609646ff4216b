"""The catalogue's algorithms that are chains of transforms (those whose maths reads a number of the whole tensor,
or of every tensor, and so needs the chain runtime's reductions)."""

from __future__ import annotations

from .cores import ScaleByAdam
from .corrected_decay import CorrectedDecay
from .custom import HEAVYBALL_DEFAULTS, Chain
from .prodigy import EstimateProdigyD, ScaleByProdigy
from .stable import ClipByStableRMS, ScaleByOptimiAdam


def stable_adamw() -> Chain:
    """torch-optimi's StableAdamW: AdamW whose step is clipped by the RMS of ``g² / v̂`` over each whole tensor
    (optimi's defaults; optimi has no default ``lr``, distopt's is 1e-3)."""
    return Chain("stableadamw", [ScaleByOptimiAdam(), ClipByStableRMS()],
                 {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 1e-2, "eps": 1e-6, "maximize": False})


def prodigy() -> Chain:
    """adv_optm's Prodigy_adv (Prodigy, https://arxiv.org/abs/2306.06101): Adam at the step size ``d lr``, with
    ``d`` estimated from statistics summed over every parameter of the group on every rank (adv_optm's defaults)."""
    return Chain("prodigy", [ScaleByProdigy(), EstimateProdigyD()],
                 {"lr": 1.0, "weight_decay": 0.0, "maximize": False})


def adamc() -> Chain:
    """HeavyBall's AdamC: its AdamW (eps floors sqrt(v̂)) with the decay corrected by ``lr_t / max_lr``."""
    return Chain("adamc", [ScaleByAdam(), CorrectedDecay()], HEAVYBALL_DEFAULTS)
