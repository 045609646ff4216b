"""Polar Express: Newton-Schulz-like orthogonalization with a different, optimized polynomial at each iteration.
Amsel, Persson, Musco & Gower, "The Polar Express: Optimal Matrix Sign Methods and Their Application to the Muon
Algorithm", https://arxiv.org/abs/2505.16932.

The five coefficient triples are the paper's for five iterations (safety factor 2e-2, cushion 2), with the 1.02
safety factor folded into all but the last, the values microsoft/dion's Muon uses by default. The input is scaled by
``1.02 |X|_F + eps`` (a looser bound on the spectral norm than Newton-Schulz's ``|X|_F``, which the coefficients
assume). Each iteration multiplies on the short side: ``A = X Xᵀ`` (or ``XᵀX`` for tall matrices), ``B = b A + c A²``,
``X <- a X + B X`` (or ``X B``), so the Gram matrix is the small one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..compile import kernel

POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _iterate(x: Tensor, eps: float) -> Tensor:
    tall = x.size(-2) > x.size(-1)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + eps)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        if tall:
            gram = x.mT @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ x.mT
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


def polar_express_each(matrices: Tensor, eps: float, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The eager path: one matrix at a time, in the operations of dion's ``polar_express`` (so its 2-D results are
    dion's eager ones to the bit)."""
    return torch.stack([_iterate(m.to(dtype), eps) for m in matrices.unbind(0)])


@kernel
def polar_express(matrices: Tensor, eps: float, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Polar Express on a stack of same-shape matrices ``(batch, m, n)`` in ``dtype`` (the compiled path)."""
    return _iterate(matrices.to(dtype), eps)
