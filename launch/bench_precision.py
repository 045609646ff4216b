"""The step-benchmark scenarios of low precision and compact states: each mode of distopt beside the libraries that
offer it (torchao's 8-bit and 4-bit AdamW, adv_optm's state_precision modes, HeavyBall's ECC and bf16 storage,
optimi's Kahan summation), with the same hyperparameters. The memory per parameter is the report's state bytes per
rank times W over the model's parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bench_candidates import Candidate
from .bench_catalogue import _replicated

ADAMW = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
MUON = {"lr": 0.02, "weight_decay": 0.01}

#: The parameters' dtype of a scenario (float32 where not named).
PARAM_DTYPE = {"precision_bf16": torch.bfloat16}


def _distopt(label: str, make: Callable) -> Candidate:
    return Candidate(f"distopt.{label}", lambda ps, mesh: make(ps), ours=True)


def _peer(label: str, make: Callable, replicated: bool = False) -> Candidate:
    if replicated:
        return _replicated(label, make)
    return Candidate(label, lambda ps, mesh: make(ps))


def _adamw(**settings):
    import distopt

    return lambda ps: distopt.AdamW(ps, **ADAMW, **settings)


def _heavyball(name: str, **settings):
    def make(ps):
        import heavyball

        return getattr(heavyball, name)(ps, **settings)
    return make


def _torchao(name: str, **settings):
    def make(ps):
        from torchao import optim

        return getattr(optim, name)(ps, **ADAMW, **settings)
    return make


def _adv_optm(name: str, **settings):
    def make(ps):
        import adv_optm

        return getattr(adv_optm, name)(ps, **settings)
    return make


def _states() -> list[Candidate]:
    """AdamW on float32 parameters: every compact state form."""
    hb = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    return [
        _distopt("AdamW (float32 states)", _adamw()),
        _distopt("AdamW state_precision=int8", _adamw(state_precision="int8")),
        _peer("torchao.AdamW8bit", _torchao("AdamW8bit")),
        _distopt("AdamW state_precision=int4", _adamw(state_precision="int4")),
        _peer("torchao.AdamW4bit", _torchao("AdamW4bit"), True),  # its 4-bit state fails on DTensor shards
        _distopt("AdamW state_precision=int8_sr", _adamw(state_precision="int8_sr")),
        _peer("adv_optm.AdamW_adv int8_sr", _adv_optm("AdamW_adv", **ADAMW, state_precision="int8_sr"), True),
        _distopt("AdamW state_precision=factored", _adamw(state_precision="factored")),
        _peer("adv_optm.AdamW_adv factored", _adv_optm("AdamW_adv", **ADAMW, state_precision="factored"), True),
        _distopt("AdamW state_precision=bf16_sr", _adamw(state_precision="bf16_sr")),
        _peer("adv_optm.AdamW_adv bf16_sr", _adv_optm("AdamW_adv", **ADAMW, state_precision="bf16_sr"), True),
        _distopt("AdamW ecc=bf16+8", _adamw(ecc="bf16+8")),
        _peer("heavyball.AdamW ecc=bf16+8", _heavyball("AdamW", **hb, ecc="bf16+8")),
        _distopt("AdamW storage_dtype=bfloat16", _adamw(storage_dtype="bfloat16")),
        _peer("heavyball.AdamW storage_dtype=bfloat16", _heavyball("AdamW", **hb, storage_dtype="bfloat16")),
    ]


def _bf16_params() -> list[Candidate]:
    """AdamW on bfloat16 parameters: how each library writes them."""
    optimi_hp = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}

    def optimi_adamw(ps):
        import optimi

        return optimi.AdamW(ps, **optimi_hp, kahan_sum=True)
    return [
        _distopt("AdamW kahan_sum (default)", _adamw()),
        _peer("optimi.AdamW kahan_sum", optimi_adamw),
        _distopt("AdamW stochastic_rounding", _adamw(stochastic_rounding=True)),
        _peer("adv_optm.AdamW_adv stochastic_rounding", _adv_optm("AdamW_adv", **ADAMW), True),
        _peer("heavyball.AdamW (stochastic rounding)", _heavyball("AdamW", **ADAMW)),
        _distopt("AdamW int8 + stochastic_rounding", _adamw(state_precision="int8", stochastic_rounding=True)),
        _peer("torchao.AdamW8bit bf16_stochastic_round", _torchao("AdamW8bit", bf16_stochastic_round=True),
              True),  # fails on DTensor shards
        _distopt("AdamW plain bf16 (kahan_sum=False)", _adamw(kahan_sum=False)),
    ]


def _muon() -> list[Candidate]:
    """Muon's momentum (on the shards) in compact forms."""
    import distopt

    def ours(**settings):
        return lambda ps: distopt.DistributedOptimizer(ps, "muon", **MUON, owner_dtype="float32", **settings)
    return [
        _distopt("Muon (float32 momentum)", ours()),
        _distopt("Muon state_precision=int8", ours(state_precision="int8")),
        _distopt("Muon ecc=bf16+8", ours(ecc="bf16+8")),
        _peer("heavyball.Muon ecc=bf16+8", _heavyball("Muon", lr=0.02, weight_decay=0.01, ecc="bf16+8")),
        _distopt("Muon state_precision=bf16_sr", ours(state_precision="bf16_sr")),
        _peer("adv_optm.Muon_adv bf16_sr", _adv_optm("Muon_adv", lr=0.02, weight_decay=0.01,
                                                     state_precision="bf16_sr"), True),
        _peer("adv_optm.Muon_adv int8_sr", _adv_optm("Muon_adv", lr=0.02, weight_decay=0.01,
                                                     state_precision="int8_sr"), True),
        _distopt("Muon state_precision=factored", ours(state_precision="factored")),
        _peer("adv_optm.Muon_adv factored", _adv_optm("Muon_adv", lr=0.02, weight_decay=0.01,
                                                      state_precision="factored"), True),
    ]


def _soap() -> list[Candidate]:
    """HeavySOAP (HeavyBall's SOAP maths, its moments in the eigenbasis on the owner) with compact moments; the
    statistics and bases stay float32 in both libraries."""
    import distopt

    hp = {"lr": 3e-3, "betas": (0.95, 0.95), "shampoo_beta": 0.95, "weight_decay": 0.01,
          "precondition_frequency": 10, "use_precond_schedule": False}

    def ours(**settings):
        return lambda ps: distopt.HeavySOAP(ps, **hp, **settings)
    return [
        _distopt("HeavySOAP (float32 moments)", ours()),
        _distopt("HeavySOAP ecc=bf16+8", ours(ecc="bf16+8")),
        _peer("heavyball.HeavySOAP ecc=bf16+8", _heavyball("HeavySOAP", **hp, ecc="bf16+8")),
        _distopt("HeavySOAP storage_dtype=bfloat16", ours(storage_dtype="bfloat16")),
        _peer("heavyball.HeavySOAP storage_dtype=bfloat16", _heavyball("HeavySOAP", **hp, storage_dtype="bfloat16")),
        _distopt("HeavySOAP state_precision=int8", ours(state_precision="int8")),
        _distopt("HeavySOAP state_precision=factored", ours(state_precision="factored")),
    ]


SCENARIOS: dict[str, Callable[[str | None], list[Candidate]]] = {
    "precision_soap": lambda dion_path: _soap(),
    "precision_states": lambda dion_path: _states(),
    "precision_bf16": lambda dion_path: _bf16_params(),
    "precision_muon": lambda dion_path: _muon(),
}
