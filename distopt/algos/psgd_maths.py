"""The Kronecker-factored PSGD maths of HeavyBall 3.2.1 (``heavyball/utils.py``: ``psgd_update_precond``,
``psgd_pro_update_precond``, ``psgd_precond_grad``, ``get_psgd_eigenbasis``), on stacks of same-shape tensors
``(n, *dims)``. Li, "Preconditioned Stochastic Gradient Descent" (https://arxiv.org/abs/1512.04202) and "Stochastic
Hessian Fittings with Lie Groups" (https://arxiv.org/abs/2402.11858, the Q0.5EQ1.5 or "PRO" fit).

A tensor's preconditioner is ``P = ⊗ Q_iᵀ Q_i``, one factor per dimension: a matrix ``(n, d, d)`` or, for a diagonal
factor, a vector ``(n, d)``. Everything is batched over the leading dimension, so that an owner fits and applies the
factors of all its same-shape matrices at once. Pure functions: the caller owns the state (factors and the running
lower bounds of the fit's step size, float64 ``(n,)`` per factor).

Two deliberate differences from HeavyBall's arithmetic, both exactly its maths: the power iteration that bounds
``‖R‖`` in the PRO step runs in the working precision (HeavyBall rounds ``R`` stochastically to bfloat16 first, a
speed measure that draws from torch's global generator), and the initial scale is fitted per matrix (HeavyBall fits
one over a bucket of same-shape matrices when ``multi_tensor=True``, so a matrix's start depended on its neighbours).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .eigenbasis import LETTERS, initial_basis, outer

F32_EPS = torch.finfo(torch.float32).eps
F32_TINY = torch.finfo(torch.float32).tiny


def _along(v: Tensor, i: int, ndim: int) -> Tensor:
    """A per-matrix vector ``(n, d)`` shaped to broadcast along dimension ``i + 1`` of an ``ndim``-D stack."""
    shape = [1] * ndim
    shape[0], shape[i + 1] = v.shape[0], -1
    return v.view(shape)


def _mode(x: Tensor, q: Tensor, i: int, transpose: bool = False) -> Tensor:
    """Dimension ``i + 1`` of ``x`` multiplied by ``Q`` (``Qᵀ`` with ``transpose``), matrix by matrix."""
    letters = LETTERS[:x.dim() - 1]
    a = letters[i]
    factor = f"z{a}{a.upper()}" if transpose else f"z{a.upper()}{a}"
    return torch.einsum(f"z{letters},{factor}->z{letters.replace(a, a.upper())}", x, q)


def apply(x: Tensor, factors: list[Tensor], sqrt: bool = False) -> Tensor:
    """``P x`` with ``P = ⊗ QᵢᵀQᵢ``, or with ``sqrt`` (QSGD) the factor ``Q x`` itself."""
    for i, q in enumerate(factors):
        if q.dim() == 2:
            x = x * _along(q if sqrt else q * q, i, x.dim())
        else:
            x = _mode(x, q, i)
            if not sqrt:
                x = _mode(x, q, i, transpose=True)
    return x


def covariance(x: Tensor, i: int, diagonal: bool) -> Tensor:
    """``x`` against itself over every dimension but ``i + 1``: ``(n, d, d)``, or its diagonal ``(n, d)``."""
    if not diagonal:
        return outer(x, i)
    others = [d for d in range(1, x.dim()) if d != i + 1]
    return (x * x).sum(dim=others) if others else x * x


def mean_root(g: Tensor) -> Tensor:
    """``mean(g⁴)^(-1/8)`` per matrix, in float64 through a log-sum-exp as HeavyBall computes it (its ``mean_root(g,
    4)``, the base of the automatic initial scale of ``P``). Returns ``(n,)``."""
    flat = g.reshape(g.shape[0], -1).double().abs().clamp(min=1e-12).log() * 4
    x = -(flat.logsumexp(dim=1) - math.log(flat.shape[1])) / 4 / 2
    return torch.where(x > 0, 1 / (-x).exp(), x.exp())


def initial_factors(dims: tuple[int, ...], diagonal: list[bool], scale: Tensor, dtype: torch.dtype,
                    device: torch.device) -> list[Tensor]:
    """``scale^(1/ndim)`` times the identity (or ones) per factor; ``scale`` per matrix, ``(n,)``."""
    per_factor = (scale ** (1 / len(dims))).to(device)
    out = []
    for size, diag in zip(dims, diagonal):
        base = torch.ones(size, dtype=dtype, device=device) if diag else torch.eye(size, dtype=dtype, device=device)
        out.append(per_factor.view(-1, *([1] * base.dim())).to(dtype) * base)
    return out


def balance(factors: list[Tensor]) -> list[Tensor]:
    """Scale the factors of each matrix to the geometric mean of their largest magnitudes (``P`` unchanged)."""
    norms = [q.abs().amax(dim=tuple(range(1, q.dim()))).log() for q in factors]
    mean = sum(norms) / len(factors)
    return [q * (mean - norm).exp().view(-1, *([1] * (q.dim() - 1))) for q, norm in zip(factors, norms)]


def _from_largest_row(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A power iteration's start: each matrix's largest row and the matrix, both divided by that row's norm."""
    x_norm, index = a.norm(dim=-1).max(dim=-1)
    x_norm = x_norm.clamp(min=F32_TINY)
    x = a.gather(-2, index[:, None, None].expand(-1, 1, a.shape[-1])).squeeze(-2) / x_norm[:, None]
    return x, a / x_norm[:, None, None], x_norm


def max_eigenvalue_spd(a: Tensor, iterations: int) -> Tensor:
    """Power iteration for the largest eigenvalue of each symmetric PSD matrix, from its largest row."""
    x, a, x_norm = _from_largest_row(a)

    def times(v: Tensor) -> Tensor:
        return ((v[:, None, :] @ a.mT) @ a.mT).squeeze(-2)

    for _ in range(iterations):
        x = F.normalize(times(x), dim=-1)
    return (x * times(x)).sum(dim=-1).sqrt() * x_norm


def max_singular_value(a: Tensor, iterations: int) -> Tensor:
    """Power iteration on ``AᵀA`` from the largest row: an estimate of ``‖A‖₂`` per matrix."""
    x, a, x_norm = _from_largest_row(a)

    def times(v: Tensor) -> Tensor:
        return (a.mT @ (a @ v[..., None])).squeeze(-1)

    for _ in range(iterations):
        x = F.normalize(times(x), dim=-1)
    return (x * times(x)).sum(dim=-1).sqrt() * x_norm


def update_lower_bound(ell: Tensor, bound: Tensor, beta: float) -> Tensor:
    """The running lower bound of the fit's normalizer, ``max(ell, bound + (ell - bound)(1 - beta))``; ``bound``
    (float64) is updated in place."""
    new = ell.maximum(bound + (ell - bound) * (1 - beta))
    bound.copy_(new)
    return new.to(ell.dtype)


def dampen(g: Tensor, noise: Tensor, dampening: float) -> Tensor:
    """``g`` plus Gaussian noise of ``dampening + eps₃₂ |g|``: keeps the fit well-posed where ``g`` vanishes."""
    return g + (dampening + F32_EPS * g.abs()) * noise


def pro_fit(factors: list[Tensor], bounds: list[Tensor], g: Tensor, lr: float, bound_beta: float,
            iterations: int) -> list[Tensor]:
    """One PRO (Q0.5EQ1.5) step of the factors towards ``E[(Pg)(Pg)ᵀ] = I`` on a dampened ``g``, with an online
    Procrustes correction that keeps each matrix factor near symmetric positive definite."""
    factors = balance(factors)
    pg = apply(g, factors)
    numel = math.prod(g.shape[1:])
    out = []
    for i, (q, bound) in enumerate(zip(factors, bounds)):
        diagonal = q.dim() == 2
        cov = covariance(pg, i, diagonal)
        target = numel / q.shape[-1]
        if diagonal:
            ell = update_lower_bound(cov.amax(dim=-1) + target, bound, bound_beta)
            out.append(q - q * (cov - target) / ell.unsqueeze(-1) * lr)
            continue
        ell = update_lower_bound(max_eigenvalue_spd(cov, iterations) + target, bound, bound_beta)
        q = q - (cov @ q - target * q) / ell[:, None, None] * lr
        r = (q.mT - q).contiguous()
        r = r / (max_singular_value(r, iterations)[:, None, None] + torch.finfo(r.dtype).smallest_normal)
        rq = r @ q
        rrq = r @ rq
        c1 = rq.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
        c2 = rrq.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
        a = torch.where(c2 < 0, (-c1 / c2).clamp(min=0, max=0.5), 0.5)[:, None, None]
        out.append(q + a * rq + (0.5 * a * a) * rrq)
    return out


def whitening_fit(factors: list[Tensor], bounds: list[Tensor], g: Tensor, probe: Tensor, lr: float,
                  bound_beta: float, iterations: int) -> list[Tensor]:
    """One step of the factors on PSGD's fitting criterion with the pair (``probe``, ``g``), ``g`` the dampened
    gradient and ``probe`` its noise (Lie-group step on upper-triangular factors, normalized by a running bound)."""
    factors = balance(factors)
    a = apply(g, factors, sqrt=True)
    conj = probe
    for i, q in enumerate(factors):
        if q.dim() == 2:
            conj = conj / _along(q, i, conj.dim())
    for i, q in enumerate(factors):
        if q.dim() == 3:  # conj <- conj ×_i Q_i^{-T}: a triangular solve along dimension i + 1
            moved = conj.movedim(i + 1, -1).contiguous()
            flat = moved.reshape(moved.shape[0], -1, moved.shape[-1])
            solved = torch.linalg.solve_triangular(q, flat, upper=True, left=False)
            conj = solved.reshape(moved.shape).movedim(-1, i + 1).contiguous()
    out = []
    for i, (q, bound) in enumerate(zip(factors, bounds)):
        diagonal = q.dim() == 2
        term1, term2 = covariance(a, i, diagonal), covariance(conj, i, diagonal)
        if diagonal:
            ell = update_lower_bound((term1 + term2).amax(dim=-1), bound, bound_beta).unsqueeze(-1)
            step = q * (term1 - term2)
        else:
            ell = update_lower_bound(max_eigenvalue_spd(term1 + term2, iterations), bound,
                                     bound_beta)[:, None, None]
            step = (term1 - term2).triu() @ q
        out.append(q - step / ell * lr)
    return out


def eigenbasis(factors: list[Tensor]) -> list[Tensor | None]:
    """LATHER's first basis: the eigenvectors of each ``QᵀQ``, largest first (none for diagonal factors)."""
    return [None if q.dim() == 2 else initial_basis(q.mT @ q) for q in factors]


def refreshed_eigenbasis(factors: list[Tensor], old: list[Tensor | None]) -> list[Tensor | None]:
    """One subspace iteration from the old basis: ``QR(QᵀQ B)``, columns sorted by ``‖Q b‖²`` and signed to agree
    with the old basis (so that moments kept in it carry over)."""
    out: list[Tensor | None] = []
    for q, basis in zip(factors, old):
        if basis is None:
            out.append(None)
            continue
        raw = torch.linalg.qr(q.mT @ (q @ basis), mode="reduced").Q
        projected = q @ raw
        order = torch.argsort((projected * projected).sum(dim=-2), dim=-1, descending=True)
        raw = raw.gather(-1, order.unsqueeze(-2).expand_as(raw))
        signs = (basis * raw).sum(dim=-2)
        out.append(raw * torch.where(signs < 0, -1.0, 1.0).to(raw.dtype).unsqueeze(-2))
    return out
