"""Muon part by part on sharded weights whose shard boundaries cut through parts and heads: equal, bitwise, to
torch.optim.Muon given each part as its own parameter (one process), on FSDP2 row shards, column shards, replicas
and 2-D meshes. The flags' chain form, NorMuon and AdaMuon with splits: sharded equals one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor

import distopt

from .harness import device, mesh as cached_mesh, group as cached_group
from .test_elementwise_sharded import _placements_cases

#: (shape, split hyperparameters, rows of each part); 13 and 11 rows cut unevenly by 2, 3 and 4 ranks.
WEIGHTS = [((13, 6), dict(split_sizes=(5, 4, 4)), [5, 4, 4]),
           ((12, 5), dict(num_heads=4), [3, 3, 3, 3]),
           ((11, 4, 2), dict(split_sizes=(5, 6), num_heads=(1, 2)), [5, 3, 3])]
STEPS = 3


def _train(params, opt, grads):
    for step in grads:
        for p, g in zip(params, step):
            if isinstance(p, torch.distributed.tensor.DTensor):
                p.grad = distribute_tensor(g.clone(), p.device_mesh, p.placements, src_data_rank=None)
            else:
                p.grad = g.clone()
        opt.step()


def _whole(p):
    return p.full_tensor() if isinstance(p, torch.distributed.tensor.DTensor) else p.detach()


def _splits_on_every_placement():
    world, dev = dist.get_world_size(), device()
    mismatches = []
    gen = torch.Generator().manual_seed(0)
    inits = [torch.randn(shape, generator=gen) for shape, _, _ in WEIGHTS]
    grads = [[torch.randn(shape, generator=gen) for shape, _, _ in WEIGHTS] for _ in range(STEPS)]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", owner_dtype="float32")
    # The reference: torch.optim.Muon on each part as its own parameter, in this process.
    expected = []
    for (shape, _, rows), init in zip(WEIGHTS, inits):
        parts = [torch.nn.Parameter(x.clone().to(dev)) for x in init.reshape(shape[0], -1).split(rows)]
        ref = torch.optim.Muon(parts, **{k: v for k, v in kw.items() if k != "owner_dtype"})
        for step in grads:
            for p, g in zip(parts, step[WEIGHTS.index(next(w for w in WEIGHTS if w[0] == shape))]
                            .reshape(shape[0], -1).split(rows)):
                p.grad = g.clone().to(dev)
            ref.step()
        expected.append(torch.cat([p.detach() for p in parts]).reshape(shape).cpu())
    for mesh_shape, placements in _placements_cases(world):
        mesh = cached_mesh(dev.type, mesh_shape)
        params = [torch.nn.Parameter(distribute_tensor(x.clone().to(dev), mesh, placements, src_data_rank=None))
                  for x in inits]
        opt = distopt.DistributedOptimizer(
            [{"params": [p], **split} for p, (_, split, _) in zip(params, WEIGHTS)], "muon",
            **{k: v for k, v in kw.items() if k != "owner_dtype"})
        _train(params, opt, [[g.to(dev) for g in step] for step in grads])
        for (shape, _, _), p, want in zip(WEIGHTS, params, expected):
            got = _whole(p).cpu()
            if not torch.equal(got, want):
                mismatches.append((mesh_shape, str(placements), shape, (got - want).abs().max().item()))
    return mismatches


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_muon_by_part_on_shards_equals_torch_muon_per_part(ranks, world_size):
    for mismatches in ranks(world_size, _splits_on_every_placement):
        assert mismatches == []


CONFIGS = [("muon", dict(lr=0.02, caution=True)), ("normuon", dict(lr=0.02, nesterov=True, flatten=True)),
           ("adamuon", dict(lr=0.02, normuon_variant=True, weight_decay=0.1)), ("adamuon", dict(lr=0.02))]


def _variants_sharded_equal_one_process():
    world, dev = dist.get_world_size(), device()
    gen = torch.Generator().manual_seed(1)
    inits = [torch.randn(shape, generator=gen) for shape, _, _ in WEIGHTS]
    grads = [[torch.randn(shape, generator=gen) for shape, _, _ in WEIGHTS] for _ in range(STEPS)]
    mesh = cached_mesh(dev.type, (world,))
    alone = cached_group("alone", lambda: dist.new_subgroups(group_size=1)[0])  # a group of one per rank
    mismatches = []
    for algo, hp in CONFIGS:
        results = []
        for sharded in (False, True):
            params = [torch.nn.Parameter(distribute_tensor(x.clone().to(dev), mesh, [Shard(0)], src_data_rank=None)
                                         if sharded else x.clone().to(dev)) for x in inits]
            groups = [{"params": [p], **split} for p, (_, split, _) in zip(params, WEIGHTS)]
            opt = distopt.DistributedOptimizer(groups, algo, owner_dtype="float32", **hp,
                                               process_group=None if sharded else alone)
            _train(params, opt, [[g.to(dev) for g in step] for step in grads])
            results.append([_whole(p).cpu() for p in params])
        for single, shard in zip(*results):
            if not torch.equal(single, shard):
                mismatches.append((algo, str(hp), (single - shard).abs().max().item()))
    return mismatches


def test_variants_by_part_on_shards_equal_one_process(ranks):
    for mismatches in ranks(3, _variants_sharded_equal_one_process):
        assert mismatches == []


def _plan_of_a_fused_weight():
    dev = device()
    mesh = cached_mesh(dev.type, (dist.get_world_size(),))
    qkv = torch.nn.Parameter(distribute_tensor(torch.zeros(13, 6, device=dev), mesh, [Shard(0)], src_data_rank=None))
    opt = distopt.DistributedOptimizer([{"params": [("attn.qkv", qkv)], "split_sizes": (5, 4, 4)}], "muon")
    return [m.meta.fqn for m in opt.plan.matrices], list(opt.plan.owners)


def test_the_parts_of_one_fused_weight_go_to_different_owners(ranks):
    results = ranks(3, _plan_of_a_fused_weight)
    names, owners = results[0]
    assert names == ["attn.qkv[0:5]", "attn.qkv[5:9]", "attn.qkv[9:13]"]
    assert sorted(owners) == [0, 1, 2]
    assert all(r == results[0] for r in results)
