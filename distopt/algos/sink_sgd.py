"""SinkSGD, as adv_optm 2.5.16's ``SinkSGD_adv``: the momentum of the gradient, normalized by Sinkhorn iterations
(alternately every row and every column of the ``(shape[0], rest)`` view rescaled to RMS 1; the longer side first),
for matrices; ``sign`` for vectors. Scetbon et al., "Gradient Multi-Normalization for Stateless and Scalable LLM
Training", https://arxiv.org/abs/2502.06742.

Why owners: every half-iteration normalizes along one side of the whole matrix, so a row-sharded matrix would need
one reduction per half-iteration (ten for the default five iterations). The owner has the whole matrix and runs
adv_optm's arithmetic on it unchanged; the momentum stays on the shards, as Muon's does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..transforms.flags import NO_EPS_DIVISION, NO_SECOND_MOMENT
from .base import MatrixAlgorithm, new_step_counter, zeros_like
from .sign_sgd import adv_optm_step, check_momentum_settings, momentum_direction


def sinkhorn(x: Tensor, iterations: int, inplace: bool = False) -> Tensor:
    """adv_optm's SR-Sinkhorn on the ``(shape[0], rest)`` view: per half-step, the slices along one dimension
    rescaled to norm ``sqrt(length)``, each norm floored at ``1 / sqrt(length)``. ``inplace``: ``x`` (contiguous)
    may be overwritten."""
    x = x.reshape(x.shape[0], -1) if inplace else x.reshape(x.shape[0], -1).clone()
    first = 0 if x.shape[0] > x.shape[1] else 1
    for _ in range(iterations):
        for dim in (first, 1 - first):
            length = x.shape[dim]
            norm = x.norm(dim=dim, keepdim=True).clamp_min_(1 / math.sqrt(length))
            x.mul_(math.sqrt(length) / norm)
    return x


class SinkSGD(MatrixAlgorithm):
    """SinkSGD. Shard state: ``step``, and ``momentum_buffer`` where ``momentum != 0``. Defaults of adv_optm's
    SinkSGD_adv."""

    name = "sinksgd"
    hyperparameters = {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "sinkhorn_iterations": 5,
                       "nesterov": False, "nesterov_coef": None}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_momentum_settings(self.name, {**hp, "maximize": False})  # adv_optm's SinkSGD has no maximize
        iterations = hp["sinkhorn_iterations"]
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"{self.name}: invalid sinkhorn_iterations={iterations!r} (must be an int >= 0)")

    def on_owner(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> bool:
        return len(shape) >= 2

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        return float(8 * hp["sinkhorn_iterations"] * math.prod(shape))

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        state = {"step": new_step_counter()}
        if hp["momentum"] != 0:
            state["momentum_buffer"] = zeros_like(param)
        return state

    local_init = init

    def _raw(self, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        if hp["momentum"] != 0 and "momentum_buffer" not in state:
            raise RuntimeError(f"{self.name}: momentum was switched on after the first step; the state has no "
                               "momentum_buffer (start the run with momentum != 0)")
        state["step"] += 1
        return momentum_direction(grad, state, hp)

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        return self._raw(grad, state, hp).to(param.dtype)

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        # What the owner receives is its own copy (the exchange's): Sinkhorn works in it.
        return [sinkhorn(w.reshape(shape), hp["sinkhorn_iterations"], inplace=True).reshape(shape) for w in wholes]

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        adv_optm_step(param, update, hp)

    def local_update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        adv_optm_step(param, self._raw(grad, state, hp).sign(), hp)

    # The chain form (flags): the same directions, and the chain's step ``p (1 - lr wd) - lr u``.
    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {"palm": NO_SECOND_MOMENT, "kourkoutas_beta": NO_SECOND_MOMENT, "atan2": NO_EPS_DIVISION,
                "grams": "its update is Sinkhorn-normalized; sign(g)·|u| would undo the normalization"}

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        return float(hp["momentum"])

    def finish_direction(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                         shape: tuple[int, ...]) -> Tensor:
        return update

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        return self._raw(grad, state, hp).sign()
