"""PSGDLRA (one low-rank preconditioner over a param group) against HeavyBall 3.2.1's PSGDLRA (``multi_tensor=True``,
its default), same gradients, float64 states, its compiler off, and its random draws made equal: distopt's draws
(the initial ``U``, ``V`` and each fit's probe, drawn whole per tensor) are recorded and replayed to HeavyBall's
``torch.randn`` and ``torch.randn_like``.

One difference in HeavyBall is corrected for the comparison: its fit moves the ``d`` it keeps by ``+nablaD·step`` but
the copy of ``d`` that preconditions the same step by ``-nablaD·step`` (``_compilable_d_step``); distopt, like
lixilinx/psgd_torch, preconditions with the ``d`` it keeps. The test wraps HeavyBall's function so that its copy
follows its kept ``d`` (calling the original with ``delayed=True``, then copying); ``delayed=True`` runs need no
wrapping, and an unwrapped default run is shown to differ.

Tolerance: 1e-6 of the distance moved after 7 steps (measured: at most 3e-7). HeavyBall runs the fit and the
preconditioning in float32 whatever the states' dtype (its ``min_dtype`` returns float32 for float64 inputs) and
its momentum weight as a float32 tensor; distopt in the states' dtype (float64 here). The group's sums add the
tensors' partial sums in another order than HeavyBall's one flattened product.
"""

from __future__ import annotations

import pytest
import torch

import distopt
from distopt.algos import psgd_lra_sums
from tests.same_grads import run_on_random_grads, worst

heavyball = pytest.importorskip("heavyball", reason="the test extra heavyball==3.2.1 is required")
heavyball.utils.compile_mode = None

SHAPES = ((6, 5), (7,), (4, 4), (3, 2, 2), (5, 3), (1, 8))
STEPS = 7
LR = 2.0**-7


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _runs(monkeypatch, hp: dict, fix_heavyball: bool = True, steps: int = STEPS):
    recorded = []
    draw = psgd_lra_sums.draw_whole

    def recording(seed, position, step, what, shape, dtype, device):
        out = draw(seed, position, step, what, shape, dtype, device)
        recorded.append(((step, position, what != "U"), _squeezed(shape), out.clone()))
        return out

    monkeypatch.setattr(psgd_lra_sums, "draw_whole", recording)
    start, mine, opt = run_on_random_grads(lambda ps: distopt.PSGDLRA(ps, lr=LR, **hp), SHAPES, steps)
    # HeavyBall draws U then V for each tensor at its first step, then each step's probes tensor by tensor.
    queues: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for _, shape, x in sorted(recorded, key=lambda r: r[0]):
        queues.setdefault(shape, []).append(x)
    randn, randn_like = torch.randn, torch.randn_like

    def take(shape):
        queue = queues.get(_squeezed(shape))
        assert queue, f"HeavyBall drew for shape {tuple(shape)} where distopt did not"
        return queue.pop(0).reshape(shape)

    def replay_randn(*size, **kwargs):
        if "generator" in kwargs or kwargs.get("requires_grad"):  # the test's own draws
            return randn(*size, **kwargs)
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        return take(shape).to(kwargs.get("dtype") or torch.get_default_dtype())

    monkeypatch.setattr(torch, "randn", replay_randn)
    monkeypatch.setattr(torch, "randn_like", lambda g, *a, **k: take(tuple(g.shape)).to(g.dtype))
    if fix_heavyball:
        d_step = heavyball.utils._compilable_d_step

        def kept_d_preconditions(d, d_orig, *args):
            *rest, delayed = args
            d_step(d, d_orig, *rest, True)  # moves the kept d only
            if not delayed:
                d.copy_(heavyball.utils.flatten(d_orig).to(d.dtype))

        monkeypatch.setattr(heavyball.utils, "_compilable_d_step", kept_d_preconditions)
    _, reference, _ = run_on_random_grads(
        lambda ps: heavyball.PSGDLRA(ps, lr=LR, storage_dtype="float64", q_dtype="float64", **hp), SHAPES, steps)
    monkeypatch.undo()
    assert not any(queues.values()), "distopt drew more than HeavyBall"
    return worst(mine, reference), worst(mine, start), opt


CASES = {
    "defaults": {},
    "delayed": dict(delayed=True),
    "no momentum": dict(exp_avg_input=False),
    "rank": dict(rank=3, exp_avg_input=False),
    "probability": dict(preconditioner_update_probability=0.5),
    "momentum not fitted": dict(momentum_into_precond_update=False),
    "no update clipping+decay": dict(update_clipping=None, weight_decay=0.1),
    "mars+caution": dict(mars=True, caution=True),
    "fit settings": dict(precond_init_scale=0.3, precond_lr=0.5, eps=1e-6),
    "init scale": dict(precond_init_scale_scale=2.0, precond_init_scale_power=0.25, beta=0.5),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", CASES)
def test_equals_heavyball(monkeypatch, case):
    difference, moved, opt = _runs(monkeypatch, CASES[case])
    assert difference <= 1e-6 * moved, (difference, moved)
    assert moved > 1e-2
    assert opt.plan is None or not opt.plan.matrices  # elementwise state on the shards: no owner


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_heavyballs_delayed_run_needs_no_correction(monkeypatch):
    difference, moved, _ = _runs(monkeypatch, dict(delayed=True), fix_heavyball=False)
    assert difference <= 1e-6 * moved, (difference, moved)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_heavyballs_d_copy_sign_is_what_the_correction_removes(monkeypatch):
    """Unwrapped, HeavyBall's default run differs by percents: the correction above is what closes the gap."""
    difference, moved, _ = _runs(monkeypatch, {}, fix_heavyball=False)
    assert difference > 1e-2 * moved, (difference, moved)


def test_the_rank_defaults_to_log2_of_the_group_size():
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]  # 88 elements: round(log2(88)) = 6
    opt = distopt.PSGDLRA(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[params[0]]
    assert {f"U.{k}" for k in range(6)} <= set(state) and "U.6" not in state
    assert all(state[f"V.{k}"].shape == params[0].shape for k in range(6))


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "rank"),
    (dict(q_dtype="bfloat16"), "q_dtype"),
    (dict(beta=1.5), "beta"),
    (dict(preconditioner_update_probability=0.0), "preconditioner_update_probability"),
    (dict(storage_dtype="bfloat16"), "storage_dtype"),
    (dict(state_precision="int8"), "state_precision"),
    (dict(factored_2nd=True), "factored_2nd"),
    (dict(multi_tensor=False), "multi_tensor"),
    (dict(palm=True), "palm"),
])
def test_bad_input_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distopt.PSGDLRA([torch.nn.Parameter(torch.randn(4, 3))], **kwargs)
