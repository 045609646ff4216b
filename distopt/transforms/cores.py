"""Core transforms for custom chains: moments, Nesterov momentum, and Newton-Schulz orthogonalization (an owner
transform: it needs the whole matrix). With the flags' transforms (:mod:`distopt.transforms.parts`) they compose
HeavyBall's MuonLaProp, OrthoLaProp and LaPropOrtho (:mod:`distopt.transforms.custom`), and users' own chains.

Each keeps its state under its own keys and reads its hyperparameters from the param group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..algos.base import second_moment_decay
from ..algos.muon import OWNER_DTYPES
from .base import OWNER, Transform, TensorStep


def _zeros(param: Tensor) -> Tensor:
    return torch.zeros_like(param, memory_format=torch.preserve_format)


class ScaleByAdam(Transform):
    """Adam's direction (Kingma & Ba, https://arxiv.org/abs/1412.6980): ``m̂ / max(sqrt(v̂), eps)`` with HeavyBall's
    eps floor. State: ``exp_avg``, ``exp_avg_sq``. PaLM and Kourkoutas-β schedule its second moment."""

    name = "scale_by_adam"
    hyperparameters = {"betas": (0.9, 0.99), "eps": 1e-8}
    state_keys = ("exp_avg", "exp_avg_sq")
    second_moment = True

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"exp_avg": _zeros(param), "exp_avg_sq": _zeros(param)}

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        beta1, beta2 = t.hp["betas"]
        m, v = t.state["exp_avg"], t.state["exp_avg_sq"]
        m.lerp_(t.u, 1 - beta1)
        decay, correction = second_moment_decay(t, beta2)
        v.mul_(decay).addcmul_(t.u, t.u, value=1 - decay)
        return m.div(1 - beta1**t.step).div_(v.div(correction).sqrt_().clamp_(min=t.hp["eps"]))


class _MomentsOfNormalized(Transform):
    """LaProp's moments (Ziyin et al., https://arxiv.org/abs/2002.04839) as HeavyBall keeps them: ``v`` of ``u²``,
    and the momentum of ``u / d`` with ``d = max(sqrt(v̂), 1e-8)`` (HeavyBall's LaProp ignores the group's eps).
    State: ``exp_avg``, ``exp_avg_sq``; PaLM and Kourkoutas-β schedule ``v``. Subclasses say what the update is."""

    hyperparameters = {"betas": (0.9, 0.99)}
    state_keys = ("exp_avg", "exp_avg_sq")
    second_moment = True
    floor = 1e-8

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"exp_avg": _zeros(param), "exp_avg_sq": _zeros(param)}

    def moments(self, t: TensorStep) -> tuple[Tensor, Tensor]:
        """Update the state; return the bias-corrected momentum and ``d``."""
        beta1, beta2 = t.hp["betas"]
        m, v = t.state["exp_avg"], t.state["exp_avg_sq"]
        decay, correction = second_moment_decay(t, beta2)
        v.mul_(decay).addcmul_(t.u, t.u, value=1 - decay)
        denom = (v / correction).sqrt().clamp(min=self.floor)
        m.lerp_(t.u / denom, 1 - beta1)
        return m / (1 - beta1**t.step), denom


class ScaleByLaProp(_MomentsOfNormalized):
    """LaProp's direction: the bias-corrected momentum of the normalized gradient."""

    name = "scale_by_laprop"

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        return self.moments(t)[0]


class ScaleByUnscaledAdam(_MomentsOfNormalized):
    """HeavyBall's UnscaledAdamW direction: LaProp's momentum times the current ``d``."""

    name = "scale_by_unscaled_adam"

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        momentum, denom = self.moments(t)
        return momentum * denom


class SignGraft(Transform):
    """The sign of the update, grafted to its norm: ``sign(u) |u| / max(|sign(u)|, 1e-6)`` with norms over the whole
    tensor (HeavyBall's ``sign`` with ``graft=True``)."""

    name = "sign_graft"
    reductions = 2

    def partials(self, t: TensorStep) -> Tensor:
        u = t.u if t.u.dtype in (torch.float32, torch.float64) else t.u.float()
        return torch.stack([u.square().sum(), (u != 0).sum().to(u.dtype)])

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        return t.u.sign() * (totals[0].sqrt() / totals[1].sqrt().clamp(min=1e-6)).to(t.u.dtype)


class NesterovMomentum(Transform):
    """torch.optim.Muon's momentum: ``b <- lerp(b, g, 1 - μ)``, the update ``lerp(g, b, μ)`` (or ``b`` without
    Nesterov). State: ``momentum_buffer``."""

    name = "nesterov_momentum"
    hyperparameters = {"momentum": 0.95, "nesterov": True}
    state_keys = ("momentum_buffer",)

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"momentum_buffer": _zeros(param)}

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        momentum = t.hp["momentum"]
        buf = t.state["momentum_buffer"]
        buf.lerp_(t.u, 1 - momentum)
        return t.u.lerp(buf, momentum) if t.hp["nesterov"] else buf.clone()


#: HeavyBall 3.2.1's five Newton-Schulz coefficient triples (one per iteration).
HEAVYBALL_NS_COEFFICIENTS = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))


def _per_iteration(coefficients: Sequence) -> tuple[tuple[float, float, float], ...]:
    return tuple(tuple(float(c) for c in triple) for triple in coefficients)


class Orthogonalize(Transform):
    """Newton-Schulz orthogonalization of the whole matrix ``(out, rest)`` on its owner, scaled by
    ``sqrt(max(1, rows / cols))`` (Muon, https://kellerjordan.github.io/posts/muon/). ``ns_coefficients`` is one
    triple per iteration (HeavyBall's five by default); the maths runs in ``owner_dtype``. Tensors with fewer than
    two dimensions skip it (HeavyBall does the same) and run the rest of the chain on their shards."""

    name = "orthogonalize"
    kind = OWNER
    hyperparameters = {"ns_coefficients": HEAVYBALL_NS_COEFFICIENTS, "ns_eps": 1e-7, "owner_dtype": "bfloat16"}

    def check(self, hp: Mapping[str, Any]) -> None:
        coefficients = hp["ns_coefficients"]
        try:
            triples = _per_iteration(coefficients)
            ok = len(triples) > 0 and all(len(t) == 3 for t in triples)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"invalid ns_coefficients={coefficients!r} (one (a, b, c) triple per iteration)")
        if hp["owner_dtype"] not in OWNER_DTYPES:
            raise ValueError(f"invalid owner_dtype={hp['owner_dtype']!r} (one of {', '.join(OWNER_DTYPES)})")

    @staticmethod
    def applies(shape: tuple[int, ...]) -> bool:
        return len(shape) >= 2

    @staticmethod
    def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
        return shape[0], math.prod(shape[1:])

    def wire_dtype(self, hp: Mapping[str, Any]) -> torch.dtype:
        return OWNER_DTYPES[hp["owner_dtype"]]

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        m, n = sorted(self.matrix_shape(shape))
        return float(len(hp["ns_coefficients"]) * (4 * m * m * n + 2 * m**3))

    def owner_update(self, wholes: list[Tensor], hp: Mapping[str, Any], shape: tuple[int, ...]) -> list[Tensor]:
        rows, cols = self.matrix_shape(shape)
        scale = max(1.0, rows / cols) ** 0.5
        dtype = self.wire_dtype(hp)
        out = []
        for whole in wholes:
            x = whole.reshape(rows, cols).to(dtype)
            tall = rows > cols
            if tall:
                x = x.T
            x = x / x.norm().clamp(min=hp["ns_eps"])
            for a, b, c in _per_iteration(hp["ns_coefficients"]):
                gram = x @ x.T
                x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
            out.append((x.T if tall else x).reshape(shape) * scale)
        return out


class MatrixEMAOrAdam(Transform):
    """HeavyBall's MuonAdamW before its orthogonalization: for tensors of two or more dimensions the Nesterov EMA
    ``m <- lerp(m, g, 1 - β1)``, ``u = g + m`` (state ``momentum``), for the others Adam's direction
    (:class:`ScaleByAdam`'s, state ``exp_avg``, ``exp_avg_sq``)."""

    name = "matrix_ema_or_adam"
    hyperparameters = {"betas": (0.9, 0.99), "eps": 1e-8}
    state_keys = ("momentum", "exp_avg", "exp_avg_sq")
    second_moment = True  # PaLM and Kourkoutas-β schedule the vectors' Adam, as in HeavyBall
    adam = ScaleByAdam()

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        if param.dim() >= 2:
            return {"momentum": _zeros(param)}
        return self.adam.init(param, hp)

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        if len(t.shape) < 2:
            return self.adam.update(t, totals)
        momentum = t.state["momentum"]
        momentum.lerp_(t.u, 1 - t.hp["betas"][0])
        return t.u + momentum
