"""``fused=True`` on FSDP2 shards: the results of torch.optim's fused path, and checkpoints across kernels.

torch's CPU fused Adam kernel runs each tensor in SIMD vectors and finishes the last partial vector with scalar code,
and the two round ``exp_avg_sq`` differently in the last bit. So a shard whose length is not a multiple of the vector
width can differ in the last bits from the same elements inside the whole tensor. Hence three comparisons:

* on shards whose sizes are multiples of 64 elements (any SIMD width), against torch.optim fused on the whole
  tensors in one process: bitwise;
* on uneven and empty shards, against torch.optim fused on the same FSDP2 shards (torch's own fused path on
  DTensors): bitwise; and against the whole-tensor run: within float rounding (stated below);
* a DCP checkpoint written by one kernel, loaded into an optimizer that goes on with the other: bitwise.

One rank function runs every case, because starting ranks costs seconds.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import distopt

from .checkpointing import load, save
from .harness import device
from .sharded_models import feed_same_grads, full, mesh_for, sharded_pair

STEPS = 4
LRS = [1e-2, 3e-2, 1e-3, 2e-2]  # a schedule: the group's lr changes between steps
CONFIGS = [
    ("adamw", "fsdp", torch.float32, {"weight_decay": 0.1}),
    ("adamw", "fsdp", torch.float32, {"amsgrad": True, "maximize": True}),
    ("adamw", "fsdp", torch.bfloat16, {}),
    ("adamw", "hsdp", torch.float32, {"amsgrad": True}),
    ("adam", "fsdp", torch.float32, {"weight_decay": 0.1, "amsgrad": True}),
    ("sgd", "fsdp", torch.float32, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
]
# kahan_sum=False: torch's arithmetic in the parameter's dtype (Kahan summation is on by default for bfloat16).
OURS = {name: (lambda cls: lambda *a, **kw: cls(*a, kahan_sum=False, **kw))(cls)
        for name, cls in {"adamw": distopt.AdamW, "adam": distopt.Adam, "sgd": distopt.SGD}.items()}
TORCH = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
#: Uneven shards against whole tensors: where a shard's scalar tail meets the whole tensor's vector body, Adam's
#: ``exp_avg_sq`` (SGD's momentum buffer) differs by an ulp; with lr at most 3e-2 over 4 steps a parameter moves by
#: far less than this.
CLOSE = {"rtol": 1e-5, "atol": 1e-7}


class Aligned(nn.Module):
    """At W=2 every shard holds 256 or 64 elements: multiples of every SIMD width, so no shard has a scalar tail
    that the whole tensor lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 8, bias=False)
        self.down = nn.Linear(32, 16, bias=False)
        self.norm = nn.Parameter(torch.randn(128))


def _shard(module, mesh):
    for child in module.children():
        fully_shard(child, mesh=mesh)
    return fully_shard(module, mesh=mesh)


def _aligned_pair(mesh, dtype, seed=0):
    torch.manual_seed(seed)
    reference = Aligned().to(device=device(), dtype=dtype)
    return _shard(copy.deepcopy(reference), mesh), reference


def _feed(model, reference, gen, step, twin=None):
    """The same full gradients to both (and ``model``'s shards to ``twin``); the first parameter has none at step 1
    (skipped, so tensors of one group are at different steps)."""
    feed_same_grads(list(model.parameters()), list(reference.parameters()), gen)
    if step == 1:
        next(model.parameters()).grad = next(reference.parameters()).grad = None
    for p, t in zip(model.parameters(), twin.parameters() if twin is not None else ()):
        t.grad = None if p.grad is None else p.grad.clone()


def _train(models, opts, steps, gen):
    """``models``: (sharded, reference[, sharded twin]); every optimizer steps with the scheduled lr."""
    for step in steps:
        _feed(*models[:2], gen, step, *models[2:])
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = LRS[step % len(LRS)]
            opt.step()


def _differences(tag, model, opt, reference, ref_opt, close=None):
    """What differs between ``model`` (sharded) and ``reference``, parameters and state, bitwise or ``close``."""
    out = []

    def compare(what, ours, theirs):
        ours = full(ours).to(theirs.device)
        if close is None and not torch.equal(ours, theirs):
            out.append(f"{tag}: {what} max diff {(ours.float() - full(theirs).float()).abs().max().item():.3g}")
        elif close is not None and not torch.allclose(ours.float(), full(theirs).float(), **close):
            out.append(f"{tag}: {what} not within {close}")

    for (fqn, p), ref in zip(model.named_parameters(), reference.parameters()):
        compare(fqn, p.detach(), full(ref).detach())
        for key, value in ref_opt.state[ref].items():
            compare(f"state {key} of {fqn}", opt.state[p][key], full(value))
    return out


def _matches_torch_fused():
    problems = []
    for name, mesh_kind, dtype, kwargs in CONFIGS:
        tag = f"{name} {mesh_kind} {dtype} {kwargs}"
        mesh = mesh_for(mesh_kind)
        # Aligned shards against whole tensors.
        model, reference = _aligned_pair(mesh, dtype)
        opt = OURS[name](model.named_parameters(), fused=True, **kwargs)
        ref_opt = TORCH[name](reference.parameters(), fused=True, **kwargs)
        _train((model, reference), (opt, ref_opt), range(STEPS), torch.Generator().manual_seed(1))
        problems += _differences(f"{tag} aligned", model, opt, reference, ref_opt)
        # Uneven and empty shards against torch's fused path on the same shards (torch has no DTensor rule for
        # its fused SGD), and against the whole tensors.
        model, reference = sharded_pair(mesh, dtype=dtype)
        opt = OURS[name](model.named_parameters(), fused=True, **kwargs)
        ref_opt = TORCH[name](reference.parameters(), fused=True, **kwargs)
        models, opts = (model, reference), (opt, ref_opt)
        if name != "sgd":
            twin = _shard(copy.deepcopy(reference), mesh)
            twin_opt = TORCH[name](twin.parameters(), fused=True, **kwargs)
            models, opts = models + (twin,), opts + (twin_opt,)
        _train(models, opts, range(STEPS), torch.Generator().manual_seed(1))
        if name != "sgd":
            problems += _differences(f"{tag} uneven vs torch on shards", model, opt, twin, twin_opt)
        if dtype == torch.float32:
            problems += _differences(f"{tag} uneven vs whole", model, opt, reference, ref_opt, close=CLOSE)
    return problems


def _checkpoint_between_kernels(path, first_fused):
    """Train with one kernel, save through DCP, load into a fresh model and optimizer, go on with the other kernel;
    torch.optim switches kernels on the same state."""
    tag = f"dcp {'fused->default' if first_fused else 'default->fused'}"
    mesh = mesh_for("fsdp")
    model, reference = _aligned_pair(mesh, torch.float32)
    kwargs = {"weight_decay": 0.1, "amsgrad": True}
    opt = distopt.AdamW(model.named_parameters(), fused=first_fused, kahan_sum=False, **kwargs)
    ref_opt = torch.optim.AdamW(reference.parameters(), **kwargs,
                                **({"fused": True} if first_fused else {"foreach": False}))
    gen = torch.Generator().manual_seed(1)
    _train((model, reference), (opt, ref_opt), range(2), gen)
    save(model, opt, path, flatten=False)
    dist.barrier()

    resumed, _ = _aligned_pair(mesh, torch.float32, seed=99)
    resumed_opt = distopt.AdamW(resumed.named_parameters(), fused=not first_fused, kahan_sum=False, **kwargs)
    load(resumed, resumed_opt, path, flatten=False)
    # The group's settings travel with the state, as in torch.optim: the loaded group says what was saved.
    problems = [f"{tag}: loaded group says fused={g['fused']!r}" for g in resumed_opt.param_groups
                if g["fused"] is not first_fused]
    for group in resumed_opt.param_groups:
        group["fused"] = not first_fused
    ref_opt.param_groups[0].update(fused=not first_fused, foreach=False)
    _train((resumed, reference), (resumed_opt, ref_opt), range(2, STEPS), gen)
    return problems + _differences(tag, resumed, resumed_opt, reference, ref_opt)


def _all_cases(root):
    root = [root]
    dist.broadcast_object_list(root, src=0)  # every rank writes to rank 0's folder
    return _matches_torch_fused() + [problem for first in (True, False) for problem in
                                      _checkpoint_between_kernels(os.path.join(root[0], f"fused-{first}"), first)]


def test_fused_on_shards_matches_torch_fused_and_checkpoints_across_kernels(ranks, tmp_path):
    results = ranks(2, _all_cases, str(tmp_path))
    assert results == [[]] * 2, results[0][:5]
