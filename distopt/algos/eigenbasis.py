"""The eigenbasis maths of HeavyBall 3.2.1's SOAP family, on stacks of same-shape tensors ``(n, *dims)``.

Each factor ``i`` of a tensor is a symmetric ``(n, d_i, d_i)`` statistic ``GG_i`` with its basis ``Q_i``. Everything
here is batched over the leading dimension, so that an owner runs one eigendecomposition, one QR and one matmul per
shape for all its matrices of that shape (DASH, https://arxiv.org/abs/2602.02016). Pure functions: the caller owns the
state. Arithmetic as HeavyBall's: lerps as ``x (1 - a) + y a``, eps floors on ``sqrt(v)``, the refresh's lift.
"""

from __future__ import annotations

import math
import string

import torch
from torch import Tensor

LETTERS = string.ascii_lowercase


def beta_debias(beta: float, step: int) -> float:
    """HeavyBall's debiased decay: the weight that makes an EMA from zero its own bias-corrected average."""
    return 1 - (1 - beta) / (1 - beta**step)


def lerp_(state: Tensor, value: Tensor, weight: float) -> Tensor:
    """``state <- state (1 - weight) + value weight`` (HeavyBall's stochastic lerp, exact in float32/64)."""
    return state.copy_(state * (1 - weight) + value * weight)


def eps_sqrt(v: Tensor, eps: float) -> Tensor:
    return v.clamp_min(0).sqrt().clamp(min=eps)


def project(x: Tensor, bases: list[Tensor | None], back: bool = False) -> Tensor:
    """Rotate dimension ``i + 1`` of ``x`` by ``Q_i`` where it has one: ``Q_iᵀ x`` (``back``: ``Q_i x``)."""
    letters = LETTERS[:x.dim() - 1]
    terms, operands = [], []
    for letter, q in zip(letters, bases):
        if q is not None:
            terms.append("z" + (letter.upper() + letter if back else letter + letter.upper()))
            operands.append(q)
    if not operands:
        return x
    out = "".join(c.upper() if any(c.upper() in t for t in terms) else c for c in letters)
    return torch.einsum(f"z{letters},{','.join(terms)}->z{out}", x, *operands)


def outer(g: Tensor, i: int) -> Tensor:
    """``g`` contracted with itself over every dimension but ``i + 1``: ``(n, d_i, d_i)``."""
    letters = LETTERS[:g.dim() - 1]
    other = letters.replace(letters[i], letters[i].upper())
    return torch.einsum(f"z{letters},z{other}->z{letters[i]}{letters[i].upper()}", g, g)


def eigenvalues_in(q: Tensor, gg: Tensor) -> Tensor:
    """``diag(Qᵀ GG Q)``: the statistic's eigenvalue estimates in the current basis."""
    return torch.einsum("zji,zjk,zki->zi", q, gg, q)


def kl_outers(g: Tensor, ggs: list[Tensor | None], bases: list[Tensor | None], eps: float,
              pseudo_inverse: bool) -> list[Tensor | None]:
    """KL-Shampoo's two-sided statistics of a matrix (Lin et al., https://arxiv.org/abs/2509.03378): each side's
    outer product weighted by the other side's inverse eigenvalues over its size. ``pseudo_inverse`` (the Heavy
    variants): eigenvalues at or below ``eps`` weigh 0 instead of ``1 / eps``. Where a side has no factor, the
    other side's statistic is the plain outer product."""
    if g.dim() != 3 or not any(gg is not None and q is not None for gg, q in zip(ggs, bases)):
        return [None if gg is None else outer(g, i) for i, gg in enumerate(ggs)]
    infos = []
    for i, (gg, q) in enumerate(zip(ggs, bases)):
        if gg is None or q is None:
            infos.append(None)
            continue
        eig = eigenvalues_in(q, gg)
        inverse = torch.where(eig > eps, eig.reciprocal(), 0.0) if pseudo_inverse else eig.clamp_min(eps).reciprocal()
        projected = torch.einsum("zji,zjk->zik" if i == 0 else "zij,zjk->zik", g, q)
        infos.append((projected, inverse / g.shape[i + 1]))
    outs: list[Tensor | None] = []
    for i, (gg, info) in enumerate(zip(ggs, reversed(infos))):
        if gg is None:
            outs.append(None)
        elif info is None:
            outs.append(outer(g, i))
        else:
            projected, scale = info
            outs.append(torch.einsum("zik,zk,zjk->zij", projected, scale, projected))
    return outs


def initial_basis(gg: Tensor) -> Tensor:
    """Eigenvectors of each statistic, largest eigenvalue first (``eigh`` of ``GG + 1e-30 I``; on failure in float64,
    then with a growing ridge, as HeavyBall retries)."""
    eps, work = 1e-30, gg
    while True:
        try:
            eye = torch.eye(work.shape[-1], dtype=work.dtype, device=work.device)
            return torch.flip(torch.linalg.eigh(work + eps * eye)[1], [-1]).contiguous().to(gg.dtype)
        except RuntimeError:
            if work.dtype != torch.float64:
                work = work.double()
            elif eps < 1e-3:
                eps = eps ** (2 / 3)
            else:
                raise


def refreshed_basis(gg: Tensor, q: Tensor, floor: float) -> Tensor:
    """One power iteration and a QR per statistic, HeavyBall's way: the columns of ``GG Q`` lifted by a multiple of
    ``Q`` (so a rank-deficient statistic does not leave the completion to rounding noise), orthogonalized in the
    order of their eigenvalue estimates, signs fixed by ``R``'s diagonal, each column back in its place."""
    gram_basis = gg @ q
    eig = torch.einsum("zij,zij->zj", q, gram_basis)
    magnitude = eig.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(gg.dtype).tiny)
    noise = min(64 * gg.shape[-1] * torch.finfo(gg.dtype).eps, 0.125)
    work = gram_basis + (max(floor, noise) * magnitude).unsqueeze(-1) * q
    index = torch.argsort(eig, descending=True).unsqueeze(-2).expand_as(work)
    orthogonal, triangular = torch.linalg.qr(work.gather(-1, index))
    signs = triangular.diagonal(dim1=-2, dim2=-1).sign()
    orthogonal = orthogonal * torch.where(signs != 0, signs, torch.ones_like(signs)).unsqueeze(-2)
    return work.scatter(-1, index, orthogonal)


def turns(old: list[Tensor | None], new: list[Tensor | None]) -> list[Tensor | None]:
    """``Q_oldᵀ Q_new`` per factor: what takes a tensor kept in the old eigenbasis to the new one."""
    return [None if o is None else o.mT @ n for o, n in zip(old, new)]


def change_basis(x: Tensor, old: list[Tensor | None], new: list[Tensor | None],
                 turned: list[Tensor | None] | None = None) -> Tensor:
    """A tensor kept in the old eigenbasis, re-expressed in the new one: ``Q_newᵀ Q_old x`` per factor. With the
    ``turns`` at hand (the Heavy variants need them anyway) one product of ``numel d`` per factor; otherwise back to the
    original space and into the new basis, two such products, rather than forming ``Q_oldᵀ Q_new`` (``d³``: the
    larger for a long side, 1024 x 1024 bases of a 256 x 1024 weight; measured 12% off an AdEMAMix variant's step)."""
    if turned is not None:
        return project(x, turned)
    return project(project(x, old, back=True), new)


def transport_second_moment(v: Tensor, turned: list[Tensor | None]) -> Tensor:
    """The Heavy variants' transport of a second moment to the new basis: by the elementwise square of
    ``Q_oldᵀ Q_new`` per factor (:func:`turns`), floored at zero."""
    return project(v, [None if t is None else t.square() for t in turned]).clamp_min(0)


def balance(factors: list[Tensor]) -> None:
    """Scale the statistics of one tensor to the geometric mean of their largest magnitudes, in place (KL-Shampoo's
    balancing, HeavyBall's ``psgd_balance_Q``)."""
    norms = [f.abs().amax(dim=tuple(range(1, f.dim()))).log() for f in factors]
    mean = sum(norms) / len(factors)
    for f, norm in zip(factors, norms):
        f.mul_((mean - norm).exp().view(-1, *([1] * (f.dim() - 1))))


def kl_shampoo_scale(x: Tensor, bases: list[Tensor | None], ggs: list[Tensor | None], eps: float) -> Tensor:
    """``⊗_i Q_i diag(d_i^{-1/2}) Q_iᵀ x`` with ``d_i = max(diag(Q_iᵀ GG_i Q_i), eps)``: KL-Shampoo's direction."""
    out = project(x, bases)
    for i, (q, gg) in enumerate(zip(bases, ggs)):
        if q is None or gg is None:
            continue
        d = eigenvalues_in(q, gg).clamp_min(eps).rsqrt()
        shape = [1] * out.dim()
        shape[0], shape[i + 1] = d.shape[0], -1
        out = out * d.view(shape)
    return project(out, bases, back=True)


def merged_dims(shape: tuple[int, ...], max_precond_dim: int, merge: bool) -> tuple[int, ...]:
    """HeavyBall's ``merge_dims``: the first dimension kept, the trailing ones merged from the last while their product
    stays within ``max_precond_dim`` (a conv kernel folds into its fan-in)."""
    if not merge or len(shape) < 2:
        return tuple(shape)
    merged, size = [], 1
    for s in reversed(shape[1:]):
        if size * s > max_precond_dim:
            if size > 1:
                merged.append(size)
                size = s
            else:
                merged.append(s)
                size = 1
        else:
            size *= s
    if size > 1:
        merged.append(size)
    return (shape[0], *reversed(merged))


def factor_dims(dims: tuple[int, ...], max_precond_dim: int, precondition_1d: bool) -> list[int]:
    """The dimensions with a statistic: all of a tensor of two or more dimensions (or a vector with
    ``precondition_1d``) but those above ``max_precond_dim`` or of size 1."""
    if math.prod(dims) <= 1 or not (len(dims) >= 2 or precondition_1d):
        return []
    return [i for i, d in enumerate(dims) if d <= max_precond_dim and d != 1]
