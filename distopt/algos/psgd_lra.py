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

import hashlib
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..transforms.base import TensorStep, Transform
from . import eigenbasis as eb
from .base import Algorithm, check_bool, check_nonnegative, check_unit_interval, new_step_counter
from .psgd_family import REFUSED_SWITCHES, heavyball_schedule
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


def _local(whole: Tensor, t: TensorStep) -> Tensor:
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
        probe = _local(draw_whole(hp["seed"], t.extra["position"], t.step, "probe", t.shape, fitted.dtype,
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
        g4 = (t.grad.double().abs().clamp(min=1e-12) ** 4).sum() if lra["initial"] else t.grad.new_zeros((),
                                                                                                       dtype=torch.float64)
        if not t.extra["lra_batch"]["due"]:
            zero = torch.zeros((), dtype=torch.float64, device=t.grad.device)
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
            scale = (totals[1] / totals[2]) ** 0.25
            scale = float(scale) if math.isfinite(float(scale)) and float(scale) > 1e-6 else 1.0
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
        key = int(totals[0])
        t.extra["lra"]["winner"] = KEY_SHIFT - 1 - key % KEY_SHIFT
        return None


class LRAFitThird(_LRATransform):
    """The fit's step on ``d`` (normalized at the winning element, in float64) and the sums of the ``U`` or ``V``
    step: ``aᵀW``, ``bᵀW`` and ``|a|²``, ``|b|²`` for ``a = Qh``, ``b = Q⁻ᵀv``, ``W`` the factor not stepped."""

    name = "lra_fit_third"
    reduce_dtype = torch.float64

    def partials(self, t: TensorStep) -> Tensor:
        lra = t.extra["lra"]
        start = t.extra["lra_batch"]["starts"][t.extra["position"]]
        here = (_flat_index(t) + start) == lra["winner"]
        zero = torch.zeros((), dtype=torch.float64, device=lra["d"].device)
        if bool(here.any()):
            i = here.nonzero()[0]
            a_at = lra["a0"][i].double().square().sum() + lra["probe"][i].double().square().sum()
            b_at = lra["b0"][i].double().square().sum() + lra["h"][i].double().square().sum()
        else:
            a_at = b_at = zero
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


class PSGDLRA(Algorithm):
    """HeavyBall's PSGDLRA (``multi_tensor=True``): one low-rank preconditioner over the group's parameters.
    State per tensor: ``step``, ``precond_cumulative``, ``fits`` (scalars), ``exp_avg`` (with ``exp_avg_input``),
    ``d``, and ``U.<k>``, ``V.<k>`` for ``k < rank``."""

    name = "psgdlra"
    hyperparameters = {"lr": 0.001, "beta": 0.9, "weight_decay": 0.0, "preconditioner_update_probability": None,
                       "momentum_into_precond_update": True, "rank": None, "q_dtype": "float32", "delayed": False,
                       "exp_avg_input": True, "eps": 1e-8, "precond_init_scale": None,
                       "precond_init_scale_scale": 1.0, "precond_init_scale_power": None, "precond_lr": 0.1,
                       "seed": 0, "update_clipping": "trust_region_clip", **REFUSED_SWITCHES}
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
        if hp["q_dtype"] not in ("float32", "float64"):
            raise ValueError(f"{self.name}: q_dtype={hp['q_dtype']!r} is not supported (float32 or float64; compact "
                             "states are not supported yet)")
        scale = hp["precond_init_scale"]
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"{self.name}: invalid precond_init_scale={scale!r} (None, or a finite number > 0)")
        prob = hp["preconditioner_update_probability"]
        if prob is not None and not callable(prob):
            if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 < prob <= 1.0:
                raise ValueError(f"{self.name}: invalid preconditioner_update_probability={prob!r} (in (0, 1], None "
                                 "for HeavyBall's schedule, or a callable of the step)")
        check_bool(self.name, hp, "momentum_into_precond_update", "delayed", "exp_avg_input")
        for key, default in REFUSED_SWITCHES.items():
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
        return core(lra_rank(hp))

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        return float(hp["beta"])

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        reason = "it has no second moment with betas[1] whose decay the flag would schedule"
        return {"palm": reason, "kourkoutas_beta": reason, "atan2": "HeavyBall defines no atan2 for PSGDLRA",
                "grams": "its update is preconditioned; sign(g)·|u| would undo the preconditioning"}

    def _probability(self, hp: Mapping[str, Any], step: int) -> float:
        prob = hp["preconditioner_update_probability"]
        if prob is None:
            return heavyball_schedule(step)
        return float(prob(step)) if callable(prob) else float(prob)

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor:
        step = int(state["step"])
        if step > 0:
            state["precond_cumulative"] += self._probability(hp, step)
        state["step"] += 1
        before = float(state["precond_cumulative"])
        due = int(before + self._probability(hp, step + 1)) > int(before)
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
                whole = draw_whole(hp["seed"], t.extra["position"], 0, name, (*t.shape, r), dtype, param.device)
                local = _local(whole, t) * scale
                for k in range(r):
                    state[f"{name}.{k}"].copy_(local[..., k])
        t.extra["lra"] = {"due": due, "initial": step == 0, "precond_u": bool(fits % 2), "work": work,
                          "fitted": fitted.reshape(-1)}
        return u

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        raise RuntimeError("psgdlra runs through the optimizer's chain runtime")
