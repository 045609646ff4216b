"""HeavyBall 3.2.1's SOAP family against HeavyBall itself: same gradients, float64 (HeavyBall's states in float64 too,
``storage_dtype="float64"``; its compiler off), every variant at its defaults and under the options and flags that
change its maths.

Tolerance: the parameters differ by at most 1e-6 of the distance moved after 7 steps (measured: at most 2.3e-7 of it,
SOAPAdEMAMix). HeavyBall contracts the basis changes in one three-operand einsum where distopt multiplies the two
bases first, and computes its scalars as 0-d tensors: last-bit differences, carried through eigenbases. Variants
differ from one another by 10-60% of the distance moved (checked below), so the tolerance tells them apart. KLShampoo
adds Gaussian noise of about ``1e-9 + 1.2e-7 |g|`` to the gradient it accumulates (``dampening``): HeavyBall draws it
from torch's global generator, distopt from one seeded by the parameter's name and step (so that the result does not
depend on the owner), so the two runs see different noise; at the default dampening this is within the same
tolerance (measured: 1.9e-7 of the distance moved).

A non-square matrix's first statistic is rank-deficient and its eigenbasis there is decided by rounding: the
comparison is meaningful only because the gradient reaches both libraries bit-identical (MARS's correction included).
"""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import run_on_random_grads, step_on, worst

heavyball = pytest.importorskip("heavyball", reason="the test extra heavyball==3.2.1 is required")
heavyball.utils.compile_mode = None

#: tall, wide and square matrices (two of one shape: a batch on the owner), a vector and a 3-D tensor (merged).
SHAPES = ((6, 5), (7,), (4, 4), (3, 2, 2), (5, 3), (6, 5))
STEPS = 7
VARIANTS = ("SOAPNAdam", "SOAPAdEMAMix", "SOLP", "KLSOAP", "KLShampoo", "HeavySOAP", "HeavySOAPNAdam",
            "HeavySOAPAdEMAMix", "HeavySOLP", "HeavyKLSOAP", "HeavyKLShampoo")


def _runs(ours: str, theirs: str, hp: dict, theirs_hp: dict | None = None):
    start, mine, opt = run_on_random_grads(lambda ps: getattr(distopt, ours)(ps, **hp), SHAPES, STEPS)
    _, reference, _ = run_on_random_grads(
        lambda ps: getattr(heavyball, theirs)(ps, storage_dtype="float64", **(hp if theirs_hp is None else theirs_hp)),
        SHAPES, STEPS)
    return worst(mine, reference), worst(mine, start), opt


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", VARIANTS)
def test_equals_heavyball(name):
    difference, moved, opt = _runs(name, name, dict(lr=0.01))
    assert difference <= 1e-6 * moved, (difference, moved)
    assert moved > 1e-2
    assert len(opt.plan.matrices if opt.plan else []) == len(SHAPES)  # every tensor on an owner


OPTIONS = {
    "HeavySOAP/precondition_frequency=3": ("HeavySOAP", dict(precondition_frequency=3)),
    "SOLP/max_precond_dim=5": ("SOLP", dict(max_precond_dim=5)),  # the 6-row factors go unrotated
    "KLSOAP/merge_dims=False": ("KLSOAP", dict(merge_dims=False)),
    "HeavySOAP/precondition_1d": ("HeavySOAP", dict(precondition_1d=True)),
    "SOLP/warmup_steps": ("SOLP", dict(warmup_steps=2)),
    "KLSOAP/caution": ("KLSOAP", dict(caution=True)),
    "HeavySOAP/mars": ("HeavySOAP", dict(mars=True)),
    "HeavyKLSOAP/mars": ("HeavyKLSOAP", dict(mars=True)),
    "SOLP/cautious_weight_decay": ("SOLP", dict(cautious_weight_decay=True, weight_decay=0.5)),
    "KLSOAP/betas+shampoo_beta": ("KLSOAP", dict(shampoo_beta=0.5, betas=(0.8, 0.9))),
    "SOAPNAdam/momentum_decay": ("SOAPNAdam", dict(momentum_decay=0.1)),
    "SOAPAdEMAMix/warmups": ("SOAPAdEMAMix", dict(alpha_warmup=4, beta3_warmup=5, alpha=5.0)),
    "KLShampoo/no dampening": ("KLShampoo", dict(dampening=0.0, init_factor=0.5)),
    "HeavyKLShampoo/gradient_clipping": ("HeavyKLShampoo", dict(gradient_clipping="l2_clip_", dampening=0.0)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", OPTIONS)
def test_options_and_flags_equal_heavyball(case):
    name, hp = OPTIONS[case]
    difference, moved, _ = _runs(name, name, dict(lr=0.01, **hp))
    assert difference <= 1e-6 * moved, (difference, moved)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ours,theirs", [("HeavySOAP", "SOAP"), ("KLSOAP", "SOAP"), ("KLSOAP", "HeavyKLSOAP"),
                                         ("SOLP", "SOAP"), ("SOAPNAdam", "SOAP")])
def test_the_comparison_tells_the_variants_apart(ours, theirs):
    hp = dict(lr=0.01, betas=(0.9, 0.95))
    difference, moved, _ = _runs(ours, theirs, hp)
    assert difference > 0.05 * moved, (difference, moved)


def test_kl_shampoos_pseudo_inverse_acts_where_eigenvalues_vanish():
    """Without the identity seed the first statistics are rank-deficient: the Heavy variant's pseudo-inverse then
    weighs those directions 0 where KLShampoo's clamp weighs them 1/eps."""
    hp = dict(lr=0.01, dampening=0.0, init_factor=0.0)
    _, plain, _ = run_on_random_grads(lambda ps: distopt.KLShampoo(ps, **hp), SHAPES, 4)
    _, heavy, _ = run_on_random_grads(lambda ps: distopt.HeavyKLShampoo(ps, **hp), SHAPES, 4)
    assert worst(plain, heavy) > 1e-3


def test_a_batch_on_the_owner_equals_each_matrix_alone():
    """Same-shape matrices are stacked for one eigendecomposition, QR and projection per shape; the result of each
    is that of the matrix stepped alone (float64: to 1e-12 of the distance moved)."""
    torch.manual_seed(3)
    inits = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    grads = [[torch.randn(5, 4, dtype=torch.float64) for _ in inits] for _ in range(5)]
    together = step_on(lambda ps: distopt.HeavySOAPAdEMAMix(ps, lr=0.01), inits, grads)
    for i, x in enumerate(inits):
        alone = step_on(lambda ps: distopt.HeavySOAPAdEMAMix(ps, lr=0.01), [x], [[g[i]] for g in grads])[0]
        assert (together[i] - alone).abs().max() <= 1e-12 * (alone - x).abs().max()


def test_first_step_only_builds_the_statistics_and_state_lives_on_the_owner():
    param = torch.nn.Parameter(torch.randn(5, 3))
    before = param.detach().clone()
    opt = distopt.SOAPAdEMAMix([param], lr=0.1, weight_decay=0.5)
    param.grad = torch.randn(5, 3)
    opt.step()
    assert torch.equal(param.detach(), before)  # no update and no decay
    state = opt.state[param]
    assert {"owner.exp_avg", "owner.exp_avg_slow", "owner.exp_avg_sq", "owner.GG.0", "owner.Q.0", "owner.GG.1",
            "owner.Q.1"} <= set(state)
    q = state["owner.Q.0"]
    assert torch.allclose(q.T @ q, torch.eye(5), atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(split=True), "split"),
    (dict(use_precond_schedule=True), "use_precond_schedule"),
    (dict(precond_grad_accum=True), "precond_grad_accum"),
    (dict(shampoo_beta=1.0), "shampoo_beta"),
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(betas=(0.9, 0.95)), "betas"),  # AdEMAMix takes three
    (dict(palm=True), "palm"),
])
def test_bad_input_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distopt.SOAPAdEMAMix([torch.nn.Parameter(torch.randn(4, 3))], **kwargs)


def test_heavyballs_implementation_switches_are_accepted():
    opt = distopt.KLShampoo([torch.nn.Parameter(torch.randn(4, 3))], multi_tensor=False, compile_step=True)
    assert opt.param_groups[0]["algorithm"] == "klshampoo"


def test_a_matrix_that_joins_late_is_stepped_at_its_own_count():
    """Same-shape matrices of one group batch on their owner; one whose gradients start later (an unused layer)
    has fewer steps behind it, and its first step must still only build its statistics, as when stepped alone."""
    torch.manual_seed(4)
    inits = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    grads = [[torch.randn(5, 4, dtype=torch.float64) for _ in inits] for _ in range(5)]
    params = [torch.nn.Parameter(x.clone()) for x in inits]
    opt = distopt.KLSOAP(params, lr=0.01)
    for step, gs in enumerate(grads):
        params[0].grad = gs[0].clone()
        params[1].grad = gs[1].clone() if step >= 2 else None
        opt.step()
    alone = step_on(lambda ps: distopt.KLSOAP(ps, lr=0.01), [inits[1]], [[g[1]] for g in grads[2:]])[0]
    assert (params[1].detach() - alone).abs().max() <= 1e-12 * (alone - inits[1]).abs().max()
