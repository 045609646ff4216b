"""Muon part by part (``split_sizes``, ``num_heads``) against torch.optim.Muon given each part as its own parameter:
the same bits (eager Newton-Schulz, one part at a time in both, each part's own learning-rate adjustment)."""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import step_on


CASES = [
    ((16, 12), dict(split_sizes=(8, 4, 4)), [8, 4, 4]),                      # fused QKV-like, unequal parts
    ((16, 6), dict(num_heads=2), [8, 8]),                                       # heads taller than wide
    ((16, 12), dict(split_sizes=(8, 4, 4), num_heads=(4, 2, 2)), [2] * 8),    # grouped-query attention
    ((12, 3, 2), dict(num_heads=3), [4, 4, 4]),                                 # (out, rest) view of a 3-D weight
]


@pytest.mark.parametrize("shape,split,rows", CASES, ids=["qkv", "heads", "gqa", "3d"])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_parts_equal_torch_muon_on_separate_parameters(shape, split, rows, adjust):
    torch.manual_seed(0)
    whole = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(3)]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    ours = step_on(lambda ps: distopt.DistributedOptimizer(ps, "muon", **kw, **split), [whole], [[g] for g in grads])
    part_grads = [list(g.reshape(shape[0], -1).split(rows)) for g in grads]
    theirs = step_on(lambda ps: torch.optim.Muon(ps, **kw), list(whole.reshape(shape[0], -1).split(rows)),
                    part_grads)
    assert torch.equal(ours[0].reshape(shape[0], -1), torch.cat(theirs))
    unsplit = step_on(lambda ps: distopt.DistributedOptimizer(ps, "muon", **kw), [whole], [[g] for g in grads])
    assert not torch.equal(unsplit[0], ours[0])  # splitting changes the result: the test can fail


def test_split_groups_of_the_constructor_and_flags():
    """Per-group settings, and the chain form (a flag on) takes each part's step size too: against torch.optim.Muon
    per part with the same flag's arithmetic (cautious weight decay does not depend on the split)."""
    torch.manual_seed(1)
    qkv, mlp = torch.nn.Parameter(torch.randn(12, 4)), torch.nn.Parameter(torch.randn(8, 4))
    opt = distopt.Muon([{"params": [qkv], "split_sizes": (4, 4, 4)}, {"params": [mlp]}], lr=0.02)
    assert opt.param_groups[0]["split_sizes"] == (4, 4, 4) and opt.param_groups[1]["split_sizes"] is None
    qkv.grad, mlp.grad = torch.randn(12, 4), torch.randn(8, 4)
    opt.step()
    plain = torch.nn.Parameter(torch.randn(12, 4))
    chained = distopt.DistributedOptimizer([plain], "muon", lr=0.02, num_heads=3, caution=True)
    plain.grad = torch.randn(12, 4)
    before = plain.detach().clone()
    chained.step()
    assert not torch.equal(before, plain.detach())


@pytest.mark.parametrize("split,match", [
    (dict(split_sizes=(8, 4)), r"split_sizes=\(8, 4\) add up to 12 rows, but 'w' has 16"),
    (dict(num_heads=3), "'w' .* has a part of 16 rows, which 3 heads do not divide"),
    (dict(num_heads=(2, 2)), "one entry per split_sizes"),
    (dict(split_sizes=(16, 0)), "split_sizes"),
    (dict(num_heads=0), "num_heads"),
])
def test_bad_splits_are_refused_naming_the_parameter(split, match):
    with pytest.raises(ValueError, match=match):
        distopt.DistributedOptimizer([("w", torch.nn.Parameter(torch.zeros(16, 4)))], "muon", **split)


@pytest.mark.parametrize("algo", ["normuon", "adamuon"])
def test_variants_orthogonalize_by_part(algo):
    """NorMuon and AdaMuon orthogonalize each part alone: on a block-diagonal-free fused weight, the split result
    differs from the whole-matrix one, and with one part it equals it bitwise."""
    torch.manual_seed(2)
    whole, grad = torch.randn(12, 8), torch.randn(12, 8)
    results = {}
    for key, split in (("none", {}), ("one", dict(split_sizes=(12,))), ("three", dict(num_heads=3))):
        p = torch.nn.Parameter(whole.clone())
        opt = distopt.DistributedOptimizer([p], algo, lr=0.02, **split)
        p.grad = grad.clone()
        opt.step()
        results[key] = p.detach()
    assert torch.equal(results["none"], results["one"])
    assert not torch.equal(results["none"], results["three"])
