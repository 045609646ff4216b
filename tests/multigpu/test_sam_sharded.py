"""SAMWrapper on FSDP2 shards: the ascent is elementwise (HeavyBall's ASAM, no norm), so each rank perturbs its own
shard; the closure's forward gathers the perturbed weights. Every rank feeds the same batch, so FSDP2's averaged
gradient is the one-process gradient (to its rounding: a sum of W equal terms divided by W), and the parameters after
4 SAM steps equal the one-process run to 1e-5 (float32)."""

from __future__ import annotations

import pytest
import torch

import distopt

from .harness import device
from .sharded_models import full, mesh_for, sharded_pair


def _sam_steps(model, steps: int):
    named = list(model.named_parameters())
    sam = distopt.SAMWrapper(named, distopt.AdamW(named, lr=0.05), ball=0.5)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=gen).to(device()), torch.randn(6, 1, generator=gen).to(device())
    losses = []

    def closure():
        sam.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(float(sam.step(closure)))
    return {name: full(p.detach()).cpu() for name, p in model.named_parameters()}, losses


def _sharded_against_one_process(mesh_kind: str):
    model, reference = sharded_pair(mesh_for(mesh_kind))
    sharded, sharded_losses = _sam_steps(model, 4)
    single, single_losses = _sam_steps(reference, 4)
    start = {name: p.detach().cpu() for name, p in sharded_pair(mesh_for(mesh_kind))[1].named_parameters()}
    moved = max((single[n] - start[n]).abs().max().item() for n in single)
    worst = max((sharded[n] - single[n]).abs().max().item() for n in single)
    return worst, moved, max(abs(a - b) for a, b in zip(sharded_losses, single_losses))


@pytest.mark.parametrize("mesh_kind,world_size", [("fsdp", 2), ("fsdp", 3), ("hsdp", 4)])
def test_sam_on_shards_equals_one_process(ranks, mesh_kind, world_size):
    for worst, moved, loss_gap in ranks(world_size, _sharded_against_one_process, mesh_kind):
        assert moved > 1e-2
        assert worst <= 1e-5, (worst, moved)
        assert loss_gap <= 1e-5
