"""Muon: momentum orthogonalized by a Newton-Schulz iteration, with the maths and defaults of torch.optim.Muon.

Jordan et al., "Muon: An optimizer for hidden layers in neural networks", https://kellerjordan.github.io/posts/muon/;
the "match_rms_adamw" learning-rate adjustment: Liu et al., "Muon is Scalable for LLM Training",
https://arxiv.org/abs/2502.16982.

Where state lives: ``momentum_buffer`` is elementwise, so it stays on each rank's shard in the parameter's layout.
Only the Nesterov update travels to the matrix's owner, in the owner's maths dtype ``owner_dtype``: Newton-Schulz
casts its input to that dtype as its first operation, so sending it in that dtype changes no bit of the result. The
default, bfloat16, is torch.optim.Muon's (and halves the bytes); ``owner_dtype=torch.float32`` is for CPUs whose
bfloat16 matmuls are slow, or for a more exact orthogonalization.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import compile
from ..compile import kernel
from ..transforms.flags import NO_EPS_DIVISION, NO_SECOND_MOMENT
from .gram_newton_schulz import gram_newton_schulz, gram_newton_schulz_each
from .polar_express import polar_express, polar_express_each
from . import splits
from .base import (MatrixAlgorithm, _as_number, check_bool, check_nonnegative, new_step_counter, require_matrix,
                   zeros_like)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: Dtypes the owners' maths may run in, by the name that param groups hold (DCP saves param groups as plain data,
#: and it cannot store a torch.dtype).
OWNER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "float64": torch.float64}


def owner_dtype(hp: Mapping[str, Any]) -> torch.dtype:
    return OWNER_DTYPES[hp["owner_dtype"]]


def newton_schulz_each(matrices: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                       dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The eager path: torch.optim.Muon's own 2-D operations, one matrix at a time. Batched ``baddbmm`` in bfloat16
    does not always round as ``addmm`` does (a 6 x 4 gradient differed by one bfloat16 unit on an AVX-512 CPU), so
    only this path is bitwise torch.optim.Muon's; the compiled path batches."""
    return torch.stack(newton_schulz_list(matrices.unbind(0), coefficients, steps, eps, dtype))


def newton_schulz_list(matrices, coefficients: tuple[float, float, float], steps: int, eps: float,
                       dtype: torch.dtype = torch.bfloat16) -> list[Tensor]:
    """:func:`newton_schulz_each` on a sequence of matrices, returning a list: no stacked copy of the inputs or
    the results (the owners' eager path, whose workspace is then one matrix's). The inputs are not changed."""
    a, b, c = coefficients
    out = []
    for matrix in matrices:
        x = matrix.to(dtype, copy=True)
        tall = x.size(0) > x.size(1)
        if tall:
            x = x.T
        x.div_(x.norm().clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.T
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
        out.append(x.T if tall else x)
    return out


@kernel
def newton_schulz(matrices: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Quintic Newton-Schulz on a stack of same-shape matrices ``(batch, m, n)``, in ``dtype``.

    Per matrix it performs the operations of torch.optim.Muon's ``_zeropower_via_newtonschulz``, batched (the
    compiled path; see :func:`newton_schulz_each` for the eager, bitwise one).
    """
    a, b, c = coefficients
    x = matrices.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


#: How owners orthogonalize: torch.optim.Muon's quintic Newton-Schulz (``ns_coefficients``, ``ns_steps``), Polar
#: Express's five per-iteration polynomials (:mod:`distopt.algos.polar_express`), or the Gram iteration of the
#: gram-newton-schulz package (:mod:`distopt.algos.gram_newton_schulz`).
ORTHOGONALIZATIONS = ("newton_schulz", "polar_express", "gram_newton_schulz")
OTHER_METHODS = {"polar_express": (polar_express, polar_express_each),
                 "gram_newton_schulz": (gram_newton_schulz, gram_newton_schulz_each)}


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple[int, int]) -> float:
    rows, cols = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class Muon(MatrixAlgorithm):
    """Muon. Shard state: ``step``, ``momentum_buffer``. Owner state: none. Weights with more than two dimensions
    are orthogonalized as the 2-D matrix ``(out, rest)``, and the learning-rate adjustment uses that shape."""

    name = "muon"
    hyperparameters = {"lr": 1e-3, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True,
                       "ns_coefficients": NS_COEFFICIENTS, "eps": 1e-7, "ns_steps": 5, "adjust_lr_fn": None,
                       "owner_dtype": "bfloat16", "orthogonalization": "newton_schulz",
                       **splits.SPLIT_HYPERPARAMETERS}
    takes_row_offset = True
    spreads_parts = True

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_nonnegative(self.name, hp, "weight_decay")
        check_nonnegative(self.name, hp, "momentum")
        check_nonnegative(self.name, hp, "eps")
        check_bool(self.name, hp, "nesterov")
        coefficients = hp["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"{self.name}: ns_coefficients must be a tuple of 3 numbers, got {coefficients!r}")
        for i, value in enumerate(coefficients):
            _as_number(self.name, f"ns_coefficients[{i}]", value)
        steps = hp["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
            raise ValueError(f"{self.name}: invalid ns_steps={steps!r} (must be an int in [0, 100))")
        if hp["orthogonalization"] not in ORTHOGONALIZATIONS:
            raise ValueError(f"{self.name}: invalid orthogonalization={hp['orthogonalization']!r} (one of "
                             f"{', '.join(ORTHOGONALIZATIONS)})")
        if hp["adjust_lr_fn"] not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"{self.name}: invalid adjust_lr_fn={hp['adjust_lr_fn']!r} (must be None, "
                             "'original' or 'match_rms_adamw')")
        splits.check(self.name, hp)
        value = hp["owner_dtype"]
        if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in OWNER_DTYPES:
            if isinstance(hp, dict):
                hp["owner_dtype"] = str(value).removeprefix("torch.")  # the group holds the name
        elif value not in OWNER_DTYPES:
            raise ValueError(f"{self.name}: invalid owner_dtype={value!r} (must be a torch dtype or a name among "
                             f"{', '.join(OWNER_DTYPES)})")

    def check_param(self, shape: tuple[int, ...], name: str) -> None:
        require_matrix(self.name, shape, name, "; give it to an elementwise algorithm such as adamw (distopt.Muon "
                       "does this by itself)")

    def check_param_in_group(self, shape: tuple[int, ...], name: str, hp: Mapping[str, Any]) -> None:
        splits.check_shape(self.name, shape, name, hp)

    def wire_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        return owner_dtype(hp)

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        """Flops of the orthogonalization on the ``(m, n)`` view, ``m <= n`` after the transpose. Newton-Schulz and
        Polar Express, per iteration: ``X Xᵀ`` (2m²n), ``b A + c A A`` (2m³) and ``(..) X`` (2m²n). Gram
        Newton-Schulz on a rectangular matrix: two Grams and two ``Q X`` products (8m²n in all, one restart) and
        four ``m x m`` products per iteration (8m³)."""
        layout = splits.parts(shape, hp)
        if layout is not None:
            whole = {**hp, "split_sizes": None, "num_heads": None}
            return sum(p.heads * self.cost(splits.part_shape(p, shape), whole) for p in layout)
        m, n = sorted(self.matrix_shape(shape))
        method = hp.get("orthogonalization", "newton_schulz")
        if method == "gram_newton_schulz" and m < n:
            return float(8 * m * m * n + 5 * 8 * m**3)
        steps = hp["ns_steps"] if method == "newton_schulz" else 5
        return float(steps * (4 * m * m * n + 2 * m**3))

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        if torch.is_complex(param):
            raise ValueError("muon does not support complex parameters")
        return {"step": new_step_counter(), "momentum_buffer": zeros_like(param)}

    #: torch.optim.Muon keeps only the momentum buffer; ``step`` counts calls and enters no maths.
    unsaved_state = ("step",)

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        momentum = hp["momentum"]
        state["step"] += 1
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if hp["nesterov"] else buf
        return update.to(owner_dtype(hp))

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The 2-D view ``(out, rest)`` that Newton-Schulz orthogonalizes."""
        return shape[0], math.prod(shape[1:])

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        layout = splits.parts(shape, hp)
        if hp["orthogonalization"] == "newton_schulz" and layout is None and not compile.enabled():
            matrices = [w.reshape(self.matrix_shape(shape)) for w in wholes]
            return [r.reshape(shape) for r in newton_schulz_list(
                matrices, tuple(hp["ns_coefficients"]), hp["ns_steps"], hp["eps"], owner_dtype(hp))]
        stacked = torch.stack([w.reshape(self.matrix_shape(shape)) for w in wholes])
        if hp["orthogonalization"] != "newton_schulz":
            compiled, eager = OTHER_METHODS[hp["orthogonalization"]]
            method = compiled if compile.enabled() else eager

            def orthogonalize(x: Tensor) -> Tensor:
                return method(x, hp["eps"], owner_dtype(hp))
        else:
            method = newton_schulz if compile.enabled() else newton_schulz_each

            def orthogonalize(x: Tensor) -> Tensor:
                return method(x, tuple(hp["ns_coefficients"]), hp["ns_steps"], hp["eps"], owner_dtype(hp))
        result = orthogonalize(stacked) if layout is None else splits.orthogonalize_by_part(stacked, layout,
                                                                                            orthogonalize)
        return [r.reshape(shape) for r in result.unbind(0)]

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        return {"palm": NO_SECOND_MOMENT, "kourkoutas_beta": NO_SECOND_MOMENT, "atan2": NO_EPS_DIVISION,
                "grams": "its update is orthogonalized; sign(g)·|u| would undo the orthogonalization"}

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        return float(hp["momentum"])

    def finish_direction(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                         shape: tuple[int, ...], row_offset: int = 0) -> Tensor:
        """The chain form of :meth:`finish`: the step is ``p (1 - lr wd) - lr u`` with this ``u``."""
        layout = splits.parts(shape, hp)
        if layout is None:
            return update * adjusted_lr(1.0, hp["adjust_lr_fn"], self.matrix_shape(shape))
        out = torch.empty_like(update)
        for rows, factor in splits.row_scales(layout, shape, row_offset, update.shape[0],
                                              lambda s: adjusted_lr(1.0, hp["adjust_lr_fn"], s)):
            out[rows] = update[rows] * factor
        return out

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...], row_offset: int = 0) -> None:
        """``row_offset``: where this rank's rows start in the whole weight (each part's own step size applies to
        its rows, as torch.optim.Muon would give each part were it its own parameter)."""
        lr = hp["lr"]
        param.mul_(1 - lr * hp["weight_decay"])
        layout = splits.parts(shape, hp)
        if layout is None:
            param.add_(update, alpha=-adjusted_lr(lr, hp["adjust_lr_fn"], self.matrix_shape(shape)))
            return
        for rows, step in splits.row_scales(layout, shape, row_offset, param.shape[0],
                                            lambda s: adjusted_lr(lr, hp["adjust_lr_fn"], s)):
            param[rows].add_(update[rows], alpha=-step)
