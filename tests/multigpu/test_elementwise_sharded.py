"""Elementwise algorithms on FSDP2 and DTensor parameters equal a single-process run, bitwise.

Every test gives the sharded model the shards of the very gradients that a single-process reference sees, so the
comparison isolates the optimizer: elementwise maths on a shard is the same arithmetic as on the whole tensor, and
the results must be identical (``torch.equal``), not merely close. The one test with a real forward/backward pass
(``test_fsdp_training``) states its own tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

import distopt
from distopt import DistributedOptimizer
from tests.reference import PAPER_CONFIGS, PAPER_LOOPS, PAPER_TOLERANCE, TORCH_OPTIMIZERS, torch_configs

from .harness import device, mesh as cached_mesh
from .sharded_models import Net, feed_same_grads, full, mesh_for, sharded_pair

STEPS = 4


def _compare_with_torch(name, configs, mesh_kind):
    """Run every config on the sharded model and on torch.optim; return the list of mismatches."""
    mesh = mesh_for(mesh_kind)
    mismatches = []
    for desc, kwargs in configs:
        model, reference = sharded_pair(mesh)
        opt = DistributedOptimizer(model.named_parameters(), algorithm=name, **kwargs)
        ref_opt = TORCH_OPTIMIZERS[name](reference.parameters(), foreach=False, **kwargs)
        gen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            feed_same_grads(list(model.parameters()), list(reference.parameters()), gen)
            opt.step()
            ref_opt.step()
        for (fqn, p), ref in zip(model.named_parameters(), reference.parameters()):
            if not torch.equal(full(p), ref):
                mismatches.append(f"{desc}: {fqn} max diff {(full(p) - ref).abs().max().item():.3g}")
            for key, value in ref_opt.state[ref].items():
                if key not in opt.state[p] and f"owner.{key}" in opt.state[p]:
                    continue  # whole on the matrix's owner only (Adafactor): the DCP tests gather and compare it
                if key != "step" and not torch.equal(full(opt.state[p][key]), value):
                    mismatches.append(f"{desc}: state {key} of {fqn}")
    return mismatches


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(TORCH_OPTIMIZERS))
def test_fsdp_matches_torch_optim(ranks, name, world_size):
    results = ranks(world_size, _compare_with_torch, name, torch_configs(name), "fsdp")
    assert results == [[]] * world_size, results[0][:5]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", sorted(TORCH_OPTIMIZERS))
def test_hsdp_matches_torch_optim(ranks, name, world_size):
    """HSDP: FSDP2 on a (replicate, shard) mesh, placements (Replicate(), Shard(0))."""
    results = ranks(world_size, _compare_with_torch, name, torch_configs(name)[:4], "hsdp")
    assert results == [[]] * world_size, results[0][:5]


def _compare_with_paper(name, configs):
    mesh = mesh_for("fsdp")
    mismatches = []
    for index, kwargs in enumerate(configs):
        model, reference = sharded_pair(mesh, dtype=torch.float64)
        opt = DistributedOptimizer(model.named_parameters(), algorithm=name, **kwargs)
        gen = torch.Generator().manual_seed(1)
        grads = {fqn: [] for fqn, _ in reference.named_parameters()}
        for _ in range(STEPS):
            feed_same_grads(list(model.parameters()), list(reference.parameters()), gen)
            for fqn, ref in reference.named_parameters():
                grads[fqn].append(ref.grad.cpu())
            opt.step()
        for (fqn, p), ref in zip(model.named_parameters(), reference.parameters()):
            want = PAPER_LOOPS[name](ref.detach().cpu(), grads[fqn], **kwargs)[-1]
            try:
                torch.testing.assert_close(full(p).detach().cpu(), want, **PAPER_TOLERANCE)
            except AssertionError as error:
                mismatches.append(f"config {index}: {fqn}: {error}")
    return mismatches


@pytest.mark.parametrize("world_size", [1, 3, 4])
@pytest.mark.parametrize("name", sorted(PAPER_LOOPS))
def test_fsdp_paper_algorithms_match_reference_loops(ranks, name, world_size):
    results = ranks(world_size, _compare_with_paper, name, PAPER_CONFIGS[name])
    assert results == [[]] * world_size, results[0][:3]


def _placements_cases(world):
    cases = [((world,), (Shard(1),)), ((world,), (Replicate(),)), ((world,), (Shard(0),))]
    if world % 2 == 0:
        half = world // 2
        cases += [((2, half), (Replicate(), Shard(0))), ((2, half), (Shard(0), Shard(1))),
                  ((2, half), (Shard(1), Replicate()))]
    return cases


def _dtensor_placements_match_torch():
    world, dev = dist.get_world_size(), device()
    shapes = [(7, 5), (5, 3), (1, 64), (9,)]
    algorithms = [("adamw", {"amsgrad": True}), ("sgd", {"momentum": 0.9, "nesterov": True}),
                  ("nadam", {"weight_decay": 0.1}), ("rmsprop", {"centered": True, "momentum": 0.5})]
    mismatches = []
    for mesh_shape, placements in _placements_cases(world):
        mesh = cached_mesh(dev.type, mesh_shape)
        for name, kwargs in algorithms:
            torch.manual_seed(0)
            reference = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
            # A 1-D tensor has no dim 1: shard it on dim 0 instead.
            ours = [torch.nn.Parameter(distribute_tensor(r.detach().clone(), mesh, [
                Shard(0) if (isinstance(pl, Shard) and pl.dim >= r.ndim) else pl for pl in placements],
                src_data_rank=None)) for r in reference]
            opt = DistributedOptimizer(ours, algorithm=name, **kwargs)
            ref_opt = TORCH_OPTIMIZERS[name](reference, foreach=False, **kwargs)
            gen = torch.Generator().manual_seed(1)
            for _ in range(STEPS):
                feed_same_grads(ours, reference, gen)
                opt.step()
                ref_opt.step()
            for i, (p, r) in enumerate(zip(ours, reference)):
                if not torch.equal(full(p), r):
                    mismatches.append(f"{mesh_shape} {placements} {name}: param {i} of shape {tuple(r.shape)}")
    return mismatches


@pytest.mark.parametrize("world_size", [2, 4])
def test_dtensor_placements_match_torch_optim(ranks, world_size):
    results = ranks(world_size, _dtensor_placements_match_torch)
    assert results == [[]] * world_size, results[0][:5]


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
                "all_to_all", "all_to_all_single", "broadcast", "reduce", "scatter", "gather", "send", "recv",
                "isend", "irecv", "barrier", "all_gather_object", "broadcast_object_list")


def _count_communication(fn):
    """Run ``fn`` with every c10d collective replaced by a counter and DTensor's CommDebugMode on."""
    calls = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}
    for name in _COLLECTIVES:
        setattr(dist, name, lambda *a, _name=name, **k: calls.append(_name))
    try:
        with CommDebugMode() as comm:
            fn()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return calls, comm.get_total_counts()


def _elementwise_step_communicates_nothing():
    model, reference = sharded_pair(mesh_for("fsdp"))
    counts = {}
    for name in distopt.algos.ELEMENTWISE_NAMES:
        opt = DistributedOptimizer(model.parameters(), algorithm=name)
        gen = torch.Generator().manual_seed(1)
        feed_same_grads(list(model.parameters()), list(reference.parameters()), gen)
        counts[name] = _count_communication(lambda: (opt.step(), opt.step()))
    # The guard itself can fail: a real collective and a DTensor redistribution are both seen.
    p = next(model.parameters())
    counts["control"] = _count_communication(lambda: (dist.all_reduce(torch.ones(1)), p.full_tensor()))
    return counts


def test_elementwise_step_communicates_nothing(ranks):
    counts = ranks(2, _elementwise_step_communicates_nothing)[0]
    control = counts.pop("control")
    assert control[0] == ["all_reduce"] and control[1] >= 1
    assert counts == {name: ([], 0) for name in distopt.algos.ELEMENTWISE_NAMES}


def _fsdp_training(steps=6):
    """A real forward/backward under FSDP2 against single-process training on the whole batch."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model, reference = sharded_pair(mesh_for("fsdp"))
    opt = distopt.AdamW(model.parameters(), lr=2e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=2e-2)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 5, generator=gen), torch.randn(12, 1, generator=gen)
    x, y = x.to(device()), y.to(device())
    rows = 12 // world
    local_x, local_y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
    losses, max_diff = [], 0.0
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(local_x), local_y).backward()
        opt.step()
        ref_opt.zero_grad()
        loss = torch.nn.functional.mse_loss(reference(x), y)
        loss.backward()
        ref_opt.step()
        losses.append(loss.item())
        for p, r in zip(model.parameters(), reference.parameters()):
            max_diff = max(max_diff, (full(p) - r).abs().max().item())
    return losses, max_diff


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp_training(ranks, world_size):
    """Gradients here come from FSDP2's reduce-scatter, which sums in another order than one process does, so
    they differ by float32 rounding (~1e-7 relative); Adam's normalised steps keep parameters within 1e-5."""
    losses, max_diff = ranks(world_size, _fsdp_training)[0]
    assert max_diff < 1e-5, max_diff
    assert losses[-1] < losses[0]


def _state_dict_round_trip(name):
    mesh = mesh_for("fsdp")
    model, reference = sharded_pair(mesh)
    opt = DistributedOptimizer(model.named_parameters(), algorithm=name, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        feed_same_grads(list(model.parameters()), list(reference.parameters()), gen)
        opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    later = torch.Generator().manual_seed(2)
    for _ in range(3):
        feed_same_grads(list(model.parameters()), list(reference.parameters()), later)
        opt.step()

    resumed, _ = sharded_pair(mesh, seed=99)
    resumed.load_state_dict(saved_model)
    resumed_opt = DistributedOptimizer(resumed.named_parameters(), algorithm=name, lr=1e-2)
    resumed_opt.load_state_dict(saved_opt)
    later = torch.Generator().manual_seed(2)
    for _ in range(3):
        feed_same_grads(list(resumed.parameters()), list(reference.parameters()), later)
        resumed_opt.step()
    problems = [fqn for (fqn, a), b in zip(model.named_parameters(), resumed.parameters())
                if not torch.equal(a.to_local(), b.to_local())]
    for p in resumed.parameters():
        for key, value in resumed_opt.state[p].items():
            if key not in distopt.ALGORITHMS[name].scalar_state and value.placements != p.placements:
                problems.append(f"state {key} lost its placements")
    return problems


@pytest.mark.parametrize("name", distopt.algos.ELEMENTWISE_NAMES)
def test_fsdp_state_dict_round_trip_continues_bitwise(ranks, name):
    assert ranks(3, _state_dict_round_trip, name) == [[]] * 3


def _gradient_layouts():
    """A gradient laid out unlike its parameter is redistributed; a plain gradient on a DTensor is an error."""
    from torch.distributed.tensor import DTensor, Partial

    mesh = mesh_for("fsdp")
    world, dev = dist.get_world_size(), device()
    torch.manual_seed(0)
    reference = torch.randn(6, 4, device=dev, requires_grad=True)
    ours = torch.nn.Parameter(distribute_tensor(reference.detach().clone(), mesh, [Replicate()], src_data_rank=None))
    opt = distopt.AdamW([("w", ours)])
    ref_opt = torch.optim.AdamW([reference], foreach=False)
    partial = torch.randn(6, 4, device=dev) * (dist.get_rank() + 1)
    total = partial.clone()
    dist.all_reduce(total)
    ours.grad = DTensor.from_local(partial, mesh, [Partial()], run_check=False)
    reference.grad = total
    opt.step()
    ref_opt.step()
    same = torch.equal(ours.to_local(), reference.detach())
    ours.grad = torch.zeros(6, 4, device=dev)
    try:
        opt.step()
        message = None
    except TypeError as error:
        message = str(error)
    return same, message, world


def test_gradient_layouts(ranks):
    for same, message, _ in ranks(2, _gradient_layouts):
        assert same
        assert message == "parameter 'w': the parameter is a DTensor but its gradient is a plain tensor"
