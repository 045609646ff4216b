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


class Replicated:
    """A peer that cannot take DTensor parameters, run the way data parallelism runs it: every rank keeps the whole
    parameters, gathers the whole gradients, repeats the whole step and keeps its shard of the result (the work that
    distopt's sharding does not repeat). Its time includes the gathers."""

    def __init__(self, params: list, make: Callable):
        self.params = params
        self.whole = [torch.nn.Parameter(p.full_tensor().detach().clone()) for p in params]
        self.opt = make(self.whole)
        self.state, self.param_groups = self.opt.state, self.opt.param_groups

    def step(self) -> None:
        from torch.distributed.tensor import distribute_tensor

        for p, whole in zip(self.params, self.whole):
            whole.grad = p.grad.full_tensor()
        self.opt.step()
        with torch.no_grad():
            for p, whole in zip(self.params, self.whole):
                p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local())


def _replicated(label: str, make: Callable) -> Candidate:
    return Candidate(f"{label} (replicated)", lambda ps, mesh: Replicated(ps, make))


def _adafactor() -> list[Candidate]:
    return [_ours("Adafactor", ADAFACTOR), *_torch_variants(torch.optim.Adafactor, "Adafactor", ADAFACTOR,
                                                           fused=False),
            _replicated("torch.optim.Adafactor (foreach)",
                        lambda ps: torch.optim.Adafactor(ps, **ADAFACTOR, foreach=True))]


OPTIMI = {"adan": ("Adan", {"lr": 1e-3, "weight_decay": 2e-2}), "ranger": ("Ranger", {"lr": 1e-3}),
          "stableadamw": ("StableAdamW", {"lr": 1e-3, "weight_decay": 1e-2})}
ADV_OPTM = {"prodigy": ("Prodigy", "Prodigy_adv", {"lr": 1.0, "d0": 1e-6}),
            "lion_k": ("Lion", "Lion_adv", {"lr": 1e-4, "kappa_p": 1.5}),
            "signsgd": ("SignSGD", "SignSGD_adv", {"lr": 1e-4, "momentum": 0.9}),
            "sinksgd": ("SinkSGD", "SinkSGD_adv", {"lr": 1e-3, "momentum": 0.9})}
SOAP_FAMILY = ("SOAPNAdam", "SOAPAdEMAMix", "SOLP", "KLSOAP", "KLShampoo", "HeavySOAP", "HeavySOAPNAdam",
               "HeavySOAPAdEMAMix", "HeavySOLP", "HeavyKLSOAP", "HeavyKLShampoo")
PSGD_FAMILY = ("PSGDPRO", "QSGD", "LATHER", "PSGDLRA")
HEAVYBALL = {"adamc": ("AdamC", {"lr": 2.5e-3, "weight_decay": 0.1}),
             "sudsadamw": ("SUDSAdamW", {"lr": 2.5e-3}),
             "hyperballadamw": ("HyperBallAdamW", {"lr": 2.5e-3, "weight_decay": 0.1}),
             "scion": ("Scion", {"lr": 2.5e-3}),
             "sfadamw": ("SFAdamW", {"lr": 2.5e-3, "weight_decay": 0.1}),
             "msamlaprop": ("MSAMLaProp", {"lr": 2.5e-3, "weight_decay": 0.1}),
             "signlaprop": ("SignLaProp", {"lr": 2.5e-3}),
             "unscaledadamw": ("UnscaledAdamW", {"lr": 2.5e-3}),
             "muonlaprop": ("MuonLaProp", {"lr": 2.5e-3}), "muonadamw": ("MuonAdamW", {"lr": 2.5e-3}), "ortholaprop": ("OrthoLaProp", {"lr": 2.5e-3}),
             "laproportho": ("LaPropOrtho", {"lr": 2.5e-3}),
             # HeavyBall's SOAP family at its defaults (refresh every 2 steps, merge_dims, max_precond_dim 2048)
             **{name.lower(): (name, {"lr": 3e-3}) for name in SOAP_FAMILY},
             # HeavyBall's PSGD family at its defaults (a fit every step for the first 1000, HeavyBall's schedule)
             **{name.lower(): (name, {"lr": 1e-3}) for name in PSGD_FAMILY}}


def _optimi(name: str, hp: dict) -> list[Candidate]:
    return [_ours(name, hp), _peer("optimi", name, {**hp, "foreach": False, "triton": False},
                                   f"optimi.{name} (for-loop)"),
            _peer("optimi", name, {**hp, "foreach": True, "triton": False}, f"optimi.{name} (foreach)")]


def _adv_optm(ours: str, theirs: str, hp: dict) -> list[Candidate]:
    def make(ps):
        import adv_optm

        return getattr(adv_optm, theirs)(ps, **hp, stochastic_rounding=False)
    out = [_ours(ours, hp), _peer("adv_optm", theirs, {**hp, "stochastic_rounding": False}),
           _replicated(f"adv_optm.{theirs}", make)]
    if ours == "Prodigy":
        out.append(_peer("prodigyopt", "Prodigy", {**hp, "slice_p": 11}))
    return out


def _heavyball(name: str, hp: dict) -> list[Candidate]:
    def make(ps):
        import heavyball

        return getattr(heavyball, name)(ps, **hp)
    replicated = [_replicated(f"heavyball.{name}", make)] if name in REPLICATED_HEAVYBALL else []
    # The SOAP family stacks same-shape matrices on their owner; owner_batch_bytes caps a stack (512 KiB by
    # default, one or two of these matrices): a larger cap trades memory for fewer, larger linear-algebra calls.
    batched = ([_ours(name, {**hp, "owner_batch_bytes": 64 << 20}, f"distopt.{name} (owner batches 64 MiB)")]
               if name in SOAP_FAMILY or name in PSGD_FAMILY[:3] else [])
    return [_ours(name, hp), *batched, _peer("heavyball", name, hp), *replicated]


#: HeavyBall optimizers that fail on DTensor parameters (measured), benchmarked replicated as well.
REPLICATED_HEAVYBALL = ("SUDSAdamW",)


def _normuon(dion_path: str | None) -> list[Candidate]:
    import distopt

    from .bench_candidates import import_dion

    hp = {"lr": 0.02, "mu": 0.95, "weight_decay": 0.01}
    return [Candidate("distopt.NorMuon (compiled)", lambda ps, mesh: distopt.NorMuon(ps, **hp, compile=True),
                      ours=True),
            Candidate("dion.NorMuon", lambda ps, mesh: import_dion(dion_path).NorMuon(ps, distributed_mesh=mesh,
                                                                                       **hp))]


def _adamuon() -> list[Candidate]:
    """AdaMuon at adv_optm's defaults (sign, bfloat16 Newton-Schulz, second moment, RMS rescale)."""
    hp = {"lr": 1e-3, "weight_decay": 0.1}

    def make(ps):
        import adv_optm

        return adv_optm.AdaMuon_adv(ps, **hp, use_muon=True, stochastic_rounding=False)
    return [_ours("AdaMuon", hp), _ours("AdaMuon", {**hp, "compile": False}, "distopt.AdaMuon (eager)"),
            _peer("adv_optm", "AdaMuon_adv", {**hp, "use_muon": True, "stochastic_rounding": False}),
            _replicated("adv_optm.AdaMuon_adv", make)]


#: Shampoo with Adam grafting, the README's Adam example of Distributed Shampoo; roots every 10 steps so that a
#: bench run of a few dozen steps computes some (the README's 100 would compute none).
SHAMPOO = {"lr": 1e-3, "betas": (0.9, 0.999), "epsilon": 1e-12, "weight_decay": 1e-5, "max_preconditioner_dim": 8192,
           "precondition_frequency": 10}
SHAMPOO_HINT = ("clone facebookresearch/optimizers (bash scripts/peers.sh --shampoo DIR) and set "
                "DISTOPT_SHAMPOO_PATH=DIR")


def _distributed_shampoo():
    import os
    import sys

    from .bench_candidates import NotInstalled

    root = os.environ.get("DISTOPT_SHAMPOO_PATH")
    if not root or not os.path.isfile(os.path.join(root, "distributed_shampoo", "__init__.py")):
        raise NotInstalled(SHAMPOO_HINT)
    if root not in sys.path:
        sys.path.insert(0, root)
    import distributed_shampoo

    return distributed_shampoo


def _shampoo() -> list[Candidate]:
    def theirs(ps, distributed_config=None):
        ds = _distributed_shampoo()
        hp = {k: v for k, v in SHAMPOO.items()}
        extra = {} if distributed_config is None else {"distributed_config": distributed_config(ds)}
        return ds.DistributedShampoo(ps, **hp, grafting_config=ds.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
                                     **extra)

    def fully_shard(strategy):
        return lambda ds: ds.FullyShardDistributedConfig(
            param_assignment_strategy=getattr(ds.FSDPParamAssignmentStrategy, strategy))
    return [_ours("Shampoo", SHAMPOO),
            Candidate("distributed_shampoo (FSDP2, its default: blocks of local shards)",
                      lambda ps, mesh: theirs(ps, fully_shard("DEFAULT"))),
            Candidate("distributed_shampoo (FSDP2, lossless round robin)",
                      lambda ps, mesh: theirs(ps, fully_shard("ROUND_ROBIN"))),
            _replicated("distributed_shampoo", lambda ps: theirs(ps))]


SCENARIOS: dict[str, Callable[[str | None], list[Candidate]]] = {
    "shampoo": lambda dion_path: _shampoo(),
    "normuon": _normuon,
    "adamuon": lambda dion_path: _adamuon(),
    "adafactor": lambda dion_path: _adafactor(),
    **{key: (lambda dion_path, name=name, hp=hp: _optimi(name, hp)) for key, (name, hp) in OPTIMI.items()},
    **{key: (lambda dion_path, args=args: _adv_optm(*args)) for key, args in ADV_OPTM.items()},
    **{key: (lambda dion_path, name=name, hp=hp: _heavyball(name, hp)) for key, (name, hp) in HEAVYBALL.items()},
    "simplified_ademamix": lambda dion_path: [_ours("Simplified_AdEMAMix", {"lr": 1e-5}),
                                               Candidate("adv_optm 2.2.3 Simplified_AdEMAMix", _adv_optm_223)],
}

ADV_OPTM_223_HINT = ("pip download --no-deps adv-optm==2.2.3, unzip the wheel, and set DISTOPT_ADV_OPTM_223_PATH "
                     "to the folder holding its adv_optm package (2.5.16, the test extra, no longer has the class)")


def _adv_optm_223(ps, mesh):
    """adv_optm 2.2.3's Simplified_AdEMAMix, loaded by path under another name beside the installed 2.5.16."""
    import importlib.util
    import os
    import sys

    from .bench_candidates import NotInstalled

    root = os.environ.get("DISTOPT_ADV_OPTM_223_PATH")
    init = os.path.join(root or "", "adv_optm", "__init__.py")
    if not root or not os.path.isfile(init):
        raise NotInstalled(ADV_OPTM_223_HINT)
    if "adv_optm_223" not in sys.modules:
        spec = importlib.util.spec_from_file_location("adv_optm_223", init,
                                                      submodule_search_locations=[os.path.dirname(init)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["adv_optm_223"] = module
        spec.loader.exec_module(module)
    return sys.modules["adv_optm_223"].Simplified_AdEMAMix(ps, lr=1e-5, stochastic_rounding=False)
