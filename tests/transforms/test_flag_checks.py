"""Flags as param-group keys: refused where their maths cannot apply (with the reason), checked values, nothing
half-built, state that appears only with its flag, and state dicts that stay torch.optim's."""

from __future__ import annotations

import pytest
import torch

import distopt
from distopt.transforms import flags


def params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


REFUSED = [
    ("sgd", dict(lr=0.1), "atan2", "no division by an eps-regularized second moment"),
    ("sgd", dict(lr=0.1), "palm", "no bias-corrected second moment"),
    ("sgd", dict(lr=0.1), "cautious_weight_decay", "L2"),
    ("adam", {}, "decouple_lr", "L2"),
    ("lion", {}, "grams", "already a sign"),
    ("lion", {}, "kourkoutas_beta", "no bias-corrected second moment"),
    ("rmsprop", {}, "palm", "no bias-corrected second moment"),
    ("adopt", {}, "palm", "not bias-corrected"),
    ("nadam", {}, "atan2", "two terms"),
    ("ademamix", {}, "atan2", "two-EMA"),
    ("adamw", dict(fused=True), "caution", "fused=True"),
    ("sgd", dict(lr=0.1, fused=True), "mars", "fused=True"),
    ("muon", {}, "grams", "orthogonalized"),
    ("muon", {}, "atan2", "no division"),
    ("soap", {}, "palm", "eigenbasis on the owner"),
    ("soap", {}, "grams", "preconditioned"),
    ("psgdkron", {}, "kourkoutas_beta", "no bias-corrected second moment"),
    ("muonlaprop", {}, "grams", "orthogonalized"),
    ("ortholaprop", {}, "atan2", "no eps division of its own"),
]


@pytest.mark.parametrize("algo,hp,flag,reason", REFUSED, ids=[f"{a}-{f}" for a, _, f, _ in REFUSED])
def test_a_flag_that_cannot_apply_is_refused_with_its_reason(algo, hp, flag, reason):
    ps = [p for p in params() if p.ndim == 2] if algo == "muon" else params()
    with pytest.raises(ValueError, match=rf"param group 0: {algo}: flag {flag}=True cannot apply: .*{reason}"):
        distopt.DistributedOptimizer([{"params": ps, flag: True}], algo, **hp)
    # Given to the optimizer, a flag goes to the groups that can take it; where none can, the error says why.
    with pytest.raises(ValueError, match=rf"flag {flag}=True cannot apply to any param group: param group 0 "
                                         rf"\({algo}\): .*{reason}"):
        distopt.DistributedOptimizer(ps, algo, **hp, **{flag: True})


@pytest.mark.parametrize("flag,value,message", [
    ("caution", 1, "must be a bool"),
    ("gradient_clipping", "l3_clip", "invalid gradient_clipping='l3_clip'"),
    ("update_clip_at", -1.0, "invalid update_clip_at=-1.0"),
    ("mars_gamma", 1.0, "invalid mars_gamma=1.0"),
    ("warmup_steps", 2.5, "invalid warmup_steps=2.5"),
    ("beta2_scale", 0, "invalid beta2_scale=0"),
    ("max_lr", float("nan"), "must be a number"),
    ("ema_alpha", 1.5, "invalid ema_alpha=1.5"),
])
def test_invalid_flag_values_name_the_flag_the_value_and_the_group(flag, value, message):
    with pytest.raises(ValueError, match=rf"param group 0: adamw: .*{message}"):
        distopt.AdamW(params(), **{flag: value})


def test_unknown_flags_are_a_type_error():
    with pytest.raises(TypeError, match="unexpected hyperparameter.*'cautoin'"):
        distopt.AdamW(params(), cautoin=True)


def test_kourkoutas_needs_betas2_above_beta2_min_and_excludes_palm():
    with pytest.raises(ValueError, match="betas\\[1\\] > beta2_min"):
        distopt.AdamW(params(), betas=(0.9, 0.85), kourkoutas_beta=True)
    with pytest.raises(ValueError, match="choose one"):
        distopt.AdamW(params(), kourkoutas_beta=True, palm=True)


def test_a_refused_group_added_later_changes_nothing():
    a, b = params()
    opt = distopt.DistributedOptimizer([a], "adamw", caution=True)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="param group 1: sgd: flag caution"):
        opt.add_param_group({"params": [b], "algorithm": "sgd", "lr": 0.1, "fused": True, "caution": True})
    assert [dict(g) for g in opt.param_groups] == before
    # The optimizer-wide default reaches every group whose algorithm takes it, and only those.
    opt.add_param_group({"params": [b], "algorithm": "sgd", "lr": 0.1, "fused": True})
    assert "caution" not in opt.param_groups[1]


def test_flags_live_in_param_groups_only_where_given():
    opt = distopt.AdamW(params(), mars=True)
    assert opt.param_groups[0]["mars"] is True and "caution" not in opt.param_groups[0]
    plain = distopt.AdamW(params())
    assert not set(flags.FLAGS) & set(plain.param_groups[0])


def test_decouple_lr_takes_max_lr_from_the_group():
    a, b = params()
    opt = distopt.DistributedOptimizer([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01, "max_lr": 0.05}],
                                       "adamw", decouple_lr=True)
    assert opt.param_groups[0]["max_lr"] == 0.1 and opt.param_groups[1]["max_lr"] == 0.05


def train(opt, ps, steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_flag_state_is_saved_and_resumes_exactly():
    """MARS's previous gradient and Kourkoutas-β's running norms are state: a save/load continues bitwise."""
    hp = dict(mars=True, kourkoutas_beta=True, caution=True)
    ps = params()
    opt = distopt.AdamW(ps, **hp)
    train(opt, ps)
    assert {"mars_prev_grad", "kourkoutas_r_ema", "kourkoutas_sum_sq"} <= set(opt.state[ps[0]])
    saved = opt.state_dict()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = distopt.AdamW(copies)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["mars"] is True  # the flags travel with the param group
    train(opt, ps, seed=2)
    train(resumed, copies, seed=2)
    for p, q in zip(ps, copies):
        assert torch.equal(p, q)


def test_a_flag_switched_on_later_starts_its_state_fresh():
    """A torch.optim.AdamW state dict loads into distopt.AdamW with flags (they stay on; their state starts as at
    their first step), and a flag switched on between steps is the same as one switched on at that resume."""
    hp = dict(mars=True, kourkoutas_beta=True)
    reference = params()
    torch_opt = torch.optim.AdamW(reference)
    train(torch_opt, reference)
    loaded_params = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    loaded = distopt.AdamW(loaded_params, **hp)
    loaded.load_state_dict(torch_opt.state_dict())
    assert loaded.param_groups[0]["mars"] is True
    switched_params = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    switched = distopt.AdamW(switched_params)
    switched.load_state_dict(torch_opt.state_dict())
    switched.param_groups[0].update(hp)
    train(loaded, loaded_params, seed=2)
    train(switched, switched_params, seed=2)
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    plain = distopt.AdamW(plain_params)
    plain.load_state_dict(torch_opt.state_dict())
    train(plain, plain_params, seed=2)
    for p, q, r in zip(loaded_params, switched_params, plain_params):
        assert torch.equal(p, q)
        assert not torch.equal(p, r)


def test_a_flagged_state_dict_loads_into_torch_optim():
    """torch.optim.AdamW ignores the extra state entries; its own continue as they would."""
    ps = params()
    opt = distopt.AdamW(ps, caution=True, mars=True)
    train(opt, ps)
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps])
    torch_opt.load_state_dict(opt.state_dict())
    assert torch.equal(torch_opt.state[torch_opt.param_groups[0]["params"][0]]["exp_avg"], opt.state[ps[0]]["exp_avg"])


def test_promote_computes_in_float32_and_keeps_bfloat16_storage():
    """``promote``: the chain runs on float32 copies (gradient, update, state) of bfloat16 tensors and writes the
    results back in bfloat16; without it the update stays in bfloat16."""
    from distopt.transforms import Transform
    from distopt.transforms.cores import ScaleByAdam
    from distopt.transforms.custom import Chain

    seen = []

    class Record(Transform):
        name = "record"

        def update(self, t, totals):
            seen.append(t.u.dtype)
            return None

    for promote in (True, False):
        seen.clear()
        p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
        opt = distopt.DistributedOptimizer([p], Chain("recorded", [Record(), ScaleByAdam(), Record()]),
                                           promote=promote, kahan_sum=False)
        p.grad = torch.randn(4, 3, dtype=torch.bfloat16)
        opt.step()
        assert seen == [torch.float32 if promote else torch.bfloat16] * 2
        assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.bfloat16
    # The same on a built-in algorithm: one step of distopt.AdamW with promote equals torch.optim.AdamW run in
    # float32 on the float32 values, rounded once to bfloat16 (the lr step is above bfloat16's resolution here).
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    grad = torch.randn(64, dtype=torch.bfloat16)
    reference = torch.nn.Parameter(p.detach().float())
    reference.grad = grad.float()
    torch.optim.AdamW([reference], lr=0.05).step()
    p.grad = grad
    distopt.AdamW([p], lr=0.05, promote=True).step()
    assert torch.equal(p.detach(), reference.detach().to(torch.bfloat16))


def test_flags_edited_into_param_groups_are_checked_at_the_next_step():
    ps = params()
    opt = distopt.AdamW(ps, fused=True)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.param_groups[0]["caution"] = True
    with pytest.raises(ValueError, match="param group 0: adamw: flag caution=True cannot apply: fused=True"):
        opt.step()
    plain = distopt.AdamW(ps)
    plain.param_groups[0]["decouple_lr"] = True
    plain.step()
    assert plain.param_groups[0]["max_lr"] == plain.param_groups[0]["lr"]


def test_optimizer_wide_flags_reach_the_groups_that_take_them():
    w, b = params()
    opt = distopt.Muon([("w", w), ("b", b)], palm=True)
    assert [(g["algorithm"], g.get("palm")) for g in opt.param_groups] == [("muon", None), ("adamw", True)]
    with pytest.raises(ValueError, match=r"flag caution=True cannot apply to any param group: param group 0 \(adamw\): fused"):
        distopt.AdamW(params(), fused=True, caution=True)


def test_global_clips_are_refused_where_a_group_takes_two_routes():
    with pytest.raises(ValueError, match="soap: gradient_clipping='global_l2norm_clip' cannot apply: .*two routes"):
        distopt.SOAP(params(), gradient_clipping="global_l2norm_clip")
    distopt.SOAP(params(), gradient_clipping="l2_clip")
    distopt.DistributedOptimizer([params()[0]], "muon", update_clipping="global_rmsnorm_clip")


def test_complex_parameters_are_refused_with_flags():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = distopt.AdamW([p], caution=True)
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="do not take complex parameters"):
        opt.step()


def test_tiny_spike_must_be_positive():
    with pytest.raises(ValueError, match="invalid tiny_spike=0.0"):
        distopt.AdamW(params(), kourkoutas_beta=True, tiny_spike=0.0)


def test_an_unstepped_state_dict_with_flag_state_is_initial_and_a_flag_switched_off_loads():
    """An optimizer that has not stepped round-trips to nothing (SGD's first step then seeds its buffer); a state
    dict that still holds the state of a flag switched off since loads, leaving that state behind."""
    a, b = params(), params()
    opt = distopt.SGD(a, lr=0.1, momentum=0.9, dampening=0.5, mars=True)
    saved = opt.state_dict()
    fresh = distopt.SGD(b, lr=0.1, momentum=0.9, dampening=0.5, mars=True)
    fresh.load_state_dict(saved)
    assert not fresh.state
    train(opt, a, steps=2)
    opt.param_groups[0]["mars"] = False
    train(opt, a, steps=1)
    again = distopt.SGD(params(), lr=0.1, momentum=0.9, dampening=0.5)
    again.load_state_dict(opt.state_dict())
    assert "mars_prev_grad" not in again.state[again.param_groups[0]["params"][0]]
