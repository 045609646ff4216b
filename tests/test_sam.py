"""Sharpness-aware minimization against HeavyBall 3.2.1 itself (float64, HeavyBall's states in float64, its compiler
off): ``SAMWrapper`` (ASAM's ascent ``p + ball g p²`` then the wrapped optimizer's step with the perturbed point's
gradients) around an optimizer that equals HeavyBall's, and ``MSAMLaProp``.

Tolerance: 1e-6 of the distance moved, as for the other HeavyBall comparisons (HeavyBall's scalars are 0-d tensors,
its lerps ``x (1 - a) + y a``; measured below 1e-7 of it)."""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import run_on_random_grads, worst

heavyball = pytest.importorskip("heavyball", reason="the test extra heavyball==3.2.1 is required")
heavyball.utils.compile_mode = None

SHAPES = ((6, 5), (7,), (4, 4), (3, 2, 2))


def _regression(make, steps=5, with_closure=True):
    """A least-squares fit of a linear layer in float64, stepped through a closure; returns (start, end)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    start = [weight.detach().clone(), bias.detach().clone()]
    opt = make([weight, bias])
    losses = []

    def closure():
        opt.zero_grad()
        loss = ((x @ weight.T + bias - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        if with_closure:
            losses.append(float(opt.step(closure)))
        else:
            closure()
            opt.step()
    return start, [weight.detach().clone(), bias.detach().clone()], losses


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("inner", ["SOLP", "HeavySOAP"])
def test_sam_wrapper_equals_heavyball(inner):
    hp = dict(lr=0.01)
    start, ours, our_losses = _regression(lambda ps: distopt.SAMWrapper(ps, getattr(distopt, inner)(ps, **hp),
                                                                         ball=0.5))
    _, theirs, their_losses = _regression(lambda ps: heavyball.SAMWrapper(
        ps, getattr(heavyball, inner)(ps, storage_dtype="float64", **hp), ball=0.5))
    moved = worst(ours, start)
    assert worst(ours, theirs) <= 1e-6 * moved, (worst(ours, theirs), moved)
    assert our_losses == pytest.approx(their_losses, rel=1e-7)  # the losses at the parameters above
    _, plain, _ = _regression(lambda ps: getattr(distopt, inner)(ps, **hp), with_closure=False)
    assert worst(ours, plain) > 0.01 * moved  # the ascent changes the result: the test can tell SAM from no SAM


def test_sam_wrapper_needs_a_closure_and_restores_the_parameters():
    p = torch.nn.Parameter(torch.randn(3, 2))
    sam = distopt.SAMWrapper([p], distopt.SGD([p], lr=0.0), ball=10.0)
    with pytest.raises(ValueError, match="closure"):
        sam.step()
    before = p.detach().clone()
    seen = []

    def closure():
        sam.zero_grad()
        seen.append(p.detach().clone())
        (p ** 3).sum().backward()
        return 0.0

    sam.step(closure)
    assert torch.equal(p.detach(), before)  # lr 0: restored exactly, not perturbed
    assert not torch.equal(seen[1], seen[0])  # the second pass saw the perturbed point


def test_sam_wrapper_refuses_what_it_cannot_wrap():
    p, q = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(TypeError, match="distopt optimizers"):
        distopt.SAMWrapper([p], torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="other parameters"):
        distopt.SAMWrapper([p, q], distopt.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="ball"):
        distopt.SAMWrapper([p], distopt.SGD, ball=-1.0)


def test_sam_wrapper_state_dict_round_trip():
    p = torch.nn.Parameter(torch.randn(3))
    sam = distopt.SAMWrapper([p], distopt.AdamW, ball=0.2)
    p.grad = torch.randn(3)
    sam.wrapped_optimizer.step()
    other = distopt.SAMWrapper([p], distopt.AdamW, ball=0.9)
    other.load_state_dict(sam.state_dict())
    assert other.ball == 0.2
    assert torch.equal(other.state[p]["exp_avg"], sam.state[p]["exp_avg"])
    with pytest.raises(ValueError, match="wrapped"):
        other.load_state_dict({"ball": 0.1})


@pytest.mark.parametrize("hp", [dict(weight_decay=0.1), dict(warmup_steps=3, sam_step_size=0.5)])
def test_msam_laprop_equals_heavyball_in_training_and_in_eval(hp):
    def run(make):
        start, end, opt = run_on_random_grads(make, SHAPES, 6)
        opt.eval()
        return start, end, [p.detach().clone() for group in opt.param_groups for p in group["params"]]

    start, ours, our_z = run(lambda ps: distopt.MSAMLaProp(ps, lr=0.01, **hp))
    _, theirs, their_z = run(lambda ps: heavyball.MSAMLaProp(ps, lr=0.01, storage_dtype="float64", **hp))
    moved = worst(ours, start)
    assert worst(ours, theirs) <= 1e-6 * moved, (worst(ours, theirs), moved)
    assert worst(our_z, their_z) <= 1e-6 * moved
    assert worst(our_z, ours) > 1e-3  # eval put z, not the perturbed point, in the parameters


def test_msam_laprop_refuses_to_step_in_eval_mode():
    p = torch.nn.Parameter(torch.randn(3))
    opt = distopt.MSAMLaProp([p])
    p.grad = torch.randn(3)
    opt.step()
    opt.eval()
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    opt.step()
