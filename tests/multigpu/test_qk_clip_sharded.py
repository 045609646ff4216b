"""QK-clip on FSDP2 shards (shard boundaries inside heads), HSDP and plain replicated tensors: each rank reports the
maxima of its own batch, and the result equals one process given the maxima over all ranks (the paper's loop of
``tests/test_qk_clip.py`` after torch.optim.Muon), with one ``all_reduce`` per step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor
from torch.distributed.tensor import Shard

import distopt
from distopt.sharding import exchange

from ..test_qk_clip import papers_loop
from .harness import device
from .sharded_models import mesh_for

HEADS, KV_HEADS, HEAD_DIM, DIM, STEPS = 5, 1, 3, 8, 3  # 15 and 3 rows: cut inside heads by 2, 3 and 4 ranks


def _run(mesh_kind):
    world, rank, dev = dist.get_world_size(), dist.get_rank(), device()
    gen = torch.Generator().manual_seed(0)
    wq0, wk0 = torch.randn(HEADS * HEAD_DIM, DIM, generator=gen), torch.randn(KV_HEADS * HEAD_DIM, DIM, generator=gen)
    grads = [(torch.randn(wq0.shape, generator=gen), torch.randn(wk0.shape, generator=gen)) for _ in range(STEPS)]
    # Per step and rank, the maxima that rank's batch gave: some heads past tau on one rank only.
    reports = [torch.rand(world, HEADS, generator=gen) * 20 for _ in range(STEPS)]
    tau = 12.0
    mesh = mesh_for(mesh_kind) if mesh_kind != "plain" else None
    placements = [Shard(0)] * (mesh.ndim if mesh is not None else 0)
    if mesh_kind == "hsdp":
        from torch.distributed.tensor import Replicate
        placements = [Replicate(), Shard(0)]
    params = [torch.nn.Parameter(distribute_tensor(w.clone().to(dev), mesh, placements, src_data_rank=None)
                                 if mesh is not None else w.clone().to(dev)) for w in (wq0, wk0)]
    opt = distopt.DistributedOptimizer(params, "muon", lr=0.02)
    clip = distopt.QKClip(opt, threshold=tau)
    clip.register("layer", params[0], params[1], HEADS, KV_HEADS)
    calls = []
    original = exchange.max_over_ranks

    def counted(values, group=None):
        calls.append(values.numel())
        return original(values, group)

    exchange.max_over_ranks = counted
    try:
        for step in range(STEPS):
            for p, g in zip(params, grads[step]):
                p.grad = (distribute_tensor(g.clone().to(dev), mesh, placements, src_data_rank=None)
                          if mesh is not None else g.clone().to(dev))
            clip.report("layer", reports[step][rank].to(dev))
            opt.step()
    finally:
        exchange.max_over_ranks = original
    # One process: torch.optim.Muon, then the paper's loop with the maxima over every rank.
    ref = [torch.nn.Parameter(wq0.clone()), torch.nn.Parameter(wk0.clone())]
    ref_opt = torch.optim.Muon(ref, lr=0.02)
    for step in range(STEPS):
        for p, g in zip(ref, grads[step]):
            p.grad = g.clone()
        ref_opt.step()
        wq, wk = papers_loop(ref[0].detach(), ref[1].detach(), reports[step].amax(0), tau, HEADS, KV_HEADS, HEAD_DIM)
        with torch.no_grad():
            ref[0].copy_(wq)
            ref[1].copy_(wk)
    full = [(p.full_tensor() if mesh is not None else p.detach()).cpu() for p in params]
    diffs = [(a - b.detach()).abs().max().item() / b.detach().abs().max().item() for a, b in zip(full, ref)]
    return diffs, calls


@pytest.mark.parametrize("mesh_kind,world_size", [("fsdp", 2), ("fsdp", 3), ("fsdp", 4), ("hsdp", 4), ("plain", 2)])
def test_qk_clip_on_shards_equals_one_process(ranks, mesh_kind, world_size):
    for diffs, calls in ranks(world_size, _run, mesh_kind):
        # Muon is bitwise torch.optim.Muon; the clip's factor is a float32 power here and a float64 square root in
        # the loop: an ulp or two per step (measured 1.4e-7 of the largest entry after three steps).
        assert max(diffs) <= 1e-6, diffs
        assert calls == [HEADS] * STEPS  # one all_reduce of every head's maximum per step
