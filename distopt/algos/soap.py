"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner. Vyas et al., "SOAP: Improving and Stabilizing Shampoo
using Adam", https://arxiv.org/abs/2409.11321; maths, names and defaults of the authors' reference ``soap.py``.

Where state lives: ``exp_avg`` is kept in the parameter's own basis and updated elementwise, so it stays on each
rank's shard. The owner holds what needs the whole matrix: the Kronecker statistics ``GG`` (L and R), their
eigenbases ``Q``, and the second moment ``exp_avg_sq`` in the rotated basis. Each step sends the gradient and
``exp_avg`` (float32) to the owner and brings the preconditioned direction back.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..compile import kernel
from .base import (OWNER_PREFIX, MatrixAlgorithm, check_betas, check_bool, check_nonnegative, new_step_counter,
                   zeros_like)


def merged_shape(shape: tuple[int, ...], max_precond_dim: int, merge: bool) -> tuple[int, ...]:
    """Merge neighbouring dimensions while their product stays within ``max_precond_dim`` (reference rule)."""
    if not merge:
        return shape
    out, current = [], 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                out.append(current)
                current = size
            else:
                out.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not out:
        out.append(current)
    return tuple(out)


def owner_dims(shape: tuple[int, ...], hp: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape the owner works on: the parameter's own for vectors and scalars, merged (with ``merge_dims``) for
    tensors of two or more dimensions, as the authors' code does."""
    if len(shape) < 2:
        return shape
    return merged_shape(shape, hp["max_precond_dim"], hp["merge_dims"])


def preconditioned_dims(shape: tuple[int, ...], hp: Mapping[str, Any]) -> list[bool]:
    """Which dimensions of :func:`owner_dims` get a Kronecker factor. The authors decide from the parameter's own
    number of dimensions: a vector only with ``precondition_1d``; a tensor of two or more dimensions on every
    (merged) dimension up to ``max_precond_dim``, even where merging leaves one dimension."""
    limit = hp["max_precond_dim"]
    if len(shape) == 1:
        return [hp["precondition_1d"] and shape[0] <= limit]
    return [d <= limit for d in owner_dims(shape, hp)]


def project(x: Tensor, bases: list[Tensor | None], back: bool = False) -> Tensor:
    """Rotate every dimension that has a basis (``Q^T x`` per dimension; ``back``: ``Q x``)."""
    for q in bases:
        if q is None:
            x = x.permute(*range(1, x.dim()), 0)
        else:
            x = torch.tensordot(x, q, dims=[[0], [1 if back else 0]])
    return x


@kernel
def adam_in_eigenbasis(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, bases: list[Tensor | None], beta2: float,
                       eps: float, normalize: bool) -> Tensor:
    """Update the rotated second moment in place and return the preconditioned direction in the original basis."""
    exp_avg_sq.mul_(beta2).add_(project(grad, bases).square(), alpha=1 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    direction = project(project(exp_avg, bases) / denom, bases, back=True)
    if normalize:
        direction = direction / (1e-30 + torch.mean(direction**2) ** 0.5)
    return direction


@kernel
def power_iteration_qr(gg: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """One power iteration and a QR of a factor, eigenvalue order kept; returns (new basis, the order used)."""
    order = torch.argsort(torch.diag(q.T @ gg @ q), descending=True)
    return torch.linalg.qr(gg @ q[:, order])[0], order


def eigenbasis(matrix: Tensor) -> Tensor:
    """Eigenvectors of a symmetric statistic, largest eigenvalue first. If float32 ``eigh`` fails or gives
    non-finite vectors, retry in float64 with a ridge of 1e-10 times the mean diagonal; if that fails too, keep
    the identity (no rotation) rather than write NaN."""
    eye = torch.eye(matrix.shape[0], device=matrix.device, dtype=matrix.dtype)
    try:
        q = torch.linalg.eigh(matrix + 1e-30 * eye)[1]
        if torch.isfinite(q).all():
            return torch.flip(q, [1])
    except RuntimeError:
        pass
    ridge = 1e-10 * max(float(matrix.diagonal().abs().mean()), 1e-30)
    try:
        q = torch.linalg.eigh(matrix.double() + ridge * eye.double())[1]
        if torch.isfinite(q).all():
            warnings.warn("soap: float32 eigh failed; recovered in float64 with a small ridge", RuntimeWarning)
            return torch.flip(q, [1]).to(matrix.dtype)
    except RuntimeError:
        pass
    warnings.warn("soap: eigh failed even in float64; this factor keeps the identity basis", RuntimeWarning)
    return eye


class SOAP(MatrixAlgorithm):
    """SOAP. Shard state: ``step`` (calls so far; the first call only feeds the preconditioner), ``exp_avg``.
    Owner state: ``owner.exp_avg_sq``, ``owner.GG.<dim>`` and ``owner.Q.<dim>`` per preconditioned dimension.
    A parameter with no preconditioned dimension (a vector without ``precondition_1d``) runs on its local shard,
    with ``exp_avg_sq`` beside ``exp_avg``.

    The first basis comes from ``eigh``; every ``precondition_frequency`` steps one power iteration and a QR
    refresh it, re-ordering ``exp_avg_sq`` to follow. A dimension above ``max_precond_dim`` stays unrotated.
    """

    name = "soap"
    hyperparameters = {"lr": 3e-3, "betas": (0.95, 0.95), "shampoo_beta": -1.0, "eps": 1e-8, "weight_decay": 0.01,
                       "precondition_frequency": 10, "max_precond_dim": 10000, "merge_dims": False,
                       "precondition_1d": False, "normalize_grads": False, "correct_bias": True}

    def channels(self, hp: Mapping[str, Any]) -> int:
        return 2  # the gradient and exp_avg

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "eps")
        check_nonnegative(self.name, hp, "weight_decay")
        if not (hp["shampoo_beta"] < 0 or 0 <= hp["shampoo_beta"] < 1):
            raise ValueError(f"{self.name}: invalid shampoo_beta={hp['shampoo_beta']!r} (must be in [0, 1), or "
                             "negative to use betas[1])")
        for key in ("precondition_frequency", "max_precond_dim"):
            value = hp[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: invalid {key}={value!r} (must be a positive int)")
        check_bool(self.name, hp, "merge_dims", "precondition_1d", "normalize_grads", "correct_bias")

    #: Until the local route, a vector kept its second moment on an owner.
    renamed_local_state = {f"{OWNER_PREFIX}exp_avg_sq": "exp_avg_sq"}

    splits_groups = True  # factor-less parameters run on their shards
    elementwise_owner_state = frozenset({"exp_avg_sq"})  # Adam's second moment, in the eigenbasis

    def on_owner(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> bool:
        # Without a factor SOAP is Adam in the original basis: elementwise, unless normalize_grads needs the mean
        # over the whole tensor (a scalar is whole on every rank).
        return any(preconditioned_dims(shape, hp)) or (hp["normalize_grads"] and len(shape) > 0)

    def local_init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {**self.init(param, hp), "exp_avg_sq": zeros_like(param)}

    def local_update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        if self._momentum(grad, state, hp):
            direction = adam_in_eigenbasis(grad, state["exp_avg"], state["exp_avg_sq"], [], hp["betas"][1],
                                           hp["eps"], hp["normalize_grads"])
            self.finish(param, direction, state, hp, tuple(param.shape))

    def wire_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(param_dtype, torch.float32)

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        numel = math.prod(shape)
        dims = owner_dims(shape, hp)
        factors = [d for d, on in zip(dims, preconditioned_dims(shape, hp)) if on]
        per_step = 2 * numel * sum(factors) * 4  # three projections and one statistics update, per factor
        refresh = sum(12 * d**3 for d in factors) / hp["precondition_frequency"]  # power iteration + QR, amortized
        return float(per_step + refresh)

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        dtype = self.wire_dtype(hp, param_dtype)
        dims = owner_dims(shape, hp)
        entries = {f"{OWNER_PREFIX}exp_avg_sq": (dims, dtype)}
        for i, on in enumerate(preconditioned_dims(shape, hp)):
            if on:
                entries[f"{OWNER_PREFIX}GG.{i}"] = entries[f"{OWNER_PREFIX}Q.{i}"] = ((dims[i], dims[i]), dtype)
        return entries

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg": zeros_like(param)}

    @staticmethod
    def _momentum(grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> bool:
        """Count the call and update ``exp_avg``; False on the first call, which the authors skip entirely
        (momentum included: it only feeds the preconditioner)."""
        first = state["step"].item() == 0
        state["step"] += 1
        if not first:
            beta1 = hp["betas"][0]
            state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        return not first

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        self._momentum(grad, state, hp)
        dtype = self.wire_dtype(hp, param.dtype)
        return torch.stack([grad.to(dtype), state["exp_avg"].to(dtype)])

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        return [self._owner_step(whole[0], whole[1], state, hp, shape) for whole, state in zip(wholes, states)]

    def _owner_step(self, grad: Tensor, exp_avg: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                    shape: tuple[int, ...]) -> Tensor:
        beta2 = hp["betas"][1]
        shampoo_beta = hp["shampoo_beta"] if hp["shampoo_beta"] >= 0 else beta2
        dims = owner_dims(shape, hp)
        grad, exp_avg = grad.reshape(dims), exp_avg.reshape(dims)
        t = int(state["step"].item()) - 1  # parameter updates before this one
        factors = [i for i, on in enumerate(preconditioned_dims(shape, hp)) if on]
        key = OWNER_PREFIX
        if t == 0:
            state[f"{key}exp_avg_sq"] = torch.zeros(dims, dtype=grad.dtype, device=grad.device)
            for i in factors:
                state[f"{key}GG.{i}"] = torch.zeros(dims[i], dims[i], dtype=grad.dtype, device=grad.device)
            # The authors' first statistics: an average from zero, (1 - shampoo_beta) G G^T, not G G^T.
            self._accumulate(grad, state, factors, shampoo_beta)
            for i in factors:
                # Stored row-major whatever LAPACK returns: a checkpoint restores owner state contiguous, and
                # matmuls round differently on other strides, so this keeps a resumed run bitwise.
                state[f"{key}Q.{i}"] = eigenbasis(state[f"{key}GG.{i}"]).contiguous()
            return torch.zeros(shape, dtype=grad.dtype, device=grad.device)

        bases = [state[f"{key}Q.{i}"] if i in factors else None for i in range(len(dims))]
        direction = adam_in_eigenbasis(grad, exp_avg, state[f"{key}exp_avg_sq"], bases, beta2, hp["eps"],
                                       hp["normalize_grads"])
        self._accumulate(grad, state, factors, shampoo_beta)
        if t % hp["precondition_frequency"] == 0:
            self._refresh(state, factors)
        return direction.reshape(shape)

    @staticmethod
    def _accumulate(grad: Tensor, state: dict[str, Tensor], factors: list[int], beta: float) -> None:
        """GG_i <- beta GG_i + (1 - beta) (grad contracted with itself over every dimension but i)."""
        for i in factors:
            others = [d for d in range(grad.dim()) if d != i]
            outer = torch.tensordot(grad, grad, dims=[others, others])
            state[f"{OWNER_PREFIX}GG.{i}"].lerp_(outer, 1 - beta)

    @staticmethod
    def _refresh(state: dict[str, Tensor], factors: list[int]) -> None:
        """One power iteration and a QR per factor, eigenvalue order kept; exp_avg_sq follows the new order. The
        finiteness check syncs with the device once per refresh (every precondition_frequency steps), not per step."""
        exp_avg_sq = state[f"{OWNER_PREFIX}exp_avg_sq"]
        for i in factors:
            gg, q = state[f"{OWNER_PREFIX}GG.{i}"], state[f"{OWNER_PREFIX}Q.{i}"]
            refreshed, order = power_iteration_qr(gg, q)
            exp_avg_sq = exp_avg_sq.index_select(i, order)
            if torch.isfinite(refreshed).all():
                state[f"{OWNER_PREFIX}Q.{i}"] = refreshed.contiguous()  # row-major, as after a restore
            else:
                warnings.warn("soap: QR refresh gave non-finite values; keeping the previous basis", RuntimeWarning)
                state[f"{OWNER_PREFIX}Q.{i}"] = q[:, order].contiguous()
        state[f"{OWNER_PREFIX}exp_avg_sq"] = exp_avg_sq

    # The chain form (flags). SOAP's own step decays the parameter after moving it, ``(p - s u)(1 - lr wd)``; with
    # flags the step is the chains' ``p (1 - lr wd) - lr u`` (HeavyBall's order), which differs by ``lr² wd s u``.

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "its second moment lives in the eigenbasis on the owner, where the flag's schedule does not reach"
        return {"palm": reason, "kourkoutas_beta": reason,
                "atan2": "no reference defines atan2 for SOAP's Adam in the eigenbasis",
                "grams": "its update is preconditioned; sign(g)·|u| would undo the preconditioning"}

    def _step_scale(self, state: dict[str, Tensor], hp: Mapping[str, Any]) -> float | None:
        t = int(state["step"].item()) - 1
        if t == 0:
            return None
        beta1, beta2 = hp["betas"]
        return (1.0 - beta2**t) ** 0.5 / (1.0 - beta1**t) if hp["correct_bias"] else 1.0

    def finish_direction(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                         shape: tuple[int, ...]) -> Tensor | None:
        scale = self._step_scale(state, hp)
        return None if scale is None else update * scale

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor | None:
        """The local route's chain form (parameters without a factor)."""
        if not self._momentum(grad, state, hp):
            return None
        update = adam_in_eigenbasis(grad, state["exp_avg"], state["exp_avg_sq"], [], hp["betas"][1], hp["eps"],
                                    hp["normalize_grads"])
        return update * self._step_scale(state, hp)

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        t = int(state["step"].item()) - 1
        if t == 0:
            return
        lr = hp["lr"]
        beta1, beta2 = hp["betas"]
        step_size = lr
        if hp["correct_bias"]:
            step_size = lr * (1.0 - beta2**t) ** 0.5 / (1.0 - beta1**t)
        param.add_(update, alpha=-step_size)
        if hp["weight_decay"] > 0:
            param.add_(param, alpha=-lr * hp["weight_decay"])
