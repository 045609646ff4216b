"""Simplified AdEMAMix against adv_optm 2.2.3's ``Simplified_AdEMAMix`` (the last release that has it; given by
``DISTOPT_ADV_OPTM_223_PATH``, see ``tests/authors.py``): the same arithmetic, so bitwise, in float64 and float32.

Where 2.2.3 is not given, the always-run test checks the maths against the formula of the seed page written out
here (our reading, so it cannot catch a misreading of adv_optm; the by-path test can)."""

from __future__ import annotations

import math

import pytest
import torch

import distopt
from tests.authors import load_adv_optm_223

SHAPES = ((7, 5), (3, 4, 6), (13,), ())
STEPS = 8


def run(make, dtype, steps=STEPS):
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    start = [p.detach().clone() for p in params]
    opt = make(params)
    gen = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(steps):
        grads.append([torch.randn(p.shape, generator=gen, dtype=dtype) for p in params])
        for p, g in zip(params, grads[-1]):
            p.grad = g.clone()
        opt.step()
    return start, [p.detach().clone() for p in params], grads


CASES = {"default": {}, "decay_alpha": dict(weight_decay=0.1, alpha_grad=5.0),
         "beta1_warmup": dict(beta1_warmup=5, min_beta1=0.8), "no_bias_correction": dict(use_bias_correction=False)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_equals_adv_optm_223(case, dtype):
    adv_optm_223 = load_adv_optm_223()
    hp = dict(lr=1e-3, **CASES[case])
    start, ours, _ = run(lambda ps: distopt.Simplified_AdEMAMix(ps, **hp), dtype)
    _, theirs, _ = run(lambda ps: adv_optm_223.Simplified_AdEMAMix(ps, stochastic_rounding=False, **hp), dtype)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert max((a - b).abs().max().item() for a, b in zip(ours, start)) > 1e-3


def formula(p, grads, lr, betas, eps, weight_decay, alpha):
    """The seed page's update: m accumulates, the bias corrections are running sums, lr / (Σβ1^j + α)."""
    b1, b2 = betas
    m, v, num, den = torch.zeros_like(p), torch.zeros_like(p), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        num, den = b1 * num + 1, b2 * den + (1 - b2)
        lr_t = lr / ((1 - b1**t) / (1 - b1) + alpha)
        m = b1 * m + g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr_t * weight_decay * p - lr_t * math.sqrt(den / num) * (m + alpha * g) / (v.sqrt() + eps * math.sqrt(den))
    return p


def test_matches_the_seed_formula():
    hp = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, alpha=5.0)
    start, ours, grads = run(lambda ps: distopt.Simplified_AdEMAMix(
        ps, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"], alpha_grad=hp["alpha"]),
        torch.float64)
    for i, p0 in enumerate(start):
        want = formula(p0, [g[i] for g in grads], **hp)
        torch.testing.assert_close(ours[i], want, rtol=1e-12, atol=1e-14)
