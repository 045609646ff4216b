"""Prodigy against the original (prodigyopt) and against adv_optm 2.5.16's Prodigy_adv, on the same gradients of a
noisy quadratic (so that ``d`` grows over the run).

prodigyopt sums its statistics in float64, like distopt on float64 parameters; its one difference of maths is that
the new ``d`` enters the ``d eps`` term of the same step (distopt and adv_optm use it from the next step). With
``eps`` negligible (1e-300) that term vanishes and the two agree to float64 rounding: 1e-9 of the distance moved.
adv_optm sums the statistics in float32 even for float64 parameters (its ``.float()``), and the numerator
``<g, p0 - p>`` cancels (``p`` moves little from ``p0`` at first), so its ``d`` differs by about 1e-7 relative and
the parameters by up to 1e-3 of the distance moved after 20 steps; ``d`` is checked to 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import worst

SHAPES = ((7, 5), (3, 4, 6), (13,), (5, 9), ())
STEPS = 20


def run(make, steps=STEPS, groups=False):
    torch.manual_seed(0)
    start = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    target = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    params = [p.clone().requires_grad_() for p in start]
    opt = make(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, t in zip(params, target):
            p.grad = (p.detach() - t) + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return start, [p.detach() for p in params], opt


ORIGINAL = {"wd": dict(weight_decay=0.1, slice_p=1), "slice_p": dict(slice_p=11),
            "safeguard": dict(slice_p=3, safeguard_warmup=True, d_coef=2.0, growth_rate=1.3),
            "beta3": dict(beta3=0.9, betas=(0.8, 0.99), d0=1e-4, slice_p=1)}  # prodigyopt: slice_p=1


@pytest.mark.parametrize("case", ORIGINAL)
def test_equals_prodigyopt(case):
    prodigyopt = pytest.importorskip("prodigyopt", reason="the test extra prodigyopt is required")
    hp = dict(eps=1e-300, **ORIGINAL[case])
    start, ours, opt = run(lambda ps: distopt.Prodigy(ps, **hp))
    _, theirs, their_opt = run(lambda ps: prodigyopt.Prodigy(ps, **hp))
    moved = worst(ours, start)
    assert worst(ours, theirs) <= 1e-9 * moved, (worst(ours, theirs), moved)
    assert opt.param_groups[0]["d"] == pytest.approx(their_opt.param_groups[0]["d"], rel=1e-9)
    assert opt.param_groups[0]["d"] > 100 * hp.get("d0", 1e-6)  # d grew


ADV = {"default": dict(d0=1e-2, weight_decay=0.1), "limiter": dict(d0=1e-2, growth_rate=1.5, d_limiter=True),
       "prodigy_steps": dict(d0=1e-2, prodigy_steps=3), "no_momentum": dict(d0=1e-2, betas=(0.0, 0.999)),
       "nesterov": dict(d0=1e-2, eps=None, nesterov=True, beta3=0.9)}


@pytest.mark.parametrize("case", ADV)
def test_equals_adv_optm(case):
    adv_optm = pytest.importorskip("adv_optm", reason="the test extra adv-optm==2.5.16 is required")
    hp = ADV[case]
    start, ours, opt = run(lambda ps: distopt.Prodigy(ps, **hp))
    _, theirs, their_opt = run(lambda ps: adv_optm.Prodigy_adv(ps, stochastic_rounding=False, **hp))
    assert opt.param_groups[0]["d"] == pytest.approx(their_opt.param_groups[0]["d"], rel=1e-5)
    assert worst(ours, theirs) <= 1e-3 * worst(ours, start)
    if case == "prodigy_steps":  # d frozen after three estimates
        assert opt.param_groups[0]["k"] == STEPS


def test_d_is_saved_with_the_group_and_resumes():
    _, _, opt = run(lambda ps: distopt.Prodigy(ps, d0=1e-3), steps=5)
    saved = opt.state_dict()
    group = saved["param_groups"][0]
    assert group["d"] == opt.param_groups[0]["d"] and group["k"] == 5 and group["d_numerator"] != 0
    copies = [torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    resumed = distopt.Prodigy(copies, d0=1e-3)
    resumed.load_state_dict(saved)
    for _ in range(3):
        for p, q in zip(opt.param_groups[0]["params"], copies):
            p.grad = torch.randn(p.shape, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(opt.param_groups[0]["params"], copies))
    assert resumed.param_groups[0]["d"] == opt.param_groups[0]["d"]


@pytest.mark.parametrize("bad,match", [(dict(d0=0.0), "d0"), (dict(slice_p=0), "slice_p"),
                                       (dict(growth_rate=-1.0), "growth_rate"), (dict(beta3=1.5), "beta3"),
                                       (dict(prodigy_steps=-1), "prodigy_steps")])
def test_bad_hyperparameters_are_named(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        distopt.Prodigy([torch.zeros(3, requires_grad=True)], **bad)
    assert "prodigy" in str(info.value)
