"""The flags' transforms: pure maths on one tensor's running update (see :mod:`distopt.transforms.base`).

Each docstring gives the formula and the paper; ``docs/design/flags-reference.md`` has the seeds' own versions. A
transform that needs a number of the whole tensor returns local sums from ``partials``; ``update`` gets the totals
over every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from . import flags
from .base import Transform, TensorStep


#: Integer dtypes of the same width, to read a float's sign bit as the integer's sign.
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class Mars(Transform):
    """MARS (Yuan et al., https://arxiv.org/abs/2411.10438), as HeavyBall 3.2.1 runs it: ``u + c (u - u_prev)`` with
    ``c = β1 γ / (1 - γ)`` (HeavyBall's argument order; the paper's is ``γ β1 / (1 - β1)``) and no clip of the
    corrected gradient (``gradient_clipping`` comes after). The corrected gradient is also what caution and grams
    compare against. State: ``mars_prev_grad``."""

    name = "mars"
    state_keys = ("mars_prev_grad",)

    def __init__(self, beta1: Callable[[Mapping[str, Any]], float]):
        self.beta1 = beta1

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"mars_prev_grad": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        gamma = flags.value(t.hp, "mars_gamma")
        c = self.beta1(t.hp) * gamma / (1.0 - gamma)
        prev = t.state["mars_prev_grad"]
        # u + c (u - prev) in HeavyBall's arithmetic, u (1 + c) + prev (-c): the last bit matters downstream where a
        # statistic is rank-deficient (SOAP's first eigenbasis of a non-square matrix is then decided by rounding).
        corrected = t.u * (1 + c) + prev.to(t.u.dtype) * -c
        prev.copy_(t.u)
        t.grad = corrected
        return corrected


class Clip(Transform):
    """HeavyBall's clips, on the running update: ``l2_clip`` and ``rmsnorm_clip`` scale a tensor by
    ``c / max(norm, c, 1e-8)`` with its L2 norm or RMS over the whole tensor; ``global_*`` use one norm over every
    tensor of the param group; ``trust_region_clip`` is elementwise (``tanh`` and ``log1p`` blended 0.9/0.1 at scale
    1.5, clamped to ±2). ``where`` is ``"gradient"`` or ``"update"``."""

    name = "clip"

    def __init__(self, kind: str, where: str):
        self.kind, self.where = kind, where
        mode = flags.CLIPS[kind]
        self.reductions = 0 if mode == "elementwise" else 2
        self.pooled = mode == "global"

    def _clip_at(self, hp: Mapping[str, Any]) -> float:
        return float(flags.value(hp, f"{self.where}_clip_at"))

    def partials(self, t: TensorStep) -> Tensor:
        u = _f32(t.u)
        return torch.stack([u.square().sum(), torch.tensor(float(u.numel()), dtype=u.dtype, device=u.device)])

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        u = _f32(t.u)
        if self.kind == "trust_region_clip":
            x = u / 1.5
            tanh = x.tanh()
            x = x.abs().log1p().copysign(tanh) * 0.1 + tanh * 0.9
            return (x * 1.5).clamp(min=-2, max=2).to(t.u.dtype)
        square_sum, numel = totals[0], totals[1]
        if self.pooled:
            norm = (square_sum / numel).sqrt() if self.kind == "global_rmsnorm_clip" else square_sum.sqrt()
        else:
            norm = (square_sum / t.numel).sqrt() if self.kind == "rmsnorm_clip" else square_sum.sqrt()
        clip_at = self._clip_at(t.hp)
        scale = clip_at / norm.clamp(min=max(clip_at, 1e-8))
        return (u * scale).to(t.u.dtype)


class OrthoProject(Transform):
    """First half of OrthoGrad (Prieto et al., https://arxiv.org/abs/2501.04697): remove the update's component
    along the parameter, ``u - <w,u>/(<w,w> + eps) w``, with sums over the whole tensor. Keeps ``|u|`` for
    :class:`OrthoGraft`. adv_optm's ``eps`` is 1e-30; HeavyBall's OrthoLaProp uses the group's ``eps``."""

    name = "orthograd"
    reductions = 3

    def __init__(self, eps: float | None = 1e-30):
        self.eps = eps
        if eps is None:  # the group's eps, as HeavyBall's OrthoLaProp reads it
            self.hyperparameters = {"eps": 1e-8}

    def partials(self, t: TensorStep) -> Tensor:
        w, u = _f32(t.param), _f32(t.u)
        return torch.stack([(w * u).sum(), (w * w).sum(), (u * u).sum()])

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        eps = t.hp["eps"] if self.eps is None else self.eps
        w, u = _f32(t.param), _f32(t.u)
        t.extra["orthograd_norm"] = totals[2].sqrt()
        return u - (totals[0] / (totals[1] + eps)) * w


class OrthoGraft(Transform):
    """Second half of OrthoGrad: rescale the orthogonal update to the norm the update had, ``o |u| / (|o| + 1e-30)``
    (adv_optm) or ``o |u| / max(|o|, 1e-6)`` (HeavyBall, ``floor=1e-6``)."""

    name = "orthograd_graft"
    reductions = 1

    def __init__(self, floor: float | None = None):
        self.floor = floor

    def partials(self, t: TensorStep) -> Tensor:
        return t.u.square().sum().reshape(1)

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        norm = totals[0].sqrt()
        scale = t.extra.pop("orthograd_norm") / (norm.clamp(min=self.floor) if self.floor else norm + 1e-30)
        return (t.u * scale).to(t.grad.dtype)


def debiased_beta(beta: float, step: int) -> float:
    """HeavyBall's ``beta_debias``: the EMA weight whose average is already bias-corrected."""
    return 1.0 - (1.0 - beta) / (1.0 - beta**step)


class PaLM(Transform):
    """PaLM's second-moment schedule (Chowdhery et al., https://arxiv.org/abs/2204.02311, §5),
    ``β2_t = 1 - t^(-beta2_scale)``, as HeavyBall runs it: the core's second moment decays with HeavyBall's
    debiased weight of ``β2_t`` and is not bias-corrected again. Unlike HeavyBall, the group's ``betas`` are left
    as they are."""

    name = "palm"

    def update(self, t: TensorStep, totals: Tensor | None) -> None:
        beta2 = 1.0 - float(t.step) ** -float(flags.value(t.hp, "beta2_scale"))
        t.beta2 = debiased_beta(beta2, t.step) if t.step > 1 else 0.0
        t.bias_correction2 = 1.0
        return None


class Grams(Transform):
    """Grams (Cao et al., https://arxiv.org/abs/2412.17107): the update's magnitude with the gradient's sign,
    ``|u| sign(g)`` (adv_optm 2.2.3's ``grams_moment``; ``sign(0) = 0``)."""

    name = "grams"

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        return t.u.abs() * t.grad.sign().to(t.u.dtype)


class Caution(Transform):
    """Cautious optimizers (Liang et al., https://arxiv.org/abs/2411.16085), as HeavyBall 3.2.1 runs them: zero the
    update where its sign bit differs from the gradient's, and scale by ``numel / max(numel - masked, 1)`` with the
    count over the whole tensor."""

    name = "caution"
    reductions = 1

    @staticmethod
    def _mask(t: TensorStep) -> Tensor:
        grad, u = t.grad, t.u
        bits = _SAME_WIDTH_INT.get(u.dtype)
        if bits is not None and grad.dtype == u.dtype:
            # The sign bits differ exactly where the XOR of the raw bits is negative: two passes instead of three.
            return (grad.view(bits) ^ u.view(bits)) < 0
        return torch.signbit(grad) ^ torch.signbit(u)

    def partials(self, t: TensorStep) -> Tensor:
        mask = self._mask(t)
        t.extra["caution_mask"] = mask
        return mask.sum().reshape(1)

    def pool(self, totals: Tensor, steps: list[TensorStep]) -> Tensor:
        """The scale of every tensor at once, ``numel / max(numel - masked, 1)``, instead of a few scalar ops each."""
        numels = torch.tensor([[float(t.numel)] for t in steps], dtype=totals.dtype, device=totals.device)
        return numels / (numels - totals).clamp(min=1)

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor:
        mask = t.extra.pop("caution_mask", None)
        if mask is None:  # a replica: it did not compute partials
            mask = self._mask(t)
        return torch.where(mask, 0.0, t.u * totals[0].to(t.u.dtype))


def apply_update(t: TensorStep, decoupled: bool, proximal: bool = False, decay_scale: Any = None) -> None:
    """The end of every chain: ``p <- p (1 - d lr) - lr u``, with HeavyBall's warm-up
    ``lr t / max(t, warmup_steps + 1)`` (decay warmed up with it), cautious weight decay (decay only where the
    parameter and the update share a sign bit), optimi's ``decouple_lr`` (the decay is ``(lr / max_lr) wd``, not
    ``lr wd``), and ``promote`` (the arithmetic in float32 for lower-precision parameters). ``proximal`` (Adan's
    decay): ``p <- (p - lr u) / (1 + d)`` instead. ``t.lr_scale`` (StableAdamW's clip) scales the step and the
    decay alike. ``decay_scale(hp, lr)`` (AdamC's ``lr / max_lr``) multiplies the decay."""
    hp = t.hp
    lr = hp["lr"] * t.lr_scale
    warmup = flags.value(hp, "warmup_steps")
    if warmup:
        lr = lr * t.step / max(t.step, warmup + 1)
    param = t.param
    work = param.float() if flags.value(hp, "promote") and param.dtype in (torch.float16, torch.bfloat16) else param
    u = t.u if t.u.dtype == work.dtype else t.u.to(work.dtype)
    weight_decay = hp.get("weight_decay", 0.0) if decoupled else 0.0
    if weight_decay and decay_scale is not None:
        weight_decay = weight_decay * decay_scale(hp, lr)
    if weight_decay and proximal:
        decay = lr / flags.value(hp, "max_lr") * weight_decay if flags.value(hp, "decouple_lr") else lr * weight_decay
        work.add_(u, alpha=-lr)
        if flags.value(hp, "cautious_weight_decay"):
            same_sign = ~(torch.signbit(work) ^ torch.signbit(u))
            work.copy_(torch.where(same_sign, work / (1 + decay), work))
        else:
            work.div_(1 + decay)
        if work is not param:
            param.copy_(work)
        return
    if weight_decay:
        decay = lr / flags.value(hp, "max_lr") * weight_decay if flags.value(hp, "decouple_lr") else lr * weight_decay
        if flags.value(hp, "cautious_weight_decay"):
            same_sign = ~(torch.signbit(work) ^ torch.signbit(u))
            work.addcmul_(work, same_sign.to(work.dtype), value=-decay)
        else:
            work.mul_(1 - decay)
    work.add_(u, alpha=-lr)
    if work is not param:
        param.copy_(work)
