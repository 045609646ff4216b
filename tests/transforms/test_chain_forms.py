"""Each algorithm's chain form (the path a group takes once any flag is on) is the algorithm: with a flag that
changes nothing (an update clip at 1e30) the result equals the algorithm's own step, which the other tests hold
bitwise to torch.optim, torch.optim.Muon, the authors' SOAP and kron-torch.

float64; the chain form computes ``lr * u`` where the algorithms fold the scale into one ``addcdiv``, so they differ
by a few units of float64 (measured: at most 3e-13 of the distance moved); 1e-11 of it is the bound. SOAP's own
step decays the parameter after moving it, the chains before (HeavyBall's order): they agree exactly only without
weight decay, so SOAP runs without it here, and its decay form is checked on its own below.
"""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import worst

SHAPES = ((6, 5), (7,), (4, 4), (3, 1, 2))
NOOP = dict(update_clipping="l2_clip", update_clip_at=1e30)

CASES = [("adamw", {}), ("adamw", dict(amsgrad=True, maximize=True)), ("adam", dict(weight_decay=0.1)),
         ("adam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
         ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)), ("sgd", dict(lr=0.1)),
         ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, maximize=True)), ("nadam", dict(weight_decay=0.1)),
         ("nadam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
         ("rmsprop", dict(momentum=0.9, centered=True, weight_decay=0.1)), ("rmsprop", {}),
         ("lion", dict(weight_decay=0.1)), ("laprop", dict(weight_decay=0.1)), ("adopt", dict(weight_decay=0.1)),
         ("adopt", dict(weight_decay=0.1, decouple=True)),
         ("ademamix", dict(weight_decay=0.1, alpha_warmup=3, beta3_warmup=3)),
         ("radam", dict(weight_decay=0.1)), ("radam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
         ("adamax", dict(weight_decay=0.1, maximize=True)), ("adagrad", dict(lr_decay=0.1, weight_decay=0.1)),
         ("adadelta", dict(weight_decay=0.1, rho=0.5)),
         ("muon", dict(owner_dtype="float64", weight_decay=0.1)),
         ("muon", dict(owner_dtype="float64", nesterov=False, adjust_lr_fn="match_rms_adamw")),
         ("soap", dict(precondition_frequency=2, weight_decay=0.0)),
         ("soap", dict(precondition_frequency=2, weight_decay=0.0, precondition_1d=True, correct_bias=False)),
         ("psgdkron", dict(weight_decay=0.1, preconditioner_update_probability=0.5)),
         ("psgdkron", dict(memory_save_mode="one_diag"))]


def run(algo, hp, flags, steps=6):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # SOAP's eigh of rank-deficient statistics depends on LAPACK's blocking
    try:
        torch.manual_seed(0)
        shapes = [s for s in SHAPES if len(s) >= 2] if algo == "muon" else SHAPES
        params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
        start = [p.detach().clone() for p in params]
        opt = distopt.DistributedOptimizer(params, algo, compile=False, **hp, **flags)
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        return start, [p.detach().clone() for p in params]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("algo,hp", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_the_chain_form_is_the_algorithm(algo, hp):
    start, own = run(algo, hp, {})
    _, chained = run(algo, hp, NOOP)
    assert worst(own, chained) <= 1e-11 * worst(own, start)
    if algo in ("sgd", "rmsprop", "adagrad", "adadelta") and "momentum" not in hp:
        return  # without momentum their update has the gradient's sign everywhere: caution keeps all of it, rightly
    _, cautious = run(algo, hp, dict(caution=True))
    assert worst(own, cautious) > 1e-3 * worst(own, start), "caution changed nothing"


def test_soap_with_flags_decays_before_the_step():
    """With flags SOAP's decay is the chains' ``p (1 - lr wd) - lr u``; its own is ``(p - lr u)(1 - lr wd)``. One
    step apart they differ by ``lr² wd |u|``: here checked on the second step (SOAP's first makes no update)."""
    hp = dict(precondition_frequency=1, weight_decay=0.5, lr=0.1)
    start, own = run("soap", hp, {}, steps=2)
    _, chained = run("soap", hp, NOOP, steps=2)
    moved = [(p - s) for p, s in zip(own, start)]
    for p, q, s, d in zip(own, chained, start, moved):
        # own: (s + d_own) with d_own = -lr u - lr wd (s - lr u); chained: s - lr wd s - lr u
        u = -(d + 0.1 * 0.5 * s) / (0.1 * (1 - 0.1 * 0.5))
        assert torch.allclose(q, s * (1 - 0.1 * 0.5) - 0.1 * u, rtol=0, atol=1e-12)
