"""SOAP against a loop written from the paper and the reference code, and its recovery from failed eigh."""

from __future__ import annotations

import pytest
import torch

import distopt
from tests import reference

#: float64 against float64: the implementation uses tensordot where the loop uses matmul, and lerp where it uses
#: b*x + (1-b)*y, so the two differ by rounding only; eigenvector signs do not matter (they cancel).
TOLERANCE = {"rtol": 1e-9, "atol": 1e-11}

CONFIGS = [{}, {"lr": 1e-2, "betas": (0.9, 0.99), "precondition_frequency": 2},
           {"shampoo_beta": 0.8, "weight_decay": 0.0, "precondition_frequency": 3, "eps": 1e-6},
           {"normalize_grads": True, "correct_bias": False, "precondition_frequency": 1}]

#: Shapes and the switches that decide their factors, each against the loop written from the authors' code. A
#: statistic of less than full rank (every vector's, and a merged side longer than the other) has no unique
#: eigenbasis: there both sides take the same first basis from the same ``eigh`` input, and no refresh follows
#: (``precondition_frequency`` 100), since a power-iteration refresh would amplify rounding in the null space.
FIXED = {"precondition_frequency": 100}
SHAPES = [
    ((4, 3, 2), {"max_precond_dim": 6, "merge_dims": True, **FIXED}),   # merged to (4, 6): two factors
    ((8, 8), {"merge_dims": True, **FIXED}),                            # merged to (64,): one factor, not Adam
    ((2, 2, 3), {"max_precond_dim": 12, "merge_dims": True, **FIXED}),  # merged to (12,): one factor
    ((4, 3, 2), {"max_precond_dim": 6, "merge_dims": False}),           # three factors, all full rank
    ((6, 40), {"max_precond_dim": 10}),                                 # the 40 side unrotated
    ((7,), {"precondition_1d": True, **FIXED}),
    ((7,), {}),                                                         # no factor: Adam on the shard
    ((30, 20), {"max_precond_dim": 10}),                                # no factor either
    ((9,), {"precondition_1d": True, "max_precond_dim": 5}),            # too long: no factor
]


def _run(p0, grads, shape=None, **kwargs):
    p = p0.clone().reshape(shape or p0.shape).requires_grad_()
    opt = distopt.DistributedOptimizer([p], algorithm="soap", **kwargs)
    out = []
    for g in grads:
        p.grad = g.reshape(p.shape).clone()
        opt.step()
        out.append(p.detach().clone())
    return out, opt, p


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("shape", [(12, 8), (5, 9)])
def test_matches_reference_loop(kwargs, shape):
    p0 = torch.randn(shape, dtype=torch.float64)
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(12)]
    expected = reference.soap(p0.clone(), grads, **kwargs)
    got, _, _ = _run(p0, grads, **kwargs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOLERANCE)


@pytest.mark.parametrize("shape,kwargs", SHAPES, ids=[f"{s}-{k}" for s, k in SHAPES])
def test_factors_follow_the_authors_rule(shape, kwargs):
    p0 = torch.randn(shape, dtype=torch.float64)
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(8)]
    kwargs = {"precondition_frequency": 2, "lr": 1e-2, **kwargs}
    got, opt, p = _run(p0, grads, **kwargs)
    expected = reference.soap(p0.clone(), grads, **kwargs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOLERANCE)
    factors = sorted(tuple(v.shape) for k, v in opt.state[p].items() if k.startswith("owner.GG."))
    assert opt._on_owner(p) == bool(factors)
    if not factors:  # elementwise: the second moment sits beside exp_avg, and nothing goes to an owner
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert opt.plan.matrices == ()


def test_first_statistics_are_an_average_from_zero():
    """After the first step the authors' GG holds (1 - shampoo_beta) G G^T, not G G^T."""
    p = torch.randn(5, 4, requires_grad=True)
    g = torch.randn(5, 4)
    opt = distopt.SOAP([p], shampoo_beta=0.9)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(opt.state[p]["owner.GG.0"], 0.1 * g @ g.T)
    torch.testing.assert_close(opt.state[p]["owner.GG.1"], 0.1 * g.T @ g)


def test_scalar_runs_as_adam_on_its_shard():
    p0 = torch.tensor(0.5, dtype=torch.float64)
    grads = [torch.randn((), dtype=torch.float64) for _ in range(5)]
    got, opt, p = _run(p0, grads, lr=1e-2)
    expected = reference.soap(p0.clone(), grads, lr=1e-2)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOLERANCE)


def test_failed_eigh_recovers_in_float64_and_writes_no_nan(monkeypatch):
    real_eigh = torch.linalg.eigh

    def failing_in_float32(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise RuntimeError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    p = torch.randn(6, 4, requires_grad=True)
    opt = distopt.SOAP([p], lr=1e-2)
    with pytest.warns(RuntimeWarning, match="recovered in float64"):
        for _ in range(4):
            p.grad = torch.randn(6, 4)
            opt.step()
    assert torch.isfinite(p).all()


def test_first_step_only_feeds_the_preconditioner():
    p = torch.randn(6, 4, requires_grad=True)
    before = p.detach().clone()
    opt = distopt.SOAP([p], weight_decay=0.5)
    p.grad = torch.randn(6, 4)
    opt.step()
    assert torch.equal(p.detach(), before)
    assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0


@pytest.mark.parametrize("kwargs,message", [
    ({"betas": (0.9, 1.0)}, r"betas\[1\]=1.0"), ({"shampoo_beta": 1.5}, "shampoo_beta=1.5"),
    ({"precondition_frequency": 0}, "precondition_frequency=0"), ({"max_precond_dim": -1}, "max_precond_dim=-1"),
    ({"merge_dims": 1}, "merge_dims must be a bool"),
])
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distopt.SOAP([torch.zeros(3, 3, requires_grad=True)], **kwargs)


def test_state_dict_round_trip_continues_bitwise():
    p0 = torch.randn(6, 5)
    grads = [torch.randn(6, 5) for _ in range(10)]
    straight, _, _ = _run(p0, grads, precondition_frequency=2, lr=1e-2)
    p = p0.clone().requires_grad_()
    opt = distopt.SOAP([p], precondition_frequency=2, lr=1e-2)
    for g in grads[:5]:
        p.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    resumed = distopt.SOAP([p], precondition_frequency=2, lr=1e-2)
    resumed.load_state_dict(saved)
    for g in grads[5:]:
        p.grad = g.clone()
        resumed.step()
    assert torch.equal(p.detach(), straight[-1])


def test_trains_200_steps_without_nan():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = distopt.SOAP(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(123)
    x, w = torch.randn(256, 16, generator=gen), torch.randn(16, 1, generator=gen)
    y = torch.sin(x @ w)
    start = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(200):
        idx = torch.randint(0, 256, (32,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = torch.nn.functional.mse_loss(model(x), y).item()
    assert final < 0.5 * start, (start, final)


def test_a_vector_saved_with_its_second_moment_on_an_owner_still_loads():
    """Earlier versions kept a factor-less vector's exp_avg_sq as owner state (owner.exp_avg_sq)."""
    p0 = torch.randn(7)
    grads = [torch.randn(7) for _ in range(6)]
    straight, _, _ = _run(p0, grads, lr=1e-2)
    p = p0.clone().requires_grad_()
    opt = distopt.SOAP([p], lr=1e-2)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    saved["state"][0]["owner.exp_avg_sq"] = saved["state"][0].pop("exp_avg_sq")
    resumed = distopt.SOAP([p], lr=1e-2)
    resumed.load_state_dict(saved)
    for g in grads[3:]:
        p.grad = g.clone()
        resumed.step()
    assert torch.equal(p.detach(), straight[-1])
