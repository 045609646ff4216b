"""AdaMuon against adv_optm 2.5.16's own ``AdaMuon_adv`` (installed as a test extra), same gradients, one process.

Where both run the same operations the results are the same bits: the sign, the bfloat16 Newton-Schulz (distopt's
eager path performs adv_optm's products in its order), the second moment and the RMS rescale each per matrix, and
adv_optm's decay ``p - lr wd p`` then ``p - u``. The auxiliary AdamW runs torch.optim.AdamW's arithmetic, which
rounds differently from adv_optm's (``lerp`` against torch's ``mul``/``add``, the bias corrections in another
order): there the bound is float32 rounding of the distance moved. Sharded equals one process in
``tests/multigpu/test_catalogue_sharded.py``.
"""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import step_on

adv_optm = pytest.importorskip("adv_optm")

SHAPES = ((16, 24), (24, 16), (16, 16), (8, 3, 2, 2))
CONFIGS = [
    {},
    dict(weight_decay=0.1, nesterov=False),
    dict(weight_decay=0.1, cautious_wd=True, use_atan2=True),
    dict(rms_rescaling=False, eps=None, ns_eps=None, betas=(0.9, 0.99)),
    dict(normuon_variant=True, weight_decay=0.05),
    dict(auto_projection=False, kappa_p=1.5, approx_mars=True, nesterov_coef=0.8),
]


@pytest.mark.parametrize("hp", CONFIGS, ids=lambda hp: ",".join(hp) or "defaults")
def test_equals_adv_optm_bitwise(hp):
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(4)]
    theirs = step_on(lambda ps: adv_optm.AdaMuon_adv(ps, lr=0.02, use_muon=True, **hp), init, grads)
    ours = step_on(lambda ps: distopt.AdaMuon(ps, lr=0.02, adam_predicate=lambda n, p: False, **hp), init, grads)
    for shape, a, b in zip(SHAPES, ours, theirs):
        assert torch.equal(a, b), (shape, (a - b).abs().max().item())
    assert min((a - b).abs().max().item() for a, b in zip(ours, init)) > 1e-3


def test_factored_second_moment_equals_adv_optm_bitwise():
    """``factored_2nd``: the second moment, on the owner, stored as adv_optm's rank-1 factors (decoded, updated and
    factored again each step, as adv_optm does): the same bits for matrices and 3-D tensors. Left out: a 4-D
    tensor, where adv_optm's factors at the first step are not the row sums of the second moment that its dense
    path computes (measured 2.4e-3 apart), so the runs part by 3% of the distance moved."""
    torch.manual_seed(0)
    shapes = ((16, 24), (24, 16), (8, 3, 4))
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    theirs = step_on(lambda ps: adv_optm.AdaMuon_adv(ps, lr=0.02, use_muon=True, factored_2nd=True), init, grads)
    ours = step_on(lambda ps: distopt.AdaMuon(ps, lr=0.02, adam_predicate=lambda n, p: False, factored_2nd=True),
                   init, grads)
    dense = step_on(lambda ps: distopt.AdaMuon(ps, lr=0.02, adam_predicate=lambda n, p: False), init, grads)
    for shape, a, b, c in zip(shapes, ours, theirs, dense):
        assert torch.equal(a, b), (shape, (a - b).abs().max().item())
        assert not torch.equal(a, c), shape  # the factored moment is lossy: the comparison can fail


def test_update_has_the_adamw_rms():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.zeros(32, 48))
    opt = distopt.AdaMuon([p], lr=0.5)
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(32, 48)
        opt.step()
        rms = (p.detach() - before).square().mean().sqrt().item()
        assert rms == pytest.approx(0.2 * 0.5, rel=1e-5)


def test_aux_adam_routing_equals_adv_optm():
    """Vectors, unit and thin shapes go to the auxiliary AdamW by adv_optm's own rule; within float32 rounding."""
    torch.manual_seed(2)
    shapes = [(16, 24), (24,), (1, 24), (3, 40), (2, 600)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    kw = dict(lr=0.01, weight_decay=0.1, adam_weight_decay=0.01)
    theirs = step_on(lambda ps: adv_optm.AdaMuon_adv(ps, **kw), init, grads)
    ours = step_on(lambda ps: distopt.AdaMuon(ps, **kw), init, grads)
    assert torch.equal(ours[0], theirs[0])
    for a, b, x in zip(ours[1:], theirs[1:], init[1:]):
        assert (a - b).abs().max().item() <= 4 * 4 * torch.finfo(torch.float32).eps * max(1.0, x.abs().max().item())
    opt = distopt.AdaMuon([torch.nn.Parameter(x.clone()) for x in init])
    assert [g["algorithm"] for g in opt.param_groups] == ["adamuon", "adamw"]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 4]


def test_use_muon_groups_choose_the_route():
    a, b = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8, 8))
    opt = distopt.AdaMuon([{"params": [a], "use_muon": True}, {"params": [b], "use_muon": False, "lr": 0.1}])
    assert [(g["algorithm"], g["lr"]) for g in opt.param_groups] == [("adamuon", 1e-3), ("adamw", 0.1)]


@pytest.mark.parametrize("bad,match", [(dict(kappa_p=3.0), "kappa_p"), (dict(betas=(0.9, 1.5)), "betas"),
                                       (dict(low_rank_ortho=True), "low_rank_ortho"),
                                       (dict(state_precision="int9"), "state_precision"),
                                       (dict(orthogonalization="svd"), "orthogonalization"),
                                       (dict(ns_eps=-1.0), "ns_eps"), (dict(caution=True), "caution")])
def test_bad_hyperparameters_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        distopt.AdaMuon([torch.nn.Parameter(torch.zeros(8, 8))], **bad)


def test_stochastic_rounding_by_default_on_bfloat16_groups_as_adv_optm():
    """adv_optm rounds bfloat16 parameters stochastically by default and leaves float32 ones alone."""
    low = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.bfloat16))
    high = torch.nn.Parameter(torch.zeros(8, 8))
    opt = distopt.AdaMuon([{"params": [low], "use_muon": True}, {"params": [high], "use_muon": True}])
    assert [g.get("stochastic_rounding", False) for g in opt.param_groups] == [True, False]
    quantized = distopt.AdaMuon([torch.nn.Parameter(torch.zeros(64, 128))], nnmf_factor=False,
                                state_precision="int8", stochastic_rounding=False)
    assert quantized.param_groups[0]["state_precision"] == "int8"
