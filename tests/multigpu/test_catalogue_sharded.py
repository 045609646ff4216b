"""The first-order catalogue under FSDP2 (W = 1 to 4, uneven and empty shards), HSDP and DDP-style plain tensors
equals the same optimizer in one process.

Elementwise maths gives the same bits. Adafactor, SinkSGD, SUDSAdamW, Scion, NorMuon, AdaMuon, the SOAP and PSGD families and Shampoo run on owners, where the whole tensor is: the same bits
too. The algorithms with a reduction (StableAdamW's RMS, Lion-k's, HyperBall's and MSAMLaProp's norms over each whole tensor, Prodigy's
statistics over the whole group) add the shards' sums in another order: the tolerance is that of the flags'
reductions (``STEPS * LARGEST * eps`` of the distance moved; see ``test_flags_sharded``). The collectives counted are the chain runtime's all_reduces per step.
"""

from __future__ import annotations

import pytest
import torch

from distopt import DistributedOptimizer

from .harness import device, mesh as cached_mesh
from .sharded_models import feed_same_grads, full
from .test_flags_sharded import check_sharded_equals_single

#: name -> (algorithm, hyperparameters, flags, all_reduce calls per step, bitwise)
CONFIGS = {
    "adafactor": ("adafactor", dict(lr=0.05, weight_decay=0.1), {}, 0, True),
    "adan": ("adan", dict(lr=0.01), {}, 0, True),
    "adan/caution+decouple_lr": ("adan", dict(lr=0.01, weight_decay=0.1), dict(caution=True, decouple_lr=True), 1,
                                 True),
    "ranger": ("ranger", dict(lr=0.01, weight_decay=0.1, k=2), {}, 0, True),
    "ranger/mars": ("ranger", dict(lr=0.01, k=3), dict(mars=True), 0, True),
    "stableadamw": ("stableadamw", dict(lr=0.01), {}, 1, False),
    "stableadamw/caution": ("stableadamw", dict(lr=0.01), dict(caution=True), 2, False),
    "prodigy": ("prodigy", dict(d0=1e-3, slice_p=3, weight_decay=0.1), {}, 1, False),
    "lion/kappa": ("lion", dict(lr=0.01, kappa_p=1.5), {}, 1, False),
    "lion/auto+caution": ("lion", dict(lr=0.01, auto_kappa_p=True), dict(caution=True), 2, False),
    "signsgd": ("signsgd", dict(lr=0.01, nesterov=True, weight_decay=0.1), {}, 0, True),
    "sinksgd": ("sinksgd", dict(lr=0.01, momentum=0.9, weight_decay=0.1), {}, 0, True),
    "sinksgd/mars": ("sinksgd", dict(lr=0.01, momentum=0.9), dict(mars=True), 0, True),
    "simplified_ademamix": ("simplified_ademamix", dict(lr=1e-3, weight_decay=0.1, beta1_warmup=3), {}, 0, True),
    "simplified_ademamix/caution": ("simplified_ademamix", dict(lr=1e-3), dict(caution=True), 1, True),
    "adamc": ("adamc", dict(weight_decay=0.5, max_lr=0.02), dict(warmup_steps=2), 0, True),
    "hyperballadamw": ("hyperballadamw", dict(lr=0.01, weight_decay=0.1), {}, 1, False),
    "sudsadamw": ("sudsadamw", dict(lr=0.01, weight_decay=0.1), {}, 0, True),
    "scion": ("scion", dict(lr=0.01, weight_decay=0.1), {}, 0, True),
    "sfadamw": ("sfadamw", dict(lr=0.01, weight_decay=0.1), dict(warmup_steps=2), 0, True),
    "normuon": ("normuon", dict(lr=0.02, nesterov=True, weight_decay=0.1), {}, 0, True),
    "normuon/caution": ("normuon", dict(lr=0.02), dict(caution=True), 2, True),
    "adamuon": ("adamuon", dict(lr=0.02, weight_decay=0.1, use_atan2=True), {}, 0, True),
    "adamuon/normuon+mars": ("adamuon", dict(lr=0.02, weight_decay=0.1, normuon_variant=True, approx_mars=True,
                                             cautious_wd=True, auto_projection=False, kappa_p=1.5), {}, 0, True),
    # HeavyBall's SOAP family: every state on the owner, same-shape matrices stacked there (the stack depends on
    # which matrices a rank owns; the batched linear algebra gives each matrix the bits it gets alone).
    "klsoap": ("klsoap", dict(lr=0.01, weight_decay=0.1), {}, 0, True),
    "heavysoapademamix/caution": ("heavysoapademamix", dict(lr=0.01, precondition_1d=True), dict(caution=True), 1,
                                  True),
    "klshampoo": ("klshampoo", dict(lr=0.01), {}, 0, True),
    "soapnadam/mars": ("soapnadam", dict(lr=0.01, precondition_frequency=1), dict(mars=True), 0, True),
    # HeavyBall's PSGD family: factors (and LATHER's moments and bases) on the owner, draws seeded by name and step.
    "psgdpro": ("psgdpro", dict(lr=0.01, weight_decay=0.1), {}, 0, True),
    "qsgd/mars": ("qsgd", dict(lr=0.01, memory_save_mode="one_diag", preconditioner_update_probability=0.5),
                  dict(mars=True), 0, True),
    "lather": ("lather", dict(lr=0.01), {}, 0, True),
    # PSGDLRA: one low-rank preconditioner over the group, its sums over every tensor and rank (eight collectives
    # on a fitting step: the balance, five sums, the argmax, and two to apply it).
    "psgdlra": ("psgdlra", dict(lr=0.01, weight_decay=0.1), {}, 8, False),
    "psgdlra/delayed+caution": ("psgdlra", dict(lr=0.01, delayed=True, rank=3), dict(caution=True), 9, False),
    # Shampoo: blocks of factors and inverse roots on the owner (2-D blocks, merged vectors, blocks of a cut weight).
    "shampoo": ("shampoo", dict(lr=0.01, max_preconditioner_dim=6, precondition_frequency=2, weight_decay=0.1), {},
                0, True),
    "msamlaprop": ("msamlaprop", dict(lr=0.01, weight_decay=0.1, sam_step_size=0.5), {}, 1, False),
}


@pytest.mark.parametrize("mesh_kind,world_size", [("fsdp", 1), ("fsdp", 2), ("fsdp", 3), ("fsdp", 4), ("hsdp", 4),
                                                  ("plain", 2)])
def test_catalogue_on_shards_equals_the_single_process_run(ranks, mesh_kind, world_size):
    check_sharded_equals_single(ranks, mesh_kind, world_size, CONFIGS)


def _placements_equal_one_process():
    """The catalogue's reducing and owner algorithms on DTensor parameters of every placement (Shard(1), Replicate,
    2-D meshes): each against the same optimizer on the whole tensors in this process. Prodigy samples ``slice_p``
    by global position, so a column-sharded tensor must sample what the whole tensor samples."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor

    from .test_elementwise_sharded import _placements_cases

    world, dev = dist.get_world_size(), device()
    shapes = [(7, 5), (5, 3), (1, 64), (9,), (3, 4, 2)]
    algorithms = [("prodigy", dict(d0=1e-4, slice_p=3)), ("stableadamw", dict(lr=1e-2)),
                  ("lion", dict(lr=1e-2, kappa_p=1.5)), ("hyperballadamw", dict(lr=1e-2, weight_decay=0.1)),
                  ("adafactor", dict(lr=1e-2)), ("sinksgd", dict(lr=1e-2, momentum=0.9)),
                  ("scion", dict(lr=1e-2)), ("adan", dict(lr=1e-2))]
    mismatches = []
    for mesh_shape, placements in _placements_cases(world):
        mesh = cached_mesh(dev.type, mesh_shape)
        for name, kwargs in algorithms:
            torch.manual_seed(0)
            reference = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
            ours = [torch.nn.Parameter(distribute_tensor(r.detach().clone(), mesh, [
                Shard(0) if (isinstance(pl, Shard) and pl.dim >= r.ndim) else pl for pl in placements],
                src_data_rank=None)) for r in reference]
            start = [r.detach().clone() for r in reference]
            targets = [torch.randn(s, device=dev) for s in shapes]
            opt = DistributedOptimizer(ours, name, **kwargs)
            ref_opt = DistributedOptimizer(reference, name, **kwargs)  # whole tensors on every rank
            gen = torch.Generator().manual_seed(1)
            for _ in range(STEPS_TO_GROW):
                # A noisy quadratic: gradients that point back to where the parameters came from, so that
                # Prodigy's d grows (on random gradients it stays at d0 and its sampling would go unchecked).
                for p, r, t in zip(ours, reference, targets):
                    g = r.detach() - t + 0.1 * torch.randn(r.shape, generator=gen).to(dev)
                    r.grad = g.clone()
                    p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                opt.step()
                ref_opt.step()
            if name == "prodigy":
                grown = opt.param_groups[0]["d"]
                if not grown > 10 * kwargs["d0"]:
                    mismatches.append(f"{mesh_shape} {placements}: prodigy's d did not grow ({grown})")
                if abs(grown - ref_opt.param_groups[0]["d"]) > 1e-5 * grown:
                    mismatches.append(f"{mesh_shape} {placements}: prodigy's d {grown} != {ref_opt.param_groups[0]['d']}")
            moved = max((r.detach() - s).abs().max().item() for r, s in zip(reference, start))
            for i, (p, r) in enumerate(zip(ours, reference)):
                diff = (full(p) - r.detach()).abs().max().item()
                if diff > STEPS_TO_GROW * 64 * torch.finfo(torch.float32).eps * max(moved, 1.0):
                    mismatches.append(f"{mesh_shape} {placements} {name}: param {i} {tuple(r.shape)} diff {diff:.3g}")
    return mismatches


STEPS_TO_GROW = 8


@pytest.mark.parametrize("world_size", [2, 4])
def test_dtensor_placements_equal_one_process(ranks, world_size):
    results = ranks(world_size, _placements_equal_one_process)
    assert results == [[]] * world_size, results[0][:5]
