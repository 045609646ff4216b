"""The flags that HeavyBall lacks, against the library that has them: adv_optm 2.5.16 (Adam-atan2 on AdamW and
ADOPT, OrthoGrad, Kourkoutas-β, cautious weight decay), torch-optimi 0.3.3 (``decouple_lr``), and, for Grams and
LaProp with atan2 (in none of the installed libraries), loops from the papers in ``tests/reference.py``.

adv_optm and optimi run in float32 (adv_optm's OrthoGrad and Kourkoutas-β sums are float32 whatever the input), so
both sides run float32 with the same gradients, stochastic rounding off: they differ by the rounding of a few
operations per step in another order, bounded by ``8 * steps`` float32 units of the largest parameter (measured:
at most 4). Each test checks that the flag moves the result by far more than that.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import distopt
from tests.same_grads import worst
from tests import reference

adv_optm = pytest.importorskip("adv_optm", reason="the test extra adv-optm==2.5.16 is required")
optimi = pytest.importorskip("optimi", reason="the test extra torch-optimi==0.3.3 is required")

# Two tensors of one shape: adv_optm's Kourkoutas-β pools them into one layer.
SHAPES = ((6, 5), (7,), (4, 4), (3, 1, 2), (6, 5))
STEPS = 6


def run(make, steps=STEPS, dtype=torch.float32, schedule=None):
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    start = [p.detach().clone() for p in params]
    opt = make(params)
    scheduler = schedule(opt) if schedule else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
        if scheduler:
            scheduler.step()
    return start, [p.detach().clone() for p in params]


def check(ours, theirs, plain):
    scale = max(p.abs().max().item() for p in ours)
    tolerance = 8 * STEPS * torch.finfo(torch.float32).eps * scale
    assert worst(ours, theirs) <= tolerance, (worst(ours, theirs), tolerance)
    assert worst(ours, plain) > 100 * tolerance, "the flag changed nothing measurable"


ADAMW_CASES = {
    "atan2": (dict(atan2=True), dict(use_atan2=True)),
    "orthograd": (dict(orthograd=True), dict(orthogonal_gradient="flattened")),
    "kourkoutas": (dict(kourkoutas_beta=True), dict(kourkoutas_beta=True)),
    "kourkoutas_settings": (dict(kourkoutas_beta=True, k_warmup_steps=3, beta2_min=0.88, ema_alpha=0.9,
                                 tiny_spike=1e-6),
                            dict(kourkoutas_beta=True, k_warmup_steps=3, beta2_min=0.88, ema_alpha=0.9,
                                 tiny_spike=1e-6)),
    "cautious_wd": (dict(cautious_weight_decay=True), dict(cautious_wd=True)),
    "orthograd_atan2_kourkoutas": (dict(orthograd=True, atan2=True, kourkoutas_beta=True),
                                   dict(orthogonal_gradient="flattened", use_atan2=True, kourkoutas_beta=True)),
}


@pytest.mark.parametrize("name", ADAMW_CASES)
def test_adamw_flag_equals_adv_optm(name):
    ours_flags, their_flags = ADAMW_CASES[name]
    hp = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    _, ours = run(lambda ps: distopt.DistributedOptimizer(ps, "adamw", **hp, **ours_flags))
    _, theirs = run(lambda ps: adv_optm.AdamW_adv(ps, **hp, stochastic_rounding=False, **their_flags))
    _, plain = run(lambda ps: distopt.DistributedOptimizer(ps, "adamw", **hp))
    check(ours, theirs, plain)


def test_adopt_atan2_equals_adv_optm():
    """adv_optm's ADOPT with atan2 steps at once (no initialization-only first step): so does distopt's."""
    hp = dict(lr=0.01, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.1)
    _, ours = run(lambda ps: distopt.DistributedOptimizer(ps, "adopt", decouple=True, atan2=True, **hp))
    _, theirs = run(lambda ps: adv_optm.Adopt_adv(ps, **hp, use_atan2=True, stochastic_rounding=False))
    _, plain = run(lambda ps: distopt.DistributedOptimizer(ps, "adopt", decouple=True, **hp))
    check(ours, theirs, plain)


def test_decouple_lr_equals_optimi_under_a_schedule():
    """optimi's fully decoupled decay, ``p (1 - (lr / max_lr) wd)``, with the lr falling by a scheduler."""
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=2e-3)
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))  # noqa: E731
    _, ours = run(lambda ps: distopt.DistributedOptimizer(ps, "adamw", decouple_lr=True, **hp), schedule=schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, theirs = run(lambda ps: optimi.AdamW(ps, decouple_lr=True, foreach=False, **hp), schedule=schedule)
    _, plain = run(lambda ps: distopt.DistributedOptimizer(ps, "adamw", **hp), schedule=schedule)
    check(ours, theirs, plain)


def _grads_float64():
    gen = torch.Generator().manual_seed(1)
    grads = [[] for _ in SHAPES]
    for _ in range(STEPS):
        for i, s in enumerate(SHAPES):
            grads[i].append(torch.randn(s, generator=gen, dtype=torch.float64))
    return grads


def test_laprop_atan2_equals_the_paper_loop():
    """No library has LaProp with atan2: a loop from the two papers, with adv_optm's constants."""
    hp = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    start, ours = run(lambda ps: distopt.DistributedOptimizer(ps, "laprop", atan2=True, **hp), dtype=torch.float64)
    expected = [reference.laprop_atan2(p, g, **hp)[-1] for p, g in zip(start, _grads_float64())]
    _, plain = run(lambda ps: distopt.DistributedOptimizer(ps, "laprop", **hp), dtype=torch.float64)
    assert worst(ours, expected) <= 1e-12 * worst(ours, start)
    assert worst(ours, plain) > 1e-6


def test_grams_equals_the_paper_loop():
    hp = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    start, ours = run(lambda ps: distopt.DistributedOptimizer(ps, "adamw", grams=True, **hp), dtype=torch.float64)
    expected = [reference.adamw_grams(p, g, **hp)[-1] for p, g in zip(start, _grads_float64())]
    _, plain = run(lambda ps: distopt.DistributedOptimizer(ps, "adamw", **hp), dtype=torch.float64)
    assert worst(ours, expected) <= 1e-12 * worst(ours, start)
    assert worst(ours, plain) > 1e-6
