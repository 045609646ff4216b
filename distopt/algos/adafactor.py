"""Adafactor with the arithmetic of torch.optim.Adafactor's single-tensor path (results bitwise). Shazeer & Stern,
"Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", https://arxiv.org/abs/1804.04235.

Why it runs on owners: every step reads numbers of the whole tensor, the parameter's RMS (the relative step size),
the column means of the squared gradient (of a row-sharded matrix, spread over the ranks), the mean of the row
statistics and the update's RMS (the clip). Summing these over shards would add them in another order than torch
does, so the result would differ in the last bits; on the owner the whole tensor is there and torch's arithmetic
runs on it unchanged. The owner receives the gradient and the parameter (two channels), keeps the factored second
moment (``owner.row_var``, ``owner.col_var``; ``owner.variance`` for vectors) and sends back the new parameter,
which each rank copies into its shard. The factored state is small (``rows + cols`` per matrix), so the owner's
memory is no concern; the traffic is that of SOAP's two channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import (OWNER_PREFIX, MatrixAlgorithm, _as_number, as_scalar, check_bool, check_nonnegative,
                   new_step_counter)


class Adafactor(MatrixAlgorithm):
    """Adafactor. Shard state: ``step``. Owner state: ``owner.row_var`` ``(..., rows, 1)`` and ``owner.col_var``
    ``(..., 1, cols)`` for tensors of two or more dimensions (factored over the last two), ``owner.variance`` for
    vectors and scalars. Defaults of torch.optim.Adafactor."""

    name = "adafactor"
    elementwise_owner_state = frozenset({"row_var", "col_var", "variance"})
    owner_mutates_input = False  # it reads what it receives
    hyperparameters = {"lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.0,
                       "maximize": False}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        if _as_number(self.name, "beta2_decay", hp["beta2_decay"]) > 0:
            raise ValueError(f"{self.name}: invalid beta2_decay={hp['beta2_decay']!r} (must be <= 0)")
        eps = hp["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"{self.name}: eps must be a tuple (eps1 or None, eps2), got {eps!r}")
        if eps[0] is not None and _as_number(self.name, "eps[0]", eps[0]) < 0:
            raise ValueError(f"{self.name}: invalid eps[0]={eps[0]!r} (must be None or >= 0)")
        if _as_number(self.name, "eps[1]", eps[1]) < 0:
            raise ValueError(f"{self.name}: invalid eps[1]={eps[1]!r} (must be >= 0)")
        if _as_number(self.name, "d", hp["d"]) < 1:
            raise ValueError(f"{self.name}: invalid d={hp['d']!r} (the clipping threshold must be >= 1)")
        check_nonnegative(self.name, hp, "weight_decay")
        check_bool(self.name, hp, "maximize")

    def check_local(self, param: Tensor, grad: Tensor, hp: Mapping[str, Any]) -> None:
        if torch.is_complex(param):
            raise RuntimeError("adafactor does not support complex parameters (nor does torch.optim.Adafactor)")

    def channels(self, hp: Mapping[str, Any]) -> int:
        return 2  # the gradient and the parameter

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        return float(12 * max(1, math.prod(shape)))  # a few elementwise passes and three norms

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if len(shape) > 1:
            return {f"{OWNER_PREFIX}row_var": ((*shape[:-1], 1), param_dtype),
                    f"{OWNER_PREFIX}col_var": ((*shape[:-2], 1, shape[-1]), param_dtype)}
        return {f"{OWNER_PREFIX}variance": (shape, param_dtype)}

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter()}

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        state["step"] += 1
        if hp["maximize"]:
            grad = -grad
        return torch.stack([grad.to(param.dtype), param.detach()])

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        return [self._step(whole[1].clone(), whole[0], state, hp) for whole, state in zip(wholes, states)]

    def _step(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        """torch.optim.Adafactor's step on the whole tensor, in its order of operations."""
        lr = as_scalar(hp["lr"])
        eps1, eps2 = hp["eps"]
        if eps1 is None:
            eps1 = torch.finfo(param.dtype).eps
        step = state["step"].item()
        one_minus_beta2 = step ** hp["beta2_decay"]
        rho = min(lr, 1 / (step**0.5))
        alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho
        if hp["weight_decay"] != 0:
            param.mul_(1 - lr * hp["weight_decay"])
        if grad.dim() > 1:
            row_var, col_var = state[f"{OWNER_PREFIX}row_var"], state[f"{OWNER_PREFIX}col_var"]
            row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2)
            col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2)
            estimate = row_var @ col_var
            estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            variance = state[f"{OWNER_PREFIX}variance"]
            variance.lerp_(grad * grad, one_minus_beta2)
            estimate = variance.clone()
        update = estimate.clamp_(min=eps1 * eps1).rsqrt_()
        update.mul_(grad)
        denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * hp["d"]))
        param.add_(update, alpha=-alpha / denom)
        return param

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        param.copy_(update)

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        for key, value in self.owner_init(tuple(param.shape), hp, param.dtype, param.device).items():
            state.setdefault(key, value)
        state["step"] += 1
        self._step(param, -grad if hp["maximize"] else grad, state, hp)
