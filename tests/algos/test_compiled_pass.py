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
STEPS = 8  # RAdam rectifies from its sixth step on
CASES = [("adamw", {}), ("adamw", dict(amsgrad=True, maximize=True)), ("adam", dict(weight_decay=0.1)),
         ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)), ("sgd", dict(lr=0.1)),
         ("nadam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
         ("rmsprop", dict(momentum=0.9, centered=True, weight_decay=0.1)), ("lion", dict(weight_decay=0.1)),
         ("laprop", dict(weight_decay=0.1)), ("adopt", dict(weight_decay=0.1)),
         ("ademamix", dict(weight_decay=0.1, alpha_warmup=3, beta3_warmup=3)),
         ("radam", dict(weight_decay=0.1, decoupled_weight_decay=True)), ("radam", dict(betas=(0.5, 0.6))),
         ("adamax", dict(weight_decay=0.1, maximize=True)), ("adagrad", dict(lr_decay=0.1, weight_decay=0.1)),
         ("adadelta", dict(rho=0.5, weight_decay=0.1))]


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


def test_many_groups_compile_past_torchs_default_recompile_limit():
    """One graph per group composition: ten groups of different sizes (torch's default limit is 8 graphs per
    function in a process) all run compiled, with the eager step's results."""
    torch._dynamo.reset()

    def train(compile):
        torch.manual_seed(0)
        params = [torch.randn(i + 1, requires_grad=True) for i in range(10)]
        opt = distopt.DistributedOptimizer([{"params": [p], "lr": 0.01 * (i + 1)} for i, p in enumerate(params)],
                                           "adamw", compile=compile)
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        return params

    for a, b in zip(train(True), train(False)):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_a_kernel_that_cannot_compile_falls_back_to_the_eager_step(monkeypatch):
    class Failure(torch._dynamo.exc.TorchDynamoException):
        pass

    def broken(fn):
        def raise_(*args, **kwargs):
            raise Failure("no compiler here")
        return raise_

    monkeypatch.setattr(compiled, "_compiled", broken)
    monkeypatch.setattr(compiled, "_WARNED", set())
    with pytest.warns(UserWarning, match="compiled pass of adamw could not compile"):
        fast = run("adamw", {}, True)
    assert all(torch.equal(a, b) for a, b in zip(fast, run("adamw", {}, False)))


def test_state_the_kernel_lacks_gets_the_eager_explanation():
    p = torch.nn.Parameter(torch.randn(3))
    opt = distopt.SGD([p], lr=0.1, momentum=0.0)
    opt.defaults["compile"] = True
    opt._compile = True
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(RuntimeError, match="momentum was switched on after the first step"):
        opt.step()


def test_a_float64_scalar_parameter_moves_under_the_compiled_pass():
    """Inductor dropped the in-place update of a 0-d float64 input (the parameter never moved): such tensors step
    eagerly, and the rest of the group still compiles."""
    def steps(compile):
        params = [torch.full((), 0.5, dtype=torch.float64, requires_grad=True),
                  torch.full((3,), 0.5, dtype=torch.float64, requires_grad=True)]
        opt = distopt.Lion(params, lr=1e-2, compile=compile)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        return [p.detach() for p in params]

    fast, eager = steps(True), steps(False)
    assert fast[0].item() != 0.5
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(fast, eager))
