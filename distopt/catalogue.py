"""Constructors of the first-order catalogue under the names and keywords of the libraries that define them
(torch-optimi, adv_optm, HeavyBall, prodigyopt, schedulefree), with their defaults. Every one is a
:class:`~distopt.DistributedOptimizer`: sharded, checkpointed through DCP, and taking the seeds' flags (``**flags``)
where its maths allows."""

from __future__ import annotations

from typing import Any

import torch

from .algos.muon import NS_COEFFICIENTS
from .optimizer import DistributedOptimizer
from .owner import DEFAULT_BUCKET_BYTES
from .routing import Predicate, is_unsuitable_for_muon, split_groups


def _optimi_switches(name: str, kahan_sum, gradient_release, flags: dict) -> None:
    """optimi's implementation switches: Kahan summation is distopt's precision setting of the same name (see
    :mod:`distopt.precision`); gradient release fuses the step into backward, which a sharded step cannot."""
    flags["kahan_sum"] = kahan_sum
    if gradient_release:
        raise ValueError(f"{name}: gradient_release=True is not supported: distopt steps after backward")


class Adan(DistributedOptimizer):
    """optimi's Adan (https://arxiv.org/abs/2208.06677): adaptive Nesterov momentum, proximal weight decay.
    ``foreach`` and ``triton`` select optimi's kernels and change no maths here."""

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), weight_decay=2e-2, eps=1e-6, decouple_lr=False,
                 max_lr=None, kahan_sum=False, foreach=None, triton=None, gradient_release=False, *, maximize=False,
                 process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None, **flags):
        _optimi_switches("adan", kahan_sum, gradient_release, flags)
        if decouple_lr:
            flags.update(decouple_lr=True, max_lr=max_lr)
        super().__init__(params, "adan", lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, maximize=maximize,
                         process_group=process_group, bucket_bytes=bucket_bytes, compile=compile, **flags)


class Ranger(DistributedOptimizer):
    """optimi's Ranger: RAdam (https://arxiv.org/abs/1908.03265) with Lookahead (https://arxiv.org/abs/1907.08610)
    every ``k`` steps."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0, eps=1e-6, k=6, alpha=0.5,
                 decouple_wd=True, decouple_lr=False, max_lr=None, kahan_sum=None, foreach=None, triton=None,
                 gradient_release=False, *, maximize=False, process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES,
                 compile=None, **flags):
        _optimi_switches("ranger", kahan_sum, gradient_release, flags)
        if decouple_lr:
            flags.update(decouple_lr=True, max_lr=max_lr)
        super().__init__(params, "ranger", lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, k=k, alpha=alpha,
                         decouple_wd=decouple_wd, maximize=maximize, process_group=process_group,
                         bucket_bytes=bucket_bytes, compile=compile, **flags)


class StableAdamW(DistributedOptimizer):
    """optimi's StableAdamW (https://arxiv.org/abs/2304.13013): AdamW whose step is clipped by the RMS of
    ``g² / v̂`` over each whole tensor, summed over every shard."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6, decouple_lr=False,
                 max_lr=None, kahan_sum=None, foreach=None, triton=None, gradient_release=False, *, maximize=False,
                 process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None, **flags):
        _optimi_switches("stableadamw", kahan_sum, gradient_release, flags)
        if decouple_lr:
            flags.update(decouple_lr=True, max_lr=max_lr)
        super().__init__(params, "stableadamw", lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                         maximize=maximize, process_group=process_group, bucket_bytes=bucket_bytes, compile=compile,
                         **flags)


def _as_groups(params: Any) -> list[dict[str, Any]]:
    params = list(params)
    return [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]


def _adv_optm_rounding(groups: list[dict[str, Any]], stochastic_rounding: bool, flags: dict) -> list[dict[str, Any]]:
    """adv_optm rounds bfloat16/float16 parameter writes stochastically by default (``stochastic_rounding=True``)
    and leaves other parameters alone: each group whose parameters are all bfloat16/float16 gets the setting,
    unless it (or the call) chooses another write."""
    writes = ("stochastic_rounding", "kahan_sum", "param_ecc")
    if not stochastic_rounding or any(key in flags for key in writes):
        return groups
    for group in groups:
        group["params"] = list(group["params"])
        tensors = [entry[1] if isinstance(entry, tuple) else entry for entry in group["params"]]
        if (tensors and all(isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
                and not any(key in group for key in writes)):
            group["stochastic_rounding"] = True
    return groups


class Prodigy(DistributedOptimizer):
    """adv_optm's Prodigy_adv (https://arxiv.org/abs/2306.06101): Adam at the step size ``d lr``, ``d`` estimated
    from statistics of every parameter of the group on every rank, with no setting for the sharding (adv_optm's
    ``fsdp_in_use``). ``d`` lives in the param group (``opt.param_groups[i]["d"]``), one per group.
    ``stochastic_rounding`` is on by default for groups of bfloat16/float16 parameters, as in adv_optm."""

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, beta3=None, d0=1e-6,
                 d_coef=1.0, growth_rate=float("inf"), safeguard_warmup=False, slice_p=11, prodigy_steps=0,
                 d_limiter=False, nesterov=False, nesterov_coef=None, maximize=False, stochastic_rounding=True,
                 process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None, **flags):
        params = _adv_optm_rounding(_as_groups(params), stochastic_rounding, flags)
        super().__init__(params, "prodigy", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, beta3=beta3,
                         d0=d0, d_coef=d_coef, growth_rate=growth_rate, safeguard_warmup=safeguard_warmup,
                         slice_p=slice_p, prodigy_steps=prodigy_steps, d_limiter=d_limiter, nesterov=nesterov,
                         nesterov_coef=nesterov_coef, maximize=maximize, process_group=process_group,
                         bucket_bytes=bucket_bytes, compile=compile, **flags)


class SignSGD(DistributedOptimizer):
    """adv_optm's SignSGD_adv (https://arxiv.org/abs/1802.04434): the sign of an exponential momentum.
    ``stochastic_rounding`` is on by default for groups of bfloat16/float16 parameters, as in adv_optm."""

    def __init__(self, params, lr=1e-4, momentum=0.9, weight_decay=0.0, *, nesterov=False, nesterov_coef=None,
                 normed_momentum=False, maximize=False, stochastic_rounding=True, process_group=None,
                 bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None, **flags):
        params = _adv_optm_rounding(_as_groups(params), stochastic_rounding, flags)
        super().__init__(params, "signsgd", lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                         nesterov_coef=nesterov_coef, normed_momentum=normed_momentum, maximize=maximize,
                         process_group=process_group, bucket_bytes=bucket_bytes, compile=compile, **flags)


class SinkSGD(DistributedOptimizer):
    """adv_optm's SinkSGD_adv (https://arxiv.org/abs/2502.06742): the momentum normalized by Sinkhorn iterations
    over the rows and columns of each whole matrix, on the matrix's owner; ``sign`` for vectors.
    ``stochastic_rounding`` is on by default for groups of bfloat16/float16 parameters, as in adv_optm."""

    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0, *, sinkhorn_iterations=5, nesterov=False,
                 nesterov_coef=None, stochastic_rounding=True, process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES,
                 compile=None, **flags):
        params = _adv_optm_rounding(_as_groups(params), stochastic_rounding, flags)
        super().__init__(params, "sinksgd", lr=lr, momentum=momentum, weight_decay=weight_decay,
                         sinkhorn_iterations=sinkhorn_iterations, nesterov=nesterov, nesterov_coef=nesterov_coef,
                         process_group=process_group, bucket_bytes=bucket_bytes, compile=compile, **flags)


class Simplified_AdEMAMix(DistributedOptimizer):  # noqa: N801 (adv_optm's name)
    """adv_optm's Simplified_AdEMAMix (https://arxiv.org/abs/2502.02431; in adv_optm up to 2.2.3): an accumulated
    momentum plus ``alpha_grad`` times the gradient, over Adam's denominator; learning rates about 100x below
    AdamW's."""

    def __init__(self, params, lr=1e-5, betas=(0.99, 0.999), eps=1e-8, weight_decay=0.0, *, alpha_grad=100.0,
                 beta1_warmup=None, min_beta1=0.9, use_bias_correction=True, maximize=False, process_group=None,
                 bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None, **flags):
        super().__init__(params, "simplified_ademamix", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         alpha_grad=alpha_grad, beta1_warmup=beta1_warmup, min_beta1=min_beta1,
                         use_bias_correction=use_bias_correction, maximize=maximize, process_group=process_group,
                         bucket_bytes=bucket_bytes, compile=compile, **flags)


class SFAdamW(DistributedOptimizer):
    """HeavyBall's SFAdamW, Schedule-Free AdamW (https://arxiv.org/abs/2405.15682): no schedule needed; the
    parameters hold the training point ``y``, and ``opt.eval()`` / ``opt.train()`` swap in the average ``x`` and
    back, on every shard. ``warmup_steps`` is HeavyBall's warm-up; the other flags are refused."""

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, *, process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None,
                 **flags):
        if warmup_steps:
            flags["warmup_steps"] = warmup_steps
        super().__init__(params, "sfadamw", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r,
                         weight_lr_power=weight_lr_power, process_group=process_group, bucket_bytes=bucket_bytes,
                         compile=compile, **flags)


class NorMuon(DistributedOptimizer):
    """dion's NorMuon (https://arxiv.org/abs/2510.05491), its keywords and defaults: Muon (Polar Express by default)
    with a neuron-wise second moment after the orthogonalization, on owners (exact on any layout). Only matrices:
    give vectors, embeddings and heads to an elementwise group (dion's ``betas`` are for those, and not taken)."""

    def __init__(self, params, lr=0.01, mu=0.95, muon_beta2=0.95, weight_decay=0.01, epsilon=1e-8,
                 nesterov=False, adjust_lr="spectral_norm", flatten=False, *, orthogonalization="polar_express",
                 owner_dtype="bfloat16", process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None,
                 **flags):
        super().__init__(params, "normuon", lr=lr, mu=mu, muon_beta2=muon_beta2, weight_decay=weight_decay,
                         epsilon=epsilon, nesterov=nesterov, adjust_lr=adjust_lr, flatten=flatten,
                         orthogonalization=orthogonalization, owner_dtype=owner_dtype, process_group=process_group,
                         bucket_bytes=bucket_bytes, compile=compile, **flags)


#: adv_optm keywords of AdaMuon_adv that select what distopt does not run yet, with the value that turns each off.
_ADAMUON_OFF = {"low_rank_ortho": False, "accelerated_ns": False, "spectral_normalization": False,
                "centered_wd": 0.0,
                "vector_reshape": False, "orthogonal_gradient": "disabled", "compiled_optimizer": False}


def _adamuon_groups(params: Any, predicate: Predicate, aux: dict[str, Any]) -> list[dict[str, Any]]:
    """adv_optm's routing: a group's ``use_muon`` (or ``optim_type``) sends all of it to AdaMuon or to the
    auxiliary AdamW; otherwise ``predicate`` decides per parameter. The AdamW part keeps the group's ``lr``, as
    adv_optm's auxiliary Adam reads ``group['lr']``."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        choice = group.get("use_muon")
        if choice is None and group.get("optim_type") is not None:
            choice = group["optim_type"] == "muon"
        group = {k: v for k, v in group.items() if k not in ("use_muon", "optim_type")}
        if choice is None:
            lr = {"lr": group["lr"]} if "lr" in group else {}
            out.extend(split_groups([group], predicate, {**aux, **lr}))
        elif choice:
            out.append(group)
        else:
            out.append({**{k: group[k] for k in ("params", "lr") if k in group}, "algorithm": "adamw", **aux})
    return out


class AdaMuon(DistributedOptimizer):
    """adv_optm's AdaMuon_adv (https://arxiv.org/abs/2507.11005), its keywords and defaults: the sign of the
    Nesterov momentum orthogonalized on owner ranks, an elementwise second moment of the result, and an RMS of
    ``0.2 lr``. Parameters that ``adam_predicate`` picks (adv_optm's own rule by default; a group's ``use_muon`` or
    ``optim_type`` overrides it) run AdamW with ``adam_betas``, ``adam_eps``, ``adam_weight_decay`` and the
    group's ``lr``, in torch.optim.AdamW's arithmetic. Low-rank, CANS, spectral normalization, centered decay and
    OrthoGrad are refused while distopt does not run them. ``stochastic_rounding`` (on by default, as in
    adv_optm) applies to groups of bfloat16/float16 parameters; ``state_precision`` (or ``nnmf_factor``) compacts
    the shards' momentum and the owner's second moment, ``factored_2nd`` factors the latter alone (see
    :mod:`distopt.precision`)."""

    def __init__(self, params, lr=1e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0, cautious_wd=False,
                 nesterov=True, nesterov_coef=None, rms_rescaling=True, ns_steps=5, ns_eps=1e-7,
                 ns_coeffs=NS_COEFFICIENTS, stochastic_rounding=True, use_atan2=False, normuon_variant=False,
                 kappa_p=1.0, auto_projection=True, approx_mars=False, mars_gamma=0.025, adam_betas=(0.9, 0.99),
                 adam_eps=1e-8, adam_weight_decay=0.0, *, adam_predicate=is_unsuitable_for_muon,
                 orthogonalization="newton_schulz", owner_dtype="bfloat16", process_group=None,
                 bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None, **kwargs):
        for key, off in _ADAMUON_OFF.items():
            if key in kwargs and kwargs.pop(key) != off:
                raise ValueError(f"adamuon: {key} is not supported by distopt yet; leave it at {off!r}")
        if adam_eps is None:
            raise ValueError("adamuon: adam_eps=None (adv_optm's scale-invariant eps) is not supported for the "
                             "AdamW part; give a number")
        groups = _adamuon_groups(params, adam_predicate, {"betas": adam_betas, "eps": adam_eps,
                                                          "weight_decay": adam_weight_decay})
        if kwargs.pop("nnmf_factor", False):  # adv_optm's older name of state_precision="factored"
            kwargs["state_precision"] = "factored"
        groups = _adv_optm_rounding(groups, stochastic_rounding, kwargs)
        super().__init__(groups, "adamuon", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         cautious_wd=cautious_wd, nesterov=nesterov, nesterov_coef=nesterov_coef,
                         rms_rescaling=rms_rescaling, ns_steps=ns_steps, ns_eps=ns_eps, ns_coeffs=ns_coeffs,
                         use_atan2=use_atan2, normuon_variant=normuon_variant, kappa_p=kappa_p,
                         auto_projection=auto_projection, approx_mars=approx_mars, mars_gamma=mars_gamma,
                         orthogonalization=orthogonalization, owner_dtype=owner_dtype, process_group=process_group,
                         bucket_bytes=bucket_bytes, compile=compile, **kwargs)
