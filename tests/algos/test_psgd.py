"""PSGD-Kron against a loop written from the maths with the same random draws, and against kron-torch's training."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import distopt
from distopt.algos.psgd import ProbabilitySchedule, _seed
from tests import reference

#: float64 against float64; mode products and triangular solves versus explicit inverses and matmuls differ by
#: rounding only.
TOLERANCE = {"rtol": 1e-8, "atol": 1e-10}


def _draws(seed, fqn, shape, dtype):
    def draw(step):
        balance = torch.rand((), generator=torch.Generator().manual_seed(_seed(seed, fqn, step))).item()
        probe = torch.Generator().manual_seed(_seed(seed, fqn + "/probe", step))
        return balance, torch.randn(shape, generator=probe, dtype=dtype)
    return draw


CASES = [
    ((6, 4), {}), ((3, 9), {}),
    ((6, 4), {"lr": 1e-2, "b1": 0.5, "weight_decay": 0.1, "precond_lr": 0.3}),
    ((3, 9), {"momentum_into_precond_update": False}),
    ((5, 4, 3), {"merge_dims": False, "weight_decay": 0.1}),        # three triangular factors
    ((5, 4, 3), {}),                                                # merged to (20, 3)
    ((12, 3), {"max_size_triangular": 8}),                          # the long side diagonal
    ((6, 4), {"memory_save_mode": "one_diag"}), ((6, 4), {"memory_save_mode": "all_diag"}),
    ((6, 4), {"memory_save_mode": "smart_one_diag"}), ((4, 4), {"memory_save_mode": "smart_one_diag"}),
    ((2, 3, 4), {"merge_dims": False, "memory_save_mode": "one_diag", "precond_init_scale": 2.0}),
    ((7,), {"weight_decay": 0.1}),                                  # a vector: one diagonal factor, no decay
    ((1, 5), {}),                                                   # a side of 1 is diagonal
    ((6, 4), {"preconditioner_update_probability": 1 / 3}),
    ((5, 4, 3), {"preconditioner_update_probability": 0.5, "memory_save_mode": "one_diag"}),
    ((6, 4), {"preconditioner_update_probability": ProbabilitySchedule(flat_start=3, decay=0.4)}),
]


def _ids(case):
    shape, kwargs = case
    return f"{shape}-" + ",".join(f"{k}={v!r:.12}" for k, v in kwargs.items())


@pytest.mark.parametrize("shape,kwargs", CASES, ids=[_ids(c) for c in CASES])
def test_matches_reference_loop_with_the_same_draws(shape, kwargs):
    kwargs = {"preconditioner_update_probability": 1.0, **kwargs}
    p0 = torch.randn(shape, dtype=torch.float64)
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(12)]
    p = p0.clone().requires_grad_()
    opt = distopt.DistributedOptimizer([("w", p)], algorithm="psgdkron", **kwargs)
    dims = distopt.algos.psgd.merged_shape(shape, kwargs.get("merge_dims", True))
    loop_kwargs = {("probability" if k == "preconditioner_update_probability" else k): v for k, v in kwargs.items()}
    expected = reference.psgd_kron(p0.clone(), grads, _draws(0, "w", dims, torch.float64), **loop_kwargs)
    for g, want in zip(grads, expected):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), want, **TOLERANCE)


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_diagonal_factor_of_a_tall_matrix_builds_no_square_matrix():
    """(6000, 16) with its 6000 side diagonal: no tensor of a step may have 6000 x 6000 elements (36M; it was built
    twice per step). The largest is now the gradient's own size, and the 16 x 16 factor."""
    p = torch.randn(6000, 16, requires_grad=True)
    opt = distopt.PSGDKron([("w", p)], max_size_triangular=1000, preconditioner_update_probability=1.0)
    for _ in range(2):
        p.grad = torch.randn(6000, 16)
        with _LargestTensor() as watch:
            opt.step()
        assert watch.largest <= 6000 * 16, watch.largest
    assert opt.state[p]["owner.Q.0"].shape == (6000,)


def test_cost_counts_a_diagonal_factor_as_elementwise():
    algo = distopt.algos.PSGDKron()
    hp = {**algo.hyperparameters, "max_size_triangular": 1000}
    tall, square = algo.cost((6000, 16), hp), algo.cost((16, 16), hp)
    assert tall == pytest.approx(square * 6000 / 16 * (1 + 16) / 32)


def test_update_probability_schedule_counts_like_kron_torch():
    """With probability 1/3 the factors update on every third step: the loop's counter rule."""
    p = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    opt = distopt.PSGDKron([("w", p)], preconditioner_update_probability=1 / 3)
    counters = []
    for _ in range(7):
        p.grad = torch.randn(5, 4, dtype=torch.float64)
        opt.step()
        counters.append(int(opt.state[p]["update_counter"]))
    assert counters == [1, 2, 0, 1, 2, 0, 1]
    schedule = ProbabilitySchedule()
    assert float(schedule(0)) == 1.0 and float(schedule(500)) == 1.0
    assert abs(float(schedule(1500)) - torch.exp(torch.tensor(-1.0)).item()) < 1e-6
    assert float(schedule(10**6)) == pytest.approx(0.03)


def _train(make, seed, steps=200):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = make(model)
    gen = torch.Generator().manual_seed(123)
    x, w = torch.randn(256, 16, generator=gen), torch.randn(16, 1, generator=gen)
    y = torch.sin(x @ w)
    first = None
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    return torch.nn.functional.mse_loss(model(x), y).item(), first


def test_trains_like_kron_torch(monkeypatch):
    """Same hyperparameters and start: distopt's final loss lies within kron-torch's own spread over seeds."""
    kron_torch = pytest.importorskip("kron_torch", reason="kron-torch 0.3.3 is an optional peer (pip install "
                                     "kron-torch==0.3.3)")
    monkeypatch.setattr(torch._dynamo.config, "disable", True)  # kron-torch compiles its kernels; eager here
    ours, theirs = [], []
    for seed in range(3):
        with contextlib.redirect_stdout(io.StringIO()):  # kron-torch prints its state sizes
            theirs.append(_train(lambda m: kron_torch.Kron(m.parameters(), lr=3e-3), seed)[0])
        final, first = _train(lambda m: distopt.PSGDKron(m.parameters(), lr=3e-3), seed)
        ours.append(final)
        assert final < first
    spread = max(theirs) - min(theirs)
    gaps = [abs(a - b) for a, b in zip(ours, theirs)]
    assert max(gaps) < spread, (ours, theirs)


@pytest.mark.parametrize("mode", [None, "one_diag", "smart_one_diag", "all_diag"])
def test_memory_save_modes_train_without_nan(mode):
    final, first = _train(lambda m: distopt.PSGDKron(m.parameters(), lr=3e-3, memory_save_mode=mode), 0, steps=50)
    assert final < first


def test_state_dict_round_trip_continues_bitwise():
    p = torch.randn(6, 5, requires_grad=True)
    p0 = p.detach().clone()
    grads = [torch.randn(6, 5) for _ in range(8)]
    opt = distopt.PSGDKron([("w", p)], lr=1e-2)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    straight = p.detach().clone()
    with torch.no_grad():
        p.copy_(p0)
    opt = distopt.PSGDKron([("w", p)], lr=1e-2)
    for g in grads[:4]:
        p.grad = g.clone()
        opt.step()
    resumed = distopt.PSGDKron([("w", p)], lr=1e-2)
    resumed.load_state_dict(opt.state_dict())
    for g in grads[4:]:
        p.grad = g.clone()
        resumed.step()
    assert torch.equal(p.detach(), straight)


@pytest.mark.parametrize("kwargs,message", [
    ({"b1": 1.0}, "b1=1.0"), ({"preconditioner_update_probability": 0.0}, "preconditioner_update_probability=0.0"),
    ({"memory_save_mode": "some_diag"}, "memory_save_mode='some_diag'"), ({"precond_lr": -1}, "precond_lr=-1"),
])
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distopt.PSGDKron([torch.zeros(3, 3, requires_grad=True)], **kwargs)
