"""Prodigy's parts: Adam scaled by the distance estimate ``d``, and the estimate of ``d`` from statistics summed
over every parameter of the group on every rank. Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive
Parameter-Free Learner", https://arxiv.org/abs/2306.06101, with adv_optm 2.5.16's ``Prodigy_adv`` options.

``d`` and its bookkeeping (``d_max``, ``d_numerator``, ``k``) live in the param group, as in adv_optm and prodigyopt:
they are one number for the whole group, saved with the group. The statistics of a step use the ``d`` of that step;
the new ``d`` is estimated after every tensor has stepped and takes effect at the next step (adv_optm's timing).
Unlike adv_optm under FSDP1, only the step's new terms are summed over the ranks, so the carried numerator is not
counted once per rank.

``slice_p`` samples every ``slice_p``-th element of each whole tensor (its row-major flatten), whatever the shard
holds: each rank finds which of its elements those are from its shard's global offset, so the estimate does not
depend on the sharding. ``p0`` and ``s`` are kept shaped like the parameter (zeros off the sample) so that they
shard and reshard like it; adv_optm keeps only the ``numel / slice_p`` sampled entries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from .base import Transform, TensorStep
from .stable import _check_betas, _check_nonnegative

GROUP_STATE = {"d": None, "d_max": None, "d_numerator": 0.0, "k": 0}


@lru_cache(maxsize=1024)
def _sample_index(shape: tuple[int, ...], offset: tuple[int, ...], local_shape: tuple[int, ...], every: int,
                  device: torch.device) -> Tensor:
    """Where, in this shard's flatten, it holds elements ``0, every, 2 every, ...`` of the whole tensor's row-major
    flatten: the statistics then touch ``numel / every`` elements, as adv_optm's strided slice does."""
    index = torch.zeros(local_shape, dtype=torch.int64, device=device)
    stride = 1
    for dim in reversed(range(len(shape))):
        positions = torch.arange(offset[dim], offset[dim] + local_shape[dim], device=device) * stride
        index += positions.reshape([-1 if d == dim else 1 for d in range(len(shape))])
        stride *= shape[dim]
    return (index.reshape(-1) % every == 0).nonzero().squeeze(1)


def _stats_active(hp: Mapping[str, Any]) -> bool:
    return not (hp["prodigy_steps"] > 0 and hp["k"] >= hp["prodigy_steps"])


class ScaleByProdigy(Transform):
    """Adam with ``d``: ``m <- β1 m + d (1 - β1) g``, ``v <- β2 v + d² (1 - β2) g²``, the direction
    ``m / (sqrt(v) + d eps)`` at the step size ``d lr`` (and decay ``d lr wd``); and this shard's terms of the
    statistics (``s <- β3 s + (d / d0) d lr g`` on the sample, the numerator ``(d / d0) d lr <g, p0 - p>``)."""

    name = "scale_by_prodigy"
    hyperparameters = {"betas": (0.9, 0.999), "eps": 1e-8, "beta3": None, "d0": 1e-6, "d_coef": 1.0,
                       "growth_rate": math.inf, "safeguard_warmup": False, "slice_p": 11, "prodigy_steps": 0,
                       "d_limiter": False, "nesterov": False, "nesterov_coef": None, **GROUP_STATE}
    state_keys = ("exp_avg", "exp_avg_sq", "s", "p0")

    def check(self, hp: Mapping[str, Any]) -> None:
        _check_betas(hp)
        if hp["eps"] is not None:
            _check_nonnegative(hp, "eps")
        for key in ("d0", "d_coef", "growth_rate"):
            _check_nonnegative(hp, key)
            if not hp[key] > 0:
                raise ValueError(f"invalid {key}={hp[key]!r} (must be > 0)")
        for key, optional in (("beta3", True), ("nesterov_coef", True)):
            value = hp[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= 1):
                raise ValueError(f"invalid {key}={value!r} (must be None or in [0, 1])")
        for key in ("slice_p", "prodigy_steps"):
            value, least = hp[key], 1 if key == "slice_p" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"invalid {key}={value!r} (must be an int >= {least})")
        for key in ("safeguard_warmup", "d_limiter", "nesterov"):
            if not isinstance(hp[key], bool):
                raise ValueError(f"{key} must be a bool, got {hp[key]!r}")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        zeros = torch.zeros_like(param, memory_format=torch.contiguous_format)
        return {"exp_avg": zeros, "exp_avg_sq": zeros.clone(), "s": zeros.clone(),
                "p0": param.detach().clone(memory_format=torch.contiguous_format)}

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        hp = t.hp
        if hp["d"] is None:  # the group's first step
            hp.update(d=float(hp["d0"]), d_max=float(hp["d0"]))
        beta1, beta2 = hp["betas"]
        d, d0, lr = hp["d"], hp["d0"], hp["lr"]
        dlr = d * lr
        g, m, v = t.u, t.state["exp_avg"], t.state["exp_avg_sq"]
        eps = hp["eps"] if hp["eps"] is not None else 1 / math.sqrt(t.numel)
        if beta1 > 0:
            m.mul_(beta1).add_(g, alpha=d * (1 - beta1))
            u = m
            if hp["nesterov"]:
                u = m.lerp(g, 1 - (hp["nesterov_coef"] if hp["nesterov_coef"] is not None else beta1))
        else:
            u = g * d
        v.mul_(beta2).addcmul_(g, g, value=d * d * (1 - beta2))
        u = u / v.sqrt().add_(d * eps)
        if _stats_active(hp):
            beta3 = hp["beta3"] if hp["beta3"] is not None else math.sqrt(beta2)
            index = self._index(t)
            s_flat = t.state["s"].view(-1)  # s and p0 hold zeros off the sample; only the sample is touched
            sampled = g.reshape(-1).index_select(0, index)
            s_sampled = s_flat.index_select(0, index).mul_(beta3).add_(
                sampled, alpha=(d / d0) * (d if hp["safeguard_warmup"] else dlr))
            s_flat.index_copy_(0, index, s_sampled)
            wide = torch.promote_types(g.dtype, torch.float32)
            moved = t.state["p0"].view(-1).index_select(0, index) - t.param.reshape(-1).index_select(0, index)
            numerator = (d / d0) * dlr * torch.dot(sampled.to(wide), moved.to(wide))
            t.extra["prodigy"] = torch.stack([numerator, s_sampled.to(wide).abs().sum()])
        t.lr_scale = d
        return u

    @staticmethod
    def _index(t: TensorStep) -> Tensor:
        offset = t.extra.get("offset", (0,) * len(t.shape))
        return _sample_index(tuple(t.shape), tuple(offset), tuple(t.param.shape), t.hp["slice_p"], t.param.device)


class EstimateProdigyD(Transform):
    """The new ``d`` from the group's statistics, summed over every tensor of the group on every rank (one
    all_reduce of two numbers per step): ``d̂ = d_coef N / D`` (``N`` carried with decay ``β3``), raised no faster
    than ``growth_rate`` (and ``2^(1/4)`` per step with ``d_limiter``), never lowered."""

    name = "estimate_prodigy_d"
    reductions = 2

    def partials(self, t: TensorStep) -> Tensor:
        found = t.extra.get("prodigy")
        return found if found is not None else torch.zeros(2, dtype=torch.float32, device=t.param.device)

    def pool(self, totals: Tensor, steps: list[TensorStep]) -> Tensor:
        hp = steps[0].hp
        if _stats_active(hp):
            beta3 = hp["beta3"] if hp["beta3"] is not None else math.sqrt(hp["betas"][1])
            numerator = beta3 * hp["d_numerator"] + totals[:, 0].sum().item()
            denominator = totals[:, 1].sum().item()
            d, d_max = hp["d"], hp["d_max"]
            if denominator > 0:
                d_hat = hp["d_coef"] * numerator / denominator
                if hp["d_limiter"]:
                    d_hat = min(d * 2**0.25, d_hat)
                if d == hp["d0"]:
                    d = max(d, d_hat)
                d_max = max(d_max, d_hat)
                d = min(d_max, d * hp["growth_rate"])
            hp.update(d=d, d_max=d_max, d_numerator=numerator)
        hp["k"] += 1
        return totals

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        return None
