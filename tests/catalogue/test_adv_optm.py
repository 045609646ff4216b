"""adv_optm 2.5.16's Lion-k, SignSGD and SinkSGD against adv_optm itself (stochastic rounding off: it only acts on
bfloat16 parameters), same gradients.

SignSGD and SinkSGD repeat adv_optm's arithmetic (SinkSGD's Sinkhorn on the matrix's owner): bitwise. Lion-k with
``kappa_p != 1`` divides by the norm of the whole tensor, summed by the chain runtime in float32 partials (float64
for float64 tensors) where adv_optm takes ``torch.norm``: a few units of the dtype per step of the distance moved,
``8 eps steps`` bounds it. Plain Lion (``kappa_p = 1``) is distopt's Lion, whose decoupled decay multiplies where
adv_optm adds ``-lr wd p``: the same bound.
"""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import run_on_random_grads, worst

adv_optm = pytest.importorskip("adv_optm", reason="the test extra adv-optm==2.5.16 is required")

SHAPES = ((7, 5), (3, 4, 6), (13,), (5, 9), (2, 3, 2, 2), ())
STEPS = 8


def run(make, dtype):
    return run_on_random_grads(make, SHAPES, STEPS, dtype)


CASES = {
    "lion": ("Lion", "Lion_adv", dict(lr=1e-2, weight_decay=0.1), False),
    "lion/kappa2": ("Lion", "Lion_adv", dict(lr=1e-2, kappa_p=2.0), False),
    "lion/kappa1.5": ("Lion", "Lion_adv", dict(lr=1e-2, kappa_p=1.5, weight_decay=0.1), False),
    "lion/auto": ("Lion", "Lion_adv", dict(lr=1e-2, auto_kappa_p=True), False),
    "signsgd": ("SignSGD", "SignSGD_adv", dict(lr=1e-2, weight_decay=0.1), True),
    "signsgd/plain": ("SignSGD", "SignSGD_adv", dict(lr=1e-2, momentum=0.0), True),
    "signsgd/nesterov": ("SignSGD", "SignSGD_adv", dict(lr=1e-2, nesterov=True, nesterov_coef=0.7), True),
    "signsgd/normed": ("SignSGD", "SignSGD_adv", dict(lr=1e-2, normed_momentum=True, nesterov=True), True),
    "sinksgd": ("SinkSGD", "SinkSGD_adv", dict(lr=1e-2), True),
    "sinksgd/momentum": ("SinkSGD", "SinkSGD_adv", dict(lr=1e-2, momentum=0.9, weight_decay=0.1), True),
    "sinksgd/nesterov": ("SinkSGD", "SinkSGD_adv", dict(lr=1e-2, momentum=0.8, nesterov=True,
                                                        sinkhorn_iterations=2), True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_equals_adv_optm(case, dtype):
    ours_name, their_name, hp, bitwise = CASES[case]
    start, ours, opt = run(lambda ps: getattr(distopt, ours_name)(ps, compile=False, **hp), dtype)
    _, theirs, _ = run(lambda ps: getattr(adv_optm, their_name)(ps, stochastic_rounding=False, **hp), dtype)
    if bitwise:
        assert worst(ours, theirs) == 0.0
    else:
        assert worst(ours, theirs) <= 8 * torch.finfo(dtype).eps * STEPS * max(worst(ours, start), 1.0)
    assert worst(ours, start) > 1e-3
    if ours_name == "SinkSGD":  # matrices on the owner route, vectors and scalars on their shards
        assert [spec.meta.shape for spec in opt.plan.matrices] == [(7, 5), (3, 4, 6), (5, 9), (2, 3, 2, 2)]


def test_sinkhorn_balances_rows_and_columns():
    """The owner's result has every row (the last half-step) at RMS 1 and columns close to it: the maths, not
    only the agreement with adv_optm."""
    from distopt.algos.sink_sgd import sinkhorn

    x = sinkhorn(torch.randn(6, 9, dtype=torch.float64) * torch.rand(6, 1, dtype=torch.float64), 20)
    assert torch.allclose(x.square().mean(1), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(x.square().mean(0), torch.ones(9, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("name,bad,match", [
    ("Lion", dict(kappa_p=3.0), "kappa_p"), ("SignSGD", dict(momentum=1.5), "momentum"),
    ("SinkSGD", dict(sinkhorn_iterations=-1), "sinkhorn_iterations"), ("SignSGD", dict(nesterov_coef=2.0),
                                                                         "nesterov_coef")])
def test_bad_hyperparameters_are_named(name, bad, match):
    with pytest.raises(ValueError, match=match) as info:
        getattr(distopt, name)([torch.zeros(3, requires_grad=True)], **bad)
    assert name.lower() in str(info.value)


@pytest.mark.parametrize("name", ["Prodigy", "SignSGD", "SinkSGD", "AdaMuon"])
def test_bfloat16_writes_round_stochastically_by_default_as_in_adv_optm(name):
    """adv_optm's ``stochastic_rounding=True`` default: on for groups of bfloat16 parameters, absent for float32
    ones (where it cannot apply), and a write the call or the group chooses is kept."""
    low, wide = torch.nn.Parameter(torch.randn(8, 8).bfloat16()), torch.nn.Parameter(torch.randn(8, 8))
    make = getattr(distopt, name)
    groups = make([{"params": [low]}, {"params": [wide]}]).param_groups
    assert groups[0]["stochastic_rounding"] is True and not groups[1].get("stochastic_rounding")
    assert not make([low], kahan_sum=True).param_groups[0].get("stochastic_rounding")
    assert not make([{"params": [low], "kahan_sum": True}]).param_groups[0].get("stochastic_rounding")
    assert not make([low], stochastic_rounding=False).param_groups[0].get("stochastic_rounding")
