"""Bad input gets a clear error that names the offending thing."""

from __future__ import annotations

import pytest
import torch

import distopt
from distopt import DistributedOptimizer

INVALID = [
    ("adamw", {"lr": -1e-3}, "lr=-0.001"),
    ("adamw", {"betas": (1.0, 0.999)}, r"betas\[0\]=1.0"),
    ("adam", {"betas": (0.9, -0.1)}, r"betas\[1\]=-0.1"),
    ("adam", {"eps": -1.0}, "eps=-1.0"),
    ("adamw", {"weight_decay": -0.1}, "weight_decay=-0.1"),
    ("adamw", {"betas": (0.9,)}, "betas must be a tuple of 2"),
    ("adamw", {"lr": float("nan")}, "lr=nan"),
    ("adamw", {"lr": "fast"}, "lr must be a number"),
    ("adamw", {"amsgrad": "yes"}, "amsgrad must be a bool"),
    ("sgd", {"momentum": -0.5}, "momentum=-0.5"),
    ("sgd", {"nesterov": True}, "nesterov=True requires momentum > 0"),
    ("nadam", {"momentum_decay": -1.0}, "momentum_decay=-1.0"),
    ("rmsprop", {"alpha": -0.9}, "alpha=-0.9"),
    ("lion", {"betas": (0.9, 1.5)}, r"betas\[1\]=1.5"),
    ("laprop", {"eps": -1e-15}, "eps=-1e-15"),
    ("adopt", {"betas": (-0.1, 0.9)}, r"betas\[0\]=-0.1"),
    ("ademamix", {"betas": (0.9, 0.999)}, "betas must be a tuple of 3"),
    ("ademamix", {"alpha_warmup": 0}, "alpha_warmup=0"),
    ("ademamix", {"alpha": -2.0}, "alpha=-2.0"),
]


@pytest.mark.parametrize("algorithm,kwargs,message", INVALID, ids=[f"{a}-{m}" for a, _, m in INVALID])
def test_invalid_hyperparameters_raise_value_error_naming_them(algorithm, kwargs, message):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        DistributedOptimizer([p], algorithm=algorithm, **kwargs)
    with pytest.raises(ValueError, match=message):  # the same check guards group-level values
        DistributedOptimizer([{"params": [p], "algorithm": algorithm, **kwargs}])


def test_thin_constructors_validate_too():
    with pytest.raises(ValueError, match="lr=-1"):
        distopt.Lion([torch.zeros(2, requires_grad=True)], lr=-1)
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        distopt.AdamW([torch.zeros(2, requires_grad=True)], capturable=True)


def test_same_tensor_twice_is_named():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="'weight' is also 'weight'|the same tensor is given twice"):
        distopt.AdamW([("weight", model.weight), ("bias", model.bias), ("weight", model.weight)])
    with pytest.raises(ValueError, match="given twice"):
        distopt.AdamW([{"params": [model.weight]}, {"params": [model.bias, model.weight]}])


def test_non_leaf_tensor_is_refused():
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="non-leaf.*shape \\(3,\\)"):
        distopt.AdamW([leaf * 2])


def test_non_tensor_is_refused():
    with pytest.raises(TypeError, match="can only optimize Tensors"):
        distopt.AdamW([torch.zeros(2, requires_grad=True), 3.0])


def test_set_of_params_is_refused():
    with pytest.raises(TypeError, match="ordered collection"):
        distopt.AdamW({torch.zeros(2, requires_grad=True)})


def test_empty_params_is_refused():
    with pytest.raises(ValueError, match="empty parameter list"):
        distopt.AdamW([])


def test_sparse_gradients_are_refused_naming_the_parameter():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = distopt.AdamW(embedding.named_parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients.*'weight'"):
        opt.step()
    assert torch.equal(embedding.weight, before)


def test_mixed_named_and_unnamed_groups_are_refused():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="with names or all without"):
        distopt.AdamW([{"params": [("a", a)]}, {"params": [b]}])


def test_a_sparse_gradient_in_a_later_group_moves_nothing():
    dense = torch.randn(3, requires_grad=True)
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = distopt.AdamW([{"params": [dense]}, {"params": [embedding.weight]}])
    dense.grad = torch.ones(3)
    embedding(torch.tensor([1])).sum().backward()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(dense.detach(), before) and dense not in opt.state


def _stepped(shapes, algorithm="soap"):
    params = [(name, torch.nn.Parameter(torch.randn(shape))) for name, shape in shapes]
    opt = DistributedOptimizer(params, algorithm=algorithm)
    for _, p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    return opt


@pytest.mark.parametrize("algorithm", ["soap", "adamw"])
def test_state_dict_of_another_shape_names_the_parameter_and_changes_nothing(algorithm):
    saved = _stepped([("a", (4, 3)), ("b", (5, 2))], algorithm).state_dict()
    opt = _stepped([("a", (4, 3)), ("b", (5, 6))], algorithm)
    before = {k: v.clone() for k, v in opt.state[opt.param_groups[0]["params"][0]].items()}
    with pytest.raises(distopt.StateDictMismatch, match=r"of 'b' has shape \(5, 2\).*expects \(5, 6\)"):
        opt.load_state_dict(saved)
    after = opt.state[opt.param_groups[0]["params"][0]]
    assert all(torch.equal(after[k], v) for k, v in before.items())  # 'a' was not loaded half-way


def test_state_dict_of_other_parameters_names_them():
    saved = _stepped([("a", (4, 3)), ("b", (5, 2))]).state_dict()
    opt = _stepped([("a", (4, 3)), ("c", (5, 2))])
    with pytest.raises(distopt.StateDictMismatch, match=r"missing \['c'\], unexpected \['b'\]"):
        opt.load_state_dict(saved)
    with pytest.raises(distopt.StateDictMismatch, match="3 param groups"):
        opt.load_state_dict({"state": {}, "param_groups": saved["param_groups"] * 3})
    broken = {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": saved["param_groups"]}
    with pytest.raises(distopt.StateDictMismatch, match=r"state of 'a' \(soap\).*missing \['exp_avg'"):
        _stepped([("a", (4, 3)), ("b", (5, 2))]).load_state_dict(broken)
