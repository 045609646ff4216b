"""NorMuon against microsoft/dion's own NorMuon (a checkout given by ``DISTOPT_DION_PATH``), on whole matrices in
one process. dion compiles its Polar Express, its normalization and its update; inductor keeps bfloat16 intermediates
in float32, so dion's compiled Polar Express differs from dion's own eager function (by 12% of the largest entry
in one call, measured). The comparison therefore runs dion's functions uncompiled (its own code, unwrapped from
``torch.compile``): then the two differ by float32 rounding of dion's foreach arithmetic (measured 1.2e-7; bound
1e-6). Sharded equals one process in ``tests/multigpu/test_catalogue_sharded.py``."""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.authors import load_dion_module
from tests.same_grads import step_on

SHAPES = ((16, 24), (24, 16), (16, 16))


def _eager(module, name):
    function = getattr(module, name)
    return getattr(function, "_torchdynamo_orig_callable", function)


@pytest.mark.parametrize("hp", [{}, dict(nesterov=True, weight_decay=0.1, adjust_lr="rms_norm", muon_beta2=0.9)])
def test_equals_dions_normuon(hp, monkeypatch):
    normuon = load_dion_module("normuon")
    megabatch = load_dion_module("megabatch_base")
    monkeypatch.setattr(megabatch, "polar_express", _eager(megabatch, "polar_express"))
    for name in ("muon_update_pre_orthogonalize", "muon_update_post_orthogonalize", "normuon_normalization_stacked"):
        monkeypatch.setattr(normuon, name, _eager(normuon, name))
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(3)]

    theirs = step_on(lambda ps: normuon.NorMuon(ps, lr=0.02, **hp), init, grads)
    ours = step_on(lambda ps: distopt.NorMuon(ps, lr=0.02, **hp), init, grads)
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) <= 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(ours, init)) > 1e-2


def test_rows_are_normalized_and_the_frobenius_norm_kept():
    from distopt.algos.normuon import normalize_neurons

    u = torch.randn(6, 9, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64).unsqueeze(1)
    variance = torch.zeros(6, 1, dtype=torch.float64)
    out = normalize_neurons(u, variance, 0.0)  # beta2 0: v is this step's row means
    rms = out.square().mean(1)
    assert torch.allclose(rms, rms[0].expand(6))  # every neuron at the same RMS
    assert torch.allclose(out.norm(), u.norm())


@pytest.mark.parametrize("bad,match", [(dict(adjust_lr="max"), "adjust_lr"), (dict(mu=-1.0), "mu"),
                                       (dict(orthogonalization="svd"), "orthogonalization")])
def test_bad_hyperparameters_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        distopt.NorMuon([torch.nn.Parameter(torch.zeros(4, 4))], **bad)


def test_vectors_are_refused_by_name():
    with pytest.raises(ValueError, match="bias"):
        distopt.NorMuon([("bias", torch.nn.Parameter(torch.zeros(4)))])


def test_a_3d_weight_without_flatten_is_refused_at_construction():
    with pytest.raises(ValueError, match="'conv.weight' has shape .* needs flatten=True"):
        distopt.NorMuon([("conv.weight", torch.nn.Parameter(torch.zeros(4, 3, 2)))])
