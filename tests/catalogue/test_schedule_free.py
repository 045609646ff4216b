"""SFAdamW against HeavyBall 3.2.1's SFAdamW and the authors' schedulefree package (AdamWScheduleFree), same
gradients, in float64; ``opt.eval()`` / ``opt.train()`` swap the parameters between ``y`` and ``x``.

HeavyBall computes its scalars (lr, the debiased β2, the weights of the average) as float32 tensors, distopt in
float64: after 6 steps the parameters differ by about 2e-8 (bound: 1e-6 of the distance moved). schedulefree adds
eps to ``sqrt(v̂)`` where HeavyBall floors it: with eps negligible (1e-30) and no warm-up (the two warm up
differently) distopt equals schedulefree to float64 rounding (bound: 1e-13).
"""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import worst

SHAPES = ((6, 5), (7,), (4, 4), (3, 1, 2))


def run(make, steps=6, call_train=False):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    start = [p.detach().clone() for p in params]
    opt = make(params)
    if call_train:
        opt.train()  # schedulefree starts in eval mode
    grads = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads, dtype=torch.float64)
        opt.step()
    y = [p.detach().clone() for p in params]
    opt.eval()
    x = [p.detach().clone() for p in params]
    opt.train()
    return start, y, x, [p.detach().clone() for p in params]


@pytest.mark.parametrize("hp", [dict(weight_decay=0.1), dict(warmup_steps=3, r=0.5, weight_lr_power=1.0)])
def test_equals_heavyball(hp):
    heavyball = pytest.importorskip("heavyball", reason="the test extra heavyball==3.2.1 is required")
    heavyball.utils.compile_mode = None
    start, y, x, back = run(lambda ps: distopt.SFAdamW(ps, lr=0.01, **hp))
    _, hy, hx, _ = run(lambda ps: heavyball.SFAdamW(ps, lr=0.01, storage_dtype="float64", **hp))
    bound = 1e-6 * worst(y, start)
    assert worst(y, hy) <= bound and worst(x, hx) <= bound, (worst(y, hy), worst(x, hx), bound)
    assert worst(x, y) > 1e-3  # eval moved the parameters to another point
    assert worst(back, y) <= 1e-15  # and train() brought y back


def test_equals_schedulefree():
    schedulefree = pytest.importorskip("schedulefree", reason="the test extra schedulefree is required")
    hp = dict(lr=0.01, eps=1e-30, betas=(0.9, 0.999), weight_decay=0.1)
    _, y, x, _ = run(lambda ps: distopt.SFAdamW(ps, **hp))
    _, sy, sx, _ = run(lambda ps: schedulefree.AdamWScheduleFree(ps, **hp), call_train=True)
    assert worst(y, sy) <= 1e-13 and worst(x, sx) <= 1e-13, (worst(y, sy), worst(x, sx))


def test_step_in_eval_mode_is_refused_and_changes_nothing():
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = distopt.SFAdamW(params, lr=0.1)
    params[0].grad = torch.ones(3)
    opt.step()
    opt.eval()
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    assert torch.equal(params[0], before)
    opt.eval()  # already in eval: nothing moves
    assert torch.equal(params[0], before)


def test_eval_mode_is_saved_and_train_after_loading_restores_y():
    _, y, _, _ = run(lambda ps: distopt.SFAdamW(ps, lr=0.01), steps=3)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    opt = distopt.SFAdamW(params, lr=0.01)
    grads = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads, dtype=torch.float64)
        opt.step()
    opt.eval()
    saved, x = opt.state_dict(), [p.detach().clone() for p in params]
    assert saved["param_groups"][0]["train_mode"] is False
    copies = [torch.nn.Parameter(v.clone()) for v in x]  # a model checkpoint taken in eval mode holds x
    resumed = distopt.SFAdamW(copies, lr=0.01)
    resumed.load_state_dict(saved)
    resumed.train()
    assert worst([p.detach() for p in copies], y) <= 1e-15
