"""Every flag on every algorithm of the catalogue: where the algorithm takes it, a few steps run, stay finite and
differ from the same steps without it (the flag acts); where it refuses it, the constructor says which flag and why,
and nothing is built."""

from __future__ import annotations

import pytest
import torch

import distopt
from distopt.algos import resolve
from distopt.transforms.flags import SWITCHES
from tests.same_grads import run_on_random_grads

NAMES = ("adafactor", "adan", "ranger", "stableadamw", "prodigy", "lion", "signsgd", "sinksgd",
         "simplified_ademamix", "adamc", "sfadamw", "hyperballadamw", "sudsadamw", "scion")
VALUES = {"caution": True, "cautious_weight_decay": True, "mars": True, "palm": True, "warmup_steps": 2,
          "gradient_clipping": "l2_clip", "update_clipping": "rmsnorm_clip", "promote": True, "grams": True,
          "orthograd": True, "atan2": True, "kourkoutas_beta": True, "decouple_lr": True}
SETTINGS = {"gradient_clipping": {"gradient_clip_at": 0.1}, "update_clipping": {"update_clip_at": 0.1},
            "decouple_lr": {"max_lr": 0.05}, "mars": {"mars_gamma": 0.5}}  # settings that make the flag act
#: Flags that change nothing on these float64 tensors (promote acts on low-precision ones).
NO_EFFECT_HERE = {"promote"}
HP = {"prodigy": dict(lr=1.0, d0=1e-2), "lion": dict(lr=1e-2), "simplified_ademamix": dict(lr=1e-2)}


def run(name, flags):
    hp = {"lr": 1e-2, "weight_decay": 0.1, **HP.get(name, {})}
    return run_on_random_grads(lambda ps: distopt.DistributedOptimizer(ps, name, **hp, **flags),
                               ((6, 5), (7,), (3, 2, 2)), 4)[1]


@pytest.mark.parametrize("flag", SWITCHES)
@pytest.mark.parametrize("name", NAMES)
def test_flag_acts_or_is_refused_with_its_reason(name, flag):
    algorithm = resolve(name)
    refused = algorithm.refused_flags(dict(algorithm.hyperparameters))
    if flag in refused or (name == "adamc" and flag == "decouple_lr"):
        with pytest.raises(ValueError, match=flag):
            run(name, {flag: VALUES[flag]})
        return
    plain, flagged = run(name, {}), run(name, {flag: VALUES[flag], **SETTINGS.get(flag, {})})
    assert all(torch.isfinite(p).all() for p in flagged)
    differs = any(not torch.equal(a, b) for a, b in zip(plain, flagged))
    assert differs or flag in NO_EFFECT_HERE, f"{flag} changed nothing on {name}"
