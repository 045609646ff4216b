"""Muon's ``orthogonalization="gram_newton_schulz"`` against the ``gram-newton-schulz`` package itself (0.1.6, its
PyTorch backend, uncompiled), which computes in float16: with ``owner_dtype="float16"`` the same operations give the
same bits, for wide, tall and square matrices; and the cost model prices the Gram iteration below Newton-Schulz's
for rectangular matrices, as the arithmetic says."""

from __future__ import annotations

import pytest
import torch

import distopt
from distopt.algos.gram_newton_schulz import gram_newton_schulz_each
from distopt.algos.muon import Muon

package = pytest.importorskip("gram_newton_schulz", reason="the test extra gram-newton-schulz is required")


@pytest.mark.parametrize("shape", [(6, 10), (12, 5), (8, 8), (32, 96)])
def test_equals_the_package(shape):
    reference = package.GramNewtonSchulz(ns_use_kernels=False, compile_kwargs=None)
    g = torch.randn(3, *shape)
    theirs = reference(g.clone())
    ours = gram_newton_schulz_each(g, 1e-7, torch.float16).float()
    assert torch.equal(ours, theirs)
    s = torch.linalg.svdvals(ours.double())
    assert 0.8 < s.min().item() and s.max().item() < 1.2  # orthogonal to the polynomial's band


def test_muon_runs_it_and_the_cost_model_knows_it():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 48))]
    opt = distopt.Muon(params, lr=0.1, orthogonalization="gram_newton_schulz", owner_dtype="float16")
    params[0].grad = torch.randn(16, 48)
    before = params[0].detach().clone()
    opt.step()
    assert not torch.equal(before, params[0])
    muon, hp = Muon(), dict(Muon.hyperparameters)
    assert muon.cost((256, 1024), {**hp, "orthogonalization": "gram_newton_schulz"}) < muon.cost((256, 1024), hp)
    assert muon.cost((256, 256), {**hp, "orthogonalization": "polar_express"}) == muon.cost((256, 256), hp)
