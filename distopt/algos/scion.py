"""Scion, as HeavyBall 3.2.1's: the momentum's linear minimization oracle for each tensor's norm, Newton-Schulz
orthogonalization for matrices (and convolutions, flattened to ``(out, rest)``), the RMS over the whole vector for
biases. Pethick et al., "Training Deep Learning Models with Norm-Constrained LMOs", https://arxiv.org/abs/2502.07529.

HeavyBall's Scion replaces each parameter at its first step by its own initialization (orthogonal matrices seeded by
the parameter's position in its group, zeros for vectors), scaled as its LMO; distopt does the same, so a model
trained with HeavyBall's Scion trains the same way here. Weight decay is the chain's decoupled decay (HeavyBall's),
not the paper's constrained form.

Why owners: the orthogonalization needs the whole matrix and the RMS the whole vector; the owner also draws the
first step's initialization whole and sends back the new parameter for that step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..transforms.cores import HEAVYBALL_NS_COEFFICIENTS
from .base import MatrixAlgorithm, _as_number, check_betas, check_nonnegative, new_step_counter, zeros_like
from .heavyball_ema import debiased_ema_


def newton_schulz5(g: Tensor) -> Tensor:
    """HeavyBall's five-step Newton-Schulz with its per-iteration coefficients: in float64 for float64 input, else
    in bfloat16 as HeavyBall runs it (HeavyBall rounds the input to bfloat16 stochastically, distopt to nearest, so
    that a run repeats), the result in ``g``'s dtype."""
    x = g / g.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    if x.dtype != torch.float64:
        x = x.to(torch.bfloat16)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for a, b, c in HEAVYBALL_NS_COEFFICIENTS:
        s = x @ x.mT
        y = c * s
        y.diagonal(dim1=-2, dim2=-1).add_(b)
        y = y @ s
        y.diagonal(dim1=-2, dim2=-1).add_(a)
        x = y @ x
    return (x.mT if tall else x).to(g.dtype)


def lmo(m: Tensor) -> Tensor:
    """HeavyBall's Scion LMO by the tensor's number of dimensions."""
    if m.ndim in (2, 3, 4):
        flat = newton_schulz5(m.reshape(m.shape[0], -1)).reshape(m.shape)
        if m.ndim == 2:
            return flat * math.sqrt(m.shape[0] / max(m.shape[1], 1))
        spatial = math.prod(m.shape[2:])
        return flat * (math.sqrt(m.shape[0] / max(m.shape[1], 1)) / max(spatial, 1))
    if m.ndim == 0:
        return m / m.abs().clamp(min=1e-8)
    return m / m.square().mean(dim=0, keepdim=True).sqrt().clamp(min=1e-8)


def initialization(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    """HeavyBall's Scion initialization: orthogonal ``(out, in)`` slices from a CPU generator seeded with the
    parameter's position, scaled by ``sqrt(out / in) / spatial``; zeros for vectors."""
    if len(shape) < 2:
        return torch.zeros(shape, dtype=dtype, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    init = torch.empty(shape, dtype=torch.float64)
    for index in itertools.product(*(range(s) for s in shape[2:])):
        torch.nn.init.orthogonal_(init[(slice(None), slice(None), *index)], generator=gen)
    fan_out, fan_in = shape[:2]
    init.mul_(math.sqrt(fan_out / max(fan_in, 1)) / max(math.prod(shape[2:]), 1))
    return init.to(dtype=dtype, device=device)


class Scion(MatrixAlgorithm):
    """Scion. Shard state: ``step``, ``exp_avg`` (the debiased momentum), ``init_seed`` (the position in the group).
    Defaults of HeavyBall's (``betas[1]`` and ``eps`` are accepted and unused, as there)."""

    name = "scion"
    owner_mutates_input = False  # it reads what it receives
    hyperparameters = {"lr": 0.0025, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0, "scale": 1.0}
    scalar_state = ("step", "init_seed")

    def check(self, hp: Mapping[str, Any]) -> None:
        super().check(hp)
        check_betas(self.name, hp)
        check_nonnegative(self.name, hp, "weight_decay")
        _as_number(self.name, "scale", hp["scale"])

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        if len(shape) < 2:
            return float(4 * max(1, math.prod(shape)))
        m, n = sorted((shape[0], math.prod(shape[1:])))
        return float(5 * (4 * m * m * n + 2 * m**3))

    def position_state(self, index: int) -> dict[str, Tensor]:
        return {"init_seed": torch.tensor(index, dtype=torch.int64)}

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"step": new_step_counter(), "exp_avg": zeros_like(param)}

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        state["step"] += 1
        return debiased_ema_(state["exp_avg"], grad, hp["betas"][0], int(state["step"].item())).to(param.dtype)

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        out = []
        for whole, state in zip(wholes, states):
            m = whole.reshape(shape)
            direction = lmo(m) * hp["scale"]
            if int(state["step"].item()) == 1:  # the first step starts from HeavyBall's initialization
                start = initialization(shape, m.dtype, m.device, int(state["init_seed"].item())) * hp["scale"]
                direction = start * (1 - hp["weight_decay"] * hp["lr"]) + direction * (-hp["lr"])
            out.append(direction)
        return out

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        if int(state["step"].item()) == 1:
            param.copy_(update)  # the initialization, stepped
            return
        param.mul_(1 - hp["weight_decay"] * hp["lr"])
        param.add_(update, alpha=-hp["lr"])
