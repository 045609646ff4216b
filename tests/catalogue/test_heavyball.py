"""HeavyBall 3.2.1's AdamC, HyperBallAdamW, SUDSAdamW and Scion against HeavyBall itself, same gradients, float64
(HeavyBall's states in float64 too: ``storage_dtype="float64"``; its compiler off).

HeavyBall computes its step scalars as float32 tensors even for float64 parameters (the lr 0.01 becomes
0.009999999776, the debiased betas are rounded to float32), distopt in float64: relative differences of about 3e-8
per step in the scalars, so the parameters differ by at most 1e-6 of the distance moved after 6 steps (measured:
at most 4e-8 absolute). A learning-rate schedule runs, so that AdamC's corrected decay acts. On float32 parameters
HeavyBall's Newton-Schulz rounds stochastically to bfloat16 (Scion), so the comparison is in float64 only.
"""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import run_on_random_grads, worst

heavyball = pytest.importorskip("heavyball", reason="the test extra heavyball==3.2.1 is required")
heavyball.utils.compile_mode = None

SHAPES = ((6, 5), (7,), (4, 4), (3, 1, 2), (2, 3, 2, 2), ())
STEPS = 6


def run(make, schedule=False):
    return run_on_random_grads(make, SHAPES, STEPS, lr_factor=0.8 if schedule else None)


CASES = {
    "adamc": ("AdamC", dict(weight_decay=0.5)),
    "adamc/max_lr+warmup+caution": ("AdamC", dict(weight_decay=0.5, max_lr=0.02, warmup_steps=2, caution=True)),
    "hyperballadamw": ("HyperBallAdamW", dict(weight_decay=0.1)),
    "sudsadamw": ("SUDSAdamW", dict(weight_decay=0.1, precond_lr=0.1)),
    "scion": ("Scion", dict(weight_decay=0.1, scale=2.0)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # HeavyBall's notes on max_lr and changing learning rates
@pytest.mark.parametrize("case", CASES)
def test_equals_heavyball(case):
    name, hp = CASES[case]
    schedule = name == "AdamC"
    start, ours, opt = run(lambda ps: getattr(distopt, name)(ps, lr=0.01, **hp), schedule)
    _, theirs, _ = run(lambda ps: getattr(heavyball, name)(ps, lr=0.01, storage_dtype="float64", **hp), schedule)
    moved = worst(ours, start)
    assert worst(ours, theirs) <= 1e-6 * moved, (worst(ours, theirs), moved)
    assert moved > 1e-2
    on_owner = {"SUDSAdamW": 6, "Scion": 6}.get(name, 0)
    assert len(opt.plan.matrices if opt.plan else []) == on_owner


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adamc_is_adamw_when_the_lr_does_not_move_and_not_otherwise():
    """Against HeavyBall's AdamW maths (eps floors sqrt(v̂)) built from the same core part."""
    from distopt.transforms.cores import ScaleByAdam

    hp = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.5)
    _, constant, _ = run(lambda ps: distopt.AdamC(ps, **hp))
    _, adamw, _ = run(lambda ps: distopt.DistributedOptimizer(ps, distopt.Chain("hb_adamw", [ScaleByAdam()]), **hp))
    assert worst(constant, adamw) == 0.0
    _, scheduled, _ = run(lambda ps: distopt.AdamC(ps, **hp), schedule=True)
    _, adamw_scheduled, _ = run(lambda ps: distopt.DistributedOptimizer(
        ps, distopt.Chain("hb_adamw", [ScaleByAdam()]), **hp), schedule=True)
    assert worst(scheduled, adamw_scheduled) > 1e-3


def test_hyperball_keeps_matrices_on_their_initial_sphere():
    start, ours, _ = run(lambda ps: distopt.HyperBallAdamW(ps, lr=0.05, weight_decay=0.1))
    for p0, p in zip(start, ours):
        if p.ndim >= 2:
            assert p.norm().item() == pytest.approx(p0.norm().item(), rel=1e-12)


def test_scion_starts_from_heavyballs_initialization_whatever_the_parameters_held():
    _, a, _ = run(lambda ps: distopt.Scion(ps, lr=0.0))
    assert all((p == 0).all() for p in a if p.ndim < 2)
    gen = torch.Generator().manual_seed(5)
    other = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    opt = distopt.Scion(other, lr=0.0)
    for p in other:
        p.grad = torch.ones_like(p)
    opt.step()
    assert worst([p.detach() for p in other], a) == 0.0


@pytest.mark.parametrize("name,bad,match", [("AdamC", dict(max_lr=-1.0), "max_lr"), ("SUDSAdamW", dict(precond_lr=-1.0), "precond_lr"),
                                            ("Scion", dict(betas=(1.5, 0.9)), "betas"),
                                            ("AdamC", dict(decouple_lr=True), "decouple_lr")])
def test_bad_hyperparameters_are_named(name, bad, match):
    with pytest.raises(ValueError, match=match) as info:
        getattr(distopt, name)([torch.zeros(3, requires_grad=True)], **bad)
    assert name.lower() in str(info.value)
