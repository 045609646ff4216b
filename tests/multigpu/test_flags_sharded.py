"""Every flag on every algorithm it applies to, under FSDP2 (W = 1 to 4, uneven and empty shards), HSDP and
DDP-style plain tensors, equals the same optimizer in one process; and the collectives it issues are the ones the
closing note states.

The sharded model gets the shards of the very gradients the single-process run sees. Flags without a reduction,
and caution (whose reduction is an integer count), give the same bits. Flags whose reduction sums floats (clips,
OrthoGrad, Kourkoutas-β) add the shards' sums in another order: a sum of ``n`` float32 terms in another order
differs by at most ``n`` units of float32 relative to the sum of magnitudes, and a scale computed from it carries
that into the step, so over ``S`` steps the parameters differ by at most ``S * n * eps`` of the distance moved
(``n`` the largest tensor's size: 35 here). ``atan2`` and the trust-region clip (``tanh``, ``log1p``) are elementwise
but not bitwise either: torch computes these functions in a vectorized loop and a scalar tail that round the last
bit differently, and a shard boundary moves elements between the two (measured: one float32 unit); the same
tolerance covers them.
"""

from __future__ import annotations

import copy

import pytest
import torch

import distopt.sharding.exchange as exchange
from distopt import DistributedOptimizer

from .harness import device
from .sharded_models import feed_same_grads, full, mesh_for, sharded_pair

STEPS = 4
LARGEST = 35  # Net's largest tensor, a.weight (7 x 5)

#: name -> (param groups maker, flags, all_reduce calls per step, exact)
ELEMENTWISE = {
    "adamw": dict(lr=0.01, weight_decay=0.1),
    "adam": dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True),
    "nadam": dict(lr=0.01),
    "rmsprop": dict(lr=0.01, momentum=0.5),
    "lion": dict(lr=0.001, weight_decay=0.1),
    "laprop": dict(lr=0.01, weight_decay=0.1),
    "adopt": dict(lr=0.01, decouple=True, weight_decay=0.1),
    "ademamix": dict(lr=0.01, weight_decay=0.1),
    "radam": dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "adamax": dict(lr=0.01),
}

#: Flags on AdamW, one at a time and together: (flags, all_reduce calls per step for one group, bitwise).
ADAMW_FLAGS = {
    "caution": (dict(caution=True), 1, True),
    "mars": (dict(mars=True, mars_gamma=0.1), 0, True),
    "palm": (dict(palm=True), 0, True),
    "warmup_cautious_wd": (dict(warmup_steps=3, cautious_weight_decay=True), 0, True),
    "grams": (dict(grams=True), 0, True),
    "atan2": (dict(atan2=True), 0, False),
    "decouple_lr": (dict(decouple_lr=True, weight_decay=1e-3), 0, True),
    "promote": (dict(promote=True), 0, True),
    "trust_region": (dict(gradient_clipping="trust_region_clip"), 0, False),
    "l2_clip": (dict(gradient_clipping="l2_clip", gradient_clip_at=0.5), 1, False),
    "rmsnorm_update_clip": (dict(update_clipping="rmsnorm_clip", update_clip_at=0.3), 1, False),
    "global_l2norm": (dict(gradient_clipping="global_l2norm_clip", gradient_clip_at=0.5), 1, False),
    "orthograd": (dict(orthograd=True), 2, False),
    "kourkoutas": (dict(kourkoutas_beta=True), 1, False),
    "everything": (dict(caution=True, mars=True, palm=True, warmup_steps=2, cautious_weight_decay=True, grams=True,
                        gradient_clipping="l2_clip", update_clipping="global_rmsnorm_clip", orthograd=True), 5, False),
}


def _configs():
    configs = {f"adamw/{name}": ("adamw", ELEMENTWISE["adamw"], flags, calls, exact)
               for name, (flags, calls, exact) in ADAMW_FLAGS.items()}
    for algo, hp in ELEMENTWISE.items():
        if algo != "adamw":
            configs[f"{algo}/caution+clip"] = (algo, hp, dict(caution=True, gradient_clipping="rmsnorm_clip",
                                                              gradient_clip_at=0.5, mars=True), 2, False)
    muon = dict(caution=True, mars=True, gradient_clipping="l2_clip", gradient_clip_at=0.5, orthograd=True,
                warmup_steps=2, cautious_weight_decay=True)
    configs["muon/caution"] = ("muon", dict(lr=0.02), dict(caution=True), 2, True)  # one call each: muon, adamw
    configs["muon/everything"] = ("muon", dict(lr=0.02), muon, 8, False)
    # Chains: matrices on owners and vectors on their shards (one collective for each, per reduction point).
    configs["muonlaprop/caution"] = ("muonlaprop", dict(owner_dtype="float32"), dict(caution=True), 2, True)
    configs["muonadamw/caution"] = ("muonadamw", dict(owner_dtype="float32"), dict(caution=True), 2, True)
    configs["ortholaprop"] = ("ortholaprop", {}, {}, 2, False)
    configs["laproportho/caution"] = ("laproportho", {}, dict(caution=True), 3, False)
    configs["signlaprop/caution"] = ("signlaprop", {}, dict(caution=True), 2, False)
    configs["unscaledadamw/mars"] = ("unscaledadamw", {}, dict(mars=True), 0, True)
    # SOAP and PSGD: matrices on owners (SOAP's vectors on their shards); MARS and clips before, caution after.
    second_order = dict(caution=True, mars=True, gradient_clipping="l2_clip", gradient_clip_at=0.5, warmup_steps=2)
    configs["soap/flags"] = ("soap", dict(lr=0.01, precondition_frequency=2), second_order, 4, False)
    configs["psgdkron/flags"] = ("psgdkron", dict(lr=0.01, weight_decay=0.1, preconditioner_update_probability=0.5),
                                 second_order, 2, False)
    configs["custom/sign_caution"] = (sign_caution, dict(lr=0.01), dict(mars=True), 1, True)
    return configs


def sign_caution():
    """A user's chain, built from the public parts."""
    from distopt.transforms.cores import ScaleByAdam
    from distopt.transforms.custom import Chain
    from distopt.transforms.parts import Caution
    return Chain("sign_caution", [ScaleByAdam(), Caution()])


CONFIGS = _configs()


def _groups(model, algo, hp, flags):
    if callable(algo):
        algo = algo()
    if algo not in ("muon", "normuon", "adamuon"):
        return DistributedOptimizer(model.named_parameters(), algo, **{**hp, **flags})
    named = list(model.named_parameters())
    return DistributedOptimizer([
        {"params": [(n, p) for n, p in named if p.ndim == 2], "algorithm": algo, **hp, "owner_dtype": "float32"},
        {"params": [(n, p) for n, p in named if p.ndim < 2], "algorithm": "adamw", "lr": 0.01}], **flags)


def _train(model, reference_params, algo, hp, flags):
    opt = _groups(model, algo, hp, flags)
    calls = []
    original, original_max = exchange.sum_over_ranks, exchange.max_over_ranks

    def counted(partials, group=None):
        calls.append(tuple(partials.shape))
        return original(partials, group)

    def counted_max(values, group=None):  # PSGDLRA's argmax
        calls.append(tuple(values.shape))
        return original_max(values, group)

    exchange.sum_over_ranks, exchange.max_over_ranks = counted, counted_max
    try:
        gen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            feed_same_grads(list(model.parameters()), reference_params, gen)
            opt.step()
    finally:
        exchange.sum_over_ranks, exchange.max_over_ranks = original, original_max
    return calls, opt


def sharded_runs(mesh_kind, configs):
    """On each rank: every config of ``configs`` (name -> (algorithm, hp, flags, calls, exact)) trained on the
    sharded model; per name the full parameters, the collectives issued and the state keys."""
    mesh = mesh_for(mesh_kind) if mesh_kind != "plain" else None
    out = {}
    for name, (algo, hp, flags, _, _) in configs.items():
        if mesh is None:
            torch.manual_seed(0)
            from .sharded_models import Net
            model = Net().to(device())
            reference = copy.deepcopy(model)
        else:
            model, reference = sharded_pair(mesh)
        calls, opt = _train(model, list(reference.parameters()), algo, hp, flags)
        keys = {n: sorted(opt.state[p]) for n, p in model.named_parameters()}
        out[name] = ({n: full(p).detach().cpu() for n, p in model.named_parameters()}, len(calls), keys)
    return out


def _single_process(config):
    """The ranks run one intra-op thread: SOAP's eigh of rank-deficient statistics depends on LAPACK's blocking."""
    from .sharded_models import Net
    algo, hp, flags, _, _ = config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = Net()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        calls, _ = _train(model, [p.detach().clone() for p in model.parameters()], algo, hp, flags)
    finally:
        torch.set_num_threads(threads)
    assert calls == [], "a single process issues no collective"
    return start, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mesh_kind,world_size", [("fsdp", 1), ("fsdp", 2), ("fsdp", 3), ("fsdp", 4), ("hsdp", 4),
                                                  ("plain", 2)])
def test_flags_on_shards_equal_the_single_process_run(ranks, mesh_kind, world_size):
    check_sharded_equals_single(ranks, mesh_kind, world_size, CONFIGS)


def check_sharded_equals_single(ranks, mesh_kind, world_size, configs, tolerance_of=None):
    """Every config trained on ``world_size`` ranks equals the single-process run: bitwise where ``exact``, else
    within ``tolerance_of(name, moved)`` (by default ``STEPS * LARGEST * eps * moved``: sums in another order)."""
    results = ranks(world_size, sharded_runs, mesh_kind, configs)
    eps = torch.finfo(torch.float32).eps
    for name, config in configs.items():
        _, _, _, calls, exact = config
        start, expected = _single_process(config)
        moved = max((expected[n] - start[n]).abs().max().item() for n in expected)
        tolerance = 0.0 if exact else (tolerance_of or (lambda _, m: STEPS * LARGEST * eps * m))(name, moved)
        for rank, per_rank in enumerate(results):
            params, issued, keys = per_rank[name]
            assert keys == results[0][name][2], (name, "state keys differ between ranks")
            assert issued == (calls * STEPS if world_size > 1 else 0), (name, issued)
            for n, value in expected.items():
                diff = (params[n] - value).abs().max().item()
                assert diff <= tolerance, (name, rank, n, diff, tolerance)
