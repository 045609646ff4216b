"""Each precision mode on a whole optimizer, against its own library on one process with the same gradients, and
bad input refused by name. The tolerances, and why:

* Kahan summation vs optimi 0.3.3's AdamW (``kahan_sum``): optimi computes each op in bfloat16 and keeps decay out
  of the compensation, distopt computes in float32 and compensates the whole write, so the bfloat16 parameters
  differ by a fraction of an ulp now and then: measured 0.5% of the distance moved (bound 2%). The pair
  (parameter, compensation) tracks the float32 run to 0.7% of the distance (bound 2%), where the bfloat16
  parameter alone is off by ~60% (its ulp is the size of the whole distance) and plain bfloat16 by ~100%.
* Stochastic rounding vs adv_optm 2.5.16 (``stochastic_rounding``): the draws differ (adv_optm's generator, seeded
  42; distopt's layout-independent stream), so only the error against float32 is compared: measured 1.68 vs
  1.70 of the distance (bound: within 20%).
* 8-bit and 4-bit states vs torchao 0.18's AdamW8bit/AdamW4bit: the same blocks and maps (bitwise, see
  ``test_codecs``); torchao's step rounds a few float32 operations otherwise (``lerp`` of ``g**2``, bias
  corrections), which now and then moves a value across a code boundary: mean difference measured 1e-4 of the
  distance moved (bound 1e-3), error against float32 equal to torchao's within 1%.
"""

from __future__ import annotations

import pytest
import torch

import distopt

torch.manual_seed(0)
START = torch.randn(32, 512).bfloat16().float()  # representable in bfloat16: every run starts from the same point
STEPS = 60
SMALL = dict(lr=2e-4, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6)
ADAM = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)


def _run(make, dtype, steps=STEPS):
    p = torch.nn.Parameter(START.clone().to(dtype))
    opt = make([p])
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        p.grad = (torch.randn(START.shape, generator=gen) * 0.1).to(dtype)
        opt.step()
    return p, opt


def _reference(hp):
    p, _ = _run(lambda ps: distopt.AdamW(ps, compile=False, **hp), torch.float32)
    return p.detach(), (p - START).abs().mean().item()


def test_kahan_summation_against_optimi():
    optimi = pytest.importorskip("optimi")
    ref, moved = _reference(SMALL)
    theirs, _ = _run(lambda ps: optimi.AdamW(ps, kahan_sum=True, **SMALL), torch.bfloat16)
    mine, opt = _run(lambda ps: distopt.AdamW(ps, compile=False, **SMALL), torch.bfloat16)  # on by default
    plain, _ = _run(lambda ps: distopt.AdamW(ps, compile=False, kahan_sum=False, **SMALL), torch.bfloat16)
    assert opt.state[mine]["kahan_comp"].dtype == torch.bfloat16
    assert (mine.float() - theirs.float()).abs().mean() / moved < 0.02
    pair = mine.float() + opt.state[mine]["kahan_comp"].float()
    assert (pair - ref).abs().mean() / moved < 0.02
    assert (plain.float() - ref).abs().mean() / moved > 0.5


def test_stochastic_rounding_against_adv_optm():
    adv_optm = pytest.importorskip("adv_optm")
    ref, moved = _reference(SMALL)
    theirs, _ = _run(lambda ps: adv_optm.AdamW_adv(ps, stochastic_rounding=True, **SMALL), torch.bfloat16)
    mine, _ = _run(lambda ps: distopt.AdamW(ps, compile=False, stochastic_rounding=True, **SMALL), torch.bfloat16)
    theirs_error = (theirs.float() - ref).abs().mean() / moved
    mine_error = (mine.float() - ref).abs().mean() / moved
    assert abs(mine_error / theirs_error - 1) < 0.2, (mine_error, theirs_error)


@pytest.mark.parametrize("bits", [8, 4])
def test_block_quantized_states_against_torchao(bits):
    optim = pytest.importorskip("torchao.optim")
    ref, moved = _reference(ADAM)
    cls = optim.AdamW8bit if bits == 8 else optim.AdamW4bit
    theirs, _ = _run(lambda ps: cls(ps, **ADAM), torch.float32)
    mine, opt = _run(lambda ps: distopt.AdamW(ps, compile=False, state_precision=f"int{bits}", **ADAM),
                     torch.float32)
    assert opt.state[mine]["exp_avg"].dtype == torch.uint8
    assert (mine - theirs).abs().mean() / moved < 1e-3
    mine_error, theirs_error = ((x - ref).abs().mean() / moved for x in (mine, theirs))
    assert abs(mine_error / theirs_error - 1) < 0.01


FACTORED_HP = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
FACTORED_START = torch.randn(48, 96, generator=torch.Generator().manual_seed(5))


def _factored_run(make):
    """20 steps from ``FACTORED_START``: (the parameter, its state)."""
    p = torch.nn.Parameter(FACTORED_START.clone())
    opt = make([p])
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        p.grad = torch.randn(FACTORED_START.shape, generator=gen)
        opt.step()
    return p.detach(), opt.state[p]


def test_factored_states_against_adv_optm():
    """adv_optm 2.5.16's ``state_precision="factored"`` (rank-1 factors over its 2-D view of the flattened tensor,
    one sign bit per element of the first moment): the same factors; the sums run in another order (measured
    5.5e-5 of the distance moved at most, bound 1e-3)."""
    adv_optm = pytest.importorskip("adv_optm")
    hp, start = FACTORED_HP, FACTORED_START
    ref, _ = _factored_run(lambda ps: distopt.AdamW(ps, compile=False, **hp))
    theirs, their_state = _factored_run(lambda ps: adv_optm.AdamW_adv(ps, state_precision="factored", **hp))
    mine, state = _factored_run(lambda ps: distopt.AdamW(ps, compile=False, state_precision="factored", **hp))
    moved = (ref - start).abs().mean()
    assert (mine - theirs).abs().max() < 1e-3 * moved
    assert (ref - theirs).abs().mean() > 0.1 * moved  # the factorization is lossy: the comparison can fail
    assert state["exp_avg::row"].shape == their_state["mu_m_nmf"].shape == (72,)
    assert torch.allclose(state["exp_avg_sq::row"], their_state["mu_v_nmf"], rtol=1e-4)


def test_factored_second_moment_against_adv_optm():
    """adv_optm 2.5.16's ``factored_2nd=True``: the first moment kept dense (float32 here, its "auto" on float32
    parameters), the second factored. Measured: at most 2.7e-5 of the distance moved apart (bound 1e-3); off the
    float32 run by 0.17 of the distance moved in mean, where ``state_precision="factored"`` (both moments) is
    0.56 off (bound: at least twice)."""
    adv_optm = pytest.importorskip("adv_optm")
    hp, start = FACTORED_HP, FACTORED_START
    ref, _ = _factored_run(lambda ps: distopt.AdamW(ps, compile=False, **hp))
    theirs, their_state = _factored_run(lambda ps: adv_optm.AdamW_adv(ps, factored_2nd=True, **hp))
    mine, state = _factored_run(lambda ps: distopt.AdamW(ps, compile=False, factored_2nd=True, **hp))
    both, _ = _factored_run(lambda ps: distopt.AdamW(ps, compile=False, state_precision="factored", **hp))
    moved = (ref - start).abs().mean()
    assert (mine - theirs).abs().max() < 1e-3 * moved
    assert state["exp_avg"].dtype == torch.float32 and "exp_avg_sq" not in state
    assert torch.allclose(state["exp_avg_sq::row"], their_state["mu_v_nmf"], rtol=1e-4)
    assert (mine - ref).abs().mean() > 0.01 * moved  # the factored second moment is lossy: the comparison can fail
    assert (both - ref).abs().mean() > 2 * (mine - ref).abs().mean()


@pytest.mark.parametrize("settings,bytes_per_state", [
    ({"state_precision": "int8"}, 1 + 4 / 256), ({"state_precision": "int4"}, 0.5 + 4 / 128),
    ({"state_precision": "int8_sr"}, 1 + 4 / 512), ({"ecc": "bf16+8"}, 3), ({"ecc": "fp16+16"}, 4),
    ({"storage_dtype": "bfloat16"}, 2), ({"state_precision": "bf16_sr"}, 2),
    # factored: m's sign bits (1/8 B) and both states' factors over the (128, 128) view: 4 (128 + 128) B each
    ({"state_precision": "factored"}, (1 / 8 + 2 * 4 * 256 / (32 * 512)) / 2)])
def test_state_bytes_per_parameter(settings, bytes_per_state):
    """Rows of 512: one scale per block (int8_sr's 2048-element blocks become one per row of 512)."""
    p, opt = _run(lambda ps: distopt.AdamW(ps, compile=False, **settings, **ADAM), torch.float32, steps=1)
    stored = sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if v.dim() > 0)
    assert stored / p.numel() == pytest.approx(2 * bytes_per_state)


def test_every_elementwise_algorithm_takes_compact_states():
    for name in ("adamw", "nadam", "rmsprop", "lion", "laprop", "adopt", "ademamix", "radam", "adamax", "adagrad",
                 "adadelta", "sgd"):
        hp = {"momentum": 0.9} if name == "sgd" else {}
        for settings in ({"state_precision": "int8"}, {"ecc": "bf16+8"}):
            plain, _ = _run(lambda ps: distopt.DistributedOptimizer(ps, name, compile=False, lr=1e-3, **hp),
                            torch.float32, steps=5)
            compact, _ = _run(lambda ps: distopt.DistributedOptimizer(ps, name, compile=False, lr=1e-3, **hp,
                                                                      **settings), torch.float32, steps=5)
            moved = (plain - START).abs().mean()
            assert moved > 0 and (compact - plain).abs().mean() < 0.05 * moved, (name, settings)


@pytest.mark.parametrize("kwargs,dtype,match", [
    ({"kahan_sum": True}, torch.float32, "kahan_sum=True cannot apply to a torch.float32 parameter"),
    ({"stochastic_rounding": True}, torch.float32, "stochastic_rounding=True cannot apply"),
    ({"param_ecc": "bf16+8"}, torch.float32, "param_ecc='bf16\\+8' needs torch.bfloat16 parameters"),
    ({"state_precision": "int3"}, torch.float32, "invalid state_precision='int3'"),
    ({"ecc": "bf16+4"}, torch.float32, "invalid ecc='bf16\\+4'"),
    ({"ecc": "bf16+8", "state_precision": "int8"}, torch.float32, "both choose how states are stored"),
    ({"stochastic_rounding": True, "kahan_sum": True}, torch.bfloat16, "both choose how parameters are written"),
    ({"state_block_size": 256}, torch.float32, "state_block_size=256 needs state_precision"),
    ({"state_precision": "int8", "state_block_size": 7}, torch.float32, "invalid state_block_size=7"),
    ({"state_precision": "int8"}, torch.complex64, "complex"),
])
def test_bad_settings_are_refused_by_name(kwargs, dtype, match):
    p = torch.nn.Parameter(torch.zeros(4, 4, dtype=dtype))
    with pytest.raises(ValueError, match=match) as error:
        distopt.DistributedOptimizer([("layer.weight", p)], "adamw", **kwargs)
    if "cannot apply" in match or "complex" in match or "needs torch" in match:
        assert "'layer.weight'" in str(error.value)


def test_matrices_on_owners_take_the_writes_and_compact_shard_states():
    """Muon's matrices run on an owner; their momentum and their write stay on the shards, and take the settings:
    with Kahan summation (the default for bfloat16) the bfloat16 run tracks the float32 one far closer than plain
    bfloat16, whose small updates are lost; an 8-bit momentum stays near the float32 run."""
    hp = dict(lr=2e-3, weight_decay=0.0, owner_dtype="float32")
    ref, _ = _run(lambda ps: distopt.Muon(ps, compile=False, **hp), torch.float32)
    moved = (ref - START).abs().mean()
    kahan, opt = _run(lambda ps: distopt.Muon(ps, compile=False, **hp), torch.bfloat16)
    plain, _ = _run(lambda ps: distopt.Muon(ps, compile=False, kahan_sum=False, **hp), torch.bfloat16)
    pair = kahan.float() + opt.state[kahan]["kahan_comp"].float()
    assert (pair - ref).abs().mean() < 0.05 * moved < (plain.float() - ref).abs().mean()
    quantized, opt8 = _run(lambda ps: distopt.Muon(ps, compile=False, state_precision="int8", **hp), torch.float32)
    assert opt8.state[quantized]["momentum_buffer"].dtype == torch.uint8
    assert (quantized - ref).abs().mean() < 0.05 * moved


def test_conversion_between_storage_modes_through_load_state_dict():
    p, opt = _run(lambda ps: distopt.AdamW(ps, compile=False, **ADAM), torch.float32, steps=5)
    for settings in ({"state_precision": "int8"}, {"ecc": "bf16+8"}, {"state_precision": "int4"}):
        q = torch.nn.Parameter(p.detach().clone())
        compact = distopt.AdamW([q], compile=False, **settings, **ADAM)
        compact.load_state_dict(opt.state_dict())
        assert compact.param_groups[0][next(iter(settings))] == next(iter(settings.values()))
        back = distopt.AdamW([torch.nn.Parameter(p.detach().clone())], compile=False, **ADAM)
        back.load_state_dict(compact.state_dict())
        restored = next(iter(back.state.values()))
        for key in ("exp_avg", "exp_avg_sq"):
            original = opt.state[p][key]
            tolerance = 0.12 if settings.get("state_precision") == "int4" else 0.01
            assert restored[key].dtype == torch.float32
            assert (restored[key] - original).abs().max() <= tolerance * original.abs().max(), (settings, key)


def test_conversion_to_and_from_factored_states():
    """float32 states loaded into factored ones hold the row and column sums of ``|x|`` over adv_optm's 2-D view
    (here (128, 128); computed here by hand) and the signs of the signed state; loaded back into float32 states,
    they decode to the rank-1 reconstruction with those signs."""
    from distopt.precision.codecs import pack_signs

    p, opt = _run(lambda ps: distopt.AdamW(ps, compile=False, **ADAM), torch.float32, steps=5)
    q = torch.nn.Parameter(p.detach().clone())
    factored = distopt.AdamW([q], compile=False, state_precision="factored", **ADAM)
    factored.load_state_dict(opt.state_dict())
    state = factored.state[q]
    back = distopt.AdamW([torch.nn.Parameter(p.detach().clone())], compile=False, **ADAM)
    back.load_state_dict(factored.state_dict())
    restored = next(iter(back.state.values()))
    for key in ("exp_avg", "exp_avg_sq"):
        x = opt.state[p][key]
        view = x.abs().reshape(128, 128)
        row, col = view.sum(1), view.sum(0) / view.sum()
        assert torch.allclose(state[f"{key}::row"], row, rtol=1e-5)
        assert torch.allclose(state[f"{key}::col"], col, rtol=1e-5)
        rebuilt = torch.outer(row, col).reshape(x.shape)
        if key == "exp_avg":
            assert torch.equal(state["exp_avg::sign"], pack_signs(x))
            rebuilt = torch.where(x > 0, rebuilt, -rebuilt)
        assert torch.allclose(restored[key], rebuilt, rtol=1e-5, atol=1e-12 * rebuilt.abs().max())
        assert not torch.allclose(restored[key], x, rtol=0.01)  # rank one is lossy: the comparison can fail


def test_schedule_free_swap_goes_through_the_compensation():
    """SFAdamW on bfloat16 parameters with Kahan summation and float32 states: ``eval()`` and ``train()`` swap the
    parameter between ``y`` and ``x`` through its working copy (parameter plus compensation, ``z`` decoded), so
    the pair tracks the float32 run's ``x`` at every evaluation (measured 0.11-0.24% of the distance moved, bound
    1%; the swap in bfloat16 alone failed on the float32 ``z``)."""
    def run(dtype, **settings):
        p = torch.nn.Parameter(START.clone().to(dtype))
        opt = distopt.SFAdamW([p], compile=False, lr=1e-3, **settings)
        gen = torch.Generator().manual_seed(1)
        evaluated = []
        for step in range(40):
            p.grad = (torch.randn(START.shape, generator=gen) * 0.1).to(dtype)
            opt.step()
            if step % 10 == 9:
                opt.eval()
                comp = opt.state[p].get("kahan_comp")
                evaluated.append(p.detach().float() + (comp.float() if comp is not None else 0))
                opt.train()
        return evaluated, p

    reference, ref_param = run(torch.float32)
    mine, param = run(torch.bfloat16, state_precision="fp32")
    moved = (ref_param.detach() - START).abs().mean()
    for x, ref in zip(mine, reference):
        assert (x - ref).abs().mean() < 0.01 * moved
    assert param.dtype == torch.bfloat16


def test_settings_edited_after_states_exist_are_refused_and_nothing_moves():
    """Editing a precision setting in ``param_groups`` would decode float32 states as int8 codes: refused by name
    at the next step, before any parameter moves. Before the first step an edit is checked and taken."""
    p, opt = _run(lambda ps: distopt.AdamW(ps, compile=False, **ADAM), torch.float32, steps=2)
    before = p.detach().clone()
    opt.param_groups[0]["state_precision"] = "int8"
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"param group 0: precision settings changed .*state_precision None -> "
                                         r"'int8'"):
        opt.step()
    assert torch.equal(p, before)
    opt.param_groups[0]["state_precision"] = None  # put back: the step runs again
    opt.step()
    assert not torch.equal(p, before)

    fresh = distopt.AdamW([torch.nn.Parameter(START.clone())], compile=False, **ADAM)
    fresh.param_groups[0]["kahan_sum"] = True  # no state yet: checked now, and refused on float32
    fresh.param_groups[0]["params"][0].grad = torch.ones_like(START)
    with pytest.raises(ValueError, match="kahan_sum"):
        fresh.step()
    fresh.param_groups[0]["kahan_sum"] = None
    fresh.param_groups[0]["state_precision"] = "int8"  # taken: the first step stores int8 states
    fresh.step()
    assert fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.uint8
