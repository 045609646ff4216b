"""HeavyBall 3.2.1's PSGD family (PSGDPRO, QSGD, LATHER) against HeavyBall itself: same gradients, float64 (HeavyBall's
states and factors in float64 too, its compiler off, ``multi_tensor=False``), with the random draws made equal.

Draws: both fits draw Gaussian noise (PSGDPRO and QSGD to dampen the gradient they fit, LATHER as its probe).
HeavyBall draws from torch's global generator, distopt from one seeded by each matrix's name and step (so that the
result does not depend on the owner): the test records distopt's draws and replays them to HeavyBall through
``torch.randn_like``. HeavyBall's power iteration for ``‖R‖`` in the PRO step first rounds ``R`` stochastically to
bfloat16 (more global draws); the test replaces that rounding by the identity, which is distopt's arithmetic.
``multi_tensor=False``: HeavyBall otherwise fits one initial scale over all same-shape matrices, distopt one per
matrix (see :mod:`distopt.algos.psgd_maths`).

Tolerances (of the distance moved, after 7 steps):
- 1e-12 where no momentum runs through HeavyBall's scalar arithmetic (LATHER, and PSGDPRO/QSGD with
  ``exp_avg_input=False``; measured at most 3e-14);
- 1e-6 for PSGDPRO/QSGD's momentum and for the flags with a schedule (warm-up, MARS): HeavyBall evaluates the
  debiased momentum weight and the warmed-up learning rate as float32 tensors (a step-1 momentum that should equal
  the gradient differs from it by 5.6e-7 on a unit gradient); measured at most 1.5e-7.
The variants differ from one another by far more (checked below).
"""

from __future__ import annotations

import pytest
import torch

import distopt
from distopt.algos import psgd_family
from tests.same_grads import run_on_random_grads, step_on, worst

heavyball = pytest.importorskip("heavyball", reason="the test extra heavyball==3.2.1 is required")
heavyball.utils.compile_mode = None

#: tall, wide and square matrices, a vector, a 3-D tensor and a row (squeezed to a vector): distinct shapes, so that
#: each recorded draw is replayed to the tensor it was drawn for.
SHAPES = ((6, 5), (7,), (4, 4), (3, 2, 2), (5, 3), (1, 8))
STEPS = 7
LR = 2.0**-7  # exact in float32, as HeavyBall holds it after its warm-up arithmetic


def _runs(monkeypatch, ours: str, hp: dict, theirs: str | None = None, steps: int = STEPS):
    """distopt's ``ours`` and HeavyBall's ``theirs`` on the same gradients and draws: (difference, moved, optimizer)."""
    draws: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    draw = psgd_family.draw_noise

    def recording(seed, fqns, step, dims, dtype, device):
        out = draw(seed, fqns, step, dims, dtype, device)
        draws.setdefault(tuple(dims), []).extend((step, x.clone()) for x in out)
        return out

    monkeypatch.setattr(psgd_family, "draw_noise", recording)
    start, mine, opt = run_on_random_grads(lambda ps: getattr(distopt, ours)(ps, lr=LR, **hp), SHAPES, steps)
    queues = {dims: [x for _, x in sorted(found, key=lambda t: t[0])] for dims, found in draws.items()}
    fresh = torch.randn_like

    def replay(g, *args, **kwargs):
        queue = queues.get(tuple(g.shape[1:]))
        if theirs is not None and not queue:  # another algorithm: it may draw where distopt's did not
            return fresh(g, *args, **kwargs)
        assert queue, f"HeavyBall drew for a tensor of shape {tuple(g.shape)} that distopt did not draw for"
        return queue.pop(0).reshape(g.shape).to(g.dtype)

    monkeypatch.setattr(torch, "randn_like", replay)
    monkeypatch.setattr(heavyball.utils, "stochastic_round_",
                        lambda ref, source=None: ref if source is None else source.to(ref.dtype))
    _, reference, _ = run_on_random_grads(
        lambda ps: getattr(heavyball, theirs or ours)(ps, lr=LR, storage_dtype="float64", q_dtype="float64",
                                                       multi_tensor=False, **hp), SHAPES, steps)
    monkeypatch.undo()
    assert all(not q for q in queues.values()) or theirs, "distopt drew more than HeavyBall"
    return worst(mine, reference), worst(mine, start), opt


EXACT = {
    "LATHER": ("LATHER", {}),
    "PSGDPRO/no momentum": ("PSGDPRO", dict(exp_avg_input=False)),
    "QSGD/no momentum": ("QSGD", dict(exp_avg_input=False)),
    "PSGDPRO/one_diag": ("PSGDPRO", dict(exp_avg_input=False, memory_save_mode="one_diag")),
    "QSGD/all_diag": ("QSGD", dict(exp_avg_input=False, memory_save_mode="all_diag")),
    "LATHER/smart_one_diag": ("LATHER", dict(memory_save_mode="smart_one_diag")),
    "PSGDPRO/one_triu": ("PSGDPRO", dict(exp_avg_input=False, memory_save_mode="one_triu")),
    "LATHER/probability": ("LATHER", dict(preconditioner_update_probability=0.5)),
    "PSGDPRO/probability+fit settings": ("PSGDPRO", dict(exp_avg_input=False, preconditioner_update_probability=0.4,
                                                         precond_lr=0.3, lower_bound_beta=0.5, dampening=1e-3,
                                                         precond_update_power_iterations=4)),
    "PSGDPRO/merge_dims": ("PSGDPRO", dict(exp_avg_input=False, merge_dims=True, max_size_triangular=5)),
    "QSGD/init scale": ("QSGD", dict(exp_avg_input=False, precond_init_scale_scale=3.0,
                                     precond_init_scale_power=0.25)),
    "LATHER/fixed init scale+eps": ("LATHER", dict(precond_init_scale=0.5, eps=1e-3)),
    "LATHER/no update clipping+decay": ("LATHER", dict(update_clipping=None, weight_decay=0.1)),
    "PSGDPRO/mars": ("PSGDPRO", dict(exp_avg_input=False, mars=True)),
    "LATHER/min_ndim_triangular": ("LATHER", dict(min_ndim_triangular=3)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", EXACT)
def test_equals_heavyball_to_rounding(monkeypatch, case):
    name, hp = EXACT[case]
    difference, moved, opt = _runs(monkeypatch, name, hp)
    assert difference <= 1e-12 * moved, (difference, moved)
    assert moved > 1e-2
    assert len(opt.plan.matrices if opt.plan else []) == len(SHAPES)  # every tensor on an owner


WITH_FLOAT32_SCALARS = {
    "PSGDPRO": ("PSGDPRO", {}),
    "QSGD": ("QSGD", {}),
    "PSGDPRO/momentum not fitted": ("PSGDPRO", dict(momentum_into_precond_update=False)),
    "QSGD/beta": ("QSGD", dict(beta=0.5)),
    "PSGDPRO/warmup+decay": ("PSGDPRO", dict(warmup_steps=3, weight_decay=0.1, cautious_weight_decay=True)),
    "LATHER/caution+mars": ("LATHER", dict(caution=True, mars=True)),
    "QSGD/update clipping+caution": ("QSGD", dict(update_clipping="trust_region_clip_", caution=True)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", WITH_FLOAT32_SCALARS)
def test_equals_heavyball_with_its_float32_scalars(monkeypatch, case):
    name, hp = WITH_FLOAT32_SCALARS[case]
    difference, moved, _ = _runs(monkeypatch, name, hp)
    assert difference <= 1e-6 * moved, (difference, moved)
    assert moved > 1e-2


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ours,theirs", [("QSGD", "PSGDPRO"), ("PSGDPRO", "PSGDKron"), ("LATHER", "PSGDKron")])
def test_the_comparison_tells_the_variants_apart(monkeypatch, ours, theirs):
    hp = dict(exp_avg_input=False) if ours != "LATHER" else {}
    if theirs == "PSGDKron":
        hp = {}
    difference, moved, _ = _runs(monkeypatch, ours, hp, theirs=theirs)
    assert difference > 0.05 * moved, (difference, moved)


def test_the_draws_matter():
    """LATHER's probe is the fit's other half: two seeds give different results (so equal draws above are needed)."""
    _, a, _ = run_on_random_grads(lambda ps: distopt.LATHER(ps, lr=LR), SHAPES, 4)
    _, b, _ = run_on_random_grads(lambda ps: distopt.LATHER(ps, lr=LR, seed=1), SHAPES, 4)
    assert worst(a, b) > 1e-4


@pytest.mark.parametrize("name", ["PSGDPRO", "QSGD", "LATHER"])
def test_a_batch_on_the_owner_equals_each_matrix_alone(name):
    """Same-shape matrices are stacked for one fit and one application per shape; each gets the result it gets
    alone (its own initial scale, draws and lower bounds), to 1e-12 of the distance moved (float64)."""
    torch.manual_seed(3)
    inits = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    grads = [[torch.randn(5, 4, dtype=torch.float64) * (i + 1) for i, _ in enumerate(inits)] for _ in range(5)]
    names = [f"w{i}" for i in range(3)]
    make = lambda ps: getattr(distopt, name)(list(zip(names, ps)) if len(ps) == 3 else ps, lr=LR)  # noqa: E731
    together = step_on(make, inits, grads)
    for i, x in enumerate(inits):
        alone = step_on(lambda ps: getattr(distopt, name)([(names[i], ps[0])], lr=LR), [x], [[g[i]] for g in grads])
        assert (together[i] - alone[0]).abs().max() <= 1e-12 * (alone[0] - x).abs().max()


def test_lathers_first_step_only_fits_and_state_lives_on_the_owner():
    param = torch.nn.Parameter(torch.randn(5, 3))
    before = param.detach().clone()
    opt = distopt.LATHER([param], lr=0.1, weight_decay=0.5)
    param.grad = torch.randn(5, 3)
    opt.step()
    assert torch.equal(param.detach(), before)  # HeavyBall skips the first update (and its decay)
    state = opt.state[param]
    assert {"owner.Q.0", "owner.Q.1", "owner.basis.0", "owner.basis.1", "owner.exp_avg", "owner.exp_avg_sq",
            "owner.lower_bound"} <= set(state)
    assert torch.equal(state["owner.Q.0"], state["owner.Q.0"].triu())  # the whitening fit keeps factors triangular
    basis = state["owner.basis.0"]
    assert torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-5)


def test_an_all_zero_first_gradient_starts_from_the_identity():
    """HeavyBall raises on an all-zero first gradient; an owner cannot raise mid-step (the other ranks would wait
    forever), so the matrix starts from the identity scale and trains on."""
    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = distopt.PSGDPRO([param], lr=0.1)
    param.grad = torch.zeros(4, 3)
    opt.step()
    param.grad = torch.randn(4, 3)
    opt.step()
    assert torch.isfinite(param).all()
    assert torch.isfinite(opt.state[param]["owner.Q.0"]).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(q_dtype="bfloat16"), "q_dtype"),
    (dict(split=True), "split"),
    (dict(precond_grad_accum=True), "precond_grad_accum"),
    (dict(hessian_approx=True), "hessian_approx"),
    (dict(memory_save_mode="half"), "memory_save_mode"),
    (dict(preconditioner_update_probability=1.5), "preconditioner_update_probability"),
    (dict(betas=(0.9,)), "betas"),
    (dict(lower_bound_beta=1.0), "lower_bound_beta"),
    (dict(precond_init_scale=float("nan")), "precond_init_scale"),
    (dict(caution=True), "caution"),  # the fused PRO step cautions before preconditioning
    (dict(palm=True), "palm"),
])
def test_bad_input_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distopt.PSGDPRO([torch.nn.Parameter(torch.randn(4, 3))], **kwargs)


def test_heavyballs_implementation_switches_are_accepted():
    opt = distopt.LATHER([torch.nn.Parameter(torch.randn(4, 3))], multi_tensor=False, store_triu_as_line=False,
                         compile_step=True)
    assert opt.param_groups[0]["algorithm"] == "lather"
    assert opt.param_groups[0]["update_clipping"] == "trust_region_clip"  # HeavyBall's default for LATHER


def test_a_matrix_that_joins_late_is_stepped_at_its_own_count():
    torch.manual_seed(4)
    inits = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    grads = [[torch.randn(5, 4, dtype=torch.float64) for _ in inits] for _ in range(5)]
    params = [torch.nn.Parameter(x.clone()) for x in inits]
    opt = distopt.LATHER([("a", params[0]), ("b", params[1])], lr=LR)
    for step, gs in enumerate(grads):
        params[0].grad = gs[0].clone()
        params[1].grad = gs[1].clone() if step >= 2 else None
        opt.step()
    alone = step_on(lambda ps: distopt.LATHER([("b", ps[0])], lr=LR), [inits[1]], [[g[1]] for g in grads[2:]])[0]
    assert (params[1].detach() - alone).abs().max() <= 1e-12 * (alone - inits[1]).abs().max()
