"""The five torch.optim look-alikes match torch.optim bitwise on plain tensors, over torch's own configurations."""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.reference import TORCH_OPTIMIZERS, torch_configs

CASES = [(name, desc, kwargs) for name in TORCH_OPTIMIZERS for desc, kwargs in torch_configs(name)]
SHAPES = [(7, 5), (5,), (1, 64), (3, 4, 2), ()]


def _run(make_optimizer, params, grads):
    opt = make_optimizer(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("name,desc,kwargs", CASES, ids=[f"{n}-{d}" for n, d, _ in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_bitwise(name, desc, kwargs, dtype):
    init = [torch.randn(s, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, dtype=dtype) for s in SHAPES] for _ in range(6)]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    ours_opt = _run(lambda ps: getattr(distopt, TORCH_OPTIMIZERS[name].__name__)(ps, **kwargs), ours, grads)
    theirs_opt = _run(lambda ps: TORCH_OPTIMIZERS[name](ps, **kwargs), theirs, grads)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b), (a - b).abs().max()
    for a, b in zip(ours, theirs):
        for key, value in theirs_opt.state[b].items():
            if torch.is_tensor(value):
                ours_state = ours_opt.state[a]
                mine = ours_state[key] if key in ours_state else ours_state[f"owner.{key}"]  # Adafactor's owners
                assert torch.equal(mine.to(value.dtype), value), key


def test_complex_parameters_match_torch():
    init = torch.randn(4, 3, dtype=torch.complex64)
    grads = [torch.randn(4, 3, dtype=torch.complex64) for _ in range(4)]
    for ours_cls, theirs_cls, kw in [(distopt.AdamW, torch.optim.AdamW, {"amsgrad": True}),
                                     (distopt.RMSprop, torch.optim.RMSprop, {"centered": True, "momentum": 0.9}),
                                     (distopt.SGD, torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.1})]:
        a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
        oa, ob = ours_cls([a], **kw), theirs_cls([b], **kw)
        for g in grads:
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        assert torch.equal(a, b), ours_cls.__name__


@pytest.mark.parametrize("name", sorted(TORCH_OPTIMIZERS))
def test_constructor_signature_is_torchs(name):
    """Every keyword of the torch.optim namesake exists with the same default (and the same kind), in the same
    order; distopt adds only the seeds' flags, as a trailing ``**flags``."""
    import inspect

    theirs = inspect.signature(TORCH_OPTIMIZERS[name].__init__).parameters
    ours = dict(inspect.signature(getattr(distopt, TORCH_OPTIMIZERS[name].__name__).__init__).parameters)
    flags = ours.pop("flags")
    assert flags.kind == inspect.Parameter.VAR_KEYWORD
    assert list(theirs) == list(ours)
    for key, param in theirs.items():
        assert ours[key].default == param.default, key
        assert ours[key].kind == param.kind, key
