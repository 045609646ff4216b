"""The main job's optimizers, with defaults that train its small GPT well, and the probe that picks the owners'
maths dtype."""

from __future__ import annotations

import time

import torch
from torch import nn

import distopt

CHOICES = ("adamw", "muon", "soap", "psgd")

#: ``--precision``: the parameters' dtype and the optimizer's precision settings (see distopt.precision).
PRECISIONS = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {"kahan_sum": False}),  # plain bfloat16: what is lost without a compensation
    "bf16-kahan": (torch.bfloat16, {"kahan_sum": True}),
    "bf16-sr": (torch.bfloat16, {"stochastic_rounding": True}),
    "bf16-states": (torch.float32, {"storage_dtype": "bfloat16"}),
    "ecc": (torch.float32, {"ecc": "bf16+8"}),
    "int8": (torch.float32, {"state_precision": "int8"}),
    "int4": (torch.float32, {"state_precision": "int4"}),
}


def bf16_slowdown(device: torch.device, size: int = 256, repeats: int = 5) -> float:
    """How many times slower a bfloat16 matmul is than a float32 one here (best of ``repeats``)."""
    if device.type == "cuda":
        return 0.0  # tensor cores: bfloat16 is the fast one
    a = torch.randn(size, size)

    def best(x: torch.Tensor) -> float:
        x @ x  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a.bfloat16()) / best(a)


def make_optimizer(name: str, model: nn.Module, lr: float | None, weight_decay: float | None, owner_dtype: str,
                   compile: bool, precision: str = "fp32") -> torch.optim.Optimizer:
    """``name`` is one of :data:`CHOICES`; ``lr``/``weight_decay`` of None take the defaults below (learning rates
    from short runs of the default job, 200 steps: AdamW 3e-3 beat 1e-2, SOAP 1e-2 beat 3e-3, PSGD 3e-3 beat 1e-3);
    ``precision`` one of :data:`PRECISIONS` (the model must already be in its dtype)."""
    params = list(model.named_parameters())
    extra = PRECISIONS[precision][1]
    if name == "adamw":
        return distopt.AdamW(params, lr=lr or 3e-3, betas=(0.9, 0.95), weight_decay=_or(weight_decay, 0.1),
                             fused=True, **extra)  # one pass over memory per step
    if name == "muon":
        # Muon on the hidden matrices; AdamW on embeddings, head and norms (distopt.Muon's default routing).
        return distopt.Muon(params, lr=lr or 0.02, weight_decay=_or(weight_decay, 0.01), owner_dtype=owner_dtype,
                            adamw_lr=3e-3, adamw_betas=(0.9, 0.95), adamw_weight_decay=0.1, compile=compile,
                            **extra)
    if name == "soap":
        return distopt.SOAP(params, lr=lr or 1e-2, betas=(0.95, 0.95), weight_decay=_or(weight_decay, 0.01),
                            precondition_frequency=10, compile=compile, **extra)
    if name == "psgd":
        return distopt.PSGDKron(params, lr=lr or 3e-3, b1=0.9, weight_decay=_or(weight_decay, 0.01), compile=compile,
                                **extra)
    raise ValueError(f"unknown optimizer {name!r}; choose among {', '.join(CHOICES)}")


def _or(value, default):
    return default if value is None else value
