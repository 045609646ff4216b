"""Shampoo with Adam grafting against facebookresearch/optimizers' Distributed Shampoo itself (a checkout given by
``DISTOPT_SHAMPOO_PATH``), on one process, same gradients, float64 (its factor and inverse-factor matrices in
float64 too), the configuration of its README's Adam example: ``AdamPreconditionerConfig`` grafting, ``epsilon``
1e-12, and its blocking of merged dimensions by ``max_preconditioner_dim``.

Distributed Shampoo evaluates its bias corrections as ``torch.tensor(1.0) - beta2 ** step``, in the default dtype:
the reference runs with float64 as the default dtype, so that its scalars are float64 like everything else (in
float32 they alone move the result by 1e-5 of the distance moved).

Tolerance: 1e-9 of the distance moved after 7 steps (measured at most 2e-11 at the defaults, 5e-11 in all). A block whose factors
are rank-deficient (a merged 1-D block of 30 elements after a few steps) has its null space lifted to ``epsilon``,
and its inverse root ``epsilon^(-1/2) = 1e6`` amplifies rounding: such cases are checked at ``epsilon=1e-6``
(measured 5e-11) where L2 decay puts the parameters in the statistics.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import distopt
from tests.authors import load_distributed_shampoo
from tests.same_grads import run_on_random_grads, step_on, worst

#: matrices that stay 2-D at max_preconditioner_dim=8, ones merged to vectors, a 3-D tensor, one cut into blocks.
SHAPES = ((6, 5), (7,), (4, 4), (3, 2, 2), (5, 3), (1, 8), (13, 3))
STEPS = 7
LR = 2.0**-7
BASE = dict(betas=(0.9, 0.999), epsilon=1e-12, weight_decay=0.0, max_preconditioner_dim=8, precondition_frequency=2)


def _reference(hp: dict):
    ds = load_distributed_shampoo()
    mine = {**BASE, **hp}
    shared = {k: mine[k] for k in ("betas", "epsilon", "weight_decay", "max_preconditioner_dim",
                                   "precondition_frequency", "use_bias_correction") if k in mine}
    graft = (None if mine.get("grafting", "adam") is None else
             ds.AdamPreconditionerConfig(beta2=mine.get("grafting_beta2", 0.999),
                                         epsilon=mine.get("grafting_epsilon", 1e-8)))
    decay = {"decoupled": ds.WeightDecayType.DECOUPLED, "l2": ds.WeightDecayType.L2}[
        mine.get("weight_decay_type", "decoupled")]
    config = ds.RootInvShampooPreconditionerConfig(factor_matrix_dtype=torch.float64,
                                                   inv_factor_matrix_dtype=torch.float64)
    return lambda ps: ds.DistributedShampoo(ps, lr=LR, **shared, beta3=mine.get("beta3") or -1.0,
                                            start_preconditioning_step=mine.get("start_preconditioning_step") or -1,
                                            weight_decay_type=decay, grafting_config=graft,
                                            preconditioner_config=config)


def _runs(hp: dict):
    make = _reference(hp)
    start, mine, opt = run_on_random_grads(lambda ps: distopt.Shampoo(ps, lr=LR, **{**BASE, **hp}), SHAPES, STEPS)
    default = torch.get_default_dtype()
    logging.disable(logging.WARNING)  # its per-block instantiation messages
    torch.set_default_dtype(torch.float64)
    try:
        _, reference, _ = run_on_random_grads(make, SHAPES, STEPS)
    finally:
        torch.set_default_dtype(default)
        logging.disable(logging.NOTSET)
    return worst(mine, reference), worst(mine, start), opt


CASES = {
    "defaults": {},
    "all merged to vectors": dict(max_preconditioner_dim=1024),
    "blocks of 3": dict(max_preconditioner_dim=3),
    "no grafting": dict(grafting=None),
    "no bias correction": dict(use_bias_correction=False),
    "decoupled decay": dict(weight_decay=0.1),
    "l2 decay": dict(weight_decay=0.1, weight_decay_type="l2", epsilon=1e-6),
    "later start": dict(start_preconditioning_step=4),
    "no first moment, sums of outer products": dict(betas=(0.0, 1.0)),
    "beta3": dict(beta3=0.5),
    "grafting settings": dict(grafting_beta2=0.9, grafting_epsilon=1e-3, epsilon=1e-6, precondition_frequency=3),
}


@pytest.mark.parametrize("case", CASES)
def test_equals_distributed_shampoo(case):
    difference, moved, opt = _runs(CASES[case])
    assert difference <= 1e-9 * moved, (difference, moved)
    assert moved > 1e-2
    assert len(opt.plan.matrices if opt.plan else []) == len(SHAPES)


def test_the_comparison_tells_grafting_and_blocking_apart():
    for theirs in (dict(grafting=None), dict(max_preconditioner_dim=1024)):
        make = _reference(theirs)
        _, mine, _ = run_on_random_grads(lambda ps: distopt.Shampoo(ps, lr=LR, **BASE), SHAPES, STEPS)
        torch.set_default_dtype(torch.float64)
        try:
            start, reference, _ = run_on_random_grads(make, SHAPES, STEPS)
        finally:
            torch.set_default_dtype(torch.float32)
        assert worst(mine, reference) > 0.05 * worst(reference, start)


def test_merged_dimensions_and_blocks_follow_distributed_shampoo():
    from distopt.algos.shampoo import blocks, merged_shape

    assert merged_shape((32, 3, 64, 64), 8192) == (96, 4096)
    assert merged_shape((1, 2, 5, 1), 10) == (10,)
    assert merged_shape((1, 2, 5, 1), 1) == (2, 5)
    assert merged_shape((1, 1), 8) == (1,)
    assert [tuple((s.start, s.stop) for s in b) for b in blocks((5, 3), 2)] == [
        ((0, 2), (0, 2)), ((0, 2), (2, 3)), ((2, 4), (0, 2)), ((2, 4), (2, 3)), ((4, 5), (0, 2)), ((4, 5), (2, 3))]
    assert blocks((5, 3), math.inf) == [(slice(0, 5), slice(0, 3))]


def test_a_batch_on_the_owner_equals_each_matrix_alone():
    torch.manual_seed(3)
    inits = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    grads = [[torch.randn(5, 4, dtype=torch.float64) for _ in inits] for _ in range(6)]
    make = lambda ps: distopt.Shampoo(ps, lr=LR, max_preconditioner_dim=4, precondition_frequency=2)  # noqa: E731
    together = step_on(make, inits, grads)
    for i, x in enumerate(inits):
        alone = step_on(make, [x], [[g[i]] for g in grads])[0]
        assert (together[i] - alone).abs().max() <= 1e-12 * (alone - x).abs().max()


def test_state_lives_on_the_owner_with_identity_inverses_before_the_first_root():
    param = torch.nn.Parameter(torch.randn(6, 5))
    opt = distopt.Shampoo([param], max_preconditioner_dim=4, precondition_frequency=10)
    param.grad = torch.randn(6, 5)
    opt.step()
    state = opt.state[param]
    assert {"owner.exp_avg", "owner.grafting", "owner.factor.0.0", "owner.inverse.3.1"} <= set(state)
    assert "owner.factor.4.0" not in state  # (6, 5) in blocks of 4: 2 x 2 blocks
    assert torch.equal(state["owner.inverse.0.0"], torch.eye(4))


@pytest.mark.parametrize("kwargs,message", [
    (dict(betas=(0.9, 0.0)), "betas"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(weight_decay_type="independent"), "weight_decay_type"),
    (dict(grafting="rmsprop"), "grafting"),
    (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
    (dict(precondition_frequency=10, start_preconditioning_step=5), "start_preconditioning_step"),
    (dict(grafting_beta2=0.0), "grafting_beta2"),
    (dict(palm=True), "palm"),
])
def test_bad_input_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distopt.Shampoo([torch.nn.Parameter(torch.randn(4, 3))], **kwargs)
