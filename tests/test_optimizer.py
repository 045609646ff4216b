"""torch.optim conventions of the facade: param formats, groups, schedulers, closure, hooks, state_dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import distopt
from distopt import DistributedOptimizer


def _model():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _train(model, opt, steps=4, scheduler=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _same(a: nn.Module, b: nn.Module):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("form", ["tensors", "named", "groups"])
def test_param_forms(form):
    model, ref = _model(), None
    ref = copy.deepcopy(model)
    if form == "tensors":
        params = model.parameters()
    elif form == "named":
        params = model.named_parameters()
    else:
        params = [{"params": list(model.parameters())}]
    opt = distopt.AdamW(params, lr=1e-2)
    _train(model, opt)
    _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2))
    _same(model, ref)
    if form == "named":
        assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_groups_mix_algorithms_and_override_defaults():
    model = _model()
    ref = copy.deepcopy(model)
    w0, b0, w1, b1 = model.parameters()
    opt = DistributedOptimizer(
        [{"params": [w0, b0]},
         {"params": [w1], "algorithm": "sgd", "momentum": 0.9},
         {"params": [b1], "algorithm": distopt.algos.RMSprop(), "lr": 1e-3}],
        algorithm="adamw", lr=1e-2, weight_decay=0.1)
    assert [g["algorithm"] for g in opt.param_groups] == ["adamw", "sgd", "rmsprop"]
    assert opt.param_groups[1]["lr"] == 1e-2 and opt.param_groups[1]["weight_decay"] == 0.1
    assert "betas" not in opt.param_groups[1]  # another algorithm's hyperparameters stay out of a group
    assert opt.param_groups[2]["alpha"] == 0.99  # the algorithm's own default fills the rest
    rw0, rb0, rw1, rb1 = ref.parameters()
    refs = [torch.optim.AdamW([rw0, rb0], lr=1e-2, weight_decay=0.1),
            torch.optim.SGD([rw1], lr=1e-2, momentum=0.9, weight_decay=0.1),
            torch.optim.RMSprop([rb1], lr=1e-3, weight_decay=0.1)]

    class Both:
        def zero_grad(self):
            for r in refs:
                r.zero_grad()

        def step(self):
            for r in refs:
                r.step()

    _train(model, opt)
    _train(ref, Both())
    _same(model, ref)


def test_unknown_algorithm_lists_known_names():
    with pytest.raises(ValueError, match="unknown algorithm 'adamz'.*adamw.*ademamix.*sgd"):
        DistributedOptimizer([torch.zeros(2, requires_grad=True)], algorithm="adamz")


def test_unknown_hyperparameter_is_a_type_error():
    with pytest.raises(TypeError, match="'momentun'"):
        DistributedOptimizer([torch.zeros(2, requires_grad=True)], algorithm="sgd", momentun=0.9)


def test_algorithm_names_are_lowercase_class_names():
    assert set(distopt.ALGORITHMS) == {"adamw", "adam", "sgd", "nadam", "rmsprop", "radam", "adamax", "adagrad",
                                       "adadelta", "adafactor", "adan", "ranger", "lion", "laprop", "adopt", "ademamix",
                                       "signsgd", "sinksgd", "simplified_ademamix", "sfadamw", "hyperballadamw",
                                       "sudsadamw", "scion",
                                       "muon",
                                       "normuon", "adamuon", "soap", "psgdkron", "msamlaprop",
                                       "soapnadam", "soapademamix", "solp", "klsoap", "klshampoo", "heavysoap",
                                       "heavysoapnadam", "heavysoapademamix", "heavysolp", "heavyklsoap",
                                       "heavyklshampoo", "psgdpro", "qsgd", "lather", "psgdlra", "shampoo"}
    for name, cls in distopt.ALGORITHMS.items():
        assert cls.__name__.lower() == name


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10),  # also cycles betas
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    lambda o: torch.optim.lr_scheduler.SequentialLR(o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
                                                         torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], [3]),
], ids=["step", "onecycle", "lambda", "cosine_restarts", "sequential"])
def test_lr_schedulers(make_scheduler):
    model = _model()
    ref = copy.deepcopy(model)
    opt, ref_opt = distopt.AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(ref.parameters(), lr=1e-2)
    sched, ref_sched = make_scheduler(opt), make_scheduler(ref_opt)
    _train(model, opt, steps=8, scheduler=sched)
    _train(ref, ref_opt, steps=8, scheduler=ref_sched)
    _same(model, ref)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def test_step_with_closure_returns_its_loss():
    model = _model()
    opt = distopt.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 6)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert len(calls) == 2 and second.item() < first.item()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model = _model()
    opt = distopt.AdamW(model.parameters())
    model(torch.randn(2, 6)).sum().backward()
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert torch.count_nonzero(p.grad) == 0


def test_add_param_group_gets_its_algorithms_defaults():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = DistributedOptimizer([a], lr=0.5)
    opt.add_param_group({"params": b, "algorithm": "lion"})
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="given twice"):
        opt.add_param_group({"params": [a]})


def test_step_hooks_run_in_order():
    p = torch.randn(3, requires_grad=True)
    opt = distopt.AdamW([p])
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o.state[p].get("step"))))
    handle = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o.state[p]["step"].item())))
    p.grad = torch.ones(3)
    opt.step()
    handle.remove()
    opt.step()
    assert seen == [("pre", None), ("post", 1.0), ("pre", torch.tensor(2.0))]


def test_params_without_grad_are_skipped():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    before = b.detach().clone()
    opt = distopt.AdamW([a, b])
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, before) and b not in opt.state and a in opt.state


@pytest.mark.parametrize("name", sorted(distopt.algos.ELEMENTWISE_NAMES))
def test_state_dict_round_trip_continues_bitwise(name):
    model = _model()
    opt = DistributedOptimizer(model.named_parameters(), algorithm=name, lr=1e-2)
    _train(model, opt, steps=3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    _train(model, opt, steps=3, seed=2)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    resumed_opt = DistributedOptimizer(resumed.named_parameters(), algorithm=name, lr=1e-2)
    resumed_opt.load_state_dict(saved["optim"])
    _train(resumed, resumed_opt, steps=3, seed=2)
    _same(resumed, model)
    assert resumed_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_counters_stay_float32_after_load_into_low_precision_params():
    p = torch.randn(4, dtype=torch.bfloat16, requires_grad=True)
    opt = distopt.NAdam([p])
    p.grad = torch.randn(4, dtype=torch.bfloat16)
    opt.step()
    fresh = distopt.NAdam([p])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["mu_product"].dtype == torch.float32
    assert fresh.state[p]["exp_avg"].dtype == torch.bfloat16


def test_load_state_dict_of_another_algorithm_is_refused():
    p = torch.randn(4, requires_grad=True)
    sgd = distopt.SGD([p], momentum=0.9)
    p.grad = torch.ones(4)
    sgd.step()
    with pytest.raises(ValueError, match="runs 'adamw' but the state dict holds state of 'sgd'"):
        distopt.AdamW([p]).load_state_dict(sgd.state_dict())
