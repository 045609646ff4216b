"""Shampoo with Adam grafting on owners, as facebookresearch/optimizers' Distributed Shampoo runs it (its names and
defaults, the configuration its README recommends in place of Adam). Gupta, Koren & Singer, "Shampoo: Preconditioned
Stochastic Tensor Optimization" (https://arxiv.org/abs/1802.09568); Shi et al., "A Distributed Data-Parallel PyTorch
Implementation of the Distributed Shampoo Optimizer" (https://arxiv.org/abs/2309.06497).

A tensor is squeezed and its dimensions merged from the last while their product stays within
``max_preconditioner_dim``, then cut into blocks of at most that size along every dimension. Each block ``G`` of
order ``o`` keeps one Kronecker factor per dimension, ``F_k = β₂ F_k + (1 - β₂) G_(k) G_(k)ᵀ``, and every
``precondition_frequency`` steps their inverse roots ``(F_k / (1 - β₂ᵗ) + ε I)^(-1/(2o))`` (an eigendecomposition,
the eigenvalues lifted to ``ε`` where they fall below it). The step preconditions the bias-corrected EMA of the
gradient ``m`` by every factor's inverse root and, per block, takes the norm of Adam's step ``m / (sqrt(v̂) + ε_g)``
(grafting). Before ``start_preconditioning_step`` the step is Adam's.

Everything but the step counter is the owner's: ``owner.exp_avg`` (``m``), ``owner.grafting`` (Adam's ``v``), and per
block ``b`` and dimension ``k`` ``owner.factor.<b>.<k>`` and ``owner.inverse.<b>.<k>``. Same-shape matrices are
stacked on their owner: one batched eigendecomposition per block and dimension.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import eigenbasis as eb
from .base import (OWNER_PREFIX, ChainedMatrixAlgorithm, check_bool, check_nonnegative, new_step_counter, split_batch,
                   stack_owner_state, write_back_owner_state)

WEIGHT_DECAY_TYPES = ("decoupled", "l2")
GRAFTINGS = ("adam", None)


def merged_shape(shape: tuple[int, ...], threshold: float) -> tuple[int, ...]:
    """Distributed Shampoo's ``merge_small_dims`` (target dimensionality 1): dimensions of size 1 squeezed out, then
    merged from the last while the product stays within ``threshold``."""
    if 0 in shape:
        return (0,)
    squeezed = [d for d in reversed(shape) if d != 1] or [1]
    merged = [squeezed[0]]
    for d in squeezed[1:]:
        if merged[-1] * d <= threshold:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(reversed(merged))


def blocks(dims: tuple[int, ...], size: float) -> list[tuple[slice, ...]]:
    """The blocks of a tensor of ``dims`` cut every ``size`` along each dimension, in Distributed Shampoo's order
    (``multi_dim_split``: the first dimension's chunks outermost)."""
    if math.isinf(size):
        return [tuple(slice(0, d) for d in dims)]
    size = int(size)
    ranges = [[slice(s, min(s + size, d)) for s in range(0, d, size)] for d in dims]
    return [tuple(cut) for cut in itertools.product(*ranges)]


def _key(name: str) -> str:
    return f"{OWNER_PREFIX}{name}"


def inverse_root(factor: Tensor, exponent: float, epsilon: float) -> Tensor:
    """``(A + ε I)^(-exponent)`` per matrix of a stack, by eigendecomposition, with the eigenvalues lifted so that the
    smallest is at least ``ε`` (Distributed Shampoo's default perturbation of rank-deficient factors)."""
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    ridge = factor + epsilon * eye
    try:
        values, vectors = torch.linalg.eigh(ridge)
    except RuntimeError:  # as Distributed Shampoo retries: in float64
        values, vectors = (x.to(factor.dtype) for x in torch.linalg.eigh(ridge.double()))
    smallest = values.min(dim=-1, keepdim=True).values
    values = torch.where(smallest < epsilon, values - smallest + epsilon, values)
    return vectors * values.pow(-exponent).unsqueeze(-2) @ vectors.mT


class Shampoo(ChainedMatrixAlgorithm):
    """Shampoo with Adam grafting (``grafting=None``: plain Shampoo). Shard state: ``step``. Owner state: see the
    module's docstring."""

    name = "shampoo"
    elementwise_owner_state = frozenset({"exp_avg", "grafting"})  # the filtered gradient, Adam grafting's moment
    hyperparameters = {"lr": 1e-3, "betas": (0.9, 0.999), "beta3": None, "epsilon": 1e-12, "weight_decay": 0.0,
                       "weight_decay_type": "decoupled", "max_preconditioner_dim": 8192,
                       "precondition_frequency": 100, "start_preconditioning_step": None,
                       "use_bias_correction": True, "grafting": "adam", "grafting_beta2": 0.999,
                       "grafting_epsilon": 1e-8}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        betas = hp["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and 0.0 <= float(betas[0]) < 1.0
                and 0.0 < float(betas[1]) <= 1.0):
            raise ValueError(f"{self.name}: invalid betas={betas!r} (betas[0] in [0, 1), betas[1] in (0, 1])")
        if hp["beta3"] is not None and not 0.0 <= float(hp["beta3"]) < 1.0:
            raise ValueError(f"{self.name}: invalid beta3={hp['beta3']!r} (None for betas[0], or in [0, 1))")
        for key in ("epsilon", "weight_decay", "grafting_epsilon"):
            check_nonnegative(self.name, hp, key)
        if not hp["epsilon"] > 0 or not hp["grafting_epsilon"] > 0:
            raise ValueError(f"{self.name}: epsilon and grafting_epsilon must be > 0")
        if hp["weight_decay_type"] not in WEIGHT_DECAY_TYPES:
            raise ValueError(f"{self.name}: invalid weight_decay_type={hp['weight_decay_type']!r} (one of "
                             f"{WEIGHT_DECAY_TYPES})")
        if hp["grafting"] not in GRAFTINGS:
            raise ValueError(f"{self.name}: grafting={hp['grafting']!r} is not supported (one of {GRAFTINGS})")
        if not 0.0 < float(hp["grafting_beta2"]) <= 1.0:
            raise ValueError(f"{self.name}: invalid grafting_beta2={hp['grafting_beta2']!r} (in (0, 1])")
        size = hp["max_preconditioner_dim"]
        if isinstance(size, bool) or not (isinstance(size, int) and size >= 1 or size == math.inf):
            raise ValueError(f"{self.name}: invalid max_preconditioner_dim={size!r} (an int >= 1, or math.inf)")
        frequency = hp["precondition_frequency"]
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"{self.name}: invalid precondition_frequency={frequency!r} (an int >= 1)")
        start = hp["start_preconditioning_step"]
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < frequency):
            raise ValueError(f"{self.name}: invalid start_preconditioning_step={start!r} (None for "
                             f"precondition_frequency, or an int >= precondition_frequency={frequency})")
        check_bool(self.name, hp, "use_bias_correction")

    # ------------------------------------------------------------------------------------------------ layout
    def _layout(self, shape: tuple[int, ...], hp: Mapping[str, Any]):
        dims = merged_shape(tuple(shape), hp["max_preconditioner_dim"])
        cuts = blocks(dims, hp["max_preconditioner_dim"])
        return dims, cuts

    def wire_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(param_dtype, torch.float32)

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        dtype = self.wire_dtype(hp, param_dtype)
        dims, cuts = self._layout(shape, hp)
        entries = {_key("exp_avg"): (dims, dtype)}
        if hp["grafting"] is not None:
            entries[_key("grafting")] = (dims, dtype)
        for b, cut in enumerate(cuts):
            for k, part in enumerate(cut):
                side = part.stop - part.start
                entries[_key(f"factor.{b}.{k}")] = entries[_key(f"inverse.{b}.{k}")] = ((side, side), dtype)
        return entries

    def owner_init(self, shape: tuple[int, ...], hp: Mapping[str, Any], param_dtype: torch.dtype,
                   device: torch.device) -> dict[str, Tensor]:
        out = super().owner_init(shape, hp, param_dtype, device)
        for key, value in out.items():
            if ".inverse." in key or key.startswith(_key("inverse.")):
                value.copy_(torch.eye(value.shape[0], dtype=value.dtype, device=device))
        return out

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        dims, cuts = self._layout(shape, hp)
        numel = math.prod(shape)
        per_step = sum(4 * math.prod(p.stop - p.start for p in cut) * sum(p.stop - p.start for p in cut)
                       for cut in cuts)
        roots = sum(10 * (p.stop - p.start) ** 3 for cut in cuts for p in cut) / hp["precondition_frequency"]
        return float(max(per_step + roots, numel))

    # ------------------------------------------------------------------------------------------------ shards
    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter()}

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        state["step"] += 1
        g = grad.to(self.wire_dtype(hp, param.dtype))
        if hp["weight_decay"] != 0 and hp["weight_decay_type"] == "l2":
            g = g + hp["weight_decay"] * param.to(g.dtype)
        return g

    def decays(self, hp: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
        return hp["weight_decay_type"] == "decoupled"

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        return float(hp["betas"][0])

    def finish_direction(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                         shape: tuple[int, ...]) -> Tensor:
        return update


    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "it has no second moment with betas[1] whose decay the flag would schedule"
        refused = {"palm": reason, "kourkoutas_beta": reason,
                   "atan2": "its grafted step has no division for atan2 to replace",
                   "grams": "its update is preconditioned; sign(g)·|u| would undo the preconditioning"}
        if hp.get("weight_decay_type") == "l2":
            refused.update(cautious_weight_decay="its weight decay is L2 (added to the gradient)",
                           decouple_lr="its weight decay is L2 (added to the gradient)")
        return refused

    # ------------------------------------------------------------------------------------------------ owner
    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        steps = [int(s["step"]) for s in states]
        apart = split_batch(steps, wholes, states, fqns, lambda w, s, f: self.owner_update(w, s, hp, shape, f))
        if apart is not None:  # a matrix that joined later: stepped apart, at its own count
            return apart
        step = steps[0]
        dims, cuts = self._layout(shape, hp)
        g = torch.stack([w[0].reshape(dims) for w in wholes])
        stacks = stack_owner_state(states)
        beta1, beta2 = float(hp["betas"][0]), float(hp["betas"][1])
        start = hp["start_preconditioning_step"] or hp["precondition_frequency"]
        amortize = (step % hp["precondition_frequency"] == 0 and step > start) or step == start
        bias2 = 1 - beta2**step if hp["use_bias_correction"] and beta2 < 1 else 1.0
        for b, cut in enumerate(cuts):
            block = g[(slice(None), *cut)]
            for k in range(len(cut)):
                factor = stacks[_key(f"factor.{b}.{k}")]
                if beta2 != 1.0:
                    factor.mul_(beta2)
                factor.add_(eb.outer(block, k), alpha=1 - beta2 if beta2 != 1.0 else 1.0)
                if amortize:
                    exponent = 1 / (2 * max(len(cut), 1))
                    stacks[_key(f"inverse.{b}.{k}")].copy_(inverse_root(factor / bias2, exponent, hp["epsilon"]))
        m = self._filtered(g, stacks[_key("exp_avg")], hp, step, beta1)
        graft = self._adam(g, m, stacks, hp, step) if hp["grafting"] is not None else None
        if step < start and graft is not None:
            direction = graft
        else:
            direction = torch.empty_like(m)
            for b, cut in enumerate(cuts):
                where = (slice(None), *cut)
                x = m[where]
                for k in range(len(cut)):
                    x = eb.project(x, [stacks[_key(f"inverse.{b}.{k}")] if j == k else None
                                       for j in range(len(cut))], back=True)
                if graft is not None:
                    norms = graft[where].flatten(1).norm(dim=1) / (x.flatten(1).norm(dim=1) + 1e-16)
                    x = x * norms.view(-1, *([1] * len(cut)))
                direction[where] = x
        write_back_owner_state(stacks, states)
        return [u.reshape(shape) for u in direction.unbind(0)]

    def _filtered(self, g: Tensor, m: Tensor, hp: Mapping[str, Any], step: int, beta1: float) -> Tensor:
        """The EMA of the gradient (``beta3``: the one this step reads), bias-corrected."""
        if beta1 == 0.0:
            return g
        beta3 = beta1 if hp["beta3"] is None else float(hp["beta3"])
        filtered = torch.lerp(m, g, 1 - beta3) if beta3 != beta1 else None
        m.lerp_(g, 1 - beta1)
        filtered = m if filtered is None else filtered
        if hp["use_bias_correction"]:
            filtered = filtered / (1.0 - beta3 * beta1 ** (step - 1))
        return filtered

    def _adam(self, g: Tensor, m: Tensor, stacks: dict[str, Tensor], hp: Mapping[str, Any], step: int) -> Tensor:
        """Adam's step direction ``m / (sqrt(v̂) + ε_g)``, whose norm per block the Shampoo step takes."""
        v, beta2 = stacks[_key("grafting")], float(hp["grafting_beta2"])
        if beta2 != 1.0:
            v.mul_(beta2)
        v.addcmul_(g, g, value=1 - beta2 if beta2 != 1.0 else 1.0)
        bias2 = 1 - beta2**step if beta2 < 1 else 1.0  # Adam's, whatever use_bias_correction says
        return m / ((v / bias2).sqrt() + hp["grafting_epsilon"])
