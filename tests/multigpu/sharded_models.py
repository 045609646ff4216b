"""Models and gradient feeds shared by the multi-rank tests (imported inside the rank processes)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .harness import device, mesh as cached_mesh


class Net(nn.Module):
    """Row counts 7, 3 and 1 do not divide by 2, 3 or 4: FSDP2 gives uneven shards, and empty ones on the ranks
    past the last row (b.* on rank 3 of 4, c.weight on every rank but 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)
        self.c = nn.Linear(3, 1, bias=False)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def mesh_for(kind: str):
    """``"fsdp"``: a 1-D mesh; ``"hsdp"``: a 2-D (replicate, shard) mesh, 2 replicas."""
    world, dev = dist.get_world_size(), device().type
    if kind == "fsdp":
        return cached_mesh(dev, (world,))
    return cached_mesh(dev, (2, world // 2), ("replicate", "shard"))


def sharded_pair(mesh, dtype=torch.float32, seed=0):
    """An unsharded reference model and an FSDP2 copy of it, with identical initial weights."""
    torch.manual_seed(seed)
    reference = Net().to(device=device(), dtype=dtype)
    model = copy.deepcopy(reference)
    for module in (model.a, model.b, model.c):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, reference


def feed_same_grads(params, reference_params, generator):
    """Give every reference parameter a fresh random gradient, and each DTensor parameter its shard of it."""
    for p, ref in zip(params, reference_params):
        full = torch.randn(ref.shape, generator=generator, dtype=ref.dtype).to(ref.device)
        ref.grad = full
        if isinstance(p, DTensor):
            p.grad = distribute_tensor(full.clone(), p.device_mesh, p.placements, src_data_rank=None)
        else:
            p.grad = full.clone()


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_resumed_like_torch_optim(runs: dict) -> None:
    """``runs[kind]``: per rank, the full parameters (start, after the straight run, after save-and-resume). Every
    parameter must have moved and resumed bitwise, and distopt.AdamW must equal torch.optim.AdamW."""
    for kind, per_rank in runs.items():
        for start, straight, resumed in per_rank:
            for name in straight:
                assert not torch.equal(start[name], straight[name]), (kind, name, "never updated")
                assert torch.equal(resumed[name], straight[name]), (kind, name, "did not resume exactly")
    for name, value in runs["torch.AdamW"][0][1].items():
        assert torch.equal(runs["distopt.AdamW"][0][1][name], value), name
