"""Muon on owner ranks equals torch.optim.Muon (plus torch.optim.AdamW for what Muon routes away), bitwise.

Every test feeds the sharded model the shards of the gradients that the single-process reference sees. The
momentum runs on shards (elementwise, so bitwise), the owner's Newton-Schulz sees the very same bfloat16 matrix as
torch.optim.Muon does, and on CPU batched bf16 products equal per-matrix ones, so the results are identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import distopt
from distopt.algos import muon as muon_module
from distopt.sharding.exchange import MetadataMismatch

from .harness import device, mesh as cached_mesh
from .sharded_models import feed_same_grads, full, mesh_for

STEPS = 3
MUON = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9}
ADAMW = {"adamw_lr": 3e-3, "adamw_weight_decay": 0.05}


class MuonNet(nn.Module):
    """Matrices whose rows do not divide by 2, 3 or 4 (37, 113, 7, 3, 1), a conv weight, an embedding, biases."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.wide = nn.Linear(113, 37)
        self.tall = nn.Linear(37, 113, bias=False)
        self.thin = nn.Linear(64, 1, bias=False)
        self.small = nn.Linear(5, 7)
        self.smaller = nn.Linear(7, 3)
        self.conv = nn.Conv2d(3, 8, 2)

    def forward(self, x):
        raise NotImplementedError("the tests feed gradients directly")


def _sharded(mesh, seed=0):
    torch.manual_seed(seed)
    reference = MuonNet().to(device())
    model = copy.deepcopy(reference)
    if mesh is not None:
        for module in model.children():
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, reference


def _reference_optimizers(reference):
    """torch.optim.Muon on the 2-D view of every matrix distopt.Muon keeps, AdamW on the rest."""
    matrices, views, others = [], [], []
    for name, p in reference.named_parameters():
        if p.ndim >= 2 and "embed" not in name:
            view = nn.Parameter(p.detach().reshape(p.shape[0], -1).clone())
            matrices.append((p, view))
            views.append(view)
        else:
            others.append(p)
    optimizers = [torch.optim.Muon(views, **MUON),
                  torch.optim.AdamW(others, lr=ADAMW["adamw_lr"], weight_decay=ADAMW["adamw_weight_decay"],
                                    foreach=False)]

    def step():
        for p, view in matrices:
            view.grad = None if p.grad is None else p.grad.reshape(view.shape)
        for opt in optimizers:
            opt.step()
        with torch.no_grad():
            for p, view in matrices:
                p.copy_(view.reshape(p.shape))

    return step


def _count_newton_schulz():
    """Patch the owners' Newton-Schulz to count the matrices this rank orthogonalizes."""
    counted = []
    originals = {name: getattr(muon_module, name) for name in ("newton_schulz", "newton_schulz_each",
                                                               "newton_schulz_list")}

    def counting(original):
        def count(matrices, *args):
            counted.append(len(matrices))
            return original(matrices, *args)
        return count

    for name, original in originals.items():  # compiled (batched) and eager (per matrix) paths
        # (the eager list path calls no other of these, so nothing is counted twice)
        setattr(muon_module, name, counting(original))
    return counted, lambda: [setattr(muon_module, n, f) for n, f in originals.items()]


def _compare(model, reference, opt, skip=()):
    """Run both for STEPS steps on the same gradients (``skip``: parameters left without gradient)."""
    ref_step = _reference_optimizers(reference)
    gen = torch.Generator().manual_seed(1)
    counted, restore = _count_newton_schulz()
    try:
        for _ in range(STEPS):
            feed_same_grads(list(model.parameters()), list(reference.parameters()), gen)
            for (name, p), r in zip(model.named_parameters(), reference.parameters()):
                if name in skip:
                    p.grad = r.grad = None
            opt.step()
            ref_step()
    finally:
        restore()
    rank = dist.get_rank()
    return {"mismatches": [name for (name, p), r in zip(model.named_parameters(), reference.parameters())
                           if not torch.equal(full(p), r)],
            "orthogonalized": sum(counted), "owned": STEPS * opt.plan.owners.count(rank), "plan": str(opt.plan),
            "buckets": len(opt.plan.buckets)}


def _check(results, world_size):
    plans = {r["plan"] for r in results}
    assert len(plans) == 1, "ranks computed different plans"
    for rank, r in enumerate(results):
        assert r["mismatches"] == [], (rank, r["mismatches"])
        # Each rank orthogonalized exactly the matrices it owns: nobody computes another's matrix.
        assert r["orthogonalized"] == r["owned"], (rank, r)
    if world_size > 1:
        assert sum(1 for r in results if r["owned"]) > 1, "the work was not split"


def _fsdp(mesh_kind, bucket_bytes=None, owner_batch_bytes=None):
    model, reference = _sharded(mesh_for(mesh_kind))
    extra = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
    if owner_batch_bytes is not None:
        extra["owner_batch_bytes"] = owner_batch_bytes
    opt = distopt.Muon(model.named_parameters(), **MUON, **ADAMW, **extra)
    return _compare(model, reference, opt)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_fsdp_muon_matches_torch(ranks, world_size):
    _check(ranks(world_size, _fsdp, "fsdp"), world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_hsdp_muon_matches_torch(ranks, world_size):
    _check(ranks(world_size, _fsdp, "hsdp"), world_size)


def test_small_buckets_give_the_same_result(ranks):
    results = ranks(3, _fsdp, "fsdp", 4096)
    _check(results, 3)
    assert results[0]["buckets"] == 3  # 37x113 and 113x37 alone, the four small matrices together


@pytest.mark.parametrize("world_size", [1, 2])
def test_one_matrix_per_owner_call_gives_the_same_result(ranks, world_size):
    """``owner_batch_bytes=1``: every owner call takes one matrix (in one process, each is also prepared and
    finished before the next one is prepared)."""
    _check(ranks(world_size, _fsdp, "fsdp", None, 1), world_size)


def _replicated_plain_tensors():
    """DDP-style: plain tensors, identical on every rank; owners split the work and share results."""
    model, reference = _sharded(None)
    opt = distopt.Muon(model.named_parameters(), **MUON, **ADAMW)
    return _compare(model, reference, opt)


@pytest.mark.parametrize("world_size", [2, 3])
def test_replicated_plain_tensors(ranks, world_size):
    _check(ranks(world_size, _replicated_plain_tensors), world_size)


def _dtensor_placements(placements):
    world = dist.get_world_size()
    mesh = cached_mesh(device().type, (2, world // 2) if len(placements) == 2 else (world,))
    torch.manual_seed(0)
    reference = MuonNet().to(device())
    model = copy.deepcopy(reference)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            layout = [Shard(0) if isinstance(pl, Shard) and pl.dim >= p.ndim else pl for pl in placements]
            setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, layout, src_data_rank=None)))
    opt = distopt.Muon(model.named_parameters(), **MUON, **ADAMW)
    return _compare(model, reference, opt)


@pytest.mark.parametrize("placements", [(Shard(1),), (Replicate(),), (Shard(0), Shard(1)), (Shard(1), Replicate())],
                         ids=["S1", "R", "S0S1", "S1R"])
def test_dtensor_placements(ranks, placements):
    _check(ranks(4, _dtensor_placements, placements), 4)


def _params_without_grads():
    model, reference = _sharded(mesh_for("fsdp"))
    opt = distopt.Muon(model.named_parameters(), **MUON, **ADAMW)
    return _compare(model, reference, opt, skip={"tall.weight", "small.bias"})


def test_params_without_grads_are_skipped(ranks):
    results = ranks(2, _params_without_grads)
    for r in results:
        assert r["mismatches"] == []


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all",
                "all_to_all_single", "broadcast", "barrier", "all_gather_object", "broadcast_object_list", "send",
                "recv", "isend", "irecv", "gather", "scatter", "reduce")


def _collectives_per_step(bucket_bytes):
    model, reference = _sharded(mesh_for("fsdp"))
    opt = distopt.Muon(model.named_parameters(), bucket_bytes=bucket_bytes)
    gen = torch.Generator().manual_seed(1)
    feed_same_grads(list(model.parameters()), list(reference.parameters()), gen)
    opt.step()  # warm-up: routes are built here
    calls = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}
    for name in _COLLECTIVES:
        original = originals[name]
        setattr(dist, name, lambda *a, _n=name, _f=original, **k: (calls.append(_n), _f(*a, **k))[1])
    try:
        opt.step()
        opt.step()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return calls, len(opt.plan.buckets), opt.plan.collectives_per_step


@pytest.mark.parametrize("bucket_bytes", [64 * 2**20, 2048])
def test_steady_state_sends_payload_only(ranks, bucket_bytes):
    for calls, buckets, per_step in ranks(2, _collectives_per_step, bucket_bytes):
        assert per_step == 2 * buckets
        assert calls == ["all_to_all_single"] * (2 * per_step)  # two steps


def _mismatched_model(kind):
    rank = dist.get_rank()
    torch.manual_seed(0)
    if kind == "shape":
        model = nn.Sequential(nn.Linear(8, 6 if rank == 0 else 5), nn.Linear(6 if rank == 0 else 5, 4))
    elif kind == "extra":
        layers = [nn.Linear(8, 8), nn.Linear(8, 4)] + ([nn.Linear(4, 4)] if rank == 1 else [])
        model = nn.Sequential(*layers)
    else:  # one rank has no matrices at all: its Muon group is empty, but it still joins the check
        model = nn.Sequential(nn.Linear(8, 8)) if rank == 0 else nn.Sequential(nn.LayerNorm(8))
    try:
        distopt.Muon(model.named_parameters())
    except MetadataMismatch as error:
        return str(error)
    return None


@pytest.mark.parametrize("kind,expected", [
    ("shape", "at position 0, rank 0 has '0.weight' of shape (6, 8)"),
    ("extra", "rank 1 has '2.weight' of shape (4, 4)"),
    ("empty", "rank 0 has '0.weight' of shape (8, 8)"),
])
def test_mismatched_models_fail_on_every_rank(ranks, kind, expected):
    messages = ranks(2, _mismatched_model, kind, timeout=60)
    for message in messages:
        assert message is not None and expected in message, messages
