"""What a user switching from torch.optim relies on: copies, torch.optim's own state dicts (single file and DCP),
state dict hooks, parameters replaced in ``param_groups``, and torch's ``param_names`` convention."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import distopt
import distopt.checkpoint

# (torch.optim class, distopt class, keyword arguments both take)
PAIRS = {
    "adamw": (torch.optim.AdamW, distopt.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "adam": (torch.optim.Adam, distopt.Adam, {"lr": 1e-2, "amsgrad": True}),
    "sgd": (torch.optim.SGD, distopt.SGD, {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1}),
    "nadam": (torch.optim.NAdam, distopt.NAdam, {"lr": 1e-2}),
    "rmsprop": (torch.optim.RMSprop, distopt.RMSprop, {"lr": 1e-2, "momentum": 0.5, "centered": True}),
    "muon": (torch.optim.Muon, distopt.DistributedOptimizer, {"lr": 2e-2}),
}


def _ours(name, params):
    torch_cls, cls, kwargs = PAIRS[name]
    if name == "muon":  # every parameter a matrix, eager and float32-free: bitwise torch.optim.Muon's
        return cls(params, "muon", compile=False, **kwargs)
    return cls(params, **kwargs)


def _params(shapes=((6, 4), (5, 5), (3, 7))):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes]


def _grads(params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


def _run(opt, params, grads):
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_torch_optim_state_dict_loads_and_continues_bitwise(name):
    torch_cls, _, kwargs = PAIRS[name]
    first, then = _grads(_params(), 3, 1), _grads(_params(), 3, 2)
    theirs = _params()
    opt = torch_cls(theirs, **kwargs)
    _run(opt, theirs, first)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # a single file, as users keep it
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    mine = _ours(name, ours)
    mine.load_state_dict(saved)
    _run(opt, theirs, then)
    _run(mine, ours, then)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    # and back: torch.optim loads distopt's state dict (no keys it lacks)
    again = torch_cls([torch.nn.Parameter(p.detach().clone()) for p in ours], **kwargs)
    again.load_state_dict(mine.state_dict())
    assert set(again.state_dict()["state"][0]) == set(opt.state_dict()["state"][0])


@pytest.mark.parametrize("name", ["adamw", "sgd", "muon"])
def test_torch_optim_dcp_checkpoint_loads_through_set_state_dict(name, tmp_path):
    torch_cls, _, kwargs = PAIRS[name]

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), torch.nn.Linear(6, 3, bias=False))

    first, then = _grads(list(model().parameters()), 3, 1), _grads(list(model().parameters()), 3, 2)
    theirs = model()
    opt = torch_cls(theirs.parameters(), **kwargs)
    _run(opt, list(theirs.parameters()), first)
    msd, osd = get_state_dict(theirs, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path), no_dist=True)

    ours = model()
    mine = _ours(name, list(ours.parameters()))
    msd, osd = get_state_dict(ours, mine)
    state = {"model": msd, "optim": osd}
    # distopt's planner: distopt's groups have settings that torch's lack ("algorithm", ...), which keep their
    # values; every tensor must be in the checkpoint (the default planner refuses any missing key)
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True, planner=distopt.checkpoint.SafeLoadPlanner())
    set_state_dict(ours, mine, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _run(opt, list(theirs.parameters()), then)
    _run(mine, list(ours.parameters()), then)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [lambda ps: distopt.AdamW(ps, lr=1e-2), lambda ps: distopt.Muon(ps, lr=2e-2),
                                  lambda ps: distopt.SOAP(ps, precondition_frequency=2),
                                  lambda ps: distopt.PSGDKron(ps, lr=1e-2)], ids=["adamw", "muon", "soap", "psgd"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_like_the_original(make, how):
    params = _params()
    opt = make(params)
    grads = _grads(params, 4, 1)
    _run(opt, params, grads[:2])
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    by_shape = {tuple(p.shape): p for p in params}
    _run(opt, params, grads[2:])
    _run(twin, twin_params, [[g[[tuple(p.shape) for p in params].index(tuple(q.shape))] for q in twin_params]
                             for g in grads[2:]])
    for q in twin_params:
        assert torch.equal(q, by_shape[tuple(q.shape)])


def test_state_dict_post_hook_keys_are_kept_and_asking_creates_no_state():
    params = _params()
    opt = distopt.AdamW(params)
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 7})
    out = opt.state_dict()
    assert out["extra"] == 7
    assert len(out["state"]) == 3  # initial state is reported ...
    assert len(opt.state) == 0     # ... and not kept, as torch.optim keeps none before a step


def test_replaced_parameter_is_followed_like_torch_optim():
    """Entries of param_groups replaced by new tensors (as frameworks do): distopt follows as torch.optim does."""
    for name in ("adamw", "muon"):
        torch_cls, _, kwargs = PAIRS[name]
        a, b = _params(), _params()
        theirs, mine = torch_cls(a, **kwargs), _ours(name, b)
        for opt, params in ((theirs, a), (mine, b)):
            new = [torch.nn.Parameter(p.detach().clone() * 2) for p in params]
            opt.param_groups[0]["params"] = new
            params[:] = new
        grads = _grads(a, 3, 1)
        _run(theirs, a, grads)
        _run(mine, b, grads)
        for x, y in zip(a, b):
            assert torch.equal(x, y), name
        assert all(not torch.equal(x, y) for x, y in zip(b, _params()))


def test_replaced_parameter_with_state_and_another_shape_is_refused_by_name():
    params = _params()
    opt = distopt.AdamW([(f"w{i}", p) for i, p in enumerate(params)])
    _run(opt, params, _grads(params, 1, 1))
    opt.param_groups[0]["params"][1] = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="parameter 'w1' was replaced"):
        opt.step()


def test_param_names_beside_params_route_embeddings_and_heads_to_adamw():
    """torchtitan's groups: {"params": [tensors], "param_names": [names]}."""
    model = torch.nn.ModuleDict({"tok_embeddings": torch.nn.Embedding(10, 4), "layer": torch.nn.Linear(4, 4),
                                 "output": torch.nn.Linear(4, 10, bias=False)})
    names, tensors = zip(*model.named_parameters())
    opt = distopt.Muon([{"params": list(tensors), "param_names": list(names)}])
    routed = {n: g["algorithm"] for g in opt.param_groups for n in g.get("param_names", [])}
    assert routed == {"tok_embeddings.weight": "adamw", "layer.weight": "muon", "layer.bias": "adamw",
                      "output.weight": "adamw"}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_state_dict_round_trip_before_the_first_step_keeps_no_state_and_changes_nothing(name):
    """What accelerate and HF Trainer do when they wrap an optimizer: ``load_state_dict(state_dict())`` before any
    step. torch.optim then holds no state; so must distopt (else it would hold unsharded state before FSDP shards
    the model, and SGD with dampening would take its first step as a later one)."""
    torch_cls, _, kwargs = PAIRS[name]
    theirs, ours = _params(), _params()
    opt, mine = torch_cls(theirs, **kwargs), _ours(name, ours)
    mine.load_state_dict(mine.state_dict())
    assert len(mine.state) == 0
    grads = _grads(theirs, 3, 1)
    _run(opt, theirs, grads)
    _run(mine, ours, grads)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_a_parameter_the_optimizer_knows_cannot_take_anothers_state():
    a, b, c = _params()
    opt = distopt.AdamW([a, b], lr=1e-2)
    _run(opt, [a, b], _grads([a, b], 1, 1))
    own = opt.state[b]["exp_avg"].clone()
    opt.param_groups[0]["params"] = [b, c]  # a leaves; b moves into its place and must keep its own state
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\] .* was replaced"):
        opt.step()
    assert torch.equal(opt.state[b]["exp_avg"], own)


def test_a_parameter_with_state_moved_to_another_algorithms_group_is_refused():
    a, b, c = _params()
    opt = distopt.DistributedOptimizer([{"params": [a, b]}, {"params": [c], "algorithm": "sgd", "lr": 0.1}])
    _run(opt, [a, b, c], _grads([a, b, c], 1, 1))
    opt.param_groups[0]["params"] = [a]
    opt.param_groups[1]["params"] = [c, b]
    with pytest.raises(RuntimeError, match=r"moved from a adamw group to a sgd group"):
        opt.step()


def test_a_successor_of_another_dtype_takes_the_state_in_its_own_dtype():
    old = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
    opt = distopt.AdamW([old], lr=1e-2)
    _run(opt, [old], [[torch.randn(4, 3, dtype=torch.bfloat16)]])
    new = torch.nn.Parameter(old.detach().float())
    opt.param_groups[0]["params"] = [new]
    _run(opt, [new], [[torch.randn(4, 3)]])
    assert opt.state[new]["exp_avg"].dtype == torch.float32 and old not in opt.state


def test_a_torch_adam_state_dict_with_l2_decay_is_refused_by_adamw():
    theirs = _params()
    opt = torch.optim.Adam(theirs, lr=1e-2, weight_decay=0.1)
    _run(opt, theirs, _grads(theirs, 1, 1))
    mine = distopt.AdamW(_params())
    with pytest.raises(distopt.StateDictMismatch, match="torch.optim.Adam with L2 weight decay.*distopt.Adam"):
        mine.load_state_dict(opt.state_dict())
    distopt.Adam(_params()).load_state_dict(opt.state_dict())  # its namesake takes it
