"""accelerate's documented FSDP2 route, on 2 gloo ranks: build the optimizer on ``model.parameters()``, then
``accelerator.prepare(model, optimizer, scheduler)``, train, ``save_state``, and in a fresh job ``load_state`` and
train on. accelerate shards the model and then swaps the new DTensor parameters into the optimizer's
``param_groups`` (after a ``state_dict``/``load_state_dict`` round trip on the old ones); torch.optim follows, and
so must distopt: before, distopt.AdamW raised ``KeyError`` at ``save_state`` and distopt.Muon never updated a
matrix.

accelerate turns FSDP on only for GPU-like devices; on the CPU its distributed type is set to FSDP after the
``Accelerator`` is built (on both of its singletons, or the next ``AcceleratorState()`` reverts it).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distopt

from .sharded_models import assert_resumed_like_torch_optim

pytest.importorskip("accelerate", reason="accelerate is a test dependency (scripts/setup.sh installs it)")

STEPS, SAVED_AT = 5, 3


def _accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()),
                      LOCAL_RANK=str(dist.get_rank()), LOCAL_WORLD_SIZE=str(dist.get_world_size()),
                      OMP_NUM_THREADS="1")
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2
    return accelerator


OPTIMIZERS = {
    "torch.AdamW": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
    "distopt.AdamW": lambda model: distopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
    "distopt.Muon": lambda model: distopt.Muon(model.parameters(), lr=2e-2, adamw_lr=1e-2,
                                               owner_dtype=torch.float32),
}


def _setup(kind):
    accelerator = _accelerator()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    opt = OPTIMIZERS[kind](model)  # before prepare, on the plain parameters: the documented order
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    return accelerator, model, opt, sched


def _train(accelerator, model, opt, sched, start, stop):
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        opt.step()
        sched.step()
        opt.zero_grad()


def _full(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _route(kind, folder):
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator, model, opt, sched = _setup(kind)
        start = _full(model)
        _train(accelerator, model, opt, sched, 0, STEPS)
        straight = _full(model)

        accelerator, model, opt, sched = _setup(kind)
        _train(accelerator, model, opt, sched, 0, SAVED_AT)
        accelerator.save_state(folder)

        accelerator, model, opt, sched = _setup(kind)
        accelerator.load_state(folder)
        _train(accelerator, model, opt, sched, SAVED_AT, STEPS)
        return start, straight, _full(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_prepare_save_and_load_resume_exactly_like_torch_optim(ranks, backend, tmp_path):
    if backend != "gloo":
        pytest.skip("accelerate's CPU route runs on gloo")
    runs = {kind: ranks(2, _route, kind, str(tmp_path / kind.replace(".", "_"))) for kind in OPTIMIZERS}
    assert_resumed_like_torch_optim(runs)
