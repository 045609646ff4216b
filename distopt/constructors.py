"""Thin constructors: each is a :class:`DistributedOptimizer` whose default algorithm is fixed.

The nine torch.optim look-alikes keep every keyword of their torch.optim namesake, with its default. The
implementation switches of torch.optim (``foreach``, ``fused``, ``capturable``, ``differentiable``) are accepted
so that code written for torch.optim runs unchanged: ``foreach`` only selects between equivalent torch kernels and
is ignored here; ``fused=True`` runs torch's fused kernel where distopt has one (Adam, AdamW, SGD) and raises
elsewhere; the switches that would change semantics (``capturable``, ``differentiable``) raise.

Every constructor also takes the seeds' flags as keywords (``caution=True``, ``mars=True``, ... : see
:mod:`distopt.transforms.flags`), for every group whose algorithm can take them.
"""

from __future__ import annotations

from typing import Any

import torch

from .algos.muon import NS_COEFFICIENTS
from .optimizer import DistributedOptimizer
from .owner import DEFAULT_BUCKET_BYTES
from .routing import is_embedding_or_head, split_groups


def _check_switches(foreach: Any = None, fused: Any = None, capturable: bool = False,
                    differentiable: bool = False, *, fusable: bool = False) -> None:
    """``fusable``: the algorithm has a ``fused`` hyperparameter, so ``fused=True`` is accepted (and passed on)."""
    for key, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{key} must be None or a bool, got {value!r}")
    if foreach and fused:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused and not fusable:
        raise ValueError("fused=True is not supported by this distopt optimizer: only Adam, AdamW and SGD have "
                         "a fused kernel in distopt")
    for key, value in (("capturable", capturable), ("differentiable", differentiable)):
        if value:
            raise ValueError(f"{key}=True is not supported by distopt: its step is not differentiable and not "
                             "CUDA-graph capturable")


class AdamW(DistributedOptimizer):
    """AdamW (https://arxiv.org/abs/1711.05101), the defaults and results of ``torch.optim.AdamW``.

    ``fused=True`` runs torch's fused AdamW kernel once over each param group's local shards (per device and
    dtype): one pass over memory per step, and the results of ``torch.optim.AdamW(..., fused=True)`` bitwise. As in
    torch.optim it is opt-in: the default (None) is torch's single-tensor arithmetic, the results of torch.optim's
    default on CPU. Both keep the same state, so checkpoints load either way.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, **flags):
        _check_switches(foreach, fused, capturable, differentiable, fusable=True)
        super().__init__(params, "adamw", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, fused=fused, **flags)


class Adam(DistributedOptimizer):
    """Adam (https://arxiv.org/abs/1412.6980), the defaults and results of ``torch.optim.Adam``; ``fused`` as in
    :class:`AdamW`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, **flags):
        _check_switches(foreach, fused, capturable, differentiable, fusable=True)
        super().__init__(params, "adam", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, fused=fused, **flags)


class SGD(DistributedOptimizer):
    """SGD with momentum, dampening and Nesterov momentum, the defaults and results of ``torch.optim.SGD``;
    ``fused=True`` runs torch's fused SGD kernel (the results of ``torch.optim.SGD(..., fused=True)``)."""

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, **flags):
        _check_switches(foreach, fused, False, differentiable, fusable=True)
        super().__init__(params, "sgd", lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, fused=fused, **flags)


class NAdam(DistributedOptimizer):
    """NAdam (https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ), defaults and results of ``torch.optim.NAdam``."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, **flags):
        _check_switches(foreach, None, capturable, differentiable)
        super().__init__(params, "nadam", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay,
                         maximize=maximize, **flags)


class RMSprop(DistributedOptimizer):
    """RMSprop, plain or centered, the defaults and results of ``torch.optim.RMSprop``."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, **flags):
        _check_switches(foreach, None, capturable, differentiable)
        super().__init__(params, "rmsprop", lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered, maximize=maximize, **flags)


class RAdam(DistributedOptimizer):
    """RAdam (https://arxiv.org/abs/1908.03265), the defaults and results of ``torch.optim.RAdam``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, decoupled_weight_decay=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, **flags):
        _check_switches(foreach, None, capturable, differentiable)
        super().__init__(params, "radam", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, **flags)


class Adamax(DistributedOptimizer):
    """Adamax (https://arxiv.org/abs/1412.6980, §7.1), the defaults and results of ``torch.optim.Adamax``."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, foreach=None, *,
                 maximize=False, differentiable=False, capturable=False, **flags):
        _check_switches(foreach, None, capturable, differentiable)
        super().__init__(params, "adamax", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         **flags)


class Adagrad(DistributedOptimizer):
    """Adagrad (Duchi et al. 2011), the defaults and results of ``torch.optim.Adagrad`` for dense gradients."""

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, **flags):
        _check_switches(foreach, fused, False, differentiable)
        super().__init__(params, "adagrad", lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize, **flags)


class Adadelta(DistributedOptimizer):
    """Adadelta (https://arxiv.org/abs/1212.5701), the defaults and results of ``torch.optim.Adadelta``."""

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *, capturable=False,
                 maximize=False, differentiable=False, **flags):
        _check_switches(foreach, None, capturable, differentiable)
        super().__init__(params, "adadelta", lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         **flags)


class Adafactor(DistributedOptimizer):
    """Adafactor (https://arxiv.org/abs/1804.04235), the defaults and results of ``torch.optim.Adafactor``; each
    tensor's step runs on its owner (it reads norms of the whole tensor)."""

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
                 foreach=None, maximize=False, **flags):
        _check_switches(foreach)
        super().__init__(params, "adafactor", lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                         weight_decay=weight_decay, maximize=maximize, **flags)


class Lion(DistributedOptimizer):
    """Lion, sign momentum (Chen et al. 2023, https://arxiv.org/abs/2302.06675); with ``kappa_p`` or
    ``auto_kappa_p``, adv_optm's Lion-k (https://arxiv.org/abs/2310.05898), whose norm is over each whole tensor."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, kappa_p=1.0,
                 auto_kappa_p=False, **flags):
        super().__init__(params, "lion", lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                         kappa_p=kappa_p, auto_kappa_p=auto_kappa_p, **flags)


class LaProp(DistributedOptimizer):
    """LaProp, momentum after normalisation (Ziyin et al. 2020, https://arxiv.org/abs/2002.04839)."""

    def __init__(self, params, lr=4e-4, betas=(0.8, 0.99), eps=1e-15, weight_decay=0.0, *, maximize=False, **flags):
        super().__init__(params, "laprop", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         maximize=maximize, **flags)


class ADOPT(DistributedOptimizer):
    """ADOPT, Adam converging for any beta2 (Taniguchi et al. 2024, https://arxiv.org/abs/2411.02853)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decouple=False,
                 clip=True, *, maximize=False, **flags):
        super().__init__(params, "adopt", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decouple=decouple, clip=clip, maximize=maximize, **flags)


class AdEMAMix(DistributedOptimizer):
    """AdEMAMix, a mixture of two gradient EMAs (Pagliardini et al. 2024, https://arxiv.org/abs/2409.03137)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None,
                 alpha_warmup=None, eps=1e-8, weight_decay=0.0, *, maximize=False, **flags):
        super().__init__(params, "ademamix", lr=lr, betas=betas, alpha=alpha, beta3_warmup=beta3_warmup,
                         alpha_warmup=alpha_warmup, eps=eps, weight_decay=weight_decay, maximize=maximize, **flags)


class Muon(DistributedOptimizer):
    """Muon on owner ranks, with the hyperparameters and defaults of ``torch.optim.Muon``
    (https://kellerjordan.github.io/posts/muon/), and AdamW for the parameters Muon should not take.

    ``adamw_predicate(name, param)`` picks the parameters that go to AdamW (with the ``adamw_*`` hyperparameters);
    the default, :func:`distopt.routing.is_embedding_or_head`, takes every parameter with fewer than two dimensions
    and, by name, embeddings and output heads. Pass ``model.named_parameters()`` so that names are known. Groups that
    set ``"algorithm"`` themselves are left alone. ``owner_dtype`` is the dtype of the owners' Newton-Schulz maths
    (bfloat16 as in torch.optim.Muon; float32 where bfloat16 matmuls are slow). ``orthogonalization``:
    ``"newton_schulz"`` (torch.optim.Muon's) or ``"polar_express"`` (https://arxiv.org/abs/2505.16932, dion's
    default; ``ns_coefficients`` and ``ns_steps`` then do not apply).
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 owner_dtype=torch.bfloat16, orthogonalization="newton_schulz", adamw_lr=1e-3,
                 adamw_betas=(0.9, 0.999), adamw_eps=1e-8, adamw_weight_decay=1e-2,
                 adamw_predicate=is_embedding_or_head, process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES,
                 compile=None, **flags):
        elementwise = {"lr": adamw_lr, "betas": adamw_betas, "eps": adamw_eps, "weight_decay": adamw_weight_decay}
        super().__init__(split_groups(params, adamw_predicate, elementwise), "muon", lr=lr,
                         weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                         owner_dtype=owner_dtype, orthogonalization=orthogonalization, process_group=process_group,
                         bucket_bytes=bucket_bytes, compile=compile, **flags)


class SOAP(DistributedOptimizer):
    """SOAP on owner ranks (Vyas et al. 2024, https://arxiv.org/abs/2409.11321), hyperparameters and defaults of
    the authors' reference code. Every parameter runs SOAP; vectors are preconditioned only with
    ``precondition_1d``."""

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1.0, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                 normalize_grads=False, correct_bias=True, *, process_group=None,
                 bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None, **flags):
        super().__init__(params, "soap", lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                         weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                         max_precond_dim=max_precond_dim, merge_dims=merge_dims, precondition_1d=precondition_1d,
                         normalize_grads=normalize_grads, correct_bias=correct_bias, process_group=process_group,
                         bucket_bytes=bucket_bytes, compile=compile, **flags)


class PSGDKron(DistributedOptimizer):
    """PSGD-Kron on owner ranks (Li, https://arxiv.org/abs/1512.04202), hyperparameters and defaults of PyPI
    ``kron-torch`` 0.3.3. ``preconditioner_update_probability=None`` is kron-torch's annealing schedule; random draws
    are seeded by ``seed`` and each parameter's name, so pass ``model.named_parameters()``."""

    def __init__(self, params, lr=3e-4, b1=0.9, weight_decay=0.0, preconditioner_update_probability=None,
                 max_size_triangular=8192, min_ndim_triangular=2, memory_save_mode=None,
                 momentum_into_precond_update=True, precond_lr=0.1, precond_init_scale=1.0, merge_dims=True, *,
                 seed=0, process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None, **flags):
        super().__init__(params, "psgdkron", lr=lr, b1=b1, weight_decay=weight_decay,
                         preconditioner_update_probability=preconditioner_update_probability,
                         max_size_triangular=max_size_triangular, min_ndim_triangular=min_ndim_triangular,
                         memory_save_mode=memory_save_mode, momentum_into_precond_update=momentum_into_precond_update,
                         precond_lr=precond_lr, precond_init_scale=precond_init_scale, merge_dims=merge_dims,
                         seed=seed, process_group=process_group, bucket_bytes=bucket_bytes, compile=compile, **flags)


class Shampoo(DistributedOptimizer):
    """Shampoo with Adam grafting on owner ranks, as facebookresearch/optimizers' Distributed Shampoo runs it with
    ``grafting_config=AdamPreconditionerConfig(beta2=grafting_beta2, epsilon=grafting_epsilon)`` (the configuration its
    README recommends in place of Adam; ``grafting=None`` for none). Its names and the README's values as defaults;
    ``weight_decay_type`` is ``"decoupled"`` or ``"l2"``. See :mod:`distopt.algos.shampoo`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, weight_decay=0.0,
                 weight_decay_type="decoupled", max_preconditioner_dim=8192, precondition_frequency=100,
                 start_preconditioning_step=None, use_bias_correction=True, grafting="adam", grafting_beta2=0.999,
                 grafting_epsilon=1e-8, *, beta3=None, process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES,
                 compile=None, **flags):
        super().__init__(params, "shampoo", lr=lr, betas=betas, beta3=beta3, epsilon=epsilon,
                         weight_decay=weight_decay, weight_decay_type=weight_decay_type,
                         max_preconditioner_dim=max_preconditioner_dim, precondition_frequency=precondition_frequency,
                         start_preconditioning_step=start_preconditioning_step,
                         use_bias_correction=use_bias_correction, grafting=grafting, grafting_beta2=grafting_beta2,
                         grafting_epsilon=grafting_epsilon, process_group=process_group, bucket_bytes=bucket_bytes,
                         compile=compile, **flags)


class _HeavyBallChain(DistributedOptimizer):
    """HeavyBall 3.2.1's optimizers that are chains of distopt's parts, with HeavyBall's keywords and defaults."""

    chain = ""

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, *, process_group=None,
                 bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None, **flags):
        super().__init__(params, self.chain, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         process_group=process_group, bucket_bytes=bucket_bytes, compile=compile, **flags)


class MuonLaProp(_HeavyBallChain):
    """HeavyBall's MuonLaProp: LaProp's momentum, orthogonalized on owner ranks (HeavyBall's five Newton-Schulz
    coefficient triples, ``ns_coefficients``; the maths in ``owner_dtype``, bfloat16 by default). Tensors with one
    dimension skip the orthogonalization and stay on their shards."""

    chain = "muonlaprop"


class MuonAdamW(_HeavyBallChain):
    """HeavyBall's MuonAdamW: for matrices a Nesterov EMA orthogonalized on owner ranks (``owner_dtype``, bfloat16
    by default), for the other parameters HeavyBall's AdamW on their shards, in one param group."""

    chain = "muonadamw"


class OrthoLaProp(_HeavyBallChain):
    """HeavyBall's OrthoLaProp: OrthoGrad (https://arxiv.org/abs/2501.04697) on the gradient, then LaProp; the
    OrthoGrad sums are over the whole tensor, however it is sharded."""

    chain = "ortholaprop"


class LaPropOrtho(_HeavyBallChain):
    """HeavyBall's LaPropOrtho: LaProp, then OrthoGrad on its update."""

    chain = "laproportho"


class SignLaProp(_HeavyBallChain):
    """HeavyBall's SignLaProp: LaProp, then the sign of its update grafted to the update's norm (a norm over the
    whole tensor, however it is sharded)."""

    chain = "signlaprop"


class UnscaledAdamW(_HeavyBallChain):
    """HeavyBall's UnscaledAdamW: the momentum of ``g / d`` times the current ``d = max(sqrt(v̂), 1e-8)``."""

    chain = "unscaledadamw"


class AdamC(_HeavyBallChain):
    """HeavyBall's AdamC (https://arxiv.org/abs/2506.02285): AdamW whose decay at lr ``lr_t`` is scaled by
    ``lr_t / max_lr`` (``max_lr``: the constructor's ``lr`` unless given)."""

    chain = "adamc"

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, max_lr=None, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         max_lr=lr if max_lr is None else max_lr, **kwargs)


class HyperBallAdamW(_HeavyBallChain):
    """HeavyBall's HyperBallAdamW: an RMSprop-normalized step on the sphere of each matrix's initial norm (norms
    over the whole tensor, summed over its shards); vectors take a plain decoupled step."""

    chain = "hyperballadamw"


class SUDSAdamW(_HeavyBallChain):
    """HeavyBall's SUDSAdamW: Adam in a basis that tracks the gradient's top eigendirection (a Householder
    reflection of each whole flattened tensor, on its owner)."""

    chain = "sudsadamw"

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, precond_lr=1e-2,
                 **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, precond_lr=precond_lr,
                         **kwargs)


class Scion(_HeavyBallChain):
    """HeavyBall's Scion (https://arxiv.org/abs/2502.07529): the momentum's LMO per tensor (Newton-Schulz for
    matrices and convolutions, RMS for vectors, on owners). Like HeavyBall's, its first step replaces each
    parameter by its own initialization, seeded by the parameter's position in its group."""

    chain = "scion"

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, scale=1.0, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scale=scale, **kwargs)


class MSAMLaProp(DistributedOptimizer):
    """HeavyBall's MSAMLaProp (Momentum-SAM, https://arxiv.org/abs/2401.12033, around RMSprop): the parameters hold
    the perturbed point ``z - sam_step_size m / |m|`` in training and ``z`` after ``opt.eval()``. ``r`` and
    ``weight_lr_power`` are in HeavyBall's signature and unused by its maths; ``storage_dtype`` other than float32
    waits for compact states."""

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, sam_step_size=0.1, r=0.0,
                 weight_lr_power=2.0, multi_tensor=True, storage_dtype="float32", compile_step=None, *,
                 process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None, **flags):
        if storage_dtype != "float32":
            raise ValueError(f"msamlaprop: storage_dtype={storage_dtype!r} is not supported (compact states come "
                             "with the low-precision work); leave it 'float32'")
        super().__init__(params, "msamlaprop", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         sam_step_size=sam_step_size, process_group=process_group, bucket_bytes=bucket_bytes,
                         compile=compile, **flags)
