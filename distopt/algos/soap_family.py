"""HeavyBall 3.2.1's SOAP family on owners: SOAPNAdam, SOAPAdEMAMix, SOLP, KLSOAP, KLShampoo and their ``Heavy*``
variants, with HeavyBall's names, defaults and arithmetic (``heavyball/chainable.py``: ``scale_by_soap_*``).

SOAP (Vyas et al., https://arxiv.org/abs/2409.11321) runs an Adam-like method in the eigenbasis of Shampoo's
Kronecker statistics. In HeavyBall's form, unlike the authors' ``soap.py`` (:mod:`distopt.algos.soap`), the moments
live in the eigenbasis and are turned with it when it is refreshed; so every state is the owner's. The inner method is
Adam, NAdam (Dozat 2016), LaProp (https://arxiv.org/abs/2002.04839) or AdEMAMix (https://arxiv.org/abs/2409.03137).
KL variants accumulate the statistics two-sided (KL-Shampoo, https://arxiv.org/abs/2509.03378); KLShampoo applies
``⊗ Q diag(d^{-1/2}) Qᵀ`` to a momentum, with no inner method. ``Heavy*`` variants carry the second moment to the
new basis by the elementwise square of ``Q_oldᵀ Q_new`` and invert the KL eigenvalues as a pseudo-inverse.

Shards send the gradient; the owner returns the direction ``u`` and each shard steps ``p (1 - lr wd) - lr u``.
The first step only builds the statistics and bases. The basis is refreshed when HeavyBall's cumulative probability
``1 / precondition_frequency`` crosses an integer (steps 2, 4, ... at the default 2), counted per parameter.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import eigenbasis as eb
from .base import (OWNER_PREFIX, ChainedMatrixAlgorithm, check_betas, check_bool, check_nonnegative,
                   check_optional_positive_int, new_step_counter, split_batch, stack_owner_state,
                   write_back_owner_state)

SOAP_DEFAULTS = {"lr": 3e-3, "betas": (0.9, 0.95), "shampoo_beta": 0.95, "eps": 1e-8, "weight_decay": 0.01,
                 "precondition_frequency": 2, "max_precond_dim": 2048, "merge_dims": True, "precondition_1d": False}

#: HeavyBall keywords that select its implementation, not the maths: accepted at their defaults only.
REFUSED_SWITCHES = {"split": False, "precond_grad_accum": False, "use_precond_schedule": False}


def _key(name: str) -> str:
    return f"{OWNER_PREFIX}{name}"


def _alpha_at(step: int, alpha: float, warmup: int | None) -> float:
    """HeavyBall's linear warm-up of AdEMAMix's alpha from 0."""
    if warmup is None or warmup <= 0 or step >= warmup:
        return alpha
    a = step / float(warmup)
    return a * alpha


def _beta3_at(step: int, beta1: float, beta3: float, warmup: int | None, eps: float = 1e-8) -> float:
    """HeavyBall's warm-up of beta3 from beta1, linear in the half-life (with its eps inside the logarithm)."""
    if warmup is None or warmup <= 0 or step >= warmup:
        return beta3
    a = step / float(warmup)
    target = (1 - a) * (math.log(0.5) / math.log(beta1 + eps) - 1) + a * (math.log(0.5) / math.log(beta3 + eps) - 1)
    return min(max(math.pow(0.5, 1.0 / (target + 1.0)), 0.0), 1.0 - eps)


def _seed(fqn: str, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"klshampoo:{fqn}:{step}".encode()).digest()[:8], "little") & (2**63 - 1)


class SOAPFamily(ChainedMatrixAlgorithm):
    """One member of the family: ``inner`` names the method in the eigenbasis (``None``: KL-Shampoo's), ``kl`` the
    two-sided statistics, ``heavy`` the Heavy variants' transport and pseudo-inverse.

    Shard state: ``step``, ``precond_cumulative`` (HeavyBall's refresh schedule), ``mu_product`` (NAdam). Owner state,
    whole, at the merged shape: the inner method's moments (``owner.exp_avg``, ``owner.exp_avg_sq``,
    ``owner.exp_avg_slow`` for AdEMAMix), and ``owner.GG.<i>``, ``owner.Q.<i>`` per dimension with a statistic."""

    name = "soap_family"
    inner: ClassVar[str | None] = "adam"
    kl: ClassVar[bool] = False
    heavy: ClassVar[bool] = False
    hyperparameters = dict(SOAP_DEFAULTS)
    scalar_state = ("step", "precond_cumulative", "mu_product")
    elementwise_owner_state = frozenset({"exp_avg", "exp_avg_sq", "exp_avg_slow"})  # moments in the eigenbasis

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp, count=3 if self.inner == "ademamix" else 2)
        for key in ("eps", "weight_decay", "shampoo_beta"):
            check_nonnegative(self.name, hp, key)
        if not hp["shampoo_beta"] < 1:
            raise ValueError(f"{self.name}: invalid shampoo_beta={hp['shampoo_beta']!r} (must be in [0, 1))")
        for key in ("precondition_frequency", "max_precond_dim"):
            value = hp[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: invalid {key}={value!r} (must be a positive int)")
        check_bool(self.name, hp, "merge_dims", "precondition_1d")
        for key, default in REFUSED_SWITCHES.items():
            if hp.get(key, default) != default:
                why = "this HeavyBall implementation switch is not offered"
                raise ValueError(f"{self.name}: {key}={hp[key]!r} is not supported ({why}); leave it at {default!r}")
        if self.inner == "nadam":
            check_nonnegative(self.name, hp, "momentum_decay")
            if hp["decoupled_weight_decay"] not in (False, True):
                raise ValueError(f"{self.name}: decoupled_weight_decay must be a bool")
        if self.inner == "ademamix":
            check_nonnegative(self.name, hp, "alpha")
            check_optional_positive_int(self.name, hp, "beta3_warmup")
            check_optional_positive_int(self.name, hp, "alpha_warmup")
        if self.inner is None:
            check_nonnegative(self.name, hp, "init_factor")
            check_nonnegative(self.name, hp, "dampening")

    # ------------------------------------------------------------------------------------------------ layout
    def _dims(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> tuple[int, ...]:
        return eb.merged_dims(shape, hp["max_precond_dim"], hp["merge_dims"])

    def _factors(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> list[int]:
        return eb.factor_dims(self._dims(shape, hp), hp["max_precond_dim"], hp["precondition_1d"])

    def _moments(self) -> tuple[str, ...]:
        return {"adam": ("exp_avg", "exp_avg_sq"), "nadam": ("exp_avg", "exp_avg_sq"),
                "laprop": ("exp_avg", "exp_avg_sq"), "ademamix": ("exp_avg", "exp_avg_slow", "exp_avg_sq"),
                None: ("exp_avg",)}[self.inner]

    def wire_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(param_dtype, torch.float32)

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        dtype, dims = self.wire_dtype(hp, param_dtype), self._dims(shape, hp)
        entries = {_key(name): (dims, dtype) for name in self._moments()}
        for i in self._factors(shape, hp):
            entries[_key(f"GG.{i}")] = entries[_key(f"Q.{i}")] = ((dims[i], dims[i]), dtype)
        return entries

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        dims = self._dims(shape, hp)
        numel, factors = math.prod(shape), [dims[i] for i in self._factors(shape, hp)]
        # Four projections and a statistics update per factor per step; the refresh (a QR, and the basis change
        # of the moments) every precondition_frequency steps.
        per_step = 2 * numel * sum(factors) * (5 + (2 if self.kl else 0))
        refresh = sum(6 * d**3 + 4 * numel * d for d in factors) / hp["precondition_frequency"]
        return float(max(per_step + refresh, numel))

    # ------------------------------------------------------------------------------------------------ shards
    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        state = {"step": new_step_counter(), "precond_cumulative": torch.tensor(0.0, dtype=torch.float64)}
        if self.inner == "nadam":
            state["mu_product"] = torch.ones((), dtype=self.wire_dtype(hp, param.dtype))
        return state

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        # Counters advance on every rank, so that every rank holds (and saves) the same schedule.
        # precond_cumulative sums HeavyBall's refresh probability over the steps before this one (the owner adds
        # this step's, in the same float arithmetic as HeavyBall, to see whether it crosses an integer).
        if int(state["step"]) > 0:
            state["precond_cumulative"] += 1 / hp["precondition_frequency"]
        state["step"] += 1
        if self.inner == "nadam" and int(state["step"]) > 1:
            state["mu_product"].mul_(self._mu(hp, int(state["step"]) - 1)[0])
        return grad.to(self.wire_dtype(hp, param.dtype))

    def _mu(self, hp: Mapping[str, Any], k: int) -> tuple[float, float]:
        beta1, md = hp["betas"][0], hp["momentum_decay"]
        return beta1 * (1 - 0.5 * 0.96 ** (k * md)), beta1 * (1 - 0.5 * 0.96 ** ((k + 1) * md))

    def finish_direction(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                         shape: tuple[int, ...]) -> Tensor | None:
        return None if int(state["step"]) == 1 else update



    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "its second moment lives in the eigenbasis on the owner, where the flag's schedule does not reach"
        return {"palm": reason, "kourkoutas_beta": reason,
                "atan2": "HeavyBall defines no atan2 for the SOAP family",
                "grams": "its update is preconditioned; sign(g)·|u| would undo the preconditioning"}

    # ------------------------------------------------------------------------------------------------ owner
    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        # One batch runs at one step count and one refresh decision; a matrix whose gradients started later (or
        # skipped steps) is behind the others, so the batch is split by where each matrix is.
        where = [(int(s["step"]), self._due(s, hp)) for s in states]
        apart = split_batch(where, wholes, states, fqns, lambda w, s, f: self.owner_update(w, s, hp, shape, f))
        if apart is not None:
            return apart
        dims, factors = self._dims(shape, hp), self._factors(shape, hp)
        g = torch.stack([w.reshape(dims) for w in wholes])
        step = where[0][0]
        stacks = stack_owner_state(states)
        ggs = [stacks[_key(f"GG.{i}")] if i in factors else None for i in range(len(dims))]
        bases = [stacks[_key(f"Q.{i}")] if i in factors else None for i in range(len(dims))]
        if step == 1:
            out = self._first(g, ggs, bases, hp)
        elif self.inner is None:
            out = self._kl_shampoo(g, ggs, bases, stacks, states, hp, step, fqns)
        else:
            out = self._soap(g, ggs, bases, stacks, states, hp, step)
        for i in factors:
            stacks[_key(f"GG.{i}")], stacks[_key(f"Q.{i}")] = ggs[i], bases[i]
        write_back_owner_state(stacks, states)
        return [u.reshape(shape) for u in out.unbind(0)]

    def _first(self, g: Tensor, ggs: list, bases: list, hp: Mapping[str, Any]) -> Tensor:
        for i, gg in enumerate(ggs):
            if gg is None:
                continue
            if self.inner is None and hp["init_factor"] > 0:
                ggs[i] = torch.eye(gg.shape[-1], dtype=gg.dtype, device=gg.device).expand_as(gg) * hp["init_factor"]
            else:
                ggs[i] = eb.outer(g, i)
            bases[i] = eb.initial_basis(ggs[i])
        return torch.zeros_like(g)

    def _due(self, state: dict[str, Tensor], hp: Mapping[str, Any]) -> bool:
        before = float(state["precond_cumulative"])
        return int(before + 1 / hp["precondition_frequency"]) > int(before)

    def _statistics(self, g: Tensor, ggs: list, bases: list, hp: Mapping[str, Any], step: int) -> None:
        beta = eb.beta_debias(hp["shampoo_beta"], step)
        outs = (eb.kl_outers(g, ggs, bases, hp["eps"], self.heavy) if self.kl
                else [None if gg is None else eb.outer(g, i) for i, gg in enumerate(ggs)])
        for i, out in enumerate(outs):
            if out is not None:
                eb.lerp_(ggs[i], out, 1 - beta)

    def _soap(self, g, ggs, bases, stacks, states, hp, step) -> Tensor:
        k = step - 1  # HeavyBall's inner step: the first call only built the statistics
        projected = eb.project(g, bases)
        direction = eb.project(self._inner(projected, stacks, states, hp, k), bases, back=True)
        self._statistics(g, ggs, bases, hp, step)
        if self._due(states[0], hp):
            self._refresh(ggs, bases, stacks, hp)
        return direction

    def _inner(self, u: Tensor, stacks: dict[str, Tensor], states, hp: Mapping[str, Any], k: int) -> Tensor:
        m, v = stacks[_key("exp_avg")], stacks[_key("exp_avg_sq")]
        beta1, beta2 = hp["betas"][0], hp["betas"][1]
        eps = hp["eps"]
        if self.inner == "adam":
            eb.lerp_(m, u, 1 - eb.beta_debias(beta1, k))
            return m / eb.eps_sqrt(eb.lerp_(v, u * u, 1 - eb.beta_debias(beta2, k)), eps)
        if self.inner == "laprop":
            denom = eb.eps_sqrt(eb.lerp_(v, u * u, 1 - eb.beta_debias(beta2, k)), 1e-8)  # HeavyBall's laprop_ eps
            return eb.lerp_(m, u / denom, 1 - eb.beta_debias(beta1, k)).clone()
        if self.inner == "nadam":
            eb.lerp_(m, u, 1 - beta1)
            denom = eb.eps_sqrt(eb.lerp_(v, u * u, 1 - eb.beta_debias(beta2, k)), eps)
            mu, mu_next = self._mu(hp, k)
            product = (torch.stack([s["mu_product"] for s in states]).to(device=u.device, dtype=u.dtype)
                       .view(-1, *([1] * (u.dim() - 1))))  # the counters live on the CPU, u may not
            return u / denom * ((1 - mu) / (1 - product)) + m / denom * (mu_next / (1 - product * mu_next))
        slow = stacks[_key("exp_avg_slow")]  # AdEMAMix
        beta3 = _beta3_at(k, beta1, hp["betas"][2], hp["beta3_warmup"])
        alpha = _alpha_at(k, hp["alpha"], hp["alpha_warmup"])
        eb.lerp_(m, u, 1 - eb.beta_debias(beta1, k))
        eb.lerp_(slow, u, 1 - beta3)
        return (m + slow * alpha) / eb.eps_sqrt(eb.lerp_(v, u * u, 1 - eb.beta_debias(beta2, k)), eps)

    def _refresh(self, ggs: list, bases: list, stacks: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        """New bases; the first moments (both of AdEMAMix) turned into them, and for the Heavy variants the second."""
        new = [None if q is None else eb.refreshed_basis(gg, q, hp["eps"]) for gg, q in zip(ggs, bases)]
        turned = eb.turns(bases, new) if self.heavy else None
        for name in ("exp_avg_slow", "exp_avg") if self.inner == "ademamix" else ("exp_avg",):
            stacks[_key(name)] = eb.change_basis(stacks[_key(name)], bases, new, turned)
        if self.heavy:
            stacks[_key("exp_avg_sq")] = eb.transport_second_moment(stacks[_key("exp_avg_sq")], turned)
        bases[:] = new

    def _kl_shampoo(self, g, ggs, bases, stacks, states, hp, step, fqns) -> Tensor:
        m = eb.lerp_(stacks[_key("exp_avg")], g, 1 - hp["betas"][0])
        direction = eb.kl_shampoo_scale(m, bases, ggs, hp["eps"])
        accumulated = g
        if hp["dampening"] > 0:
            noise = torch.stack([torch.randn(g.shape[1:], dtype=g.dtype, device=g.device,
                                             generator=torch.Generator(g.device).manual_seed(_seed(fqn, step)))
                                 for fqn in fqns])
            accumulated = g + (hp["dampening"] + torch.finfo(torch.float32).eps * g.abs()) * noise
        self._statistics(accumulated, ggs, bases, hp, step)
        if self._due(states[0], hp):
            bases[:] = [None if q is None else eb.refreshed_basis(gg, q, hp["eps"]) for gg, q in zip(ggs, bases)]
        present = [gg for gg in ggs if gg is not None]
        if len(present) >= 2:
            eb.balance(present)
        return direction



class SOAPNAdam(SOAPFamily):
    name, inner = "soapnadam", "nadam"
    hyperparameters = {**SOAP_DEFAULTS, "betas": (0.9, 0.999), "momentum_decay": 4e-3,
                       "decoupled_weight_decay": False, **REFUSED_SWITCHES}


class SOAPAdEMAMix(SOAPFamily):
    name, inner = "soapademamix", "ademamix"
    hyperparameters = {**SOAP_DEFAULTS, "betas": (0.9, 0.95, 0.999), "alpha": 2.0, "beta3_warmup": None,
                       "alpha_warmup": None, **REFUSED_SWITCHES}


class SOLP(SOAPFamily):
    name, inner = "solp", "laprop"
    hyperparameters = {**SOAP_DEFAULTS, **REFUSED_SWITCHES}


class KLSOAP(SOAPFamily):
    name, inner, kl = "klsoap", "adam", True
    hyperparameters = {**SOAP_DEFAULTS, **REFUSED_SWITCHES}


class KLShampoo(SOAPFamily):
    name, inner, kl = "klshampoo", None, True
    hyperparameters = {**SOAP_DEFAULTS, "init_factor": 0.1, "dampening": 1e-9, **REFUSED_SWITCHES}


class HeavySOAP(SOAPFamily):
    name, inner, heavy = "heavysoap", "adam", True
    hyperparameters = {**SOAP_DEFAULTS, **REFUSED_SWITCHES}


class HeavySOAPNAdam(SOAPNAdam):
    name, heavy = "heavysoapnadam", True


class HeavySOAPAdEMAMix(SOAPAdEMAMix):
    name, heavy = "heavysoapademamix", True


class HeavySOLP(SOLP):
    name, heavy = "heavysolp", True


class HeavyKLSOAP(KLSOAP):
    name, heavy = "heavyklsoap", True


class HeavyKLShampoo(KLShampoo):
    name, heavy = "heavyklshampoo", True


FAMILY = (SOAPNAdam, SOAPAdEMAMix, SOLP, KLSOAP, KLShampoo, HeavySOAP, HeavySOAPNAdam, HeavySOAPAdEMAMix, HeavySOLP,
          HeavyKLSOAP, HeavyKLShampoo)
