"""NorMuon: Muon with a neuron-wise second moment applied after the orthogonalization, in the hyperparameters and
arithmetic of microsoft/dion's ``NorMuon``. Li et al., "NorMuon: Making Muon more efficient and scalable",
https://arxiv.org/abs/2510.05491.

Per matrix: the momentum ``M <- mu M + G`` (Nesterov: ``U = mu M + G``, else ``U = M``) on the shards; on the owner,
cast to ``owner_dtype`` (bfloat16, as dion casts it), the orthogonalization (Polar Express by default, as dion), then each row (neuron) divided
by ``sqrt(v) + 1e-8`` with ``v <- lerp(v, mean_row(U²), 1 - muon_beta2)``, and the result rescaled to the Frobenius
norm it had; on the shards, ``X <- X (1 - lr wd) - adjusted_lr U``.

Why the normalization runs on the owner: its row means and the Frobenius rescale are over the whole matrix, so the
owner, which has it, keeps ``v`` (``owner.variance_neuron``) and the result equals one process on any layout. dion
normalizes each rank's shard on its sharded path (its own note calls it an approximation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..compile import kernel
from .base import (OWNER_PREFIX, MatrixAlgorithm, check_bool, check_nonnegative, new_step_counter,
                   require_matrix, zeros_like)
from . import splits
from .muon import Muon, owner_dtype

VARIANCE = f"{OWNER_PREFIX}variance_neuron"
ADJUST_LR = ("spectral_norm", "rms_norm", None)


def _normalized(u: Tensor, variance: Tensor, beta2: float) -> tuple[Tensor, Tensor]:
    u = u.to(variance.dtype)
    norm = u.norm(p=2, dim=(-2, -1), keepdim=True)
    variance = torch.lerp(variance, (u * u).mean(dim=-1, keepdim=True), 1 - beta2)
    normalized = u / (variance.sqrt() + 1e-8)
    return normalized * (norm / normalized.norm(p=2, dim=(-2, -1), keepdim=True).clamp(min=1e-8)), variance


@kernel
def normalize_stack(u: Tensor, variance: Tensor, beta2: float) -> tuple[Tensor, Tensor]:
    """The normalization of a stack of same-shape matrices ``(N, rows, cols)`` with their ``(N, rows, 1)``
    variances, in one pass (compiled with the owner maths); returns the results and the new variances."""
    return _normalized(u, variance, beta2)


def normalize_neurons(u: Tensor, variance: Tensor, beta2: float) -> Tensor:
    """dion's NorMuon normalization of one whole matrix ``u`` (in ``variance``'s dtype); ``variance`` updated."""
    out, new_variance = _normalized(u, variance, beta2)
    variance.copy_(new_variance)
    return out


class NorMuon(MatrixAlgorithm):
    """NorMuon. Shard state: ``step``, ``momentum``. Owner state: ``owner.variance_neuron`` ``(rows, 1)``.
    Defaults of dion's NorMuon (``flatten=True`` views a weight of more dimensions as ``(out, rest)``)."""

    name = "normuon"
    elementwise_owner_state = frozenset({"variance_neuron"})
    hyperparameters = {"lr": 0.01, "mu": 0.95, "muon_beta2": 0.95, "weight_decay": 0.01, "epsilon": 1e-8,
                       "nesterov": False, "adjust_lr": "spectral_norm", "flatten": False,
                       "orthogonalization": "polar_express", "owner_dtype": "bfloat16",
                       **splits.SPLIT_HYPERPARAMETERS}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        for key in ("mu", "muon_beta2", "weight_decay", "epsilon"):
            check_nonnegative(self.name, hp, key)
        check_bool(self.name, hp, "nesterov", "flatten")
        if hp["adjust_lr"] not in ADJUST_LR:
            raise ValueError(f"{self.name}: invalid adjust_lr={hp['adjust_lr']!r} (must be 'spectral_norm', "
                             "'rms_norm' or None)")
        Muon().check({**Muon.hyperparameters, "orthogonalization": hp["orthogonalization"],
                      "owner_dtype": hp["owner_dtype"]})
        splits.check(self.name, hp)

    def check_param(self, shape: tuple[int, ...], name: str) -> None:
        require_matrix(self.name, shape, name)

    def check_param_in_group(self, shape: tuple[int, ...], name: str, hp: Mapping[str, Any]) -> None:
        # At construction, on every rank: found on the owner at step time, it would fail one rank of a collective.
        if len(shape) > 2 and not hp["flatten"]:
            raise ValueError(f"normuon: {name} has shape {shape}; a weight of more than 2 dimensions needs "
                             "flatten=True (viewed as (out, rest))")
        splits.check_shape(self.name, shape, name, hp)

    def _matrix(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> tuple[int, int]:
        if len(shape) > 2 and not hp["flatten"]:
            raise ValueError(f"normuon: a weight of shape {shape} needs flatten=True (viewed as (out, rest))")
        return shape[0], math.prod(shape[1:])

    def wire_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        # The momentum goes out in owner_dtype: the orthogonalization's first operation casts to it (Newton-Schulz
        # and Polar Express; Gram Newton-Schulz rounds it before its float32 normalization on every layout alike),
        # as dion rounds it to bfloat16 before sending.
        return owner_dtype(hp)

    def return_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        # The normalized result is in the parameter's dtype (float32 for float32 parameters).
        return torch.promote_types(param_dtype, torch.float32)

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        return Muon().cost(shape, {**Muon.hyperparameters, "orthogonalization": hp["orthogonalization"],
                                   "split_sizes": hp["split_sizes"], "num_heads": hp["num_heads"]})

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {VARIANCE: ((shape[0], 1), param_dtype)}

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "momentum": zeros_like(param)}

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        state["step"] += 1
        m = state["momentum"]
        grad = grad.to(m.dtype)
        m.mul_(hp["mu"]).add_(grad)
        u = m * hp["mu"] + grad if hp["nesterov"] else m
        return u.to(owner_dtype(hp))

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        matrix = self._matrix(shape, hp)
        muon_hp = {**Muon.hyperparameters, "orthogonalization": hp["orthogonalization"], "eps": hp["epsilon"],
                   "owner_dtype": hp["owner_dtype"], "split_sizes": hp["split_sizes"], "num_heads": hp["num_heads"]}
        orthogonal = Muon().owner_update([w.reshape(matrix) for w in wholes], states, muon_hp, matrix, fqns)
        variances = [state[VARIANCE].view(matrix[0], 1) for state in states]
        out, new_variances = normalize_stack(torch.stack(orthogonal), torch.stack(variances), hp["muon_beta2"])
        torch._foreach_copy_(variances, list(new_variances.unbind(0)))
        return [u.reshape(shape) for u in out.unbind(0)]

    def _adjusted_lr(self, lr: float, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        fan_out, fan_in = self._matrix(shape, hp)
        if hp["adjust_lr"] == "spectral_norm":
            return lr * math.sqrt(fan_out / fan_in)
        if hp["adjust_lr"] == "rms_norm":
            return lr * 0.2 * math.sqrt(max(fan_out, fan_in))
        return lr

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        lr = hp["lr"]
        param.mul_(1 - lr * hp["weight_decay"])
        param.sub_(update.to(param.dtype) * self._adjusted_lr(lr, shape, hp))

    # The chain form (flags): the step ``p (1 - lr wd) - lr u`` with ``u`` the owner's result times the adjustment.
    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return Muon().refused_flags(hp)  # the same reasons: no second moment to change, an orthogonalized update

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        return float(hp["mu"])

    def finish_direction(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                         shape: tuple[int, ...]) -> Tensor:
        return update * self._adjusted_lr(1.0, shape, hp)
