"""Parameters swapped in ``param_groups`` after the optimizer was built, on 2 ranks without any framework: build the
optimizer on a plain model, ``fully_shard`` it, put the new DTensor parameters into ``param_groups`` by name (what
accelerate does), train, save through DCP, and resume in a fresh job. Each optimizer must resume exactly, every
matrix must move, and distopt.AdamW must equal torch.optim.AdamW. Also: a multi-rank owner plan refuses to be
copied, at copy time."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import distopt

from .sharded_models import assert_resumed_like_torch_optim, mesh_for

STEPS, SAVED_AT = 5, 3
OPTIMIZERS = {
    "torch.AdamW": lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1),
    "distopt.AdamW": lambda named: distopt.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1),
    "distopt.Muon": lambda named: distopt.Muon(named, lr=2e-2, adamw_lr=1e-2, owner_dtype=torch.float32),
    "distopt.SOAP": lambda named: distopt.SOAP(named, lr=1e-2, precondition_frequency=2),
}


def _built_then_swapped(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    before = list(model.named_parameters())
    opt = OPTIMIZERS[kind](before)  # on the plain parameters
    mesh = mesh_for("fsdp")
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    after = dict(model.named_parameters())
    successor = {id(p): after[name] for name, p in before}
    for group in opt.param_groups:
        group["params"] = [successor[id(p)] for p in group["params"]]
    return model, opt


def _train(model, opt, start, stop):
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _full(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _swap_run(kind, folder):
    model, opt = _built_then_swapped(kind)
    start = _full(model)
    _train(model, opt, 0, STEPS)
    straight = _full(model)

    model, opt = _built_then_swapped(kind)
    _train(model, opt, 0, SAVED_AT)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)

    model, opt = _built_then_swapped(kind)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _train(model, opt, SAVED_AT, STEPS)
    return start, straight, _full(model)


def test_swapped_parameters_train_and_resume_like_torch_optim(ranks, backend, tmp_path):
    if backend != "gloo":
        pytest.skip("runs on gloo")
    runs = {kind: ranks(2, _swap_run, kind, str(tmp_path / kind.replace(".", "_"))) for kind in OPTIMIZERS}
    assert_resumed_like_torch_optim(runs)


def _copy_refused():
    model, opt = _built_then_swapped("distopt.Muon")
    try:
        copy.deepcopy(opt)
    except TypeError as error:
        return str(error)
    return "copied"


def test_a_multi_rank_owner_plan_refuses_to_be_copied(ranks, backend):
    if backend != "gloo":
        pytest.skip("runs on gloo")
    for message in ranks(2, _copy_refused):
        assert "matrix algorithms run on 2 ranks" in message and "load_state_dict" in message


def _mesh_of_one_rank():
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = DeviceMesh("cpu", [dist.get_rank()])
    weight = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
    try:
        distopt.DistributedOptimizer([("w", weight)], algorithm="muon")
    except NotImplementedError as error:
        return str(error)
    return "accepted"


def test_a_mesh_over_other_ranks_than_the_optimizer_is_refused_by_name(ranks, backend):
    if backend != "gloo":
        pytest.skip("runs on gloo")
    for rank, message in enumerate(ranks(2, _mesh_of_one_rank)):
        assert f"parameter w: its device mesh spans ranks [{rank}], not the optimizer's process group [0, 1]" \
            in message, message
