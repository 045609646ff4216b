"""Gram Newton-Schulz: the Newton-Schulz polynomial iterated on the Gram matrix of the short side, which is cheaper
for rectangular matrices, as the ``gram-newton-schulz`` package (Dao-AILab) runs it: ``R = X Xᵀ`` (``XᵀX`` for tall
matrices) is updated with the polynomial ``Z = b R + c R²`` while the accumulated polynomial ``Q`` collects the
iterations, and ``X`` is multiplied by ``Q`` only at a restart (iteration 2 by default, for stability) and at the
end. The coefficients are the package's default: Polar Express's (https://arxiv.org/abs/2505.16932) with a 1.05
safety factor. Square matrices take the standard iteration with the same coefficients, as the package does.

Per matrix ``m x n`` (``m <= n``) with one restart the products are ``2 m² n`` for each Gram and ``2 m² n`` for each
``Q X``, plus ``O(m³)`` for the rest, against ``4 m² n`` every iteration for Newton-Schulz on ``X``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..compile import kernel

_UNMODIFIED = ((8.28721201814563, -23.595886519098837, 17.300387312530933),
               (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
               (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
               (3.3184196573706015, -2.488488024314874, 0.51004894012372),
               (2.300652019954817, -1.6689039845747493, 0.4188073119525673))
SAFETY = 1.05
#: The package's default coefficients: the paper's, divided by the safety factor's first, third and fifth powers.
GRAM_COEFFICIENTS = tuple((a / SAFETY, b / SAFETY**3, c / SAFETY**5) for a, b, c in _UNMODIFIED)
RESTARTS = (2,)


def _standard(x: Tensor, coefficients) -> Tensor:
    tall = x.size(-2) > x.size(-1)
    for a, b, c in coefficients:
        gram = x.mT @ x if tall else x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, alpha=c, beta=b)
        x = torch.baddbmm(x, x, poly, beta=a) if tall else torch.baddbmm(x, poly, x, beta=a)
    return x


def _gram(x: Tensor, coefficients, restarts) -> Tensor:
    tall = x.size(-2) > x.size(-1)

    def gram_of(y):
        return y.mT @ y if tall else y @ y.mT

    def apply(q, y):
        return y @ q if tall else q @ y

    r = gram_of(x)
    eye = torch.eye(r.size(-1), device=x.device, dtype=x.dtype).unsqueeze(0).expand(r.size(0), -1, -1).contiguous()
    q = None
    last = len(coefficients) - 1
    for i, (a, b, c) in enumerate(coefficients):
        if i in restarts and i != 0:
            x = apply(q, x)
            r = gram_of(x)
            q = None
        z = torch.baddbmm(r, r, r, alpha=c, beta=b)
        q = z + a * eye if (i == 0 or i in restarts) else torch.baddbmm(q, q, z, beta=a)
        if i < last and i + 1 not in restarts:
            rz = torch.baddbmm(r, r, z, beta=a)
            r = torch.baddbmm(rz, z, rz, beta=a)
    return apply(q, x)


def _orthogonalize(matrices: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    x = matrices.to(torch.float32)
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + eps)).to(dtype)
    if max(x.shape[-2:]) > min(x.shape[-2:]):
        return _gram(x, GRAM_COEFFICIENTS, RESTARTS)
    return _standard(x, GRAM_COEFFICIENTS)


def gram_newton_schulz_each(matrices: Tensor, eps: float, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The eager path, in the package's operations (batched ``baddbmm``, as the package runs even one matrix)."""
    return _orthogonalize(matrices, eps, dtype)


@kernel
def gram_newton_schulz(matrices: Tensor, eps: float, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The compiled path over a stack of same-shape matrices ``(batch, m, n)``."""
    return _orthogonalize(matrices, eps, dtype)
