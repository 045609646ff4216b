"""HeavyBall 3.2.1's PSGD family on owners: PSGDPRO, QSGD and LATHER, with HeavyBall's names, defaults and
arithmetic (``heavyball/chainable.py``: ``scale_by_psgd_pro``, ``scale_by_lather``).

- PSGDPRO fits Kronecker factors ``Q_i`` of ``P = ⊗ Q_iᵀ Q_i`` with the Q0.5EQ1.5 ("PRO") step and an online
  Procrustes correction (Li, https://arxiv.org/abs/2402.11858) and applies ``P`` to the momentum.
- QSGD fits the same factors and applies ``Q`` instead of ``QᵀQ`` (≈ ``P^½``: a full-matrix Adam-like scaling).
- LATHER runs Adam in the eigenbasis of PSGD's (whitening-fitted, triangular) preconditioner, and turns its first
  moment with the basis.

Shards keep the elementwise state (the momentum ``exp_avg`` of PSGDPRO/QSGD, the step and HeavyBall's
preconditioning schedule); the owner holds the factors ``owner.Q.<i>``, the fit's running lower bounds
``owner.lower_bound`` (float64, one per factor) and, for LATHER, ``owner.exp_avg``, ``owner.exp_avg_sq`` and
``owner.basis.<i>``. The random draws of the fit (the dampening noise, LATHER's probe) come from a generator seeded
by ``(seed, fqn, step)``, so a result does not depend on the owner or the world size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import eigenbasis as eb
from . import psgd_maths as pm
from .base import (OWNER_PREFIX, ChainedMatrixAlgorithm, check_bool, check_nonnegative, check_unit_interval,
                   new_step_counter, split_batch, stack_owner_state, write_back_owner_state)

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "one_triu", "all_diag")

PSGD_DEFAULTS = {"lr": 0.001, "beta": None, "betas": (0.9, 0.999), "weight_decay": 0.0,
                 "preconditioner_update_probability": None, "max_size_triangular": 2048, "min_ndim_triangular": 2,
                 "memory_save_mode": None, "momentum_into_precond_update": True, "merge_dims": False,
                 "lower_bound_beta": 0.9, "dampening": 1e-9, "precond_update_power_iterations": 2,
                 "precond_init_scale": None, "precond_init_scale_scale": 1.0, "precond_init_scale_power": None,
                 "precond_lr": 0.1, "q_dtype": "float32", "seed": 0}

#: HeavyBall keywords that select its implementation, not the maths: accepted at their defaults only.
REFUSED_SWITCHES = {"split": False, "precond_grad_accum": False, "finite_differences": False,
                    "hessian_approx": False}

#: HeavyBall keywords that change nothing here (caching ``P``, keeping triangles as lines): accepted and ignored.
IGNORED_SWITCHES = ("cached", "store_triu_as_line", "fallback_to_finite_differences", "hvp_interval")


def heavyball_schedule(step: int) -> float:
    """HeavyBall's default probability of a preconditioner fit at step ``step`` (1-based): 1 for 1000 steps, then
    ``0.999^(step - 1000)`` down to 0.03."""
    return max(0.03, 1.0 * 0.999 ** max(step - 1000, 0))


def fit_probability(hp: Mapping[str, Any], step: int) -> float:
    """``preconditioner_update_probability`` at ``step``: a number, a callable of the step, or None for
    :func:`heavyball_schedule`."""
    prob = hp["preconditioner_update_probability"]
    if prob is None:
        return heavyball_schedule(step)
    return float(prob(step)) if callable(prob) else float(prob)


def check_fit_settings(name: str, hp: Mapping[str, Any]) -> None:
    """The settings the PSGD fits share: ``q_dtype``, ``precond_init_scale``, ``preconditioner_update_probability``."""
    if hp["q_dtype"] not in ("float32", "float64"):
        raise ValueError(f"{name}: q_dtype={hp['q_dtype']!r} is not supported (float32 or float64; compact states are "
                         "not supported yet)")
    scale = hp["precond_init_scale"]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"{name}: invalid precond_init_scale={scale!r} (None for HeavyBall's automatic scale, or a "
                         "finite number > 0)")
    prob = hp["preconditioner_update_probability"]
    if prob is not None and not callable(prob):
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 < prob <= 1.0:
            raise ValueError(f"{name}: invalid preconditioner_update_probability={prob!r} (in (0, 1], None for "
                             "HeavyBall's schedule, or a callable of the step)")


def _seed(seed: int, fqn: str, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"psgd:{seed}:{fqn}:{step}".encode()).digest()[:8], "little") & (2**63 - 1)


def draw_noise(seed: int, fqns: list[str], step: int, dims: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """Standard normal draws ``(n, *dims)``, each matrix's from its own generator seeded by its name and step."""
    return torch.stack([torch.randn(dims, dtype=dtype, device=device,
                                    generator=torch.Generator(device).manual_seed(_seed(seed, fqn, step)))
                        for fqn in fqns])


def _key(name: str) -> str:
    return f"{OWNER_PREFIX}{name}"


class PSGDFamily(ChainedMatrixAlgorithm):
    """One member: ``sqrt`` applies ``Q`` rather than ``QᵀQ`` (QSGD); ``lather`` runs Adam in the eigenbasis with the
    whitening fit instead of applying ``P`` with the PRO fit."""

    name = "psgd_family"
    sqrt: ClassVar[bool] = False
    lather: ClassVar[bool] = False
    hyperparameters = {**PSGD_DEFAULTS, "exp_avg_input": True, **REFUSED_SWITCHES}
    scalar_state = ("step", "precond_cumulative")

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        if hp["beta"] is not None:
            check_unit_interval(self.name, hp, "beta")
        betas = hp["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
            raise ValueError(f"{self.name}: invalid betas={betas!r} (two numbers in [0, 1))")
        for key in ("weight_decay", "dampening", "precond_lr", "precond_init_scale_scale"):
            check_nonnegative(self.name, hp, key)
        if not 0.0 <= float(hp["lower_bound_beta"]) < 1.0:
            raise ValueError(f"{self.name}: invalid lower_bound_beta={hp['lower_bound_beta']!r} (must be in [0, 1))")
        for key in ("max_size_triangular", "min_ndim_triangular", "precond_update_power_iterations", "seed"):
            if isinstance(hp[key], bool) or not isinstance(hp[key], int) or hp[key] < 0:
                raise ValueError(f"{self.name}: invalid {key}={hp[key]!r} (must be a non-negative int)")
        if hp["memory_save_mode"] not in MEMORY_SAVE_MODES:
            raise ValueError(f"{self.name}: invalid memory_save_mode={hp['memory_save_mode']!r} (one of "
                             f"{MEMORY_SAVE_MODES})")
        power = hp["precond_init_scale_power"]
        if power is not None and (isinstance(power, bool) or not isinstance(power, (int, float))):
            raise ValueError(f"{self.name}: invalid precond_init_scale_power={power!r} (None or a number)")
        check_fit_settings(self.name, hp)
        check_bool(self.name, hp, "momentum_into_precond_update", "merge_dims", *(("exp_avg_input",) if "exp_avg_input"
                                                                                  in hp else ()))
        for key, default in REFUSED_SWITCHES.items():
            if hp.get(key, default) != default:
                why = ("Hessian-vector products are not offered" if key in ("finite_differences", "hessian_approx")
                       else "this HeavyBall implementation switch is not offered")
                raise ValueError(f"{self.name}: {key}={hp[key]!r} is not supported ({why}); leave it at {default!r}")

    # ------------------------------------------------------------------------------------------------ layout
    def _dims(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> tuple[int, ...]:
        """HeavyBall's view of a tensor: merged (``merge_dims``) and with its dimensions of size 1 squeezed out."""
        dims = tuple(d for d in eb.merged_dims(shape, hp["max_size_triangular"], hp["merge_dims"]) if d != 1)
        return dims or (1,)

    def _diagonal(self, dims: tuple[int, ...], hp: Mapping[str, Any]) -> list[bool]:
        mode = hp["memory_save_mode"]
        largest = max(i for i, d in enumerate(dims) if d == max(dims))  # HeavyBall counts from the back on ties
        diag = [False] * len(dims)
        if mode == "one_diag":
            diag[largest] = True
        elif mode == "smart_one_diag":
            ordered = sorted(dims)
            if len(dims) >= 2 and ordered[-1] > ordered[-2]:
                diag[largest] = True
        elif mode == "one_triu":
            smallest_rank = sorted(range(len(dims)), key=lambda i: (dims[i], i))[0]
            diag = [i != smallest_rank for i in range(len(dims))]
        elif mode == "all_diag":
            diag = [True] * len(dims)
        return [flag or size == 1 or size > hp["max_size_triangular"] or len(dims) < hp["min_ndim_triangular"]
                for size, flag in zip(dims, diag)]

    def _factor_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(self.wire_dtype(hp, param_dtype), getattr(torch, hp["q_dtype"]))

    def wire_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(param_dtype, torch.float32)

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        dims = self._dims(shape, hp)
        diagonal, qtype = self._diagonal(dims, hp), self._factor_dtype(hp, param_dtype)
        entries = {_key(f"Q.{i}"): ((d,) if diag else (d, d), qtype) for i, (d, diag) in enumerate(zip(dims, diagonal))}
        entries[_key("lower_bound")] = ((len(dims),), torch.float64)
        if self.lather:
            wire = self.wire_dtype(hp, param_dtype)
            entries[_key("exp_avg")] = entries[_key("exp_avg_sq")] = (dims, wire)
            for i, (d, diag) in enumerate(zip(dims, diagonal)):
                if not diag:
                    entries[_key(f"basis.{i}")] = ((d, d), qtype)
        return entries

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        dims = self._dims(shape, hp)
        numel = math.prod(dims)
        triangular = [d for d, diag in zip(dims, self._diagonal(dims, hp)) if not diag]
        # Applying P (two mode products per matrix factor) and a fit (two more, a covariance, a few d^3 products;
        # LATHER adds two projections and a QR per refresh).
        per_factor = sum(numel * d * (8 + (4 if self.lather else 0)) + 10 * d**3 for d in triangular)
        return float(max(per_factor, 4 * numel))

    # ------------------------------------------------------------------------------------------------ shards
    def _uses_momentum(self, hp: Mapping[str, Any]) -> bool:
        return not self.lather and hp["exp_avg_input"]

    def channels(self, hp: Mapping[str, Any]) -> int:
        return 2 if self._uses_momentum(hp) and not hp["momentum_into_precond_update"] else 1

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        state = {"step": new_step_counter(), "precond_cumulative": torch.tensor(0.0, dtype=torch.float64)}
        if self._uses_momentum(hp):
            state["exp_avg"] = torch.zeros_like(param, dtype=self.wire_dtype(hp, param.dtype))
        return state

    def _beta1(self, hp: Mapping[str, Any]) -> float:
        return float(hp["beta"] if hp["beta"] is not None else hp["betas"][0])

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        # HeavyBall's schedule: a fit when the cumulative probability crosses an integer. The counter sums the
        # probabilities of the previous steps; the owner adds this step's (float64, in HeavyBall's order).
        step = int(state["step"])
        if step > 0:
            state["precond_cumulative"] += fit_probability(hp, step)
        state["step"] += 1
        g = grad.to(self.wire_dtype(hp, param.dtype))
        if not self._uses_momentum(hp):
            return g
        m = eb.lerp_(state["exp_avg"], g, 1 - eb.beta_debias(self._beta1(hp), step + 1))
        if hp["momentum_into_precond_update"]:
            return m.clone()
        return torch.stack([m, g])

    def _due(self, state: dict[str, Tensor], hp: Mapping[str, Any]) -> bool:
        before = float(state["precond_cumulative"])
        return int(before + fit_probability(hp, int(state["step"]))) > int(before)

    def finish_direction(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                         shape: tuple[int, ...]) -> Tensor | None:
        return None if self.lather and int(state["step"]) == 1 else update



    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "it has no second moment with betas[1] whose decay the flag would schedule"
        refused = {"palm": reason, "kourkoutas_beta": reason,
                   "atan2": "HeavyBall defines no atan2 for the PSGD family",
                   "grams": "its update is preconditioned; sign(g)·|u| would undo the preconditioning"}
        if not self.lather and hp.get("update_clipping") is None:
            refused["caution"] = ("HeavyBall's fused PSGDPRO step cautions the momentum before preconditioning, "
                                  "distopt's caution acts on the update after it; not offered without update_clipping")
        return refused

    # ------------------------------------------------------------------------------------------------ owner
    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        # One batch runs at one step count and one fit decision; a matrix that joined later is split off.
        where = [(int(s["step"]), self._due(s, hp)) for s in states]
        apart = split_batch(where, wholes, states, fqns, lambda w, s, f: self.owner_update(w, s, hp, shape, f))
        if apart is not None:
            return apart
        step, due = where[0]
        dims = self._dims(shape, hp)
        diagonal = self._diagonal(dims, hp)
        channels = [torch.stack([w[c].reshape(dims) for w in wholes]) for c in range(wholes[0].shape[0])]
        update, fitted = channels[0], channels[-1]
        stacks = stack_owner_state(states)
        bounds = stacks[_key("lower_bound")]
        bound_views = [bounds[:, i] for i in range(len(dims))]
        factors = [stacks[_key(f"Q.{i}")] for i in range(len(dims))]
        if step == 1:
            factors = self._initial_factors(fitted, dims, diagonal, hp, factors[0].dtype)
        if due:
            factors = self._fit(factors, bound_views, fitted, hp, step, fqns)
        if not self.lather:
            out = pm.apply(update.to(factors[0].dtype), factors, sqrt=self.sqrt).to(update.dtype)
        else:
            out = self._lather(update, factors, stacks, hp, step, due, dims, diagonal)
        for i, q in enumerate(factors):
            stacks[_key(f"Q.{i}")] = q
        write_back_owner_state(stacks, states)
        return [u.reshape(shape) for u in out.unbind(0)]

    def _initial_factors(self, g: Tensor, dims, diagonal, hp, dtype) -> list[Tensor]:
        if hp["precond_init_scale"] is not None:
            scale = torch.full((g.shape[0],), float(hp["precond_init_scale"]), dtype=torch.float64)
        else:
            power = 0.5 if hp["precond_init_scale_power"] is None else hp["precond_init_scale_power"]
            scale = (pm.mean_root(g) * hp["precond_init_scale_scale"]) ** power
            # HeavyBall refuses an all-zero or non-finite first gradient; an owner cannot raise mid-step without
            # stranding the other ranks, so such a matrix starts from the identity instead.
            zero = g.reshape(g.shape[0], -1).eq(0).all(dim=1).cpu()
            scale = torch.where(torch.isfinite(scale.cpu()) & ~zero, scale.cpu(), torch.ones_like(scale.cpu()))
        return pm.initial_factors(dims, diagonal, scale, dtype, g.device)

    def _fit(self, factors, bounds, fitted, hp, step, fqns) -> list[Tensor]:
        g = fitted.to(factors[0].dtype)
        noise = draw_noise(hp["seed"], fqns, step, tuple(g.shape[1:]), g.dtype, g.device)
        damped = pm.dampen(g, noise, hp["dampening"])
        args = (hp["precond_lr"], hp["lower_bound_beta"], hp["precond_update_power_iterations"])
        if self.lather:
            return pm.whitening_fit(factors, bounds, damped, noise, *args)
        return pm.pro_fit(factors, bounds, damped, *args)

    def _lather(self, u, factors, stacks, hp, step, due, dims, diagonal) -> Tensor:
        basis_keys = [_key(f"basis.{i}") if not d else None for i, d in enumerate(diagonal)]
        if step == 1:
            for key, basis in zip(basis_keys, pm.eigenbasis(factors)):
                if key is not None:
                    stacks[key] = basis
            return torch.zeros_like(u)
        bases = [None if key is None else stacks[key] for key in basis_keys]
        m, v = stacks[_key("exp_avg")], stacks[_key("exp_avg_sq")]
        projected = eb.project(u, bases)
        beta1, beta2 = self._beta1(hp), float(hp["betas"][1])
        eb.lerp_(m, projected, 1 - eb.beta_debias(beta1, step))
        direction = m / eb.eps_sqrt(eb.lerp_(v, projected * projected, 1 - eb.beta_debias(beta2, step)), hp["eps"])
        direction = eb.project(direction, bases, back=True)
        if due:
            new = pm.refreshed_eigenbasis(factors, bases)
            stacks[_key("exp_avg")] = eb.change_basis(m, bases, new)
            for key, basis in zip(basis_keys, new):
                if key is not None:
                    stacks[key] = basis
        return direction


class PSGDPRO(PSGDFamily):
    name = "psgdpro"


class QSGD(PSGDFamily):
    name, sqrt = "qsgd", True


class LATHER(PSGDFamily):
    name, lather = "lather", True
    elementwise_owner_state = frozenset({"exp_avg", "exp_avg_sq"})  # Adam's moments in the preconditioner's basis
    hyperparameters = {**PSGD_DEFAULTS, "eps": 1e-8, "update_clipping": "trust_region_clip", **REFUSED_SWITCHES}


FAMILY = (PSGDPRO, QSGD, LATHER)
