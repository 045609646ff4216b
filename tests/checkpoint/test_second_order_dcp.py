"""Every second-order variant (HeavyBall's SOAP and PSGD families, Shampoo) through a DCP checkpoint in one process:
saved after some steps through torch's ``get_state_dict``, loaded into a fresh model and optimizer, and continued, it
equals the uninterrupted run bitwise (every owner state, the fit schedules and the draws' counters restored). The
multi-rank resharding of a selection of them is in ``tests/multigpu/test_checkpoint_reshard.py``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import distopt
import distopt.checkpoint
from distopt.algos.psgd_family import FAMILY as PSGD
from distopt.algos.soap_family import FAMILY as SOAP

NAMES = [cls.name for cls in (*SOAP, *PSGD)] + ["psgdlra", "shampoo"]
EXTRA = {"shampoo": dict(max_preconditioner_dim=6, precondition_frequency=2),
         "psgdpro": dict(preconditioner_update_probability=0.5), "lather": dict(preconditioner_update_probability=0.5),
         "psgdlra": dict(preconditioner_update_probability=0.5)}


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(6, 5))
        self.b = torch.nn.Parameter(torch.randn(7))
        self.c = torch.nn.Parameter(torch.randn(3, 2, 4))


def _steps(model, opt, seed: int, count: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _make(model, name):
    return distopt.DistributedOptimizer(list(model.named_parameters()), name, lr=1e-2, **EXTRA.get(name, {}))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_continues_like_the_uninterrupted_run(name, tmp_path):
    model = Model()
    opt = _make(model, name)
    _steps(model, opt, 1, 3)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path), no_dist=True)
    _steps(model, opt, 2, 3)

    fresh = Model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # nothing of the fresh model's own values may survive the load
    resumed = _make(fresh, name)
    msd, osd = get_state_dict(fresh, resumed)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True, planner=distopt.checkpoint.SafeLoadPlanner())
    set_state_dict(fresh, resumed, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _steps(fresh, resumed, 2, 3)
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), (name, n, (a - b).abs().max().item())
