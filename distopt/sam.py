"""Sharpness-aware minimization around any distopt optimizer: HeavyBall 3.2.1's ``SAMWrapper``.

ASAM (Kwon et al., https://arxiv.org/abs/2102.11600) as HeavyBall implements it: the ascent step is
``p <- p + ball · g ⊙ p²``, elementwise, with no normalization by a gradient norm (the SAM paper's ``ρ g / |g|`` is
not in HeavyBall's code, which distopt follows). So the ascent runs on each rank's own shard and needs no
communication; the second forward and backward (the closure) then see the perturbed parameters, FSDP2 gathering
them as usual. The parameters are restored before the wrapped optimizer steps with the perturbed point's gradients.

torch.optim's closure convention: ``step(closure)`` where ``closure`` zeroes the gradients, computes the loss,
calls ``backward()`` and returns the loss. SAM calls it twice per step and returns the second loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .optimizer import DistributedOptimizer


class SAMWrapper:
    """``SAMWrapper(params, wrapped_optimizer=distopt.AdamW, ball=0.1)``: ``wrapped_optimizer`` is a distopt
    optimizer over ``params`` or a constructor taking them. Checkpoints: :meth:`state_dict` holds the wrapped
    optimizer's and ``ball``; DCP helpers take ``sam.wrapped_optimizer`` (``ball`` is a constructor setting)."""

    def __init__(self, params: Iterable[Any], wrapped_optimizer: Any = None, ball: float = 0.1):
        if isinstance(ball, bool) or not isinstance(ball, (int, float)) or math.isnan(ball) or ball < 0:
            raise ValueError(f"SAMWrapper: invalid ball={ball!r} (must be a number >= 0)")
        params = list(params)
        if wrapped_optimizer is None:
            from .constructors import AdamW

            wrapped_optimizer = AdamW
        if isinstance(wrapped_optimizer, type):
            if not issubclass(wrapped_optimizer, DistributedOptimizer):
                raise TypeError(f"SAMWrapper wraps distopt optimizers; {wrapped_optimizer.__name__} is not one")
            wrapped_optimizer = wrapped_optimizer(params)
        elif not isinstance(wrapped_optimizer, DistributedOptimizer):
            raise TypeError(f"SAMWrapper wraps distopt optimizers; got {type(wrapped_optimizer).__name__}")
        mine = {id(p) for p in _tensors(params)}
        theirs = {id(p) for group in wrapped_optimizer.param_groups for p in group["params"]}
        if mine != theirs:
            raise ValueError(f"SAMWrapper: the wrapped optimizer steps other parameters than those given "
                             f"({len(mine - theirs)} given but not wrapped, {len(theirs - mine)} wrapped but not given)")
        self.wrapped_optimizer = wrapped_optimizer
        self.ball = float(ball)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.wrapped_optimizer.param_groups

    @property
    def state(self):
        return self.wrapped_optimizer.state

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            raise ValueError("SAMWrapper.step needs a closure: it evaluates the loss and gradients twice, at the "
                             "parameters and at the perturbed parameters")
        with torch.enable_grad():
            closure()
        saved = []
        for p in self._params():
            saved.append(p.detach().clone())
            if p.grad is None:
                continue
            g = p.grad.float() if p.grad.dtype in (torch.float16, torch.bfloat16) else p.grad
            ascent = g * p.to(g.dtype).square()  # ASAM: the gradient scaled by p², elementwise
            p.copy_((p.to(g.dtype) + ascent * self.ball).to(p.dtype))
            p.grad.zero_()
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            for p, old in zip(self._params(), saved):
                p.copy_(old)
        self.wrapped_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.wrapped_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"wrapped": self.wrapped_optimizer.state_dict(), "ball": self.ball}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"wrapped", "ball"}:
            raise ValueError("SAMWrapper.load_state_dict expects the dict of SAMWrapper.state_dict() (keys 'wrapped' "
                             f"and 'ball'), got keys {sorted(state_dict) if isinstance(state_dict, dict) else None}")
        self.wrapped_optimizer.load_state_dict(state_dict["wrapped"])
        self.ball = float(state_dict["ball"])

    def train(self, mode: bool = True) -> SAMWrapper:
        self.wrapped_optimizer.train(mode)
        return self

    def eval(self) -> SAMWrapper:
        return self.train(False)

    def __repr__(self) -> str:
        return f"SAMWrapper(ball={self.ball}, wrapped={self.wrapped_optimizer!r})"


def _tensors(params: list[Any]) -> list[Tensor]:
    """The tensors of a torch.optim-style params argument (tensors, (name, tensor) pairs, or group dicts)."""
    out = []
    for item in params:
        if isinstance(item, dict):
            out.extend(_tensors(list(item["params"])))
        elif isinstance(item, tuple):
            out.append(item[1])
        else:
            out.append(item)
    return out
