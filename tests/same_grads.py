"""The single-process harness of the reference tests: parameters drawn from seed 0, the same gradient draws for
every optimizer compared, and the largest difference between two runs."""

from __future__ import annotations

from collections.abc import Callable

import torch


def run_on_random_grads(make: Callable, shapes, steps: int, dtype=torch.float64, seed: int = 1,
                        grad_scale: Callable[[int], float] | None = None, lr_factor: float | None = None):
    """``make(params)`` stepped ``steps`` times on gradients drawn from ``seed`` (times ``grad_scale(step)``), every
    group's lr multiplied by ``lr_factor`` after each step; returns (start, final parameters, optimizer)."""
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt = make(params)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        scale = grad_scale(step) if grad_scale is not None else 1.0
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * scale
        opt.step()
        if lr_factor is not None:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * lr_factor
    return start, [p.detach().clone() for p in params], opt


def step_on(make: Callable, inits, grads) -> list[torch.Tensor]:
    """``make(params)`` on copies of ``inits``, stepped once per entry of ``grads`` (a list of per-parameter
    gradients each); returns the final parameters."""
    params = [torch.nn.Parameter(x.clone()) for x in inits]
    opt = make(params)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def worst(a, b) -> float:
    """The largest absolute difference between two lists of tensors."""
    return max((x - y).abs().max().item() for x, y in zip(a, b))
