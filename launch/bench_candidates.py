"""The candidates of each step-benchmark scenario: distopt's optimizers and their peers, with the same
hyperparameters where the peer has them.

A candidate is built from a list of FSDP2 (DTensor) parameters and the device mesh. Peers come from PyPI
(``pip install -e .[peers]``: heavyball 3.2.1, torch-optimi, kron-torch) except microsoft/dion, which is not on PyPI:
its Muon is imported from a source tree given by ``--dion-path`` or ``DISTOPT_DION_PATH``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

import distopt

DION_HINT = ("git clone https://github.com/microsoft/dion, then pass --dion-path <clone> "
             "(or set DISTOPT_DION_PATH)")


class NotInstalled(Exception):
    """A peer that this machine does not have; the message says how to get it."""


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    build: Callable[[list, object], torch.optim.Optimizer]  # (params, device mesh) -> optimizer
    ours: bool = False  # distopt's own: a failure is "unavailable"; a peer's is "not installed" or "unsupported"


def failure(candidate: Candidate, error: BaseException) -> tuple[str, str]:
    """(status, short reason) of a candidate that could not be built or stepped."""
    if isinstance(error, NotInstalled):
        return "not installed", str(error)
    if isinstance(error, ModuleNotFoundError) and not candidate.ours:
        return "not installed", f"no module {error.name!r} ({_pip_hint(error.name)})"
    return ("unavailable" if candidate.ours else "unsupported"), short_reason(error)


def short_reason(error: BaseException) -> str:
    """``Type: first line``; for torch.compile's errors, the error the traced code raised, which names the cause
    (their first line is generic)."""
    text = str(error).strip()
    inner = re.search(r"got (\w+(?:Error|Exception))\((['\"])(.+?)\2\)", text)
    if inner:
        return f"{inner.group(1)}: {_clip(inner.group(3))}"
    lines = text.splitlines()
    return f"{type(error).__name__}: {_clip(lines[0]) if lines else ''}".rstrip(": ")


def _clip(text: str, limit: int = 120) -> str:
    """At most ``limit`` characters, cut at a word and marked, so a table cell never ends mid-word."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def _pip_hint(module: str | None) -> str:
    return "pip install -e .[peers]" if module in ("heavyball", "optimi", "kron_torch") else "missing dependency"


def import_dion(path: str | None):
    """microsoft/dion's package from the source tree at ``path``."""
    if not path:
        raise NotInstalled(DION_HINT)
    if not os.path.isfile(os.path.join(path, "dion", "__init__.py")):
        raise NotInstalled(f"no dion/__init__.py under {path!r}; {DION_HINT}")
    if path not in sys.path:
        sys.path.insert(0, path)
    import dion

    return dion


# -- elementwise ------------------------------------------------------------------------------------------------
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
SGD = {"lr": 1e-2, "momentum": 0.9}
LION = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.1}
ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
NADAM = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "momentum_decay": 4e-3}
RMSPROP = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8}
ADOPT = {"lr": 1e-3, "betas": (0.9, 0.9999), "eps": 1e-6, "weight_decay": 0.0}
LAPROP = {"lr": 4e-4, "betas": (0.8, 0.99), "eps": 1e-15, "weight_decay": 0.0}
ADEMAMIX = {"lr": 1e-3, "betas": (0.9, 0.999, 0.9999), "alpha": 2.0, "eps": 1e-8, "weight_decay": 0.0}
RADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
ADAMAX = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
ADAGRAD = {"lr": 1e-2, "lr_decay": 0.0, "eps": 1e-10}
ADADELTA = {"lr": 1.0, "rho": 0.9, "eps": 1e-6}


def _heavyball(cls_name: str, **hp):
    def build(ps, mesh):
        import heavyball

        return getattr(heavyball, cls_name)(ps, **hp)
    return build


def _optimi(cls_name: str, **hp):
    def build(ps, mesh):
        import optimi

        return getattr(optimi, cls_name)(ps, **hp)
    return build


def _torch_variants(cls: type, label: str, hp: dict, fused: bool = True) -> list[Candidate]:
    """torch.optim's implementations: per-tensor loop, foreach (multi-tensor) and, where torch has them, fused
    kernels."""
    return [Candidate(f"torch.optim.{label} (for-loop)", lambda ps, mesh: cls(ps, **hp, foreach=False)),
            Candidate(f"torch.optim.{label} (foreach)", lambda ps, mesh: cls(ps, **hp, foreach=True)),
            *([Candidate(f"torch.optim.{label} (fused)", lambda ps, mesh: cls(ps, **hp, fused=True))] if fused else [])]


def _adamw() -> list[Candidate]:
    return [Candidate("distopt.AdamW", lambda ps, mesh: distopt.AdamW(ps, **ADAMW), ours=True),
            Candidate("distopt.AdamW (fused)", lambda ps, mesh: distopt.AdamW(ps, **ADAMW, fused=True), ours=True),
            *_torch_variants(torch.optim.AdamW, "AdamW", ADAMW),
            Candidate("heavyball.AdamW", _heavyball("AdamW", **ADAMW)),
            Candidate("optimi.AdamW", _optimi("AdamW", **ADAMW))]


def _sgd() -> list[Candidate]:
    return [Candidate("distopt.SGD", lambda ps, mesh: distopt.SGD(ps, **SGD), ours=True),
            Candidate("distopt.SGD (fused)", lambda ps, mesh: distopt.SGD(ps, **SGD, fused=True), ours=True),
            *_torch_variants(torch.optim.SGD, "SGD", SGD),
            Candidate("heavyball.SGD", _heavyball("SGD", lr=SGD["lr"], beta=SGD["momentum"])),
            Candidate("optimi.SGD", _optimi("SGD", **SGD))]


def _lion() -> list[Candidate]:
    return [Candidate("distopt.Lion", lambda ps, mesh: distopt.Lion(ps, **LION), ours=True),
            Candidate("optimi.Lion", _optimi("Lion", **LION))]


def _adam() -> list[Candidate]:
    # heavyball has no Adam with coupled weight decay; its AdamW at weight_decay 0 is the same maths.
    return [Candidate("distopt.Adam", lambda ps, mesh: distopt.Adam(ps, **ADAM), ours=True),
            Candidate("distopt.Adam (fused)", lambda ps, mesh: distopt.Adam(ps, **ADAM, fused=True), ours=True),
            *_torch_variants(torch.optim.Adam, "Adam", ADAM),
            Candidate("heavyball.AdamW (weight_decay 0)", _heavyball("AdamW", **ADAM)),
            Candidate("optimi.Adam", _optimi("Adam", **ADAM))]


def _nadam() -> list[Candidate]:
    return [Candidate("distopt.NAdam", lambda ps, mesh: distopt.NAdam(ps, **NADAM), ours=True),
            *_torch_variants(torch.optim.NAdam, "NAdam", NADAM, fused=False),
            Candidate("heavyball.NAdam", _heavyball("NAdam", **NADAM))]


def _rmsprop() -> list[Candidate]:
    # heavyball's RMSprop takes (momentum, alpha) as betas; without momentum it is the same update.
    return [Candidate("distopt.RMSprop", lambda ps, mesh: distopt.RMSprop(ps, **RMSPROP), ours=True),
            *_torch_variants(torch.optim.RMSprop, "RMSprop", RMSPROP, fused=False),
            Candidate("heavyball.RMSprop", _heavyball("RMSprop", lr=RMSPROP["lr"], betas=(0.0, RMSPROP["alpha"]),
                                                      eps=RMSPROP["eps"]))]


def _torch_only(name: str, cls: type, hp: dict, fused: bool = False,
                extra: list[Candidate] | None = None) -> Callable[[], list[Candidate]]:
    """torch.optim's other first-order optimizers: distopt against torch's implementations (and a peer's)."""
    return lambda: [Candidate(f"distopt.{name}", lambda ps, mesh: getattr(distopt, name)(ps, **hp), ours=True),
                    *_torch_variants(cls, name, hp, fused=fused), *(extra or [])]


def _heavyball_only(name: str, hp: dict) -> Callable[[], list[Candidate]]:
    """Algorithms torch.optim does not have: distopt against heavyball's version."""
    return lambda: [Candidate(f"distopt.{name}", lambda ps, mesh: getattr(distopt, name)(ps, **hp), ours=True),
                    Candidate(f"heavyball.{name}", _heavyball(name, **hp))]


# -- matrix (owner compute in distopt) ----------------------------------------------------------------------------
MUON = {"lr": 0.02, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1}
SOAP = {"lr": 3e-3, "betas": (0.95, 0.95), "shampoo_beta": 0.95, "weight_decay": 0.01, "precondition_frequency": 10}
PSGD = {"lr": 3e-4, "b1": 0.9, "preconditioner_update_probability": 1.0, "max_size_triangular": 8192}


def _distopt(algorithm: str, compile: bool, hp: dict):
    return lambda ps, mesh: distopt.DistributedOptimizer(ps, algorithm=algorithm, compile=compile, **hp)


def _dion_muon(dion_path: str | None):
    def build(ps, mesh):
        # use_polar_express=False: the same 5-step quintic Newton-Schulz in bfloat16 as distopt and torch.
        return import_dion(dion_path).Muon(ps, distributed_mesh=mesh, lr=MUON["lr"], mu=MUON["momentum"],
                                           nesterov=MUON["nesterov"], weight_decay=MUON["weight_decay"],
                                           use_polar_express=False)
    return build


def _dion_muon_default(dion_path: str | None):
    def build(ps, mesh):
        return import_dion(dion_path).Muon(ps, distributed_mesh=mesh, lr=MUON["lr"], mu=MUON["momentum"],
                                           nesterov=MUON["nesterov"], weight_decay=MUON["weight_decay"])
    return build


def _muon(dion_path: str | None) -> list[Candidate]:
    return [Candidate("distopt.Muon (eager)", _distopt("muon", False, MUON), ours=True),
            Candidate("distopt.Muon (compiled)", _distopt("muon", True, MUON), ours=True),
            Candidate("distopt.Muon polar_express (compiled)",
                      _distopt("muon", True, {**MUON, "orthogonalization": "polar_express"}), ours=True),
            Candidate("distopt.Muon gram_newton_schulz (compiled)",
                      _distopt("muon", True, {**MUON, "orthogonalization": "gram_newton_schulz"}), ours=True),
            Candidate("dion.Muon (polar express, its default)", _dion_muon_default(dion_path)),
            Candidate("torch.optim.Muon", lambda ps, mesh: torch.optim.Muon(ps, **MUON)),
            Candidate("heavyball.Muon", _heavyball("Muon", lr=MUON["lr"], betas=(MUON["momentum"], 0.99),
                                                   weight_decay=MUON["weight_decay"])),
            Candidate("dion.Muon", _dion_muon(dion_path))]


def _soap() -> list[Candidate]:
    return [Candidate("distopt.SOAP (eager)", _distopt("soap", False, SOAP), ours=True),
            Candidate("distopt.SOAP (compiled)", _distopt("soap", True, SOAP), ours=True),
            Candidate("heavyball.SOAP", _heavyball("SOAP", **SOAP, merge_dims=False, use_precond_schedule=False))]


def _psgd() -> list[Candidate]:
    peer = {k: v for k, v in PSGD.items() if k != "b1"}
    return [Candidate("distopt.PSGDKron (eager)", _distopt("psgdkron", False, PSGD), ours=True),
            Candidate("distopt.PSGDKron (compiled)", _distopt("psgdkron", True, PSGD), ours=True),
            Candidate("heavyball.PSGDKron", _heavyball("PSGDKron", **peer, betas=(PSGD["b1"], 0.999))),
            Candidate("kron_torch.Kron", _kron(PSGD))]


# -- flags (the transforms issue): the same flags on both sides ------------------------------------------------------
ADAMW_FLAGS = {"caution": True, "mars": True}
MUON_FLAGS = {"caution": True}


def _adamw_flags() -> list[Candidate]:
    hp = {**ADAMW, "betas": (0.9, 0.99)}  # heavyball's AdamW default betas; distopt takes the same
    return [Candidate("distopt.AdamW caution+mars", lambda ps, mesh: distopt.AdamW(ps, **hp, **ADAMW_FLAGS),
                      ours=True),
            Candidate("distopt.AdamW", lambda ps, mesh: distopt.AdamW(ps, **hp), ours=True),
            Candidate("heavyball.AdamW caution+mars", _heavyball("AdamW", **hp, **ADAMW_FLAGS)),
            Candidate("heavyball.AdamW", _heavyball("AdamW", **hp))]


def _elementwise_flags() -> list[Candidate]:
    """Every elementwise algorithm that HeavyBall has, with caution and MARS on both sides."""
    out = []
    for name, hp, peer, peer_hp in (
            ("LaProp", LAPROP, "LaProp", LAPROP), ("NAdam", NADAM, "NAdam", NADAM),
            ("ADOPT", ADOPT, "ADOPT", ADOPT), ("AdEMAMix", ADEMAMIX, "AdEMAMix", ADEMAMIX),
            ("SGD", SGD, "SGD", {"lr": SGD["lr"], "beta": SGD["momentum"]}),
            ("RMSprop", RMSPROP, "RMSprop", {"lr": RMSPROP["lr"], "betas": (0.0, RMSPROP["alpha"]),
                                             "eps": RMSPROP["eps"]})):
        out += [Candidate(f"distopt.{name} caution+mars",
                          lambda ps, mesh, name=name, hp=hp: getattr(distopt, name)(ps, **hp, **ADAMW_FLAGS), ours=True),
                Candidate(f"heavyball.{peer} caution+mars", _heavyball(peer, **peer_hp, **ADAMW_FLAGS))]
    return out


def _muon_flags() -> list[Candidate]:
    return [Candidate("distopt.Muon caution (compiled)", lambda ps, mesh: distopt.DistributedOptimizer(
                ps, algorithm="muon", compile=True, **MUON, **MUON_FLAGS), ours=True),
            Candidate("distopt.Muon (compiled)", _distopt("muon", True, MUON), ours=True),
            Candidate("heavyball.Muon caution", _heavyball("Muon", lr=MUON["lr"], betas=(MUON["momentum"], 0.99),
                                                           weight_decay=MUON["weight_decay"], **MUON_FLAGS)),
            Candidate("heavyball.Muon", _heavyball("Muon", lr=MUON["lr"], betas=(MUON["momentum"], 0.99),
                                                   weight_decay=MUON["weight_decay"]))]


def _kron(hp: dict):
    def build(ps, mesh):
        import kron_torch

        return kron_torch.Kron(ps, **hp)
    return build


SCENARIOS: dict[str, Callable[[str | None], list[Candidate]]] = {
    "adamw": lambda dion_path: _adamw(),
    "sgd": lambda dion_path: _sgd(),
    "lion": lambda dion_path: _lion(),
    "adam": lambda dion_path: _adam(),
    "nadam": lambda dion_path: _nadam(),
    "rmsprop": lambda dion_path: _rmsprop(),
    "adopt": lambda dion_path: _heavyball_only("ADOPT", ADOPT)(),
    "laprop": lambda dion_path: _heavyball_only("LaProp", LAPROP)(),
    "ademamix": lambda dion_path: _heavyball_only("AdEMAMix", ADEMAMIX)(),
    "radam": lambda dion_path: _torch_only("RAdam", torch.optim.RAdam, RADAM,
                                           extra=[Candidate("optimi.RAdam", _optimi("RAdam", **RADAM))])(),
    "adamax": lambda dion_path: _torch_only("Adamax", torch.optim.Adamax, ADAMAX)(),
    "adagrad": lambda dion_path: _torch_only("Adagrad", torch.optim.Adagrad, ADAGRAD, fused=True)(),
    "adadelta": lambda dion_path: _torch_only("Adadelta", torch.optim.Adadelta, ADADELTA)(),
    "muon": _muon,
    "soap": lambda dion_path: _soap(),
    "psgd": lambda dion_path: _psgd(),
    "adamw_flags": lambda dion_path: _adamw_flags(),
    "muon_flags": lambda dion_path: _muon_flags(),
    "elementwise_flags": lambda dion_path: _elementwise_flags(),
}


def _catalogue() -> None:
    from .bench_catalogue import SCENARIOS as CATALOGUE
    from .bench_precision import SCENARIOS as PRECISION

    SCENARIOS.update(CATALOGUE)
    SCENARIOS.update(PRECISION)


_catalogue()


def candidates(scenario: str, dion_path: str | None = None, only: list[str] | None = None) -> list[Candidate]:
    """The candidates of ``scenario`` whose names contain one of ``only`` (all by default); the first is the
    baseline of the ratios."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose among {', '.join(SCENARIOS)}")
    chosen = [c for c in SCENARIOS[scenario](dion_path) if not only or any(s in c.name for s in only)]
    if not chosen:
        raise ValueError(f"no candidate of scenario {scenario!r} matches {only}")
    return chosen
