"""PSGD with Kronecker-factored preconditioners (PSGD-Kron). Li, "Preconditioned Stochastic Gradient Descent",
https://arxiv.org/abs/1512.04202, and its Kron preconditioner (lixilinx/psgd_torch); maths, names and defaults of
the widely used PyPI ``kron-torch`` 0.3.3.

Where state lives: the momentum is elementwise, so it stays on each rank's shard with the step and update
counters. The owner holds the Kronecker factors ``Q`` whole. The probe vectors and the occasional rebalancing of
the factors draw from a generator seeded by ``(seed, fqn, step)``, so results do not depend on which rank owns a
matrix, nor on the world size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..compile import kernel
from ..transforms.flags import NO_EPS_DIVISION, NO_SECOND_MOMENT
from .base import (OWNER_PREFIX, MatrixAlgorithm, _as_number, check_bool, check_nonnegative, check_unit_interval,
                   new_step_counter, zeros_like)

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")


@dataclass(frozen=True)
class ProbabilitySchedule:
    """kron-torch's default: probability 1 for ``flat_start`` steps, then an exponential anneal to ``min_prob``."""

    max_prob: float = 1.0
    min_prob: float = 0.03
    decay: float = 0.001
    flat_start: float = 500

    def __call__(self, step: int) -> Tensor:
        # float32 tensors, as kron-torch computes it, so that 1 / probability rounds the same way
        f32 = torch.float32
        prob = torch.tensor(self.max_prob, dtype=f32) * torch.exp(
            -torch.tensor(self.decay, dtype=f32) * (torch.tensor(float(step), dtype=f32)
                                                    - torch.tensor(self.flat_start, dtype=f32)))
        return prob.clamp(min=self.min_prob, max=self.max_prob)


def merged_shape(shape: tuple[int, ...], merge: bool) -> tuple[int, ...]:
    """kron-torch's merge of a tensor with more than two dimensions into the matrix whose sides differ least."""
    if len(shape) <= 2 or not merge:
        return shape
    first = (math.prod(shape[:-1]), shape[-1])
    second = (shape[0], math.prod(shape[1:]))
    return first if first[1] - first[0] <= second[1] - second[0] else second


def diagonal_dims(shape: tuple[int, ...], hp: Mapping[str, Any]) -> list[bool]:
    """Which factors are diagonal (vectors) rather than upper triangular."""
    mode = hp["memory_save_mode"]
    diag = [False] * len(shape)
    if mode == "all_diag":
        diag = [True] * len(shape)
    elif mode in ("one_diag", "smart_one_diag"):
        largest = max(range(len(shape)), key=lambda i: (shape[i], i))  # argsort's last index on ties
        ordered = sorted(shape)
        if mode == "one_diag" or (len(shape) > 1 and ordered[-1] > ordered[-2]):
            diag[largest] = True
    return [d or size == 1 or size > hp["max_size_triangular"] or len(shape) < hp["min_ndim_triangular"]
            for d, size in zip(diag, shape)]


def _mode_product(x: Tensor, matrix: Tensor, dim: int) -> Tensor:
    """Multiply dimension ``dim`` of ``x`` by ``matrix`` (``out[..a..] = sum_b matrix[a, b] x[..b..]``)."""
    return torch.movedim(torch.tensordot(matrix, x, dims=[[1], [dim]]), 0, dim)


def _scale_dim(x: Tensor, diagonal: Tensor, dim: int) -> Tensor:
    """``x`` times a diagonal factor along dimension ``dim``: the mode product with ``diag(diagonal)``, done
    elementwise (O(numel) work and no ``n x n`` matrix; a 50,257-row embedding would need 10 GB for one)."""
    return x * diagonal.reshape([-1 if j == dim else 1 for j in range(x.dim())])


def _contract_others(a: Tensor, b: Tensor, dim: int, diagonal: bool) -> Tensor:
    """``a`` against ``b`` over every dimension but ``dim``: a matrix, or its diagonal for a diagonal factor."""
    others = [d for d in range(a.dim()) if d != dim]
    if diagonal:
        return (a * b).sum(dim=others) if others else a * b
    return torch.tensordot(a, b, dims=[others, others])


def _spectral_lower_bound(a: Tensor, max_abs: Tensor) -> Tensor:
    """Cheap lower bound of the spectral norm of a symmetric matrix (one power step from its largest column)."""
    a = a / max_abs
    column = torch.argmax((a * a).sum(0)).reshape(1)
    x = torch.index_select(a, 1, column).flatten() @ a  # index_select: no data-dependent graph break
    x = a @ (x / x.norm())
    return x.norm() * max_abs


@kernel
def precondition(g: Tensor, factors: list[Tensor], diag: list[bool]) -> Tensor:
    """``Q^T Q`` applied along every dimension, then kron-torch's RMS clip of the update at 1.1."""
    update = g
    for i, (q, d) in enumerate(zip(factors, diag)):
        update = _scale_dim(update, q * q, i) if d else _mode_product(update, q.T @ q, i)
    return update * torch.clamp(1.1 / (update.square().mean().sqrt() + 1e-12), max=1.0)


def _seed(seed: int, fqn: str, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{fqn}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@kernel
def update_factors(factors: list[Tensor], diag: list[bool], g: Tensor, probe: Tensor,
                   precond_lr: float) -> list[Tensor]:
    """One step of the factors on the fitting criterion of PSGD, with the probe ``probe``."""
    tiny = torch.finfo(g.dtype).tiny
    a = g
    conj_b = probe
    for i, (q, d) in enumerate(zip(factors, diag)):
        a = _scale_dim(a, q, i) if d else _mode_product(a, q, i)
        if d:
            conj_b = conj_b / q.reshape([-1 if j == i else 1 for j in range(g.dim())])
        else:  # conj_b <- conj_b x_i Q_i^{-T}: a triangular solve along dimension i
            moved = torch.movedim(conj_b, i, -1)
            solved = torch.linalg.solve_triangular(q, moved.reshape(-1, q.shape[0]), upper=True, left=False)
            conj_b = torch.movedim(solved.reshape(moved.shape), -1, i)
    updated = []
    for i, (q, d) in enumerate(zip(factors, diag)):
        term_a = _contract_others(a, a, i, d)
        term_b = _contract_others(conj_b, conj_b, i, d)
        step, total = (term_a - term_b) * precond_lr, term_a + term_b
        norm = total.abs().max()
        if d:
            updated.append(q - step * q / norm.clamp(min=tiny))
        else:
            bound = torch.where(norm > 0, _spectral_lower_bound(total, norm), norm).clamp(min=tiny)
            updated.append(q - torch.triu(step) / bound @ q)
    return updated


class PSGDKron(MatrixAlgorithm):
    """PSGD-Kron. Shard state: ``step``, ``update_counter`` (scalars), ``momentum_buffer``. Owner state:
    ``owner.Q.<dim>`` per dimension of the (merged) shape: upper triangular, or a vector when diagonal."""

    name = "psgdkron"
    hyperparameters = {"lr": 3e-4, "b1": 0.9, "weight_decay": 0.0, "preconditioner_update_probability": None,
                       "max_size_triangular": 8192, "min_ndim_triangular": 2, "memory_save_mode": None,
                       "momentum_into_precond_update": True, "precond_lr": 0.1, "precond_init_scale": 1.0,
                       "merge_dims": True, "seed": 0}
    scalar_state = ("step", "update_counter")

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_unit_interval(self.name, hp, "b1")
        check_nonnegative(self.name, hp, "weight_decay")
        check_nonnegative(self.name, hp, "precond_lr")
        check_nonnegative(self.name, hp, "precond_init_scale")
        prob = hp["preconditioner_update_probability"]
        if prob is not None and not callable(prob):
            value = _as_number(self.name, "preconditioner_update_probability", prob)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{self.name}: invalid preconditioner_update_probability={prob!r} (must be in "
                                 "(0, 1], None for kron-torch's schedule, or a callable of the step)")
        if hp["memory_save_mode"] not in MEMORY_SAVE_MODES:
            raise ValueError(f"{self.name}: invalid memory_save_mode={hp['memory_save_mode']!r} (must be one of "
                             f"{MEMORY_SAVE_MODES})")
        for key in ("max_size_triangular", "min_ndim_triangular", "seed"):
            if isinstance(hp[key], bool) or not isinstance(hp[key], int) or hp[key] < 0:
                raise ValueError(f"{self.name}: invalid {key}={hp[key]!r} (must be a non-negative int)")
        check_bool(self.name, hp, "momentum_into_precond_update", "merge_dims")

    def check_param(self, shape: tuple[int, ...], name: str) -> None:
        if len(shape) == 0:
            raise ValueError(f"psgdkron needs parameters with at least 1 dimension, but {name} is a scalar")

    def wire_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(param_dtype, torch.float32)

    def _dims(self, shape, hp):
        return merged_shape(tuple(shape), hp["merge_dims"])

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        dims = self._dims(shape, hp)
        numel = math.prod(dims)
        # A triangular factor of side n costs O(numel * n) per mode product; a diagonal one O(numel), since it is
        # applied elementwise.
        sides = sum(1 if d else size for size, d in zip(dims, diagonal_dims(dims, hp)))
        return float(4 * numel * sides + 10 * numel * sides)  # preconditioning + a factor update per step

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        dtype = self.wire_dtype(hp, param_dtype)
        dims = self._dims(shape, hp)
        return {f"{OWNER_PREFIX}Q.{i}": ((size,) if d else (size, size), dtype)
                for i, (size, d) in enumerate(zip(dims, diagonal_dims(dims, hp)))}

    def owner_init(self, shape: tuple[int, ...], hp: Mapping[str, Any], param_dtype: torch.dtype,
                   device: torch.device) -> dict[str, Tensor]:
        """kron-torch's initial factors: ``precond_init_scale^(1/ndim)`` times the identity (or ones)."""
        dtype = self.wire_dtype(hp, param_dtype)
        dims = self._dims(shape, hp)
        scale = hp["precond_init_scale"] ** (1 / len(dims))
        return {f"{OWNER_PREFIX}Q.{i}": scale * (torch.ones(size, dtype=dtype, device=device) if d else
                                                 torch.eye(size, dtype=dtype, device=device))
                for i, (size, d) in enumerate(zip(dims, diagonal_dims(dims, hp)))}

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "update_counter": torch.tensor(0, dtype=torch.int32),
                "momentum_buffer": zeros_like(param)}

    def _probability(self, hp: Mapping[str, Any], step: int):
        prob = hp["preconditioner_update_probability"]
        if prob is None:
            prob = ProbabilitySchedule()
        return prob(step) if callable(prob) else prob

    def channels(self, hp: Mapping[str, Any]) -> int:
        return 1 if hp["momentum_into_precond_update"] else 2  # the debiased momentum (and the gradient)

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        b1 = hp["b1"]
        # The update decision: kron-torch's deterministic counter, against the probability at the previous step.
        # A counter of 0 after this tells the owner that this step updates the factors.
        probability = self._probability(hp, int(state["step"].item()))
        state["update_counter"] += 1
        if bool(state["update_counter"] >= 1 / probability):
            state["update_counter"].zero_()
        state["step"] += 1
        buf = state["momentum_buffer"]
        buf.mul_(b1).add_(grad, alpha=1 - b1)
        dtype = self.wire_dtype(hp, param.dtype)
        debiased = (buf / (1 - b1 ** state["step"].item())).to(dtype)
        return debiased if hp["momentum_into_precond_update"] else torch.stack([debiased, grad.to(dtype)])

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        return [self._owner_step(w, s, hp, shape, fqn) for w, s, fqn in zip(wholes, states, fqns)]

    def _owner_step(self, whole: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                    shape: tuple[int, ...], fqn: str) -> Tensor:
        dims = self._dims(shape, hp)
        diag = diagonal_dims(dims, hp)
        g = whole[0].reshape(dims).clone()
        # kron-torch fits the factors to the momentum (default) or to the raw gradient; the probe noise lands on
        # whichever it fits, so only in the default mode does the preconditioned momentum carry it.
        fitted = g if hp["momentum_into_precond_update"] else whole[1].reshape(dims).clone()
        factors = [state[f"{OWNER_PREFIX}Q.{i}"] for i in range(len(dims))]
        step = int(state["step"].item())
        # The rebalancing decision is drawn on the CPU (reading it is then no device sync); the probe on the device.
        balance = torch.rand((), generator=torch.Generator().manual_seed(_seed(hp["seed"], fqn, step))).item() < 0.01
        gen = torch.Generator(device=g.device).manual_seed(_seed(hp["seed"], fqn + "/probe", step))
        if int(state["update_counter"].item()) == 0:
            if len(dims) > 1 and balance:
                norms = torch.stack([q.abs().max() for q in factors])
                factors = [q * s for q, s in zip(factors, norms.log().mean().exp() / norms)]
            probe = torch.randn(dims, generator=gen, dtype=g.dtype, device=g.device)
            # The probe also damps the momentum that is preconditioned below, as kron-torch does.
            eps = torch.tensor(torch.finfo(torch.float32).eps, dtype=g.dtype, device=g.device)
            fitted += eps.sqrt() * fitted.abs().mean() * probe
            factors = update_factors(factors, diag, fitted, probe, hp["precond_lr"])
        for i, q in enumerate(factors):
            state[f"{OWNER_PREFIX}Q.{i}"] = q
        return precondition(g, factors, diag).reshape(shape)

    # The chain form (flags): kron-torch's step, ``p - lr (u + wd p)`` on matrices, is the chains' last step.

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {"palm": NO_SECOND_MOMENT, "kourkoutas_beta": NO_SECOND_MOMENT, "atan2": NO_EPS_DIVISION,
                "grams": "its update is preconditioned; sign(g)·|u| would undo the preconditioning"}

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        return float(hp["b1"])

    def decays(self, hp: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
        return len(shape) >= 2  # kron-torch decays matrices only

    def finish_direction(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                         shape: tuple[int, ...]) -> Tensor:
        return update

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        if hp["weight_decay"] != 0 and len(shape) >= 2:
            update = update.add(param, alpha=hp["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-hp["lr"])
