"""Rank-side helpers of the checkpoint tests: the optimizers under test, a training loop fed with the same full
gradients at any world size, and saving and loading through torch's standard DCP route."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import distopt

from .harness import device, group as cached_group
from .sharded_models import feed_same_grads, full, mesh_for
from .test_muon_owner import MuonNet

ALGORITHMS = ("adamw", "muon", "muon+adamw", "soap", "psgd", "flags", "catalogue", "catalogue_peers",
              "muon_variants", "second_order")
#: HeavyBall's SOAP and PSGD families and Shampoo, one group each (round robin): owner state of every inner method, KL
#: and Heavy, the PRO and whitening fits (their lower bounds, LATHER's moments and bases), the fits' schedule on
#: shards, and Shampoo's blocks of factors and inverse roots.
SECOND_ORDER = {"soapnadam": {"precondition_1d": True}, "heavysoapademamix": {"precondition_1d": True},
                "klshampoo": {"precondition_1d": True}, "psgdpro": {"preconditioner_update_probability": 0.4},
                "solp": {"precondition_1d": True}, "heavyklsoap": {"precondition_1d": True},
                "lather": {"preconditioner_update_probability": 0.6}, "qsgd": {"memory_save_mode": "one_diag"},
                "shampoo": {"max_preconditioner_dim": 16, "precondition_frequency": 2}}
#: Kinds whose maths sums over shards (StableAdamW's RMS, Prodigy's statistics, Lion-k's and HyperBall's norms): a
#: resumed run on another world size adds the shards in another order, so it continues to a tolerance, not to the
#: bit.
REDUCING = ("catalogue_reducing",)

#: The peers' algorithms of the catalogue, one group each, in the order that gives each the parameter it needs
#: (round robin over MuonNet's eleven: owner-route algorithms get matrices, Scion the 4-D convolution).
PEERS = ("muonadamw", "sinksgd", "signsgd", "adagrad", "adamc", "sudsadamw", "ranger", "simplified_ademamix",
         "sfadamw", "scion")  # ten names: MuonAdamW gets the embedding (a matrix) and conv.bias (a vector)
REDUCING_NAMES = ("stableadamw", "prodigy", "lion", "hyperballadamw", "adan", "msamlaprop", "psgdlra")


def make_optimizer(kind: str, model):
    named = list(model.named_parameters())
    if kind == "adamw":
        return distopt.AdamW(named, lr=3e-3, weight_decay=0.05)
    if kind == "muon":  # matrices only (the biases stay out of this optimizer)
        return distopt.DistributedOptimizer([(n, p) for n, p in named if p.ndim >= 2], algorithm="muon", lr=0.02,
                                            weight_decay=0.1)
    if kind == "muon+adamw":  # distopt.Muon routes 1-D parameters, the embedding and the head to AdamW
        return distopt.Muon(named, lr=0.02, weight_decay=0.1, adamw_lr=3e-3)
    if kind == "soap":
        return distopt.SOAP(named, lr=3e-3, precondition_frequency=2, precondition_1d=True)
    if kind == "psgd":
        return distopt.PSGDKron(named, lr=1e-3, preconditioner_update_probability=0.5)
    if kind == "catalogue":  # the newer first-order algorithms, one group each (round robin over the parameters)
        names = ("radam", "adamax", "adagrad", "adafactor", "adadelta", "unscaledadamw")  # adafactor: 4-D conv too
        return distopt.DistributedOptimizer([{"params": named[i::len(names)], "algorithm": name, "lr": 1e-2}
                                             for i, name in enumerate(names)])
    if kind == "second_order":
        return distopt.DistributedOptimizer([{"params": named[i::len(SECOND_ORDER)], "algorithm": name,
                                              "lr": 1e-2, **extra} for i, (name, extra) in
                                             enumerate(SECOND_ORDER.items())])
    if kind in ("catalogue_peers", "catalogue_reducing"):
        names = PEERS if kind == "catalogue_peers" else REDUCING_NAMES
        extra = {"prodigy": {"d0": 1e-3, "slice_p": 3, "lr": 1.0}, "lion": {"kappa_p": 1.5, "lr": 1e-3},
                 "simplified_ademamix": {"lr": 1e-4}, "muonadamw": {"owner_dtype": "float32"}}
        return distopt.DistributedOptimizer([{"params": named[i::len(names)], "algorithm": name, "lr": 1e-2,
                                              **extra.get(name, {})} for i, name in enumerate(names)])
    if kind == "muon_variants":  # owner state of NorMuon (per row) and AdaMuon (whole, or per row); Muon's parts
        by_name = dict(named)
        pick = lambda *names: [(n, by_name[n]) for n in names]  # noqa: E731
        return distopt.DistributedOptimizer([
            {"params": pick("small.weight"), "algorithm": "normuon", "lr": 0.02, "nesterov": True,
             "owner_dtype": "float32"},
            {"params": pick("wide.weight"), "algorithm": "muon", "lr": 0.02, "split_sizes": (17, 20),
             "owner_dtype": "float32"},  # parts on different owners whenever W > 1
            {"params": pick("tall.weight", "smaller.weight"), "algorithm": "adamuon", "lr": 0.02,
             "weight_decay": 0.1, "approx_mars": True, "owner_dtype": "float32"},
            {"params": pick("conv.weight", "embed.weight"), "algorithm": "adamuon", "lr": 0.02,
             "normuon_variant": True, "owner_dtype": "float32"},
            {"params": [(n, p) for n, p in named if p.ndim < 2 or n == "thin.weight"], "algorithm": "adamw",
             "lr": 3e-3}])
    if kind == "flags":  # flag state (MARS's previous gradient) on shards, with flags whose reductions are exact
        return distopt.Muon(named, lr=0.02, weight_decay=0.1, adamw_lr=3e-3, mars=True, mars_gamma=0.05,
                            caution=True, cautious_weight_decay=True, warmup_steps=2)
    raise ValueError(kind)


def build(mesh_kind: str | None, seed: int = 0):
    """A MuonNet, FSDP2-sharded on ``mesh_kind`` (``None``: plain, one process), and an unsharded twin whose
    shapes draw the full gradients."""
    torch.manual_seed(seed)
    model = MuonNet().to(device())
    torch.manual_seed(0)
    shadow = MuonNet().to(device())
    if mesh_kind is not None:
        mesh = mesh_for(mesh_kind)
        for module in model.children():
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, shadow


def train(model, shadow, opt, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        feed_same_grads(list(model.parameters()), list(shadow.parameters()), gen)
        opt.step()
        opt.zero_grad()


def snapshot(model, opt) -> dict[str, torch.Tensor]:
    """Full parameters and full optimizer state by FQN (owner state gathered whole), on every rank."""
    options = StateDictOptions(full_state_dict=True)
    msd, osd = get_state_dict(model, opt, options=options)
    out = {f"model/{k}": full(v).detach().cpu().clone() for k, v in msd.items()}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            out[f"optim/{fqn}/{key}"] = full(value).detach().cpu().clone()
    return out


def save(model, opt, path: str, flatten: bool) -> None:
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=flatten))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def load(model, opt, path: str, flatten: bool) -> None:
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    msd, osd = get_state_dict(model, opt, options=options)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


def reference_run(kind: str, mesh_kind: str, path: str, flatten: bool, before: int, after: int):
    """Train ``before`` steps, save, train ``after`` more; return the final snapshot (the uninterrupted run)."""
    model, shadow = build(mesh_kind)
    opt = make_optimizer(kind, model)
    train(model, shadow, opt, before, seed=1)
    save(model, opt, path, flatten)
    dist.barrier()
    train(model, shadow, opt, after, seed=2)
    return snapshot(model, opt), str(opt.plan) if opt.plan is not None else ""


def resumed_run(kind: str, mesh_kind: str, path: str, flatten: bool, after: int):
    """A model with other initial weights and a fresh optimizer load the checkpoint and train ``after`` steps."""
    model, shadow = build(mesh_kind, seed=123)
    opt = make_optimizer(kind, model)
    load(model, opt, path, flatten)
    train(model, shadow, opt, after, seed=2)
    return snapshot(model, opt), str(opt.plan) if opt.plan is not None else ""


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint manager


def managed_run(kind: str, root: str, steps: int, every: int, keep: int, async_save: bool, resume: bool,
                mesh_kind: str = "fsdp"):
    """Train to ``steps`` with a scheduler, saving through the manager; with ``resume``, start from the latest
    checkpoint (model built from other weights). Returns (snapshot, lr, resumed-from step, a draw of the RNG,
    checkpoint names)."""
    from distopt.checkpoint import CheckpointManager

    model, shadow = build(mesh_kind, seed=123 if resume else 0)
    opt = make_optimizer(kind, model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    manager = CheckpointManager(root, model, opt, scheduler, every=every, keep=keep, async_save=async_save)
    start = manager.resume() if resume else None
    first = (start or 0) + 1
    gen = torch.Generator().manual_seed(5)
    for step in range(1, steps + 1):
        full_grads = [torch.randn(p.shape, generator=gen) for p in shadow.parameters()]  # same draws every run
        if step < first:
            continue
        for p, g in zip(model.parameters(), full_grads):
            p.grad = _shard_like(p, g)
        opt.step()
        opt.zero_grad()
        scheduler.step()
        torch.rand(1)  # the job's own randomness: checkpoints restore it
        manager.maybe_save(step)
    manager.close()
    names = [p.name for p in manager.checkpoints()]
    return snapshot(model, opt), opt.param_groups[0]["lr"], start, torch.rand(1), names


def _shard_like(param, full_grad):
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor):
        return distribute_tensor(full_grad.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return full_grad.to(param.device)


def stateful_save(kind: str, path: str, before: int, after: int):
    """``dcp.async_save({"model": model, "optim": opt})`` (both DCP-Stateful), training on while it writes."""
    model, shadow = build("fsdp")
    opt = make_optimizer(kind, model)
    train(model, shadow, opt, before, seed=1)
    future = dcp.async_save({"model": model, "optim": opt}, checkpoint_id=path,
                            process_group=cached_group("async_save", lambda: dist.new_group(backend="gloo")))
    train(model, shadow, opt, after, seed=2)  # changes the state while the background thread writes
    future.result()
    dist.barrier()
    return snapshot(model, opt)


def stateful_load(kind: str, path: str, after: int):
    model, shadow = build("fsdp", seed=123)
    opt = make_optimizer(kind, model)
    dcp.load({"model": model, "optim": opt}, checkpoint_id=path)
    train(model, shadow, opt, after, seed=2)
    return snapshot(model, opt)


def saved_layout(kind: str):
    """What get_state_dict hands DCP: per FQN, each state entry's type, global shape and placements."""
    from torch.distributed.tensor import DTensor

    model, shadow = build("fsdp")
    opt = make_optimizer(kind, model)
    train(model, shadow, opt, 2, seed=1)
    _, osd = get_state_dict(model, opt)
    in_memory = {n: {k: tuple(v.shape) for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    return ({fqn: {k: (type(v).__name__, tuple(v.shape), str(v.placements) if isinstance(v, DTensor) else None)
                   for k, v in state.items()} for fqn, state in osd["state"].items()}, in_memory)


# ----------------------------------------------------------------------------------------------------------------
# Schedule-free: the eval/train swap on shards, and a checkpoint taken in eval mode


def schedule_free_run(mesh_kind: str, path: str, resume: bool):
    """SFAdamW on MuonNet. Without ``resume``: 3 steps, ``eval()``, save (the model holds x), then ``train()``,
    2 steps, ``eval()``. With ``resume``: other initial weights, load, ``train()``, the same 2 steps, ``eval()``.
    Returns the final snapshot (x in the parameters) and the x saved at step 3 (without ``resume``)."""
    model, shadow = build(mesh_kind, seed=123 if resume else 0)
    opt = distopt.SFAdamW(model.named_parameters(), lr=0.01, weight_decay=0.1)
    saved_x = None
    if resume:
        load(model, opt, path, True)
        assert opt.param_groups[0]["train_mode"] is False
    else:
        train(model, shadow, opt, 3, seed=1)
        opt.eval()
        saved_x = snapshot(model, opt)
        save(model, opt, path, True)
        dist.barrier()
    opt.train()
    train(model, shadow, opt, 2, seed=2)
    opt.eval()
    return snapshot(model, opt), saved_x
