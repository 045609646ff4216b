"""Muon's ``orthogonalization="polar_express"`` against microsoft/dion's own ``polar_express`` (a checkout given by
``DISTOPT_DION_PATH``; its eager function, unwrapped from ``torch.compile``): the same operations, so the same bits
in bfloat16 and float32. Without the checkout, the always-run tests check the coefficients against the paper's
construction (the iteration maps [0, 1] into a narrow band around 1) and the orthogonality reached."""

from __future__ import annotations

import pytest
import torch

import distopt
from distopt.algos.polar_express import POLAR_EXPRESS_COEFFICIENTS, polar_express_each
from tests.authors import load_dion_module

SHAPES = ((6, 10), (12, 5), (8, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_dions_polar_express(shape, dtype):
    module = load_dion_module("polar_express")
    theirs_fn = getattr(module.polar_express, "_torchdynamo_orig_callable", None) or module.polar_express.__wrapped__
    g = torch.randn(3, *shape)
    ours = polar_express_each(g, 1e-6, dtype)
    theirs = torch.stack([theirs_fn(m.to(dtype), 1e-6) for m in g.unbind(0)])  # dion casts to bfloat16 itself
    if dtype == torch.bfloat16:
        assert torch.equal(ours, theirs)
    else:  # dion computes in bfloat16 whatever comes in: ours in float32 is at least as orthogonal
        assert _spread(ours) <= _spread(theirs.float()) + 1e-2
    assert torch.equal(torch.tensor(module._POLAR_EXPRESS_COEFFS), torch.tensor(POLAR_EXPRESS_COEFFICIENTS))


def _spread(x: torch.Tensor) -> float:
    s = torch.linalg.svdvals(x.double())
    return (s.max() - s.min()).item()


def test_the_polynomials_map_the_unit_interval_near_one():
    """The composition of the five odd polynomials ``p(x) = a x + b x³ + c x⁵`` sends every singular value in
    (0.001, 1] (after the 1.02 scaling) into a band around 1, as the paper's construction promises."""
    x = torch.linspace(1e-3, 1.0, 10_000, dtype=torch.float64) / 1.02
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        x = a * x + b * x**3 + c * x**5
    assert x.min().item() > 0.5 and x.max().item() < 1.25


@pytest.mark.parametrize("compile", [False, True])
def test_muon_with_polar_express_orthogonalizes_and_differs_from_newton_schulz(compile):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(16, 24))]
    grads = [torch.randn_like(p) for p in params]

    def step(method):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        # Newton-Schulz eagerly: its compiled kernel is compiled (once per process) by tests/test_compiled.py,
        # which checks that it does the compiling.
        opt = distopt.DistributedOptimizer(copies, "muon", lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False,
                                           orthogonalization=method, owner_dtype="float32",
                                           compile=compile and method != "newton_schulz")
        for p, g in zip(copies, grads):
            p.grad = g.clone()
        opt.step()
        return [(c.detach() - p.detach()) / -0.1 for c, p in zip(copies, params)]  # the orthogonalized update

    polar, newton = step("polar_express"), step("newton_schulz")
    for u_pe, u_ns, p in zip(polar, newton, params):
        scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
        assert _spread(u_pe / scale) < 0.35, _spread(u_pe / scale)
        assert not torch.allclose(u_pe, u_ns)


def test_an_unknown_orthogonalization_is_named():
    with pytest.raises(ValueError, match="orthogonalization='svd'"):
        distopt.Muon([torch.nn.Parameter(torch.zeros(4, 4))], orthogonalization="svd")
