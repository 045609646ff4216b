"""Chains: HeavyBall's MuonLaProp, OrthoLaProp, LaPropOrtho, SignLaProp and UnscaledAdamW as chains of the same
parts, against HeavyBall 3.2.1's own classes; and the public API for custom chains (a user's transform beside built-in ones, state dicts,
errors).

Against HeavyBall the runs are float64 (HeavyBall orthogonalizes float64 input in float64, without its stochastic
rounding to bfloat16; distopt's owners then run float64 too): the difference is HeavyBall's float32 step scalars,
``32 * 2**-24 * steps`` of the distance moved (measured: at most 4e-6 of it, for OrthoLaProp).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import distopt
from distopt.transforms import Transform, TensorStep
from distopt.transforms.cores import NesterovMomentum, Orthogonalize, ScaleByAdam, ScaleByLaProp
from distopt.transforms.custom import Chain
from distopt.transforms.parts import Caution
from tests.same_grads import run_on_random_grads, worst

heavyball = pytest.importorskip("heavyball", reason="the test extra heavyball==3.2.1 is required")
heavyball.utils.compile_mode = None

SHAPES = ((6, 5), (7,), (4, 4), (3, 1, 2))
STEPS = 6


def run(make, steps=STEPS, dtype=torch.float64, seed=1):
    return run_on_random_grads(make, SHAPES, steps, dtype, seed)


CHAINS = {"muonlaprop": "MuonLaProp", "muonadamw": "MuonAdamW", "ortholaprop": "OrthoLaProp", "laproportho": "LaPropOrtho",
          "signlaprop": "SignLaProp", "unscaledadamw": "UnscaledAdamW"}
FLAGS = {"none": {}, "caution": dict(caution=True), "mars_update_clip": dict(mars=True, update_clipping="l2_clip_"),
         "palm_warmup": dict(palm=True, warmup_steps=3)}


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("name", CHAINS)
def test_heavyball_chains_equal_heavyball(name, flags):
    hp = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    ours_flags = {k: (v.rstrip("_") if isinstance(v, str) else v) for k, v in FLAGS[flags].items()}
    their_flags = {k: (getattr(heavyball.utils, v) if isinstance(v, str) else v) for k, v in FLAGS[flags].items()}
    extra = dict(owner_dtype="float64") if name.startswith("muon") else {}
    start, ours, opt = run(lambda ps: distopt.DistributedOptimizer(ps, name, **hp, **extra, **ours_flags))
    _, theirs, _ = run(lambda ps: getattr(heavyball, CHAINS[name])(ps, **hp, **their_flags))
    tolerance = 32 * 2**-24 * STEPS * worst(ours, start)
    assert worst(ours, theirs) <= tolerance, (worst(ours, theirs), tolerance)
    if name.startswith("muon"):  # matrices go to the owner route, vectors skip the orthogonalization
        assert [spec.meta.shape for spec in opt.plan.matrices] == [(6, 5), (4, 4), (3, 1, 2)]


def test_the_three_orders_differ():
    """The same parts in three orders are three optimizers: a chain that ignored its order would fail here."""
    results = {name: run(lambda ps: distopt.DistributedOptimizer(
        ps, name, **(dict(owner_dtype="float64") if name.startswith("muon") else {})))[1] for name in CHAINS}
    plain = run(lambda ps: distopt.DistributedOptimizer(ps, "laprop", lr=0.0025, betas=(0.9, 0.99), eps=0.0))[1]
    names = list(results)
    for i, a in enumerate(names):
        assert worst(results[a], plain) > 1e-4
        for b in names[i + 1:]:
            assert worst(results[a], results[b]) > 1e-4, (a, b)


# ------------------------------------------------------------------------------------------------------------------
# The public API


class SignOfUpdate(Transform):
    """A user's transform: the sign of the running update, scaled (signSGD-like), with a counter of its own."""

    name = "sign_of_update"
    hyperparameters = {"sign_scale": 1.0}
    state_keys = ("sign_calls",)
    scalar_state = ("sign_calls",)

    def init(self, param: Tensor, hp) -> dict[str, Tensor]:
        return {"sign_calls": torch.tensor(0.0)}

    def update(self, t: TensorStep, totals) -> Tensor:
        t.state["sign_calls"] += 1
        return t.u.sign() * t.hp["sign_scale"]


def signed_adam() -> Chain:
    return Chain("signed_adam", [ScaleByAdam(), SignOfUpdate(), Caution()], {"lr": 0.01, "sign_scale": 0.5})


def reference_signed_adam(start, grads, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, scale=0.5):
    """The same maths written out: Adam's direction, its sign, HeavyBall's caution, the decoupled step."""
    b1, b2 = betas
    p, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = ((m / (1 - b1**t)) / (v / (1 - b2**t)).sqrt().clamp(min=eps)).sign() * scale
        mask = torch.signbit(g) ^ torch.signbit(u)
        u = u.masked_fill(mask, 0) * (u.numel() / max(u.numel() - int(mask.sum()), 1))
        p = p * (1 - lr * weight_decay) - lr * u
    return p


def test_a_custom_chain_runs_checkpoints_and_matches_its_maths():
    start, ours, opt = run(lambda ps: distopt.DistributedOptimizer(ps, signed_adam(), weight_decay=0.1))
    gen = torch.Generator().manual_seed(1)
    grads = [[] for _ in SHAPES]
    for _ in range(STEPS):
        for i, s in enumerate(SHAPES):
            grads[i].append(torch.randn(s, generator=gen, dtype=torch.float64))
    for p0, g, p in zip(start, grads, ours):
        assert torch.allclose(p, reference_signed_adam(p0, g, weight_decay=0.1), rtol=0, atol=1e-12)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "sign_calls", "step"] and state["sign_calls"].item() == STEPS
    # A checkpoint round trip continues exactly.
    saved = opt.state_dict()
    assert saved["param_groups"][0]["algorithm"] == "signed_adam"
    copies = [torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    resumed = distopt.DistributedOptimizer(copies, signed_adam(), weight_decay=0.1)
    resumed.load_state_dict(saved)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p, q in zip(opt.param_groups[0]["params"], copies):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        resumed.step()
    for p, q in zip(opt.param_groups[0]["params"], copies):
        assert torch.equal(p, q)


def test_chain_errors_name_the_problem():
    with pytest.raises(ValueError, match="both keep state 'exp_avg'"):
        Chain("twice", [ScaleByAdam(), ScaleByLaProp()])
    with pytest.raises(ValueError, match="must be consecutive"):
        Chain("two_owner_sections", [Orthogonalize(), ScaleByAdam(), Orthogonalize()])
    with pytest.raises(TypeError, match="holds Transform objects"):
        Chain("not_a_transform", [ScaleByAdam(), "caution"])
    with pytest.raises(ValueError, match="has no transforms"):
        Chain("empty", [])
    params = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="two different algorithms share the name 'signed_adam'"):
        distopt.DistributedOptimizer([{"params": [params[0]], "algorithm": signed_adam()},
                                      {"params": [params[1]], "algorithm": Chain("signed_adam", [ScaleByAdam()])}])
    with pytest.raises(ValueError, match="invalid ns_coefficients"):
        distopt.DistributedOptimizer(params, Chain("muonish", [NesterovMomentum(), Orthogonalize()]),
                                     ns_coefficients=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"grams=True cannot apply to any param group: param group 0 \(muonlaprop\): "
                                         r".*orthogonalized"):
        distopt.DistributedOptimizer(params, "muonlaprop", grams=True)
