"""SOAP and PSGD-Kron on owners, mixed with Muon and AdamW in one optimizer, equal the same optimizer run in one
process.

The ranks return the full parameters after a few steps; the test process runs the same optimizer on plain
tensors (world size 1) with the same gradients and compares. The owner maths sees the same whole matrices on
every layout and the shard maths is elementwise, so the results must be identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import distopt
from distopt import DistributedOptimizer

from .harness import device
from .sharded_models import feed_same_grads, full, mesh_for
from .test_muon_owner import MuonNet

STEPS = 5


def _groups(model):
    named = dict(model.named_parameters())
    soap = ["wide.weight", "small.weight", "small.bias"]
    psgd = ["tall.weight", "smaller.weight", "conv.weight"]
    muon = ["thin.weight"]
    rest = [n for n in named if n not in soap + psgd + muon]
    return [{"params": [(n, named[n]) for n in soap], "algorithm": "soap", "lr": 1e-2, "precondition_frequency": 2,
             "precondition_1d": True},
            {"params": [(n, named[n]) for n in psgd], "algorithm": "psgdkron", "lr": 1e-2, "weight_decay": 0.1,
             "preconditioner_update_probability": 0.5},
            {"params": [(n, named[n]) for n in muon], "algorithm": "muon", "lr": 0.02},
            {"params": [(n, named[n]) for n in rest], "algorithm": "adamw", "lr": 3e-3}]


def _train(model, reference_params, steps=STEPS):
    opt = DistributedOptimizer(_groups(model))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        feed_same_grads(list(model.parameters()), reference_params, gen)
        opt.step()
    return opt


def _fsdp_model(mesh_kind):
    """An FSDP2 MuonNet, and an unsharded copy whose shapes are used to draw the full gradients."""
    torch.manual_seed(0)
    model = MuonNet().to(device())
    shadow = copy.deepcopy(model)
    mesh = mesh_for(mesh_kind)
    for module in model.children():
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, shadow


def _full_params(model):
    return {n: full(p).detach().cpu() for n, p in model.named_parameters()}


def _sharded(mesh_kind):
    model, shadow = _fsdp_model(mesh_kind)
    opt = _train(model, list(shadow.parameters()))
    keys = {n: sorted(opt.state[p]) for n, p in model.named_parameters()}
    return _full_params(model), keys, str(opt.plan)


def _single_process():
    """The same optimizer on plain tensors in this process, with the ranks' single intra-op thread: eigh and QR of
    rank-deficient statistics (R = G^T G of a 37x113 gradient has a 76-dimensional null space) pick an arbitrary
    basis of the null space that depends on LAPACK's blocking, so the thread count must match to compare bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = MuonNet()
        _train(model, [p.detach().clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mesh_kind,world_size", [("fsdp", 2), ("fsdp", 3), ("fsdp", 4), ("hsdp", 4)])
def test_mixed_soap_psgd_muon_adamw_equal_the_single_process_run(ranks, mesh_kind, world_size):
    results = ranks(world_size, _sharded, mesh_kind)
    expected = _single_process()
    for rank, (params, keys, plan) in enumerate(results):
        for name, value in expected.items():
            assert torch.equal(params[name], value), (rank, name, (params[name] - value).abs().max())
        assert keys == results[0][1], "state keys differ between ranks"
        assert plan == results[0][2]
    assert "owner.Q.0" in results[0][1]["wide.weight"] and "owner.Q.1" in results[0][1]["wide.weight"]
    assert "owner.Q.1" in results[0][1]["conv.weight"] and "update_counter" in results[0][1]["conv.weight"]


def _three_more_steps(interrupt: bool):
    """Train 3 steps, then 3 more: straight on, or through state_dict()/load_state_dict() into a new optimizer."""
    model, shadow = _fsdp_model("fsdp")
    opt = _train(model, list(shadow.parameters()), steps=3)
    if interrupt:
        saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        gen = torch.Generator().manual_seed(7)
        for _ in range(3):  # steps whose effect the load must undo
            feed_same_grads(list(model.parameters()), list(shadow.parameters()), gen)
            opt.step()
        model.load_state_dict(saved_model)
        opt = DistributedOptimizer(_groups(model))
        opt.load_state_dict(saved_opt)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        feed_same_grads(list(model.parameters()), list(shadow.parameters()), gen)
        opt.step()
    return _full_params(model)


def test_state_dict_round_trip_with_owner_state_continues_bitwise(ranks):
    resumed = ranks(3, _three_more_steps, True)
    straight = ranks(3, _three_more_steps, False)
    for params, reference in zip(resumed, straight):
        for name, value in reference.items():
            assert torch.equal(params[name], value), name


def _add_group_midway(mesh_kind):
    """SOAP on two matrices for 2 steps, then add_param_group brings three more (a new plan, so owners move with
    their state), then 2 more steps of all five."""
    model, shadow = _fsdp_model(mesh_kind) if mesh_kind else (MuonNet(), None)
    if shadow is None:
        torch.manual_seed(0)
        model = MuonNet()
        shadow = copy.deepcopy(model)
    named = dict(model.named_parameters())
    first, later = ["small.weight", "smaller.weight"], ["wide.weight", "tall.weight", "embed.weight"]
    opt = DistributedOptimizer([(n, named[n]) for n in first], algorithm="soap", precondition_frequency=2)
    gen = torch.Generator().manual_seed(1)
    owners = []
    for step in range(4):
        if step == 2:
            owners.append([opt.plan.owner_of(n) for n in first])
            opt.add_param_group({"params": [(n, named[n]) for n in later], "algorithm": "soap"})
            owners.append([opt.plan.owner_of(n) for n in first])
        feed_same_grads(list(model.parameters()), list(shadow.parameters()), gen)
        opt.step()
    return _full_params(model), owners


def test_add_param_group_moves_owner_state_to_the_new_owners(ranks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected, _ = _add_group_midway(None)
    finally:
        torch.set_num_threads(threads)
    results = ranks(3, _add_group_midway, "fsdp")
    before, after = results[0][1]
    assert before != after, "the new plan should move an existing matrix to another owner"
    for params, _ in results:
        for name, value in expected.items():
            assert torch.equal(params[name], value), name


def _soap_everywhere(sharded: bool):
    """distopt.SOAP on every parameter, vectors without precondition_1d: they run as Adam on their own shards."""
    if sharded:
        model, shadow = _fsdp_model("fsdp")
    else:
        torch.manual_seed(0)
        model = MuonNet()
        shadow = None
    opt = distopt.SOAP(model.named_parameters(), lr=1e-2, precondition_frequency=2)
    gen = torch.Generator().manual_seed(1)
    reference = list((shadow or model).parameters())
    for _ in range(STEPS):
        feed_same_grads(list(model.parameters()), reference, gen)
        opt.step()
    owned = sorted(spec.meta.fqn for spec in opt.plan.matrices)
    return _full_params(model), owned


def test_soap_vectors_run_on_their_shards_and_equal_the_single_process_run(ranks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # rank-deficient statistics: LAPACK's null-space basis depends on its blocking
    try:
        expected, _ = _soap_everywhere(False)
    finally:
        torch.set_num_threads(threads)
    for params, owned in ranks(3, _soap_everywhere, True):
        assert owned == ["conv.weight", "embed.weight", "small.weight", "smaller.weight", "tall.weight", "thin.weight",
                         "wide.weight"]
        for name, value in expected.items():
            assert torch.equal(params[name], value), name
