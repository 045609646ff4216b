"""AdaMuon: Muon on the sign of the momentum, then an elementwise second moment of the orthogonalized update and an
RMS-aligned rescale, in the hyperparameters and arithmetic of adv_optm 2.5.16's ``AdaMuon_adv``. Si et al.,
"AdaMuon: Adaptive Muon Optimizer", https://arxiv.org/abs/2507.11005.

Per matrix: on the shards, ``m <- lerp(m, g, 1 - beta1)`` and the Nesterov blend ``u = lerp(g, m, nesterov_coef)``
(elementwise); on the owner, the projection of ``u`` (its sign for ``kappa_p=1``, adv_optm's default for matrices;
``u`` itself for ``kappa_p=2``, its default for 4-D weights; the Lion-k direction between), the orthogonalization
of the ``(out, rest)`` view, the second moment ``v <- beta2 v + (1 - beta2) o²`` and ``o / (sqrt(v) + eps)`` (or
``atan2``, or NorMuon's row-wise form with ``normuon_variant``), and the rescale to an RMS of ``0.2 lr`` (or Muon's
``lr sqrt(max(1, r/c))`` without ``rms_rescaling``). On the shards, adv_optm's decoupled decay ``p - lr wd p`` (masked
where the update's sign disagrees, with ``cautious_wd``) and ``p - update``.

Why the owner keeps ``v``: the rescale and the general projection read norms of the whole matrix, which only the
owner has, and ``v`` is consumed between the orthogonalization and the rescale. So ``v`` is owner state
(``owner.second_momentum_buffer``, or ``owner.normuon_v`` per row) and the result equals one process on any layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import compile
from ..transforms.flags import FLAGS, SETTING_OF
from .base import (OWNER_PREFIX, MatrixAlgorithm, _as_number, check_betas, check_bool, check_nonnegative,
                   new_step_counter, require_matrix, zeros_like)
from . import splits
from .muon import Muon, owner_dtype

SECOND_MOMENT = f"{OWNER_PREFIX}second_momentum_buffer"
NORMUON_V = f"{OWNER_PREFIX}normuon_v"
ATAN2_SCALE = 4 / math.pi
RMS_TARGET = 0.2


def project(u: Tensor, kappa_p: float) -> Tensor:
    """adv_optm's projection of the raw update before orthogonalization (Lion-k's geometry, arXiv 2310.05898):
    ``sign(u)`` for ``p=1``, ``u`` for ``p=2`` (the orthogonalization normalizes it), else
    ``sign(u) |u|^(p-1) / ||u||_p^(p-1)``. ``u`` is one whole matrix."""
    if kappa_p == 1.0:
        return u.sign()
    if kappa_p == 2.0:
        return u
    return (u.sign() * u.abs().pow(kappa_p - 1)).div_(u.norm(p=kappa_p).pow(kappa_p - 1).clamp_min(1e-12))


class AdaMuon(MatrixAlgorithm):
    """AdaMuon. Shard state: ``step``, ``momentum_buffer`` (and ``last_grad`` with ``approx_mars``). Owner state:
    ``owner.second_momentum_buffer`` (the parameter's shape), or ``owner.normuon_v`` ``(rows,)`` with
    ``normuon_variant``. ``eps=None`` or ``ns_eps=None`` mean ``1/sqrt(numel)``, as in adv_optm."""

    name = "adamuon"
    elementwise_owner_state = frozenset({"second_momentum_buffer", "normuon_v"})
    hyperparameters = {"lr": 1e-3, "betas": (0.95, 0.95), "eps": 1e-8, "weight_decay": 0.0, "cautious_wd": False,
                       "nesterov": True, "nesterov_coef": None, "rms_rescaling": True, "ns_steps": 5,
                       "ns_eps": 1e-7, "ns_coeffs": Muon.hyperparameters["ns_coefficients"], "use_atan2": False,
                       "normuon_variant": False, "kappa_p": 1.0, "auto_projection": True, "approx_mars": False,
                       "mars_gamma": 0.025, "orthogonalization": "newton_schulz", "owner_dtype": "bfloat16",
                       **splits.SPLIT_HYPERPARAMETERS}

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "weight_decay")
        check_nonnegative(self.name, hp, "mars_gamma")
        for key in ("eps", "ns_eps", "nesterov_coef"):
            if hp[key] is not None and _as_number(self.name, key, hp[key]) < 0:
                raise ValueError(f"{self.name}: invalid {key}={hp[key]!r} (must be None or >= 0)")
        check_bool(self.name, hp, "cautious_wd", "nesterov", "rms_rescaling", "use_atan2", "normuon_variant",
                   "auto_projection", "approx_mars")
        kappa = _as_number(self.name, "kappa_p", hp["kappa_p"])
        if not 1.0 <= kappa <= 2.0:
            raise ValueError(f"{self.name}: invalid kappa_p={kappa!r} (must be in [1, 2])")
        Muon().check({**Muon.hyperparameters, "ns_coefficients": hp["ns_coeffs"], "ns_steps": hp["ns_steps"],
                      "orthogonalization": hp["orthogonalization"], "owner_dtype": hp["owner_dtype"]})
        splits.check(self.name, hp)
        if isinstance(hp, dict):  # Muon's check stores a dtype's name; the group must hold it too
            hp["owner_dtype"] = str(hp["owner_dtype"]).removeprefix("torch.")

    def check_param(self, shape: tuple[int, ...], name: str) -> None:
        require_matrix(self.name, shape, name, "; give it to an elementwise algorithm (distopt.AdaMuon does this by "
                       "itself)")

    def check_param_in_group(self, shape: tuple[int, ...], name: str, hp: Mapping[str, Any]) -> None:
        splits.check_shape(self.name, shape, name, hp)

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = ("AdaMuon rescales its update to a fixed RMS on the owner after the step size; use its own "
                  "keywords (cautious_wd, approx_mars, use_atan2) instead")
        return {name: reason for name in FLAGS if name not in SETTING_OF}

    def _kappa(self, ndim: int, hp: Mapping[str, Any]) -> float:
        return (2.0 if ndim >= 4 else 1.0) if hp["auto_projection"] else float(hp["kappa_p"])

    def wire_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        # Out in owner_dtype where no bit depends on more: the sign (taken on the shards, exact in any float
        # dtype) or u itself, which the orthogonalization casts to owner_dtype first. The general projection reads
        # u at full precision, so it goes out in float32.
        if hp["auto_projection"] or float(hp["kappa_p"]) in (1.0, 2.0):
            return owner_dtype(hp)
        return self.return_dtype(hp, param_dtype)

    def return_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        # The rescaled update comes back at full precision (adv_optm applies it in the parameter's dtype).
        return torch.promote_types(param_dtype, torch.float32)

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        muon_hp = {**Muon.hyperparameters, "ns_steps": hp["ns_steps"], "orthogonalization": hp["orthogonalization"],
                   "split_sizes": hp["split_sizes"], "num_heads": hp["num_heads"]}
        return Muon().cost(shape, muon_hp) + 10.0 * math.prod(shape)

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if hp["normuon_variant"]:
            return {NORMUON_V: ((shape[0],), torch.float32)}
        return {SECOND_MOMENT: (shape, param_dtype)}

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        state = {"step": new_step_counter(), "momentum_buffer": zeros_like(param)}
        if hp["approx_mars"]:
            state["last_grad"] = zeros_like(param)
        return state

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        beta1 = hp["betas"][0]
        state["step"] += 1
        if hp["approx_mars"]:
            # MARS-M's approximation (arXiv 2510.21800): c = g + gamma beta1 / (1 - beta1) (g - g_prev).
            last = state["last_grad"]
            corrected = grad.sub(last).mul_(hp["mars_gamma"] * beta1 / (1.0 - beta1)).add_(grad)
            last.copy_(grad)
            grad = corrected
        m = state["momentum_buffer"]
        m.lerp_(grad, 1 - beta1)
        coef = beta1 if hp["nesterov_coef"] is None else hp["nesterov_coef"]
        u = grad.lerp(m, coef) if hp["nesterov"] else m
        if self._kappa(param.dim(), hp) == 1.0:
            u = u.sign()  # elementwise, so on the shards: the sign travels exactly in owner_dtype
        return u.to(self.wire_dtype(hp, param.dtype), copy=u is m)

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        numel, rows = math.prod(shape), shape[0]
        kappa = self._kappa(len(shape), hp)
        projected = [project(w, kappa) for w in wholes]
        ns_eps = 1 / math.sqrt(numel) if hp["ns_eps"] is None else hp["ns_eps"]
        muon_hp = {**Muon.hyperparameters, "ns_coefficients": tuple(hp["ns_coeffs"]), "ns_steps": hp["ns_steps"],
                   "eps": ns_eps, "orthogonalization": hp["orthogonalization"], "owner_dtype": hp["owner_dtype"],
                   "split_sizes": hp["split_sizes"], "num_heads": hp["num_heads"]}
        orthogonal = Muon().owner_update(projected, states, muon_hp, shape, fqns)
        # Matrix by matrix, in adv_optm's memory layout: its result for a tall matrix is the transposed view of
        # what Newton-Schulz produced, and on such a view torch's elementwise kernels (atan2's among them) and
        # sums take other paths, so the same layout gives the same bits.
        tall = rows > numel // rows
        eps = 1 / math.sqrt(numel) if hp["eps"] is None else hp["eps"]
        lr = hp["lr"]
        step_scale = lr * ATAN2_SCALE if hp["use_atan2"] and not hp["normuon_variant"] else lr
        return [self._adapt(u.reshape(rows, -1).mT.contiguous().mT if tall else u.reshape(rows, -1), state, hp,
                            shape, eps, step_scale).reshape(shape)
                for u, state in zip(orthogonal, states)]

    def _adapt(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any], shape: tuple[int, ...],
               eps: float, step_scale: float) -> Tensor:
        """The second moment and the rescale of one orthogonalized ``(rows, rest)`` matrix."""
        update = update.to(state[NORMUON_V].dtype if hp["normuon_variant"] else state[SECOND_MOMENT].dtype)
        beta2 = hp["betas"][1]
        if hp["normuon_variant"]:
            variance = state[NORMUON_V]
            variance.lerp_(update.square().mean(dim=1, dtype=variance.dtype), 1 - beta2)
            update.div_(variance.sqrt().unsqueeze_(1).add_(eps))
        else:
            update = update.view(shape) if update.is_contiguous() else update
            second = state[SECOND_MOMENT].view(update.shape)
            second.mul_(beta2).addcmul_(update, update, value=1 - beta2)
            if hp["use_atan2"]:
                update.atan2_(second.sqrt())
            else:
                update.div_(second.sqrt().add_(eps))
        if hp["rms_rescaling"]:
            norm = torch.linalg.vector_norm(update)
            return update.mul_(step_scale * RMS_TARGET * math.sqrt(update.numel()) / norm.clamp_min_(1e-8))
        return update.mul_(step_scale * math.sqrt(max(1, shape[-2] / shape[-1])))

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        decay = hp["weight_decay"] * hp["lr"]
        update = update.to(param.dtype)
        if decay != 0:
            if hp["cautious_wd"]:
                param.addcmul_(param, (update * param >= 0).to(param.dtype), value=-decay)
            else:
                param.add_(param, alpha=-decay)
        param.sub_(update)
