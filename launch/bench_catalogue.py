"""The step-benchmark scenarios of the first-order catalogue: each algorithm against its own library (torch.optim,
HeavyBall, optimi, adv_optm, prodigyopt, schedulefree), with the same hyperparameters on both sides."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bench_candidates import Candidate, _torch_variants

ADAFACTOR = {"lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.0}


def _ours(name: str, hp: dict, label: str | None = None) -> Candidate:
    import distopt

    return Candidate(label or f"distopt.{name}", lambda ps, mesh: getattr(distopt, name)(ps, **hp), ours=True)


def _peer(module: str, cls_name: str, hp: dict, label: str | None = None) -> Candidate:
    def build(ps, mesh):
        return getattr(__import__(module), cls_name)(ps, **hp)
    return Candidate(label or f"{module}.{cls_name}", build)


def _adafactor() -> list[Candidate]:
    return [_ours("Adafactor", ADAFACTOR), *_torch_variants(torch.optim.Adafactor, "Adafactor", ADAFACTOR,
                                                           fused=False)]


SCENARIOS: dict[str, Callable[[str | None], list[Candidate]]] = {
    "adafactor": lambda dion_path: _adafactor(),
}
