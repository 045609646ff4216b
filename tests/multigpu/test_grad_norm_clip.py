"""``max_grad_norm``: the norm of every gradient of every rank together, clipped as
``torch.nn.utils.clip_grad_norm_`` clips DTensor gradients, against that function followed by torch.optim.SGD on
the same FSDP2 model (and on plain tensors in one process).

torch sums per-tensor norms' squares in another grouping than distopt's sum of squares: the total norm agrees to a
few float32 units (``rtol`` 1e-6), and SGD, linear in the gradient, carries that relative difference into the
distance moved (bound: ``1e-5`` of it over the steps here). Each case clips for real (the norm exceeds the bound).
"""

from __future__ import annotations

import copy

import pytest
import torch

import distopt

from .harness import device
from .sharded_models import Net, feed_same_grads, full, mesh_for, sharded_pair

STEPS = 4
MAX_NORM = 0.5


def _run(mesh_kind):
    if mesh_kind == "plain":
        torch.manual_seed(0)
        ours_model = Net().to(device())
        theirs_model = copy.deepcopy(ours_model)
        shadow = copy.deepcopy(ours_model)
    else:
        mesh = mesh_for(mesh_kind)
        ours_model, shadow = sharded_pair(mesh)
        theirs_model, _ = sharded_pair(mesh)
    start = {n: full(p).detach().clone().cpu() for n, p in ours_model.named_parameters()}
    ours = distopt.SGD(ours_model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=MAX_NORM)
    theirs = torch.optim.SGD(theirs_model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    norms = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        feed_same_grads(list(ours_model.parameters()), list(shadow.parameters()), gen)
        for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
            q.grad = p.grad.clone()
        total = torch.nn.utils.clip_grad_norm_(list(theirs_model.parameters()), MAX_NORM)
        ours.step()
        theirs.step()
        norms.append((float(full(total)), float(ours.last_grad_norm)))
    return (start, {n: full(p).detach().cpu() for n, p in ours_model.named_parameters()},
            {n: full(p).detach().cpu() for n, p in theirs_model.named_parameters()}, norms)


def _check(result):
    start, ours, theirs, norms = result
    for torch_norm, our_norm in norms:
        assert torch_norm > MAX_NORM
        assert our_norm == pytest.approx(torch_norm, rel=1e-6)
    moved = max((ours[n] - start[n]).abs().max().item() for n in ours)
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max().item() <= 1e-5 * moved, name


def test_one_process_equals_clip_grad_norm():
    _check(_run("plain"))


@pytest.mark.parametrize("mesh_kind,world_size", [("fsdp", 2), ("fsdp", 3), ("hsdp", 4)])
def test_sharded_equals_clip_grad_norm_on_dtensors(ranks, mesh_kind, world_size):
    for result in ranks(world_size, _run, mesh_kind):
        _check(result)


def test_invalid_max_grad_norm_is_refused():
    with pytest.raises(ValueError, match="invalid max_grad_norm=0"):
        distopt.AdamW([torch.nn.Parameter(torch.ones(2))], max_grad_norm=0)
