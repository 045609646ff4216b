"""The flags against HeavyBall 3.2.1's own code, same gradients, single process.

AdamW, LaProp, NAdam, AdEMAMix and SGD: against HeavyBall's class of the same name with the same flags, run eagerly
in float64 (their cores are the same maths; ADOPT's is not, so it is not compared here).
HeavyBall turns its step scalars (lr, the warmed-up lr, PaLM's beta2, caution's scale) into float32 tensors, so
each step differs by a few float32 units in the scale of the update: the tolerance is
``16 * 2**-24 * steps`` of the distance the parameters moved (measured: about 1e-7 of it). Each test also checks
that the flag changes the result by far more than that tolerance, so a flag that did nothing would fail.

Muon: HeavyBall's Muon has another core (``u = g + m``, its own Newton-Schulz coefficients, stochastic rounding to
bfloat16), so the reference is torch.optim.Muon's own step for the orthogonalized update (run on zeroed shadow
parameters with lr 1, no decay, which yields ``-adjusted u`` exactly) inside HeavyBall's own flag functions:
``mars_correction`` and its clips on the gradient, and ``update_param_`` (caution, cautious weight decay, lr) at the
end. The cores are the same bits, so the only difference is the rounding of the final parameter arithmetic
(HeavyBall: ``p (1 - d lr) - lr u`` in one expression): ``4 * steps`` float32 units of the largest parameter.
"""

from __future__ import annotations

import functools

import pytest
import torch

import distopt
from tests.same_grads import run_on_random_grads, worst

heavyball = pytest.importorskip("heavyball", reason="the test extra heavyball==3.2.1 is required")
heavyball.utils.compile_mode = None  # eager: the compiled kernels round differently, and compile for minutes

SHAPES = ((6, 5), (7,), (4, 4), (3, 1, 2))
STEPS = 6

FLAG_CASES = {
    "caution": dict(caution=True),
    "mars": dict(mars=True),
    "mars_gamma": dict(mars=True, mars_gamma=0.1),
    "palm": dict(palm=True),
    "palm_scale": dict(palm=True, beta2_scale=0.5),
    "warmup": dict(warmup_steps=4),
    "cautious_wd": dict(cautious_weight_decay=True),
    "gradient_l2_clip": dict(gradient_clipping="l2_clip_", gradient_clip_at=0.5),
    "gradient_rmsnorm_clip": dict(gradient_clipping="rmsnorm_clip_", gradient_clip_at=0.3),
    "gradient_trust_region": dict(gradient_clipping="trust_region_clip_"),
    "gradient_global_l2norm": dict(gradient_clipping="global_l2norm_clip", gradient_clip_at=0.7),
    "update_l2_clip": dict(update_clipping="l2_clip_", update_clip_at=0.5),
    "update_global_rmsnorm": dict(update_clipping="global_rmsnorm_clip", update_clip_at=0.5),
    "update_clip_then_caution": dict(update_clipping="rmsnorm_clip_", update_clip_at=0.3, caution=True),
    "everything": dict(caution=True, mars=True, palm=True, warmup_steps=2, cautious_weight_decay=True,
                       gradient_clipping="l2_clip_", gradient_clip_at=2.0, update_clipping="l2_clip_",
                       update_clip_at=1.0),
}


def heavyball_flags(flags: dict) -> dict:
    """HeavyBall takes a clip as a function; its thresholds by ``functools.partial``."""
    out = {k: v for k, v in flags.items() if not k.endswith("_clip_at")}
    for where in ("gradient", "update"):
        name = flags.get(f"{where}_clipping")
        if name is not None:
            fn = getattr(heavyball.utils, name)
            at = flags.get(f"{where}_clip_at")
            out[f"{where}_clipping"] = functools.partial(fn, clip_at=at) if at is not None else fn
    return out


def run(make, steps=STEPS, dtype=torch.float64):
    return run_on_random_grads(make, SHAPES, steps, dtype)[:2]


#: distopt algorithm -> (HeavyBall class, distopt hyperparameters, HeavyBall's, cases HeavyBall or distopt lacks).
#: eps: HeavyBall's is a floor, max(sqrt(v), eps), distopt's (torch's) is added; at 1e-30 they agree. HeavyBall's
#: LaProp ignores eps (a fixed floor of 1e-8 that these gradients never reach); distopt's runs with eps 0.
#: HeavyBall's SGD decays decoupled and distopt's (torch's) as L2: they are compared without decay.
ALGORITHMS = {
    "adamw": ("AdamW", dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-30), {}, ()),
    "laprop": ("LaProp", dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, eps=0.0), dict(eps=1e-8), ()),
    "nadam": ("NAdam", dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-30, decoupled_weight_decay=True),
              {}, ()),
    "ademamix": ("AdEMAMix", dict(lr=0.01, betas=(0.9, 0.99, 0.999), weight_decay=0.1, eps=1e-30), {},
                 ("palm", "palm_scale", "everything")),
    "sgd": ("SGD", dict(lr=0.01, momentum=0.9), dict(beta=0.9, momentum=None),
            ("palm", "palm_scale", "cautious_wd", "everything")),
}
PAIRS = [(algo, name) for algo, (_, _, _, skip) in ALGORITHMS.items() for name in FLAG_CASES if name not in skip]


@pytest.mark.parametrize("algo,name", PAIRS, ids=[f"{a}-{n}" for a, n in PAIRS])
def test_flag_equals_heavyball(algo, name):
    flags = FLAG_CASES[name]
    cls, hp, theirs_hp, _ = ALGORITHMS[algo]
    their_kwargs = {k: v for k, v in {**hp, **theirs_hp}.items() if v is not None and k not in (
        "decoupled_weight_decay", "momentum")}
    if algo == "nadam":
        their_kwargs["decoupled_weight_decay"] = True
    start, ours = run(lambda ps: distopt.DistributedOptimizer(ps, algo, **hp, **flags))
    _, theirs = run(lambda ps: getattr(heavyball, cls)(ps, **their_kwargs, **heavyball_flags(flags)))
    _, plain = run(lambda ps: distopt.DistributedOptimizer(ps, algo, **hp))
    moved = worst(ours, start)
    tolerance = 16 * 2**-24 * STEPS * moved
    assert worst(ours, theirs) <= tolerance, (worst(ours, theirs), tolerance)
    assert worst(ours, plain) > 20 * tolerance, "the flag changed nothing measurable"


def test_heavyball_without_flags_is_the_same_algorithm():
    """The frame of the comparison: with no flag on, HeavyBall's AdamW and distopt's agree to the same tolerance."""
    hp = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    start, ours = run(lambda ps: distopt.DistributedOptimizer(ps, "adamw", **hp, eps=1e-30))
    _, theirs = run(lambda ps: heavyball.AdamW(ps, **hp, eps=1e-30))
    assert worst(ours, theirs) <= 16 * 2**-24 * STEPS * worst(ours, start)


# ------------------------------------------------------------------------------------------------------------------
# Muon: torch.optim.Muon's core inside HeavyBall's flag functions.

MUON_SHAPES = ((8, 6), (6, 8), (5, 5))


class MuonWithHeavyBallFlags:
    """The reference loop: HeavyBall's MARS and clip on the gradient, torch.optim.Muon's orthogonalized update, and
    HeavyBall's ``update_param_`` for caution, cautious weight decay, warm-up and lr."""

    def __init__(self, params, lr, weight_decay, momentum, flags):
        self.params, self.lr, self.wd, self.momentum, self.flags = params, lr, weight_decay, momentum, flags
        self.shadows = [torch.zeros_like(p) for p in params]
        self.core = torch.optim.Muon(self.shadows, lr=1.0, weight_decay=0.0, momentum=momentum)
        self.prev = [torch.zeros_like(p) for p in params]
        self.step_count = 0

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        grads = []
        for p, prev in zip(self.params, self.prev):
            g = p.grad.clone()
            if self.flags.get("mars"):
                heavyball.utils.mars_correction([g], [prev], self.flags.get("mars_gamma", 0.0025), self.momentum)
            if self.flags.get("gradient_clipping"):
                heavyball_flags(self.flags)["gradient_clipping"]([g])
            grads.append(g)
        for shadow, g in zip(self.shadows, grads):
            shadow.zero_()
            shadow.grad = g.clone()
        self.core.step()
        updates = [-s for s in self.shadows]
        warmup = self.flags.get("warmup_steps", 0)
        lr = self.lr * self.step_count / max(self.step_count, warmup + 1)
        heavyball.utils.update_param_(self.params, updates, lr, self.wd, caution=self.flags.get("caution", False),
                                      cautious_decay=self.flags.get("cautious_weight_decay", False), grad=grads)


MUON_CASES = {
    "caution": dict(caution=True),
    "mars": dict(mars=True, mars_gamma=0.05),
    "warmup": dict(warmup_steps=3),
    "cautious_wd": dict(cautious_weight_decay=True),
    "gradient_l2_clip": dict(gradient_clipping="l2_clip_", gradient_clip_at=0.5),
    "all": dict(caution=True, mars=True, warmup_steps=2, cautious_weight_decay=True,
                gradient_clipping="rmsnorm_clip_", gradient_clip_at=0.5),
}


@pytest.mark.parametrize("name", MUON_CASES)
def test_muon_flags_equal_heavyball_flags_around_torch_muon(name):
    flags = MUON_CASES[name]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95)

    def train(make):
        torch.manual_seed(0)
        params = [torch.randn(s, requires_grad=True) for s in MUON_SHAPES]
        opt = make(params)
        gen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params]

    ours = train(lambda ps: distopt.DistributedOptimizer(ps, "muon", compile=False, **kw, **flags))
    theirs = train(lambda ps: MuonWithHeavyBallFlags(ps, flags=flags, **kw))
    plain = train(lambda ps: distopt.DistributedOptimizer(ps, "muon", compile=False, **kw))
    scale = max(p.abs().max().item() for p in ours)
    tolerance = 4 * STEPS * torch.finfo(torch.float32).eps * scale
    assert worst(ours, theirs) <= tolerance, (worst(ours, theirs), tolerance)
    assert worst(ours, plain) > 100 * tolerance
