"""PSGD with a low-rank preconditioner (PSGDLRA) as HeavyBall 3.2.1's, over every parameter of a param group at once
(its default ``multi_tensor=True``: one approximation for the group). Li, "Preconditioned Stochastic Gradient
Descent" (https://arxiv.org/abs/1512.04202) and lixilinx/psgd_torch's ``UVd`` preconditioner.

The preconditioner of the group's flattened gradient is ``P = D (I + V Uᵀ)(I + U Vᵀ) D``, with ``D = diag(d)`` and
``U, V`` of ``rank`` columns: one row of each per element of every parameter. So every state is elementwise and
lives on the shards (``d``, and ``U``, ``V`` as ``rank`` tensors shaped like the parameter, ``U.<k>``, ``V.<k>``);
what the maths needs of the whole group are sums (``Vᵀ x``, ``VᵀU``, norms) and one argmax, reductions over every
tensor of the group on every rank: one small collective each, eight on a step that fits the preconditioner and two
on one that only applies it. The result equals the single-process run up to the order of those sums.

Random draws (the initial ``U, V``; the fit's probe) come whole from a generator seeded by ``(seed, the tensor's
place in its group, step)``, each rank keeping its part, so they do not depend on the sharding. Where HeavyBall's
fit writes this step's copy of ``d`` with the opposite sign to the ``d`` it keeps (``_compilable_d_step``: the kept
``d`` moves by ``+nablaD·step``, the copy that preconditions this step by ``-nablaD·step``), distopt preconditions
with the ``d`` it keeps, as psgd_torch does; ``delayed=True`` (precondition with the state before the fit) is the
same in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import eigenbasis as eb
from . import psgd_lra_sums as sums
from .base import Algorithm, check_bool, check_nonnegative, check_unit_interval, new_step_counter
from .psgd_family import REFUSED_SWITCHES, check_fit_settings, fit_probability
from .psgd_lra_sums import lra_rank


#: Its per-tensor state is the low-rank preconditioner's factors (``U``, ``V``, ``d``), which a compact form would
#: round every step inside the fit's products: the state settings are refused, as for other algorithms' factors.
LRA_REFUSED = {**REFUSED_SWITCHES, "storage_dtype": "float32", "ecc": None, "param_ecc": None,
               "state_precision": None, "factored_2nd": False}


class PSGDLRA(Algorithm):
    """HeavyBall's PSGDLRA (``multi_tensor=True``): one low-rank preconditioner over the group's parameters.
    State per tensor: ``step``, ``precond_cumulative``, ``fits`` (scalars), ``exp_avg`` (with ``exp_avg_input``),
    ``d``, and ``U.<k>``, ``V.<k>`` for ``k < rank``."""

    name = "psgdlra"
    hyperparameters = {"lr": 0.001, "beta": 0.9, "weight_decay": 0.0, "preconditioner_update_probability": None,
                       "momentum_into_precond_update": True, "rank": None, "q_dtype": "float32", "delayed": False,
                       "exp_avg_input": True, "eps": 1e-8, "precond_init_scale": None,
                       "precond_init_scale_scale": 1.0, "precond_init_scale_power": None, "precond_lr": 0.1,
                       "seed": 0, "update_clipping": "trust_region_clip", **LRA_REFUSED}
    scalar_state = ("step", "precond_cumulative", "fits")
    reduces = True

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_unit_interval(self.name, hp, "beta")
        for key in ("weight_decay", "precond_lr", "precond_init_scale_scale", "eps"):
            check_nonnegative(self.name, hp, key)
        rank = hp["rank"]
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"{self.name}: invalid rank={rank!r} (None for log2 of the group's size, or an int >= 1)")
        if isinstance(hp["seed"], bool) or not isinstance(hp["seed"], int):
            raise ValueError(f"{self.name}: invalid seed={hp['seed']!r} (must be an int)")
        check_fit_settings(self.name, hp)
        check_bool(self.name, hp, "momentum_into_precond_update", "delayed", "exp_avg_input")
        for key, default in LRA_REFUSED.items():
            if hp.get(key, default) != default:
                raise ValueError(f"{self.name}: {key}={hp[key]!r} is not supported; leave it at {default!r}")

    def _dtype(self, hp: Mapping[str, Any], param: Tensor) -> torch.dtype:
        return torch.promote_types(torch.promote_types(param.dtype, torch.float32), getattr(torch, hp["q_dtype"]))

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        dtype = self._dtype(hp, param)
        state = {"step": new_step_counter(), "precond_cumulative": torch.tensor(0.0, dtype=torch.float64),
                 "fits": torch.tensor(0, dtype=torch.int64), "d": torch.zeros_like(param, dtype=dtype)}
        if hp["exp_avg_input"]:
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.promote_types(param.dtype, torch.float32))
        for k in range(lra_rank(hp)):
            state[f"U.{k}"] = torch.zeros_like(param, dtype=dtype)
            state[f"V.{k}"] = torch.zeros_like(param, dtype=dtype)
        return state

    def chained(self, hp: Mapping[str, Any]) -> bool:
        return True  # its sums over the group are reductions of the chain runtime

    def core_transforms(self, hp: Mapping[str, Any]) -> tuple:
        return sums.core(lra_rank(hp))

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        return float(hp["beta"])

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "it has no second moment with betas[1] whose decay the flag would schedule"
        return {"palm": reason, "kourkoutas_beta": reason, "atan2": "HeavyBall defines no atan2 for PSGDLRA",
                "grams": "its update is preconditioned; sign(g)·|u| would undo the preconditioning"}

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        step = int(state["step"])
        if step > 0:
            state["precond_cumulative"] += fit_probability(hp, step)
        state["step"] += 1
        before = float(state["precond_cumulative"])
        due = int(before + fit_probability(hp, step + 1)) > int(before)
        fits = int(state["fits"])
        if due:
            state["fits"] += 1
        u = grad
        if hp["exp_avg_input"]:
            u = eb.lerp_(state["exp_avg"], grad.to(state["exp_avg"].dtype), 1 - eb.beta_debias(hp["beta"], step + 1))
            u = u.clone()
        fitted = u if hp["momentum_into_precond_update"] else t.grad
        dtype = state["d"].dtype
        work = torch.float32 if torch.float32 in (dtype, fitted.dtype) else torch.float64  # HeavyBall's min_dtype
        if step == 0:
            r = lra_rank(hp)
            count = sum(p.numel() for p in hp["params"])
            scale = (count * (r + 10)) ** -0.5
            for name in ("U", "V"):
                whole = sums.draw_whole(hp["seed"], t.extra["position"], 0, name, (*t.shape, r), dtype, param.device)
                local = sums.local_part(whole, t) * scale
                for k in range(r):
                    state[f"{name}.{k}"].copy_(local[..., k])
        t.extra["lra"] = {"due": due, "initial": step == 0, "precond_u": bool(fits % 2), "work": work,
                          "fitted": fitted.reshape(-1)}
        return u

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        raise RuntimeError("psgdlra runs through the optimizer's chain runtime")
