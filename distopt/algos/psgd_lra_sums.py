"""PSGDLRA's sums over a param group, as transforms of the chain runtime (:mod:`distopt.transforms.base`): each is
one small collective over every tensor of the group on every rank (a sum, or for the fit's argmax a maximum), and the
elementwise maths between them on each rank's shards. The algorithm is :class:`distopt.algos.psgd_lra.PSGDLRA`; the
order of the transforms is HeavyBall 3.2.1's ``update_lra_precond_`` and ``lra_precond``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..transforms.base import TensorStep, Transform
from .psgd_maths import F32_EPS

DAMPENING = 1e-9  # HeavyBall's fixed dampening of the fitted gradient (no keyword for PSGDLRA)
KEY_SHIFT = 2**38  # an element's place in the group's flatten is below this; bfloat16 bits times it stay exact


def lra_rank(hp: Mapping[str, Any]) -> int:
    """``rank``, or HeavyBall's default ``round(log2(number of elements))`` over the group's parameters."""
    if hp["rank"] is not None:
        return int(hp["rank"])
    return max(1, round(math.log2(sum(p.numel() for p in hp["params"]))))


def _seed(seed: int, position: int, step: int, what: str) -> int:
    digest = hashlib.sha256(f"psgdlra:{seed}:{position}:{step}:{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw_whole(seed: int, position: int, step: int, what: str, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """Standard normal draws of a whole tensor's shape (every rank draws it all and keeps its part)."""
    gen = torch.Generator(device).manual_seed(_seed(seed, position, step, what))
    return torch.randn(shape, dtype=dtype, device=device, generator=gen)


def local_part(whole: Tensor, t: TensorStep) -> Tensor:
    offset = t.extra.get("offset", (0,) * len(t.shape))
    return whole[tuple(slice(o, o + s) for o, s in zip(offset, t.param.shape))]


def _flat_index(t: TensorStep) -> Tensor:
    """Each local element's place in its whole tensor's row-major flatten."""
    offset = t.extra.get("offset", (0,) * len(t.shape))
    index = torch.zeros(t.param.shape, dtype=torch.int64, device=t.param.device)
    stride = 1
    for dim in reversed(range(len(t.shape))):
        positions = torch.arange(offset[dim], offset[dim] + t.param.shape[dim], device=t.param.device) * stride
        index += positions.reshape([-1 if d == dim else 1 for d in range(len(t.shape))])
        stride *= t.shape[dim]
    return index.reshape(-1)


def _batch(steps: list[TensorStep]) -> dict[str, Any]:
    """The group's decisions for this step, taken once from the first tensor (every rank holds the same batch)."""
    found = steps[0].extra.get("lra_batch")
    if found is None:
        first = steps[0].extra["lra"]
        found = {"due": first["due"], "initial": any(t.extra["lra"]["initial"] for t in steps),
                 "precond_u": first["precond_u"], "fit_ok": True}
        hp = steps[0].hp
        sizes = {t.extra["position"]: t.numel for t in steps}
        params = hp["params"]
        starts, total = {}, 0
        for i, p in enumerate(params):
            starts[i] = total
            total += sizes.get(i, p.numel())
        found["starts"] = starts
        for t in steps:
            t.extra["lra_batch"] = found
    return found


def _stack(state: dict[str, Tensor], name: str, rank: int) -> Tensor:
    return torch.stack([state[f"{name}.{k}"].reshape(-1) for k in range(rank)], dim=1)


def _flats(t: TensorStep) -> dict[str, Any]:
    """This step's copies of ``U``, ``V`` (``(m, rank)``) and ``d``, in the working dtype (built once per step; a
    replica that does not count in the sums builds them too, as it steps its own copy of the parameter)."""
    lra, r = t.extra["lra"], lra_rank(t.hp)
    if "U" not in lra:
        work = lra["work"]
        lra.update(U=_stack(t.state, "U", r).to(work), V=_stack(t.state, "V", r).to(work),
                   d=t.state["d"].reshape(-1).to(work, copy=True))  # a copy: the fit moves the kept d
    return lra


def _fit_inputs(t: TensorStep) -> dict[str, Any]:
    """The flats, the fit's probe (drawn whole from the seeded generator, this rank's part kept) and the dampened
    fitted gradient ``h``."""
    lra, hp = _flats(t), t.hp
    if "h" not in lra:
        fitted = lra["fitted"]
        probe = local_part(draw_whole(hp["seed"], t.extra["position"], t.step, "probe", t.shape, fitted.dtype,
                                  fitted.device), t).reshape(-1)
        lra["h"] = (fitted + (DAMPENING + F32_EPS * fitted.abs()) * probe).to(lra["work"])
        lra["probe"] = probe.to(lra["work"])
    return lra


class _LRATransform(Transform):
    pooled = True

    def __init__(self, rank: int = 0):
        self.rank = rank
        sizes = {"lra_fit_first": 2 * rank + rank * rank, "lra_fit_second": 2 * rank, "lra_fit_third": 2 * rank + 4}
        if self.name in sizes:
            self.reductions = sizes[self.name]  # the group's sums: a number of the rank

    def active(self, steps: list[TensorStep]) -> bool:
        batch = _batch(steps)
        return batch["due"] and batch["fit_ok"]


class LRAStart(_LRATransform):
    """The initial ``d`` (HeavyBall's scale from the first gradient's ``mean(g⁴)``, per tensor) and, on a fitting
    step, the balance of ``U`` and ``V`` to equal norms over the group."""

    name = "lra_start"
    reductions = 3
    reduce_dtype = torch.float64

    def active(self, steps: list[TensorStep]) -> bool:
        batch = _batch(steps)
        return batch["due"] or batch["initial"]

    def partials(self, t: TensorStep) -> Tensor:
        lra, r = t.extra["lra"], lra_rank(t.hp)
        zero = torch.zeros((), dtype=torch.float64, device=t.grad.device)
        g4 = (t.grad.double().abs().clamp(min=1e-12) ** 4).sum() if lra["initial"] else zero
        if not t.extra["lra_batch"]["due"]:
            return torch.stack([g4, zero, zero])
        u = sum(t.state[f"U.{k}"].square().sum().double() for k in range(r))
        v = sum(t.state[f"V.{k}"].square().sum().double() for k in range(r))
        return torch.stack([g4, u, v])

    def pool(self, totals: Tensor, steps: list[TensorStep]) -> Tensor:
        pooled = totals.sum(0)
        out = totals.clone()
        out[:, 1:] = pooled[1:]
        return out

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        hp, lra, r = t.hp, t.extra["lra"], lra_rank(t.hp)
        if lra["initial"]:
            t.state["d"].fill_(_initial_scale(totals[0], t.numel, hp))
        if t.extra["lra_batch"]["due"]:
            # On the device, as 0-d tensors: reading the scale on the host would wait for the device every tensor.
            scale = (totals[1] / totals[2]) ** 0.25
            scale = torch.where(torch.isfinite(scale) & (scale > 1e-6), scale, torch.ones_like(scale))
            for k in range(r):
                t.state[f"U.{k}"].mul_(1 / scale)
                t.state[f"V.{k}"].mul_(scale)
        return None


def _initial_scale(g4_sum: Tensor, numel: int, hp: Mapping[str, Any]) -> float:
    if hp["precond_init_scale"] is not None:
        return float(hp["precond_init_scale"])
    power = 0.5 if hp["precond_init_scale_power"] is None else hp["precond_init_scale_power"]
    x = -(math.log(float(g4_sum)) - math.log(numel)) / 4 / 2 if float(g4_sum) > 0 else math.inf
    if not math.isfinite(x) or float(g4_sum) <= numel * 1e-48:  # an all-zero first gradient: HeavyBall refuses it
        return 1.0
    root = 1 / math.exp(-x) if x > 0 else math.exp(x)
    scale = (root * hp["precond_init_scale_scale"]) ** power
    return scale if math.isfinite(scale) else 1.0


class LRAFitFirst(_LRATransform):
    """``Vᵀ(d h)``, ``VᵀU`` and ``Uᵀ(v / d)`` over the group: ``Qh = d h + U Vᵀ(d h)``, the LU of ``I + VᵀU``, and
    ``Q⁻ᵀ v``. ``h`` is the dampened fitted gradient, ``v`` its probe."""

    name = "lra_fit_first"

    def partials(self, t: TensorStep) -> Tensor:
        lra = _fit_inputs(t)
        u, v_, d = lra["U"], lra["V"], lra["d"]
        return torch.cat([v_.T @ (d * lra["h"]), (v_.T @ u).reshape(-1), u.T @ (lra["probe"] / d)])

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        lra, r = _fit_inputs(t), lra_rank(t.hp)
        u, v_, d = lra["U"], lra["V"], lra["d"]
        vdh, vtu, rhs = totals[:r], totals[r:r + r * r].reshape(r, r), totals[r + r * r:]
        ip_vtu = torch.eye(r, dtype=vtu.dtype, device=vtu.device) + vtu
        lu, pivots, info = torch.linalg.lu_factor_ex(ip_vtu)
        if int(info) != 0:  # HeavyBall skips the fit where I + VᵀU is singular, and tries again at the next
            t.extra["lra_batch"]["fit_ok"] = False
            return None
        correction = torch.linalg.lu_solve(lu, pivots, rhs.view(-1, 1), adjoint=True).to(v_.dtype)
        lra.update(ip_vtu=ip_vtu, lu=lu, pivots=pivots, Qh=d * lra["h"] + u @ vdh.to(u.dtype),
                   invQtv=lra["probe"] / d - (v_ @ correction).flatten())
        return None


class LRAFitSecond(_LRATransform):
    """``UᵀQh`` and ``Vᵀ Q⁻ᵀv``: ``Ph``, ``P⁻¹v``, and the gradient of the fit with respect to ``d``."""

    name = "lra_fit_second"

    def partials(self, t: TensorStep) -> Tensor:
        lra = t.extra["lra"]
        return torch.cat([lra["U"].T @ lra["Qh"], lra["V"].T @ lra["invQtv"]])

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        lra, r = t.extra["lra"], lra_rank(t.hp)
        u, v_, d, h, probe = lra["U"], lra["V"], lra["d"], lra["h"], lra["probe"]
        ph = lra["Qh"] + v_ @ totals[:r].to(v_.dtype)
        solution = torch.linalg.lu_solve(lra["lu"], lra["pivots"], totals[r:].view(-1, 1)).to(u.dtype)
        inverse = lra["invQtv"] - (u @ solution).flatten()
        a0, b0 = d * ph, inverse / d
        lra.update(nabla_d=d.square() * ph * h - probe * inverse, a0=a0, b0=b0,
                   divisor=(a0.square() + probe.square()) * (b0.square() + h.square()))
        return None


class LRAArgmax(_LRATransform):
    """The element of the group where ``(a0² + a1²)(b0² + b1²)`` is largest, compared in bfloat16 as HeavyBall
    does, the first in the group's flatten among ties: one ``all_reduce(MAX)`` of a float64 key."""

    name = "lra_argmax"
    reductions = 1
    reduce_op = "max"
    reduce_dtype = torch.float64

    def partials(self, t: TensorStep) -> Tensor:
        lra = t.extra["lra"]
        if lra["divisor"].numel() == 0:  # an empty shard holds no candidate
            return torch.full((1,), -1.0, dtype=torch.float64, device=lra["divisor"].device)
        rounded = lra["divisor"].to(torch.bfloat16)
        bits = rounded.view(torch.int16).to(torch.int64)  # non-negative floats order as their bits
        best = bits.max()
        index = _flat_index(t)[bits == best].min() + t.extra["lra_batch"]["starts"][t.extra["position"]]
        return (best * KEY_SHIFT + (KEY_SHIFT - 1 - index)).to(torch.float64).reshape(1)

    def pool(self, totals: Tensor, steps: list[TensorStep]) -> Tensor:
        return totals.max(0, keepdim=True).values.expand(len(steps), -1)

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        key = totals[0].to(torch.int64)  # exact: the key is an integer below 2^53
        t.extra["lra"]["winner"] = KEY_SHIFT - 1 - torch.remainder(key, KEY_SHIFT)
        return None


class LRAFitThird(_LRATransform):
    """The fit's step on ``d`` (normalized at the winning element, in float64) and the sums of the ``U`` or ``V``
    step: ``aᵀW``, ``bᵀW`` and ``|a|²``, ``|b|²`` for ``a = Qh``, ``b = Q⁻ᵀv``, ``W`` the factor not stepped."""

    name = "lra_fit_third"
    reduce_dtype = torch.float64

    def partials(self, t: TensorStep) -> Tensor:
        lra = t.extra["lra"]
        start = t.extra["lra_batch"]["starts"][t.extra["position"]]
        # The winning element's terms where this shard holds it, zeros elsewhere (no host read of where it is).
        here = (_flat_index(t) + start) == lra["winner"].to(lra["d"].device)
        a_at = torch.where(here, lra["a0"].double().square() + lra["probe"].double().square(), 0.0).sum()
        b_at = torch.where(here, lra["b0"].double().square() + lra["h"].double().square(), 0.0).sum()
        w = lra["V"] if t.extra["lra_batch"]["precond_u"] else lra["U"]
        a, b = lra["Qh"], lra["invQtv"]
        return torch.cat([torch.stack([a_at, b_at]), (a @ w).double(), (b @ w).double(),
                          torch.stack([a.square().sum().double(), b.square().sum().double()])])

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        hp, lra, r = t.hp, t.extra["lra"], lra_rank(t.hp)
        divisor = (totals[0] * totals[1]).sqrt().clamp(min=hp["eps"])
        step = -hp["precond_lr"] / divisor
        d_state = t.state["d"].view(-1)
        d_state.copy_(d_state + lra["nabla_d"].to(d_state.dtype) * step)
        if not hp["delayed"]:
            lra["d"] = d_state.to(lra["d"].dtype)
        w = lra["V"] if t.extra["lra_batch"]["precond_u"] else lra["U"]
        at_w, bt_w = totals[2:2 + r].to(w.dtype), totals[2 + r:2 + 2 * r].to(w.dtype)
        lra.update(at_w=at_w, bt_w=bt_w, a_norm=totals[-2].sqrt(), b_norm=totals[-1].sqrt(), at_wwt=w @ at_w,
                   bt_wwt=w @ bt_w)
        return None


class LRAFitFourth(_LRATransform):
    """``|aᵀW Wᵀ|`` and ``|bᵀW Wᵀ|`` over the group: the normalized step of ``U`` (odd fits) or ``V`` (even)."""

    name = "lra_fit_fourth"
    reductions = 2
    reduce_dtype = torch.float64

    def partials(self, t: TensorStep) -> Tensor:
        lra = t.extra["lra"]
        return torch.stack([lra["at_wwt"].square().sum().double(), lra["bt_wwt"].square().sum().double()])

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        hp, lra, r = t.hp, t.extra["lra"], lra_rank(t.hp)
        size = (lra["a_norm"] * totals[0].sqrt() + lra["b_norm"] * totals[1].sqrt()).clamp(min=hp["eps"])
        step = hp["precond_lr"] / size
        a, b, at_w, bt_w = lra["Qh"], lra["invQtv"], lra["at_w"], lra["bt_w"]
        if t.extra["lra_batch"]["precond_u"]:
            name, change = "U", torch.outer(b, bt_w @ lra["ip_vtu"].to(b.dtype)) - torch.outer(
                a, at_w @ lra["ip_vtu"].to(a.dtype))
        else:
            v_ = lra["V"]
            name, change = "V", torch.outer(b + v_ @ bt_w, bt_w) - torch.outer(a + v_ @ at_w, at_w)
        change = change * step.to(change.dtype)
        for k in range(r):
            kept = t.state[f"{name}.{k}"]
            kept.copy_(kept + change[:, k].view_as(kept).to(kept.dtype))
        if not hp["delayed"]:
            lra[name] = lra[name] + change
        return None


class LRAApply(Transform):
    """``P u = d (x + V Uᵀx)`` with ``x = d u + U Vᵀ(d u)``: two sums of ``rank`` numbers over the group."""

    pooled = True

    def __init__(self, rank: int, second: bool):
        self.second, self.reductions = second, rank
        self.name = "lra_apply_second" if second else "lra_apply_first"

    def partials(self, t: TensorStep) -> Tensor:
        lra = self._inputs(t)
        return lra["U"].T @ lra["x"] if self.second else lra["V"].T @ lra["du"]

    @staticmethod
    def _inputs(t: TensorStep) -> dict[str, Any]:
        lra = _flats(t)
        if "du" not in lra:
            lra["du"] = lra["d"] * t.u.reshape(-1).to(lra["d"].dtype)
        return lra

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor | None:
        lra = self._inputs(t)
        if not self.second:
            lra["x"] = lra["du"] + lra["U"] @ totals.to(lra["U"].dtype)
            return None
        out = lra["d"] * (lra["x"] + lra["V"] @ totals.to(lra["V"].dtype))
        return out.to(t.u.dtype).view(t.u.shape)


@lru_cache(maxsize=64)
def core(rank: int) -> tuple[Transform, ...]:
    """The transforms of a group of this rank, after the momentum: fit (when due), then apply."""
    return (LRAStart(), LRAFitFirst(rank), LRAFitSecond(rank), LRAArgmax(), LRAFitThird(rank), LRAFitFourth(),
            LRAApply(rank, second=False), LRAApply(rank, second=True))


