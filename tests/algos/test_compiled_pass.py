"""The compiled pass of each elementwise algorithm (the default step when compilation is on) equals its eager,
torch-bitwise step to rounding, runs compiled (not a silent fallback), and does not recompile when the lr changes
or the steps go on.

Inductor fuses each tensor's update into one loop and folds the bias corrections into float64 scalars: the two
paths round differently, by at most a few float32 units of the parameters per step (bound: ``4 * steps`` units of
the largest parameter; measured at most 2).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import distopt
import distopt.algos.compiled as compiled

SHAPES = ((6, 5), (7,), (4, 4), (3, 1, 2))
STEPS = 5
CASES = [("adamw", {}), ("adamw", dict(amsgrad=True, maximize=True)), ("adam", dict(weight_decay=0.1)),
         ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)), ("sgd", dict(lr=0.1)),
         ("nadam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
         ("rmsprop", dict(momentum=0.9, centered=True, weight_decay=0.1)), ("lion", dict(weight_decay=0.1)),
         ("laprop", dict(weight_decay=0.1)), ("adopt", dict(weight_decay=0.1)),
         ("ademamix", dict(weight_decay=0.1, alpha_warmup=3, beta3_warmup=3))]


def run(algo, hp, compile, schedule=False):
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    opt = distopt.DistributedOptimizer(params, algo, compile=compile, **hp)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7) if schedule else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        if scheduler:
            scheduler.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("algo,hp", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_compiled_pass_equals_the_eager_step(algo, hp, monkeypatch):
    torch._dynamo.reset()
    ran = []
    original = compiled._compiled
    monkeypatch.setattr(compiled, "_compiled", lambda fn: (ran.append(fn.__name__), original(fn))[1])
    fast = run(algo, hp, True, schedule=True)
    frames = dict(torch._dynamo.utils.counters["frames"])
    eager = run(algo, hp, False, schedule=True)
    assert ran, "the compiled pass did not run"
    scale = max(p.abs().max().item() for p in eager)
    diff = max((a - b).abs().max().item() for a, b in zip(fast, eager))
    assert diff <= 4 * STEPS * torch.finfo(torch.float32).eps * scale, diff
    # A falling lr and the step count are data, not constants of the graph: one compilation for the run.
    assert frames.get("ok", 0) <= 2, frames
