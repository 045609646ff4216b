"""Lion, LaProp, ADOPT and AdEMAMix match loops written from their papers (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.reference import PAPER_CONFIGS, PAPER_LOOPS, PAPER_TOLERANCE

CASES = [(name, i, kwargs) for name, configs in PAPER_CONFIGS.items() for i, kwargs in enumerate(configs)]
CONSTRUCTORS = {"lion": distopt.Lion, "laprop": distopt.LaProp, "adopt": distopt.ADOPT, "ademamix": distopt.AdEMAMix}


@pytest.mark.parametrize("name,index,kwargs", CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_matches_paper_loop(name, index, kwargs):
    init = torch.randn(6, 5, dtype=torch.float64)
    grads = [torch.randn(6, 5, dtype=torch.float64) for _ in range(10)]
    expected = PAPER_LOOPS[name](init.clone(), grads, **kwargs)
    p = init.clone().requires_grad_()
    opt = CONSTRUCTORS[name]([p], **kwargs)
    for g, want in zip(grads, expected):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), want, **PAPER_TOLERANCE)


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_float32_tracks_the_float64_reference(name):
    """In float32 the same maths drifts only by float32 rounding: a sanity bound, not a bitwise claim."""
    init = torch.randn(16, 8, dtype=torch.float64)
    grads = [torch.randn(16, 8, dtype=torch.float64) for _ in range(10)]
    expected = PAPER_LOOPS[name](init.clone(), grads, lr=1e-2)[-1]
    p = init.float().requires_grad_()
    opt = CONSTRUCTORS[name]([p], lr=1e-2)
    for g in grads:
        p.grad = g.float()
        opt.step()
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-4, atol=1e-5)


def test_adopt_first_step_leaves_parameter_alone():
    p = torch.randn(3, requires_grad=True)
    before = p.detach().clone()
    opt = distopt.ADOPT([p], lr=1.0)
    p.grad = torch.randn(3)
    opt.step()
    assert torch.equal(p.detach(), before)
    assert torch.equal(opt.state[p]["exp_avg_sq"], p.grad * p.grad)
