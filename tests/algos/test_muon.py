"""Muon's maths against torch.optim.Muon, its validation, and distopt.Muon's routing of parameters to AdamW."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import distopt
from distopt.routing import is_embedding_or_head

CONFIGS = [{}, {"lr": 0.02, "weight_decay": 0.0}, {"nesterov": False, "momentum": 0.9},
           {"adjust_lr_fn": "match_rms_adamw"}, {"adjust_lr_fn": "original", "ns_steps": 3},
           {"ns_coefficients": (2.0, -1.5, 0.5), "eps": 1e-5}, {"lr": torch.tensor(0.01)}]
SHAPES = [(37, 113), (113, 37), (1, 64), (64, 1), (16, 16)]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_matches_torch_muon_bitwise(kwargs):
    ours = [torch.randn(s, requires_grad=True) for s in SHAPES]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = distopt.DistributedOptimizer(ours, algorithm="muon", **kwargs)
    ref = torch.optim.Muon(theirs, **kwargs)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])


def _muon_float32_loop(param, grads, lr, weight_decay, momentum=0.95, steps=5, eps=1e-7):
    """Muon from the paper's pseudo-code, all in float32: Nesterov momentum, quintic Newton-Schulz, scaled step."""
    a, b, c = 3.4445, -4.7750, 2.0315
    param, buf = param.clone(), torch.zeros_like(param)
    for grad in grads:
        buf = momentum * buf + (1 - momentum) * grad
        x = (1 - momentum) * grad + momentum * buf
        transposed = x.shape[0] > x.shape[1]
        x = x.T if transposed else x
        x = x / max(x.norm().item(), eps)
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if transposed else x
        param = param * (1 - lr * weight_decay) - lr * max(1.0, param.shape[0] / param.shape[1]) ** 0.5 * x
    return param


def test_float32_owner_maths_follows_the_paper_in_float32():
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in [(24, 40), (40, 24)]]
    grads = [[torch.randn(p.shape) for _ in range(3)] for p in params]
    start = [p.detach().clone() for p in params]
    opt = distopt.DistributedOptimizer(params, algorithm="muon", lr=0.02, owner_dtype=torch.float32)
    assert opt.param_groups[0]["owner_dtype"] == "float32"  # by name: DCP cannot save a torch.dtype
    for step in range(3):
        for p, g in zip(params, grads):
            p.grad = g[step]
        opt.step()
    for p, p0, g in zip(params, start, grads):
        expected = _muon_float32_loop(p0, g, lr=0.02, weight_decay=0.1)
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
        # bfloat16 owner maths is measurably further from the float32 reference: the switch is real.
    bf16 = [p0.clone().requires_grad_() for p0 in start]
    opt = distopt.DistributedOptimizer(bf16, algorithm="muon", lr=0.02)
    for step in range(3):
        for p, g in zip(bf16, grads):
            p.grad = g[step]
        opt.step()
    for p, p0, g, p32 in zip(bf16, start, grads, params):
        expected = _muon_float32_loop(p0, g, lr=0.02, weight_decay=0.1)
        assert (p.detach() - expected).abs().max() > 10 * (p32.detach() - expected).abs().max()


def test_conv_weights_are_orthogonalized_as_out_by_rest():
    conv = torch.randn(8, 3, 2, 2, requires_grad=True)
    flat = conv.detach().reshape(8, 12).clone().requires_grad_()
    opt = distopt.DistributedOptimizer([conv], algorithm="muon", lr=0.02)
    ref = torch.optim.Muon([flat], lr=0.02)
    for _ in range(3):
        conv.grad = torch.randn(8, 3, 2, 2)
        flat.grad = conv.grad.reshape(8, 12).clone()
        opt.step()
        ref.step()
    assert torch.equal(conv.detach().reshape(8, 12), flat)


def test_signature_keeps_torch_muons_names_and_defaults():
    theirs = inspect.signature(torch.optim.Muon.__init__).parameters
    ours = inspect.signature(distopt.Muon.__init__).parameters
    for key, param in theirs.items():
        assert key in ours and ours[key].default == param.default, key


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": -1.0}, "lr=-1.0"), ({"momentum": -0.1}, "momentum=-0.1"), ({"weight_decay": -1}, "weight_decay=-1"),
    ({"ns_steps": 100}, "ns_steps=100"), ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients must be a tuple of 3"),
    ({"adjust_lr_fn": "fancy"}, "adjust_lr_fn='fancy'"), ({"nesterov": 1}, "nesterov must be a bool"),
    ({"owner_dtype": torch.int32}, "owner_dtype=torch.int32"), ({"owner_dtype": "fp8"}, "owner_dtype='fp8'"),
])
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distopt.Muon([torch.zeros(3, 3, requires_grad=True)], **kwargs)


def test_muon_group_refuses_vectors_by_name():
    bias = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="muon needs parameters with at least 2 dimensions, but 'b' has 1"):
        distopt.DistributedOptimizer([("b", bias)], algorithm="muon")


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(11, 8)
        self.layers = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(8, 8), "output": nn.Linear(8, 8)})])
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)


def test_default_routing_sends_vectors_embeddings_and_heads_to_adamw():
    model = TinyGPT()
    opt = distopt.Muon(model.named_parameters(), adamw_lr=3e-4)
    by_algorithm = {g["algorithm"]: g["param_names"] for g in opt.param_groups}
    # A module named "output" deep inside a block is a hidden layer, not the output head.
    assert by_algorithm["muon"] == ["layers.0.attn.weight", "layers.0.output.weight"]
    assert set(by_algorithm["adamw"]) == {"tok_embeddings.weight", "layers.0.attn.bias", "layers.0.output.bias",
                                          "norm.weight", "norm.bias", "lm_head.weight"}
    adamw = next(g for g in opt.param_groups if g["algorithm"] == "adamw")
    assert adamw["lr"] == 3e-4 and adamw["betas"] == (0.9, 0.999) and adamw["weight_decay"] == 1e-2


def test_routing_predicate_can_be_replaced():
    model = TinyGPT()
    opt = distopt.Muon(model.named_parameters(),
                       adamw_predicate=lambda name, p: p.ndim < 2 or name.startswith("tok_"))
    muon = next(g for g in opt.param_groups if g["algorithm"] == "muon")
    assert "lm_head.weight" in muon["param_names"]


def test_predicate_without_names_uses_dimensions_only():
    assert is_embedding_or_head(None, torch.zeros(3)) and not is_embedding_or_head(None, torch.zeros(3, 3))


def test_mixed_muon_and_adamw_match_torch_single_process():
    model = TinyGPT()
    reference = TinyGPT()
    reference.load_state_dict(model.state_dict())
    opt = distopt.Muon(model.named_parameters(), lr=0.02)
    matrices = [p for n, p in reference.named_parameters() if n in ("layers.0.attn.weight", "layers.0.output.weight")]
    others = [p for n, p in reference.named_parameters() if all(p is not m for m in matrices)]
    refs = [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(others, lr=1e-3, weight_decay=1e-2)]
    for _ in range(3):
        for p, r in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape)
            r.grad = p.grad.clone()
        opt.step()
        for ref in refs:
            ref.step()
    for p, r in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, r)
    assert opt.plan is not None and opt.plan.world_size == 1


def test_state_dict_round_trip_and_scheduler_after_load():
    """After load_state_dict the group dicts are new objects; the owner route must follow them (lr schedules)."""
    shapes = [(6, 4), (4, 6)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = distopt.DistributedOptimizer(ours, algorithm="muon", lr=0.02)
    ref = torch.optim.Muon(theirs, lr=0.02)

    def run(optimizer, params, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
            sched.step()

    run(opt, ours, 2, 0)
    run(ref, theirs, 2, 0)
    resumed = distopt.DistributedOptimizer(ours, algorithm="muon", lr=0.02)
    resumed.load_state_dict(opt.state_dict())
    run(resumed, ours, 3, 1)
    run(ref, theirs, 3, 1)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_owner_batches_respect_the_cap():
    """Same-shape matrices are batched up to owner_batch_bytes of input (bfloat16 here), a larger one alone."""
    import distopt

    params = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(5)] + [torch.nn.Parameter(torch.randn(32, 16))]
    for cap, sizes in ((1, [1] * 6), (2 * 16 * 16 * 2, [2, 2, 1, 1]), (2**20, [5, 1])):
        opt = distopt.DistributedOptimizer(params, "muon", owner_batch_bytes=cap)
        batches = opt._owner._batches(tuple(range(6)))
        assert sorted(len(b) for b in batches) == sorted(sizes), (cap, batches)
    with pytest.raises(ValueError, match="owner_batch_bytes"):
        distopt.DistributedOptimizer(params, "muon", owner_batch_bytes=0)
