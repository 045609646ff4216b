"""optimi 0.3.3's Adan, Ranger and StableAdamW against torch-optimi itself, on the same gradients.

Adan's and Ranger's own steps repeat optimi's single-tensor arithmetic, so they are bitwise optimi's. Their chain
form (what runs when a flag is on: optimi's ``decouple_lr`` is one) forms the update ``u`` first and applies it in
one operation, where optimi adds two ``addcdiv`` terms (Adan) or folds the rectification into the scalar (Ranger):
each step rounds once more, so the parameters differ by a few units of the dtype relative to the distance moved,
``8 eps steps`` bounds it. StableAdamW is a chain (its RMS is a reduction): the same bound covers the RMS summed in
another order.
"""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import run_on_random_grads, worst

optimi = pytest.importorskip("optimi", reason="the test extra torch-optimi is required")

SHAPES = ((6, 5), (7,), (4, 4), (3, 1, 2), ())
STEPS = 13  # past Ranger's first rectified step (6) and two lookahead syncs


def run(make, dtype, steps=STEPS, spike=False):
    """A falling lr (so that lr / max_lr moves), and with ``spike`` a gradient 100 times larger at step 5."""
    return run_on_random_grads(make, SHAPES, steps, dtype, grad_scale=lambda step: 100.0 if spike and step == 4
                               else 1.0, lr_factor=0.9)[:2]


CASES = {
    "adan": ("Adan", dict(lr=1e-2, weight_decay=2e-2), True),
    "adan/decouple_lr": ("Adan", dict(lr=1e-2, weight_decay=0.1, decouple_lr=True), False),
    "adan/betas": ("Adan", dict(lr=1e-2, betas=(0.9, 0.8, 0.95), eps=1e-4, weight_decay=0.0), True),
    "ranger": ("Ranger", dict(lr=1e-2, weight_decay=1e-2, k=3, alpha=0.3), True),
    "ranger/l2": ("Ranger", dict(lr=1e-2, weight_decay=1e-2, decouple_wd=False), True),
    "ranger/decouple_lr": ("Ranger", dict(lr=1e-2, weight_decay=0.1, decouple_lr=True, k=4), False),
    "stableadamw": ("StableAdamW", dict(lr=1e-2, weight_decay=1e-2), False),
    "stableadamw/decouple_lr": ("StableAdamW", dict(lr=1e-2, weight_decay=0.1, decouple_lr=True), False),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # optimi's "potentially high" decay warning with decouple_lr
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_equals_optimi(case, dtype):
    name, hp, bitwise = CASES[case]
    spike = name == "StableAdamW"  # a gradient spike makes the RMS clip act
    start, ours = run(lambda ps: getattr(distopt, name)(ps, **hp), dtype, spike=spike)
    _, theirs = run(lambda ps: getattr(optimi, name)(ps, foreach=False, triton=False, **hp), dtype, spike=spike)
    if bitwise:
        assert worst(ours, theirs) == 0.0
    else:
        tolerance = 8 * torch.finfo(dtype).eps * STEPS * max(worst(ours, start), 1.0)
        assert worst(ours, theirs) <= tolerance, (worst(ours, theirs), tolerance)
    assert worst(ours, start) > 1e-3  # it moved


def test_stable_clip_acts_on_a_spike():
    """The clip is live: on the spike step StableAdamW moves less than AdamW with optimi's moments would."""
    hp = dict(lr=1e-2, weight_decay=0.0)
    _, clipped = run(lambda ps: distopt.StableAdamW(ps, **hp), torch.float64, spike=True)
    _, plain = run(lambda ps: optimi.AdamW(ps, foreach=False, triton=False, eps=1e-6, betas=(0.9, 0.99), **hp),
                   torch.float64, spike=True)
    assert worst(clipped, plain) > 1e-4


@pytest.mark.parametrize("name,bad,match", [
    ("Adan", dict(betas=(0.9, 0.9)), "betas"), ("Adan", dict(eps=-1.0), "eps"),
    ("Ranger", dict(k=0), "k=0"), ("Ranger", dict(alpha=1.5), "alpha"), ("StableAdamW", dict(betas=(1.0, 0.9)), "betas"),
    ("StableAdamW", dict(kahan_sum=True), "kahan_sum"), ("Ranger", dict(decouple_wd=False, decouple_lr=True, weight_decay=0.1), "decouple_lr")])
def test_bad_hyperparameters_are_named(name, bad, match):
    with pytest.raises(ValueError, match=match) as info:
        getattr(distopt, name)([torch.zeros(3, requires_grad=True)], **bad)
    assert name.lower() in str(info.value)
