"""Low-precision writes and compact states on FSDP2 shards equal a single process, bitwise, and a DCP checkpoint of
them resumes on another world size, bitwise.

This is what the layout-independent design buys: quantization blocks lie along rows (a shard never cuts one), and
every random draw (stochastic rounding of a parameter or a state, the ECC correction) comes from the element's
position in the whole tensor, the parameter's name and the step, not from a generator that each rank advances.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import distopt

from . import checkpointing as ck
from .harness import device
from .sharded_models import feed_same_grads, full, mesh_for

#: name -> (parameter dtype, settings of an AdamW group). Shapes are chosen so that the quantized modes quantize
#: (rows of 256 and 64 elements) and the others stay plain (a 37-column matrix, vectors).
CONFIGS = {
    "kahan": (torch.bfloat16, {}),
    "stochastic_rounding": (torch.bfloat16, {"stochastic_rounding": True}),
    "fp16_stochastic_rounding": (torch.float16, {"stochastic_rounding": True, "lr": 1e-4}),
    "param_ecc": (torch.bfloat16, {"param_ecc": "bf16+8"}),
    "int8": (torch.float32, {"state_precision": "int8"}),
    "int4": (torch.float32, {"state_precision": "int4"}),
    "int8_sr": (torch.float32, {"state_precision": "int8_sr"}),
    "ecc": (torch.float32, {"ecc": "bf16+16"}),
    "storage_dtype": (torch.float32, {"storage_dtype": "bfloat16"}),
    "bf16_sr+kahan": (torch.bfloat16, {"state_precision": "bf16_sr", "kahan_sum": True}),
    # Row and column sums of the whole tensor over the ranks: equal to one process up to the order of the sums.
    "factored": (torch.float32, {"state_precision": "factored"}),
    "factored_2nd+int8_sr": (torch.float32, {"factored_2nd": True, "state_precision": "int8_sr"}),
    # Muon: the matrices on owners (their momentum and write on the shards), the embedding and vectors on AdamW.
    "muon/kahan": (torch.bfloat16, {"algorithm": "muon"}),
    "muon/stochastic_rounding": (torch.bfloat16, {"algorithm": "muon", "stochastic_rounding": True}),
    "muon/int8": (torch.float32, {"algorithm": "muon", "state_precision": "int8", "owner_dtype": "float32"}),
    "muon/ecc+mars": (torch.float32, {"algorithm": "muon", "ecc": "bf16+8", "mars": True, "caution": True,
                                      "owner_dtype": "float32"}),
    # SOAP: the second moment in the eigenbasis is compact on its owner (its bases and statistics are not); a
    # refresh every 2 steps re-orders it. int8_sr draws on the owner, from the whole tensor's positions.
    "soap/ecc": (torch.float32, {"algorithm": "soap", "ecc": "bf16+8"}),
    "soap/int8_sr": (torch.float32, {"algorithm": "soap", "state_precision": "int8_sr"}),
    "soap/int8": (torch.float32, {"algorithm": "soap", "state_precision": "int8"}),
    # Factored states of owner matrices: Muon's momentum on the shards (its sums in one collective per step),
    # SOAP's owner moment factored whole on its owner.
    "muon/factored": (torch.float32, {"algorithm": "muon", "state_precision": "factored", "owner_dtype": "float32"}),
    "soap/factored": (torch.float32, {"algorithm": "soap", "state_precision": "factored"}),
}


#: The fused step (compilation on): one compiled graph per group on each rank's shards, whose shapes differ from
#: one process's; the random draws and the quantization must not depend on them. One config (a compile costs
#: seconds per rank): stochastic parameter writes and stochastically rounded int8 states on bfloat16 parameters.
COMPILED = {"compiled/stochastic_rounding+int8_sr": (torch.bfloat16, {"stochastic_rounding": True,
                                                                     "state_precision": "int8_sr",
                                                                     "compile": True})}


class PrecisionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 37)  # 37 rows: uneven shards on 2, 3 and 4 ranks
        self.b = nn.Linear(37, 130)
        self.c = nn.Embedding(70, 64)


def _model(dtype, mesh_kind, seed=0):
    torch.manual_seed(seed)
    model = PrecisionNet().to(device=device(), dtype=dtype)
    torch.manual_seed(0)
    shadow = PrecisionNet().to(device=device(), dtype=dtype)
    if mesh_kind is not None:
        mesh = mesh_for(mesh_kind)
        for module in model.children():
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, shadow


def _optimizer(model, settings):
    settings = dict(settings)
    algorithm = settings.pop("algorithm", "adamw")
    if algorithm == "muon":
        return distopt.Muon(model.named_parameters(), **{"lr": 0.02, "weight_decay": 0.1, "adamw_lr": 1e-3,
                                                         **settings})
    if algorithm == "soap":
        return distopt.SOAP(model.named_parameters(), **{"lr": 3e-3, "weight_decay": 0.1, "precondition_frequency": 2,
                                                         **settings})
    return distopt.AdamW(model.named_parameters(), **{"lr": 1e-3, "weight_decay": 0.1, **settings})


def _snapshot(model, opt):
    out = {f"param/{n}": full(p).detach().cpu().clone() for n, p in model.named_parameters()}
    names = {p: n for n, p in model.named_parameters()}
    unsaved = {p: set(opt.algorithm_of(g).unsaved_keys(g)) for g in opt.param_groups for p in g["params"]}
    # Owner state lives whole on one rank (which one depends on the world size): read in the checkpoint layout.
    ids = {p: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    saved = opt.state_dict()["state"] if any(k.startswith("owner.") for s in opt.state.values() for k in s) else {}
    for p, state in opt.state.items():
        for key, value in sorted(state.items()):  # one order on every rank (the owner's keys are made apart)
            if key in unsaved[p]:
                continue  # not in checkpoints (torch.optim.Muon keeps no step): rebuilt on load
            if key.startswith("owner."):
                value = saved[ids[p]][key]
            wide = value.to(torch.int32) if value.dtype == torch.int16 else value  # gloo gathers no int16
            out[f"state/{names[p]}/{key}"] = full(wide).detach().cpu().clone()
    return out


def precision_run(names, mesh_kind, steps: int = 4):
    """Each config of ``names`` on a fresh model: ``steps`` steps of the same full gradients."""
    out = {}
    for name in names:
        dtype, settings = {**CONFIGS, **COMPILED}[name]
        model, shadow = _model(dtype, mesh_kind)
        opt = _optimizer(model, settings)
        ck.train(model, shadow, opt, steps, seed=1)
        out[name] = _snapshot(model, opt)
    return out


#: Configs whose encoding sums over the shards: the same sums in another order, so equal to a tolerance (relative
#: 1e-5 of each tensor's largest value: a few float32 roundings of the sums, amplified by 4 steps of Adam).
REDUCING = {"factored", "factored_2nd+int8_sr", "muon/factored", "soap/factored"}


def _same(name, got, value, context):
    if name in REDUCING and value.is_floating_point():
        scale = value.abs().max().clamp_min(1e-30)
        assert (got - value).abs().max() <= 1e-5 * scale, context
    elif name in REDUCING and value.dtype == torch.uint8 and "::sign" in context[1]:
        assert (got != value).float().mean() <= 0.01, context  # a sign bit flips where a value sits at zero
    else:
        assert torch.equal(got, value), context


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharded_equals_one_process_bitwise(ranks, backend, world_size):
    names = sorted(CONFIGS)
    single = ranks(1, precision_run, names, None)[0]
    sharded = ranks(world_size, precision_run, names, "fsdp")
    for name in names:
        quantized = [k for k, v in single[name].items() if v.dtype in (torch.uint8, torch.int8)]
        if name.startswith("int"):
            assert quantized, (name, "nothing was quantized: the test would not see a block spanning ranks")
        for rank_result in sharded:
            got = rank_result[name]
            assert set(got) == set(single[name]), name
            for key, value in single[name].items():
                _same(name, got[key], value, (name, key, world_size))


def test_compiled_sharded_equals_one_process(ranks, backend):
    names = sorted(COMPILED)
    single = ranks(1, precision_run, names, None)[0]
    for rank_result in ranks(2, precision_run, names, "fsdp"):
        for name in names:
            for key, value in single[name].items():
                _same(name, rank_result[name][key], value, (name, key, 2))


def precision_checkpoint_run(names, path: str, resume: bool):
    """Without ``resume``: 3 steps, a DCP save, 2 more steps. With it: other weights, load, the same 2 steps."""
    out = {}
    for name in names:
        dtype, settings = CONFIGS[name]
        model, shadow = _model(dtype, "fsdp", seed=123 if resume else 0)
        opt = _optimizer(model, settings)
        where = f"{path}/{name}"
        if resume:
            ck.load(model, opt, where, True)
        else:
            ck.train(model, shadow, opt, 3, seed=1)
            ck.save(model, opt, where, True)
            dist.barrier()
        ck.train(model, shadow, opt, 2, seed=2)
        out[name] = _snapshot(model, opt)
    return out


@pytest.mark.parametrize("world,new_world", [(2, 3), (4, 1)])
def test_checkpoint_reshards_and_resumes_bitwise(ranks, backend, tmp_path, world, new_world):
    if backend != "gloo":
        pytest.skip("checkpoint resharding runs on gloo")
    names = sorted(CONFIGS)
    straight = ranks(world, precision_checkpoint_run, names, str(tmp_path), False)[0]
    resumed = ranks(new_world, precision_checkpoint_run, names, str(tmp_path), True)
    for name in names:
        for rank_result in resumed:
            for key, value in straight[name].items():
                _same(name, rank_result[name][key], value, (name, key, world, new_world))


def conversion_run(path: str, phase: str):
    """``phase="save"``: SOAP with float32 states, 3 steps, a DCP save. ``"convert"``: DCP load (resharded) into an
    optimizer of the saved settings, its state dict loaded into int8 states (the owner state goes to the owners of
    that optimizer's plan in the saved form and is converted there), and that state dict into float32 states."""
    if phase == "save":
        model, shadow = _model(torch.float32, "fsdp")
        opt = _optimizer(model, {"algorithm": "soap"})
        ck.train(model, shadow, opt, 3, seed=1)
        ck.save(model, opt, f"{path}/float32", True)
        adamw_model, adamw_shadow = _model(torch.float32, "fsdp")
        adamw = _optimizer(adamw_model, {})
        ck.train(adamw_model, adamw_shadow, adamw, 3, seed=1)
        ck.save(adamw_model, adamw, f"{path}/adamw", True)
        dist.barrier()
        return _snapshot(model, opt)
    model, _ = _model(torch.float32, "fsdp", seed=123)
    saved_form = _optimizer(model, {"algorithm": "soap"})
    ck.load(model, saved_form, f"{path}/float32", True)
    compact = _optimizer(model, {"algorithm": "soap", "state_precision": "int8"})
    compact.load_state_dict(saved_form.state_dict())
    stored = {key: value.dtype for key, value in _snapshot(model, compact).items()}
    back = _optimizer(model, {"algorithm": "soap"})
    back.load_state_dict(compact.state_dict())
    # Factored states (AdamW: none on owners) need each whole tensor's row and column sums on every rank.
    adamw_model, _ = _model(torch.float32, "fsdp", seed=123)
    adamw = _optimizer(adamw_model, {})
    ck.load(adamw_model, adamw, f"{path}/adamw", True)
    factored = _optimizer(adamw_model, {"state_precision": "factored"})
    factored.load_state_dict(adamw.state_dict())
    adamw_back = _optimizer(adamw_model, {})
    adamw_back.load_state_dict(factored.state_dict())
    return _snapshot(model, back), stored, _snapshot(adamw_model, adamw), _snapshot(adamw_model, adamw_back)


def test_state_dict_converts_owner_state_between_modes(ranks, backend, tmp_path):
    """float32 states saved on 2 ranks; on 3 and on 1, loaded into int8 states and back into float32 states: within
    one int8 code of every compact state (1% of its largest value), everything else bitwise. AdamW's states
    through factored ones and back: the same on 3 ranks as on 1, bitwise."""
    if backend != "gloo":
        pytest.skip("checkpoint resharding runs on gloo")
    original = ranks(2, conversion_run, str(tmp_path), "save")[0]
    factored_back = {}
    for world in (3, 1):
        back, stored, adamw, factored_back[world] = ranks(world, conversion_run, str(tmp_path), "convert")[0]
        rebuilt = [key for key in adamw if key.endswith("exp_avg_sq") and adamw[key].dim() == 2]
        assert rebuilt and all(not torch.equal(factored_back[world][k], adamw[k]) for k in rebuilt)  # lossy
        assert stored["state/a.weight/owner.exp_avg_sq"] == torch.uint8  # quantized on the owner
        assert stored["state/a.weight/owner.Q.1"] == torch.float32  # the bases are not
        assert set(back) == set(original)
        compact = 0
        for key, value in original.items():
            if f"{key}::scale" in stored:
                compact += 1
                assert (back[key] - value).abs().max() <= 0.01 * value.abs().max(), (key, world)
                assert not torch.equal(back[key], value), key  # it was quantized: the comparison can fail
            else:
                assert torch.equal(back[key], value), (key, world)
        assert compact >= 4
    # The factors come from the whole tensors, so their conversion does not depend on the world size.
    for key, value in factored_back[1].items():
        assert torch.equal(factored_back[3][key], value), key
